"""Sample grids: fixed captions and fixed noise through the current generator, as PNG and TensorBoard image.

Each grid is labelled: a caption line above each caption's images (Stage-I, then Stage-II at Stage-II) and
the stage at the left; the captions go beside the grids once, as ``samples/captions.json``."""
from __future__ import annotations

import json
import os

import numpy as np
import torch
from PIL import Image

from ..checkpoint.files import check_entry, run_subdir, write_atomic
from ..data.read.reader import read_batches
from .images import labelled_grid, png_bytes, to_uint8


class SampleWriter:
    """Rank 0 only. Row 1: Stage-I images (from the frozen Stage-I G at Stage-II); row 2: Stage-II images."""

    def __init__(self, run_dir: str, info, stage: int, text_dim: int, z_dim: int, cond_dim: int,
                 stage1_cond_dim: int | None, seed: int, device: torch.device, metrics, embed=None):
        """``embed``: the data/device_text.CaptionEmbedder of a dataset whose captions are embedded on the
        device (the grid's captions go through it, as the training batches do); None otherwise."""
        self.dir = os.path.join(run_dir, "samples")
        self.info, self.stage, self.text_dim = info, stage, text_dim
        self.z_dim, self.cond_dim, self.stage1_cond_dim = z_dim, cond_dim, stage1_cond_dim or cond_dim
        self.seed, self.device, self.metrics = seed, device, metrics
        self.embed = embed
        self._fixed = None

    def _inputs(self):
        """Fixed captions (from the test split when given) and fixed noise."""
        if self._fixed is None:
            info = self.info
            if info.num_samples >= 1:  # the split's first samples in file order, their first captions
                b = next(read_batches(info, self.stage, 8, embed=self.embed))
                text, self.captions = b["text"], [c or f"sample {k}" for c, k in zip(b["caption"], b["key"])]
            else:
                text, self.captions = torch.zeros(8, self.text_dim), ["(no caption)"] * 8
            g = torch.Generator().manual_seed(self.seed + 12345)
            n = text.shape[0]
            noise = {"z": torch.randn(n, self.z_dim, generator=g), "eps": torch.zeros(n, self.cond_dim),
                     "eps1": torch.zeros(n, self.stage1_cond_dim)}
            self._fixed = (text.to(self.device), {k: v.to(self.device) for k, v in noise.items()})
        return self._fixed

    @torch.no_grad()
    def write(self, step: int, G: torch.nn.Module, G1: torch.nn.Module | None, autocast) -> str:
        text, noise = self._inputs()
        was = G.training
        G.eval()
        try:
            with autocast:
                if self.stage == 1:
                    img, _, _ = G(text, noise["z"], noise["eps"])
                    rows = [to_uint8(img)]
                else:
                    s0, _, _ = G1(text, noise["z"], noise["eps1"])
                    img, _, _ = G(text, s0, noise["eps"])
                    rows = [to_uint8(s0), to_uint8(img)]
        finally:
            G.train(was)
        size = rows[-1].shape[1]
        # caption-major: each caption's Stage-I (upscaled) and Stage-II images side by side under it
        per_caption = [np.stack([_resized(r[i], size) for r in rows]) for i in range(len(self.captions))]
        label = "Stage-I | II" if self.stage == 2 else "Stage-I"
        grid = labelled_grid(per_caption, self.captions, [label], size=size)
        run_subdir(os.path.dirname(self.dir), "samples")  # a real folder of the run (not a link, not a file)
        cap_file = os.path.join(self.dir, "captions.json")
        if check_entry(cap_file) is None:
            write_atomic(cap_file, json.dumps({"captions": self.captions, "layout": "one caption per line of the "
                         "grid, " + ("its Stage-I image (upscaled) then its Stage-II image" if self.stage == 2
                                     else "its Stage-I image")}, indent=1), "sample captions", fsync=False)
        path = os.path.join(self.dir, f"step_{step:08d}.png")
        write_atomic(path, png_bytes(grid), "sample grid", fsync=False)
        self.metrics.image(step, "samples", grid)
        return path


def _resized(img: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3), nearest (a Stage-I image shown beside its Stage-II one)."""
    if img.shape[0] == size:
        return img
    return np.asarray(Image.fromarray(img).resize((size, size), Image.NEAREST))

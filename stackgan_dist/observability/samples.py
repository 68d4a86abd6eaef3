"""Sample grids: fixed captions and fixed noise through the current generator, as PNG and TensorBoard image."""
from __future__ import annotations

import os

import torch

from ..data.loader import make_loader
from .images import make_grid, save_png, to_uint8


class SampleWriter:
    """Rank 0 only. Row 1: Stage-I images (from the frozen Stage-I G at Stage-II); row 2: Stage-II images."""

    def __init__(self, run_dir: str, info, stage: int, text_dim: int, z_dim: int, cond_dim: int,
                 stage1_cond_dim: int | None, seed: int, device: torch.device, metrics):
        self.dir = os.path.join(run_dir, "samples")
        self.info, self.stage, self.text_dim = info, stage, text_dim
        self.z_dim, self.cond_dim, self.stage1_cond_dim = z_dim, cond_dim, stage1_cond_dim or cond_dim
        self.seed, self.device, self.metrics = seed, device, metrics
        self._fixed = None

    def _inputs(self):
        """Fixed captions (from the test split when given) and fixed noise."""
        if self._fixed is None:
            info = self.info
            ds, _ = make_loader(info, self.stage, 8, 0, num_workers=0, shuffle_buffer=1, train=False) \
                if info.num_samples >= 8 else (None, None)
            text = next(ds.slot_batches(0, 0))["text"] if ds else torch.zeros(8, self.text_dim)
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
        grid = make_grid(rows, size=rows[-1].shape[1])
        path = os.path.join(self.dir, f"step_{step:08d}.png")
        save_png(grid, path)
        self.metrics.image(step, "samples", grid)
        return path

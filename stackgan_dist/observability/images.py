"""Image grids as PNG (PIL only; no torchvision)."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def make_grid(rows: list[np.ndarray], size: int | None = None, pad: int = 2) -> np.ndarray:
    """rows: lists of (N, H, W, 3) uint8 arrays; each row resized to ``size`` -> one HWC image."""
    size = size or max(r.shape[1] for r in rows)
    ncol = max(r.shape[0] for r in rows)
    H = len(rows) * (size + pad) + pad
    W = ncol * (size + pad) + pad
    out = np.full((H, W, 3), 255, np.uint8)
    for i, r in enumerate(rows):
        for j, im in enumerate(r):
            if im.shape[0] != size:
                im = np.asarray(Image.fromarray(im).resize((size, size), Image.NEAREST))
            y, x = pad + i * (size + pad), pad + j * (size + pad)
            out[y:y + size, x:x + size] = im
    return out


def save_png(arr: np.ndarray, path: str) -> None:
    Image.fromarray(arr).save(path)

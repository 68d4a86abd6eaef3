"""Caption consistency for the synthetic dataset: does the image show the colour and shape its caption names?

The classifier is deliberately simple and exact on real data: the background is the median colour of
the image border (shapes never touch it), the foreground is every pixel far from it, its colour the
palette entry nearest to the foreground's median, its shape read from how much of its bounding box
it fills (a square fills it) and how it tapers (an upright triangle's top third is far narrower than its
bottom third; a circle's is not).
"""
from __future__ import annotations

import numpy as np

from ..data.synthetic import CLASSES, COLORS, SHAPES

_PALETTE = np.array(list(COLORS.values()), dtype=np.float32)
_NAMES = list(COLORS)


def classify(img: np.ndarray) -> tuple[str | None, str | None]:
    """img (H, W, 3) uint8 -> (colour name, shape name); None where no foreground is found."""
    a = img.astype(np.float32)
    h, w, _ = a.shape
    b = max(1, h // 32)
    border = np.concatenate([a[:b].reshape(-1, 3), a[-b:].reshape(-1, 3), a[:, :b].reshape(-1, 3),
                             a[:, -b:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    dist = np.linalg.norm(a - bg, axis=2)
    mask = dist > 60.0
    if mask.sum() < 0.005 * h * w:
        return None, None
    fg = np.median(a[mask], axis=0)
    color = _NAMES[int(np.argmin(np.linalg.norm(_PALETTE - fg, axis=1)))]
    ys, xs = np.nonzero(mask)
    y0, y1 = np.percentile(ys, [1, 99])
    x0, x1 = np.percentile(xs, [1, 99])
    area = max((y1 - y0 + 1) * (x1 - x0 + 1), 1.0)
    box = mask[int(y0):int(y1) + 1, int(x0):int(x1) + 1]
    fill = box.mean() if area > 1 else 0.0
    # an upright triangle widens from top to bottom; circles and squares are as wide at both ends
    rows = box.sum(axis=1).astype(np.float32)
    third = max(len(rows) // 3, 1)
    taper = rows[:third].mean() / max(rows[-third:].mean(), 1.0)
    shape = "square" if fill > 0.88 else ("triangle" if taper < 0.6 else "circle")
    return color, shape


def caption_scores(images: np.ndarray, classes: list[int]) -> dict:
    """images (N, H, W, 3) uint8, classes: the synthetic class id (colour x shape) of each caption."""
    col = shp = 0
    for img, c in zip(images, classes):
        want_c, want_s = CLASSES[c]
        got_c, got_s = classify(img)
        col += got_c == want_c
        shp += got_s == want_s
    n = max(len(classes), 1)
    return {"color_accuracy": col / n, "shape_accuracy": shp / n, "num_images": len(classes)}


__all__ = ["classify", "caption_scores", "SHAPES"]

"""Caption consistency for the synthetic dataset: does the image show the colour and shape its caption names?

The classifier is deliberately simple and exact on real data: the background is the median colour of
the image border (shapes never touch it), the foreground is every pixel far from it, its colour the
palette entry nearest to the foreground's median, its shape read from how much of its bounding box
it fills (a square fills it) and how it tapers (an upright triangle's top third is far narrower than its
bottom third; a circle's is not). Size: the foreground's extent (the larger side of its bounding box)
as a share of the image side; the synthetic "small" and "large" shapes (SIZE_WORDS) do not overlap there.
"""
from __future__ import annotations

import numpy as np

import re

from ..data.prepare.synthetic import CLASSES, COLORS, SHAPES, SIZE_WORDS

_PALETTE = np.array(list(COLORS.values()), dtype=np.float32)
_NAMES = list(COLORS)
# the drawn side is a share s of the 304 px image; the 64/76 crop shows it at s * 76/64 of the crop's side:
# small 0.33-0.45, large 0.53-0.71; the threshold sits between the two
SIZE_THRESHOLD = 0.5 * (SIZE_WORDS["small"][1] + SIZE_WORDS["large"][0]) * 76 / 64
_SIZE_RE = re.compile(r"\b(" + "|".join(SIZE_WORDS) + r")\b")


def size_word(caption: str) -> str | None:
    """The size a caption names ("small"/"large"), or None where it names none (half the phrasings)."""
    m = _SIZE_RE.search(caption.lower())
    return m.group(1) if m else None


def _foreground(img: np.ndarray):
    """-> (mask, foreground median colour) or None where no foreground is found."""
    a = img.astype(np.float32)
    h, w, _ = a.shape
    b = max(1, h // 32)
    border = np.concatenate([a[:b].reshape(-1, 3), a[-b:].reshape(-1, 3), a[:, :b].reshape(-1, 3),
                             a[:, -b:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    mask = np.linalg.norm(a - bg, axis=2) > 60.0
    if mask.sum() < 0.005 * h * w:
        return None
    return mask, np.median(a[mask], axis=0)


def extent(img: np.ndarray) -> float | None:
    """The foreground's larger bounding-box side (1st-99th percentile of its pixels) / the image side."""
    fg = _foreground(img)
    if fg is None:
        return None
    ys, xs = np.nonzero(fg[0])
    y0, y1 = np.percentile(ys, [1, 99])
    x0, x1 = np.percentile(xs, [1, 99])
    return float(max(y1 - y0 + 1, x1 - x0 + 1) / img.shape[0])


def classify_size(img: np.ndarray) -> str | None:
    e = extent(img)
    return None if e is None else ("large" if e > SIZE_THRESHOLD else "small")


def classify(img: np.ndarray) -> tuple[str | None, str | None]:
    """img (H, W, 3) uint8 -> (colour name, shape name); None where no foreground is found."""
    found = _foreground(img)
    if found is None:
        return None, None
    mask, fg = found
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


def caption_scores(images: np.ndarray, classes: list[int], sizes: list[str | None] | None = None) -> dict:
    """images (N, H, W, 3) uint8, classes: the synthetic class id (colour x shape) of each caption; sizes:
    the size each caption names (``size_word``; None where it names none). With sizes, ``size_accuracy``
    is over the captions that name one (``num_sized``; chance 0.5)."""
    col = shp = 0
    for img, c in zip(images, classes):
        want_c, want_s = CLASSES[c]
        got_c, got_s = classify(img)
        col += got_c == want_c
        shp += got_s == want_s
    n = max(len(classes), 1)
    out = {"color_accuracy": col / n, "shape_accuracy": shp / n, "num_images": len(classes)}
    if sizes is not None:
        named = [(img, s) for img, s in zip(images, sizes) if s is not None]
        hits = sum(classify_size(img) == s for img, s in named)
        out.update({"size_accuracy": hits / max(len(named), 1), "num_sized": len(named)})
    return out


__all__ = ["classify", "classify_size", "caption_scores", "extent", "size_word", "SHAPES"]

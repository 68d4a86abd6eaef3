"""Image conversions shared by prepare (what it stores) and the reader (images indexed in place)."""
from __future__ import annotations

import numpy as np
from PIL import Image

FITS = ("crop", "pad", "stretch")


def to_rgb8(img: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB, upright: EXIF orientation applied, 16- and 32-bit greyscale scaled to
    0..255 (not clipped: a 16-bit PNG would otherwise come out nearly white), CMYK, palette, LA/RGBA as PIL
    converts them."""
    from PIL import ImageOps

    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or (a.size and a.max() > 255) else 255.0
        if img.mode in ("I", "F") and a.size and a.max() > 65535:
            top = float(a.max())
        img = Image.fromarray(np.clip(a * (255.0 / top), 0, 255).round().astype(np.uint8), mode="L")
    return img.convert("RGB")


def fit_square(img: Image.Image, size: int, fit: str = "crop") -> Image.Image:
    """``crop``: resize the short side to ``size`` and centre-crop (keeps the aspect ratio, loses the borders);
    ``pad``: resize the long side and pad with the mean colour (keeps everything); ``stretch``: squash to a
    square (the authors' handling of their bounding-box crops)."""
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    w, h = img.size
    if (w, h) == (size, size):
        return img
    if fit == "stretch" or w == h:
        return img.resize((size, size), Image.BICUBIC)
    if fit == "crop":
        s = size / min(w, h)
        nw, nh = max(size, round(w * s)), max(size, round(h * s))
        img = img.resize((nw, nh), Image.BICUBIC)
        x, y = (nw - size) // 2, (nh - size) // 2
        return img.crop((x, y, x + size, y + size))
    s = size / max(w, h)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    small = img.resize((nw, nh), Image.BICUBIC)
    fill = tuple(int(v) for v in np.asarray(small).reshape(-1, 3).mean(axis=0))
    out = Image.new("RGB", (size, size), fill)
    out.paste(small, ((size - nw) // 2, (size - nh) // 2))
    return out

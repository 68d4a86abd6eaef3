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
    """A PNG at a path the user named (command line: trusted)."""
    Image.fromarray(arr).save(path)


def png_bytes(arr: np.ndarray) -> bytes:
    """The PNG encoding of an HWC uint8 array, in memory: run files are written whole through
    checkpoint/files.write_atomic (no link followed, no 0-byte file on a full disk)."""
    import io

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _font(px: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=px)  # Pillow >= 10.1: a scalable built-in font
    except TypeError:
        return ImageFont.load_default()


def _fit(draw, text: str, font, width: int) -> str:
    """``text`` cut with an ellipsis to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def labelled_grid(rows: list[np.ndarray], captions: list[str], row_labels: list[str], size: int,
                  pad: int = 2) -> np.ndarray:
    """A grid that says what it shows: for each caption, the caption on a line of its own, then one row per
    entry of ``row_labels`` (e.g. Stage-I, Stage-II), each labelled at its left.

    rows: ``len(captions) * len(row_labels)`` arrays of (N, H, W, 3) uint8, caption-major
    (caption 0's Stage-I row, caption 0's Stage-II row, caption 1's Stage-I row, ...).
    """
    from PIL import ImageDraw

    per = len(row_labels)
    if len(rows) != len(captions) * per:
        raise ValueError(f"{len(rows)} rows for {len(captions)} captions x {len(row_labels)} labels")
    body = make_grid(rows, size=size, pad=pad)
    px = max(11, min(18, size // 5))
    font = _font(px)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = int(max(probe.textlength(lbl, font=font) for lbl in row_labels)) + 3 * pad if per > 1 or \
        row_labels[0] else 0
    cap_h = px + 2 * pad + 2
    W = label_w + body.shape[1]
    block = per * (size + pad)
    H = len(captions) * (cap_h + block) + pad
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, cap in enumerate(captions):
        y0 = i * (cap_h + block)
        draw.text((pad, y0 + pad), _fit(draw, cap, font, W - 2 * pad), fill=(0, 0, 0), font=font)
        src = body[pad + i * block: pad + (i + 1) * block]
        canvas.paste(Image.fromarray(np.ascontiguousarray(src)), (label_w, y0 + cap_h))
        for j, lbl in enumerate(row_labels):
            ty = y0 + cap_h + j * (size + pad) + size // 2 - px // 2
            draw.text((pad, ty), lbl, fill=(90, 90, 90), font=font)
    return np.asarray(canvas)

"""Resource budgets checked before anything is allocated for an untrusted file's claim.

- Image pixels: an image's header gives its size before any pixel is decoded; one over the budget is
  refused (the loader counts it as a bad sample), so a small compressed file (a 368 KB PNG of
  13000 x 13000 16-bit pixels) cannot make a loader worker allocate gigabytes.
- ``.npy`` arrays: the header (magic, dtype, shape) is read and checked against what the caller expects
  (a float array of the right width and a bounded number of rows, no object dtype) before the data is.
- Embedding values: finite and of a sane magnitude (a 3e38 squares to inf in float32, a NaN poisons the
  step), so one bad sample is skipped instead of ending a run with a non-finite loss.
"""
from __future__ import annotations

import io

import numpy as np

from ..data.format import STORE_SIZE

# Default for data.max_image_pixels: 16 x the side prepare stores (304 px), squared: about 23.7 MP. Room for
# camera photos indexed in place (a 24 MP frame), while the costliest decode path (16-bit greyscale scaled
# through float64 in images.to_rgb8, about 11 bytes a pixel with its copies) stays near 250 MB a worker.
DEFAULT_MAX_IMAGE_PIXELS = (16 * STORE_SIZE) ** 2
MAX_EMBEDDING_ABS = 1e4  # text embeddings in use are O(1) (unit RMS or char-CNN-RNN); 1e4 leaves room
MAX_NPY_HEADER = 10_000  # bytes; numpy's own default bound


class OverBudget(ValueError):
    """An input claims more than its budget (one line, naming the claim and the budget)."""


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise OverBudget(f"image of {width} x {height} pixels exceeds data.max_image_pixels={max_pixels} "
                         "(a decompression bomb, or raise the budget)")


def read_npy(src, dim: int | None, max_rows: int, max_bytes: int = 1 << 30) -> np.ndarray:
    """A float array of shape (rows, dim) or (dim,) from ``.npy`` bytes or a binary file object, its header
    checked first: not an .npy, an object or non-float dtype, the wrong width, no rows, more than
    ``max_rows`` rows or ``max_bytes`` bytes -> OverBudget naming the problem, before the data is read."""
    f = io.BytesIO(src) if isinstance(src, (bytes, bytearray, memoryview)) else src
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f, max_header_size=MAX_NPY_HEADER)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f, max_header_size=MAX_NPY_HEADER)
        else:
            raise ValueError(f"npy version {version}")
    except (ValueError, SyntaxError, EOFError, TypeError) as e:  # text, truncated or forged headers
        raise OverBudget(f"not a .npy array ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})") \
            from None
    if dtype.hasobject or dtype.kind != "f" or dtype.itemsize > 8:
        raise OverBudget(f"holds {dtype} values, not floats")
    if len(shape) not in (1, 2) or (dim is not None and shape[-1] != dim) or 0 in shape:
        want = f"(N, {dim})" if dim is not None else "(N, dim)"
        raise OverBudget(f"has shape {tuple(shape)}; expected {want} with at least one row")
    rows = shape[0] if len(shape) == 2 else 1
    count = rows * shape[-1]
    if rows > max_rows or count * dtype.itemsize > max_bytes:
        raise OverBudget(f"has shape {tuple(shape)}: more than {max_rows} rows or {max_bytes} bytes")
    data = f.read(count * dtype.itemsize)
    if len(data) != count * dtype.itemsize:
        raise OverBudget(f"is cut short ({len(data)} of {count * dtype.itemsize} data bytes)")
    a = np.frombuffer(data, dtype=dtype, count=count)
    return a.reshape(shape, order="F" if fortran else "C")


def check_embedding(a: np.ndarray) -> None:
    """Finite values of a sane magnitude (see the module docstring)."""
    if not np.isfinite(a).all():
        raise OverBudget("non-finite embedding values")
    if a.size and float(np.abs(a).max()) > MAX_EMBEDDING_ABS:
        raise OverBudget(f"embedding values beyond +-{MAX_EMBEDDING_ABS:g}")


MAX_CLASS_ID = (1 << 63) - 1


def parse_class_id(raw: bytes) -> int:
    """A sample's ``cls`` member: a non-negative int64 in ASCII digits."""
    text = bytes(raw).strip()
    if not text.isdigit() or len(text) > 19 or int(text) > MAX_CLASS_ID:
        raise OverBudget(f"class id {text[:24]!r} is not an integer from 0 to 2**63-1")
    return int(text)

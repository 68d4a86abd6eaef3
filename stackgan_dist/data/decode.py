"""One sample's bytes -> training tensors: JPEG decode at the stage's load size, crop, flip, caption."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from ..errors import DataError

REQUIRED = ("jpg", "emb.npy")


class BadSample(Exception):
    """A sample that does not decode: the loader fills its place and counts it."""


def check_sample(sample: dict, text_dim: int) -> None:
    missing = [k for k in REQUIRED if k not in sample]
    if missing:
        raise DataError(f"shard {sample.get('__url__')}: sample '{sample['__key__']}' lacks {missing} "
                        f"(expected keys {list(REQUIRED)}, found {sorted(k for k in sample if not k.startswith('__'))})")
    emb = np.load(io.BytesIO(sample["emb.npy"]), allow_pickle=False)
    if emb.ndim not in (1, 2) or emb.shape[-1] != text_dim:
        raise DataError(f"shard {sample.get('__url__')}: sample '{sample['__key__']}' has an embedding of shape "
                        f"{tuple(emb.shape)}; expected (captions, {text_dim}) (model.text_dim)")


def decode(sample: dict, load_size: int, crop: int, rng: np.random.Generator | None, text_dim: int,
           train: bool = True):
    """-> image uint8 (3, crop, crop), text embedding float32 (text_dim,), class id, caption index.

    ``train``: random crop, flip and caption from ``rng``; otherwise the centre crop and the first caption."""
    try:
        img = Image.open(io.BytesIO(sample["jpg"]))
        if img.format == "JPEG":
            img.draft("RGB", (load_size, load_size))  # decode at 1/2, 1/4 ... scale: no full-size decode
        if img.mode != "RGB":  # convert() copies even when there is nothing to convert
            img = img.convert("RGB")
        if img.size != (load_size, load_size):
            img = img.resize((load_size, load_size), Image.BICUBIC)
        a = np.asarray(img, dtype=np.uint8)
        emb = np.load(io.BytesIO(sample["emb.npy"]), allow_pickle=False)
        cls = int(sample["cls"]) if "cls" in sample else -1
    except Exception as e:  # noqa: BLE001 - any decode failure makes a bad sample
        raise BadSample(f"{type(e).__name__}: {e}") from None
    if emb.ndim == 1:
        emb = emb[None]
    if emb.ndim != 2 or emb.shape[0] == 0:
        raise BadSample(f"embedding of shape {tuple(emb.shape)}")
    if emb.shape[-1] != text_dim:
        raise DataError(f"shard {sample.get('__url__')}: sample '{sample['__key__']}' embedding dim "
                        f"{emb.shape[-1]}, expected {text_dim} (model.text_dim)")
    if train:
        x, y = (int(rng.integers(0, load_size - crop + 1)) for _ in range(2))
        flip = bool(rng.integers(0, 2))
        cap = int(rng.integers(0, emb.shape[0]))
    else:
        x = y = (load_size - crop) // 2
        flip, cap = False, 0
    a = a[y:y + crop, x:x + crop]
    if flip:
        a = a[:, ::-1]
    return np.ascontiguousarray(a.transpose(2, 0, 1)), emb[cap].astype(np.float32), cls, cap

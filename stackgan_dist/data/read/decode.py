"""One sample's bytes -> training tensors: JPEG decode at the stage's load size, crop, flip, caption."""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from PIL import Image

from ...errors import DataError
from ...safety.budgets import (DEFAULT_MAX_IMAGE_PIXELS, OverBudget, check_embedding, check_pixels, parse_class_id,
                               read_npy)
from ..format import MAX_CAPTIONS, REQUIRED



@dataclass(frozen=True)
class OnTheFly:
    """Shards indexed in place (``stackgan prepare index``): image-text samples as img2dataset writes them
    (``KEY.jpg``, ``KEY.txt``, ``KEY.json``). ``embed_on`` "worker": the chosen caption is embedded here, in the
    loader worker, with the hashing encoder that the dataset file names; "device": it is not embedded here
    (the text is a zero placeholder) and travels as a string, embedded on the training device
    (data/text/device_text.py)."""

    image_keys: tuple[str, ...]
    caption_key: str
    dim: int
    embed_on: str = "worker"
    _enc: list = field(default_factory=list, compare=False, repr=False)

    def encode(self, captions: list[str]) -> np.ndarray:
        if not self._enc:  # one encoder per process (workers are forked)
            from ..text.text_encoders import HashingEncoder

            self._enc.append(HashingEncoder(self.dim))
        return self._enc[0].encode(captions)

    def captions(self, sample: dict) -> list[str]:
        raw = sample.get(self.caption_key)
        if raw is None:
            raise BadSample(f"no .{self.caption_key} caption")
        if self.caption_key == "json":
            import json

            try:
                cap = json.loads(raw.decode("utf-8")).get("caption")
            except (ValueError, AttributeError):
                raise BadSample("unreadable .json caption") from None
            caps = [cap] if isinstance(cap, str) else []
        else:
            try:
                caps = raw.decode("utf-8-sig").splitlines()
            except UnicodeDecodeError:
                raise BadSample("caption is not UTF-8") from None
        caps = [c.strip() for c in caps if c.strip()]
        if not caps:
            raise BadSample("empty caption")
        return caps

    def image(self, sample: dict) -> bytes:
        for k in self.image_keys:
            if k in sample:
                return sample[k]
        raise BadSample(f"no image member (looked for {', '.join(self.image_keys)})")


def sample_format(manifest: dict) -> OnTheFly | None:
    """The on-the-fly format a (validated) dataset file describes, or None for shards with stored embeddings."""
    idx = manifest.get("index") if isinstance(manifest, dict) else None
    if not idx:
        return None
    return OnTheFly(tuple(idx["image_keys"]), idx["caption_key"], int(manifest["text_dim"]),
                    idx.get("embed_on", "worker"))


def embedded_on_device(manifest: dict) -> bool:
    """Whether a (validated) dataset's captions are embedded on the training device, not in the loader."""
    fmt = sample_format(manifest)
    return fmt is not None and fmt.embed_on == "device"


class Decoded(NamedTuple):
    """One decoded sample, as the loader and the sequential reader use it."""

    image: np.ndarray  # uint8 (3, crop, crop)
    text: np.ndarray  # float32 (text_dim,): the chosen caption's embedding (zeros when embedded on the device)
    cls: int  # class id, -1 when unknown
    caption_index: int  # which of the sample's captions
    caption: str  # its text ("" where the sample stores embeddings)


class BadSample(Exception):
    """A sample that does not decode: the loader fills its place and counts it."""


def check_sample(sample: dict, text_dim: int, fmt: OnTheFly | None = None) -> None:
    if fmt is not None:
        if not any(k in sample for k in fmt.image_keys) or fmt.caption_key not in sample:
            raise DataError(f"shard {sample.get('__url__')}: sample '{sample['__key__']}' lacks an image "
                            f"({'/'.join(fmt.image_keys)}) or its .{fmt.caption_key} caption; found "
                            f"{sorted(k for k in sample if not k.startswith('__'))}")
        return
    missing = [k for k in REQUIRED if k not in sample]
    if missing:
        found = sorted(k for k in sample if not k.startswith('__'))
        raise DataError(f"shard {sample.get('__url__')}: sample '{sample['__key__']}' lacks {missing} "
                        f"(expected keys {list(REQUIRED)}, found {found})")
    try:
        emb = read_npy(sample["emb.npy"], None, MAX_CAPTIONS)
    except OverBudget as e:
        raise DataError(f"shard {sample.get('__url__')}: sample '{sample['__key__']}' emb.npy {e} "
                        f"(expected float (captions, {text_dim}), model.text_dim)") from None
    if emb.shape[-1] != text_dim:
        raise DataError(f"shard {sample.get('__url__')}: sample '{sample['__key__']}' has an embedding of shape "
                        f"{tuple(emb.shape)}; expected (captions, {text_dim}) (model.text_dim)")


def decode(sample: dict, load_size: int, crop: int, rng: np.random.Generator | None, text_dim: int,
           train: bool = True, fmt: OnTheFly | None = None,
           max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Decoded:
    """-> the sample as a ``Decoded``. For captions embedded on the device (``fmt.embed_on``
    "device") the embedding is a zero placeholder and the caption text is the one to embed.

    ``train``: random crop, flip and caption from ``rng``; otherwise the centre crop and the first caption.
    An image over ``max_pixels`` (after JPEG draft scaling), a non-finite or huge embedding and a class id
    outside int64 are bad samples (BadSample), like undecodable ones; an embedding of the wrong width is a
    DataError (the dataset does not fit the model)."""
    try:
        img = Image.open(io.BytesIO(sample["jpg"] if fmt is None else fmt.image(sample)))
        if img.format == "JPEG":
            img.draft("RGB", (load_size, load_size))  # decode at 1/2, 1/4 ... scale: no full-size decode
        check_pixels(*img.size, max_pixels)  # the header's size, before any pixel is decoded
        if fmt is not None:  # images as they come: upright, 8-bit RGB, the short side to load_size, centre crop
            from ..images import fit_square, to_rgb8

            img = fit_square(to_rgb8(img), load_size, "crop")
        if img.mode != "RGB":  # convert() copies even when there is nothing to convert
            img = img.convert("RGB")
        if img.size != (load_size, load_size):
            img = img.resize((load_size, load_size), Image.BICUBIC)
        a = np.asarray(img, dtype=np.uint8)
        if fmt is None:
            emb = read_npy(sample["emb.npy"], None, MAX_CAPTIONS)
            caption = ""
        else:
            caps = fmt.captions(sample)
            pick = int(rng.integers(0, len(caps))) if train else 0
            caption = caps[pick]
            # only the caption used is embedded; on the device later, or here
            emb = np.zeros((1, text_dim), np.float32) if fmt.embed_on == "device" else fmt.encode([caption])
        cls = parse_class_id(sample["cls"]) if "cls" in sample else -1
        check_embedding(emb)
    except BadSample:
        raise
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
    return Decoded(np.ascontiguousarray(a.transpose(2, 0, 1)), emb[cap].astype(np.float32), cls, cap, caption)

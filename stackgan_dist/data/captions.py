"""Shards from any folder of images plus a captions file: how to make embeddings for one's own data.

``captions.jsonl``: one JSON object per line, ``{"file": "a/b.jpg", "captions": ["...", ...], "class": 3}``
(``file`` relative to the images folder; ``class`` optional; ``captions`` may also be one string).
Captions are embedded in the parent process (batched; a sentence-transformers model is loaded once), then
image workers only decode, resize and write. The manifest records the encoder, so ``stackgan sample --text``
embeds free text the same way.
"""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from ..errors import DataError
from .text_encoders import make_encoder
from .writer import DEFAULT_SHARD_BYTES, DEFAULT_SHARD_COUNT, encode_image, make_sample, write_manifest, write_parallel


def _text(path: str) -> str:
    """The file as text: UTF-8, a BOM allowed; anything else one DataError line naming file and line."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{path}: UTF-16 text (it starts with a UTF-16 byte-order mark); save it as UTF-8")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x}; latin-1 or another code page?); "
                        "save it as UTF-8") from None
    if "\0" in text:
        line = text[:text.index("\0")].count("\n") + 1
        raise DataError(f"{path}:{line}: holds NUL characters (UTF-16 without a byte-order mark?); save it as UTF-8")
    return text


def read_jsonl(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise DataError(f"captions file not found: {path}")
    rows = []
    for ln, line in enumerate(_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{ln}: not JSON ({e.msg}); one JSON object per line is expected") from None
        except (ValueError, RecursionError) as e:
            raise DataError(f"{path}:{ln}: not JSON ({str(e) or type(e).__name__})") from None
        if not isinstance(r, dict) or "file" not in r or "captions" not in r:
            raise DataError(f"{path}:{ln}: expected an object with 'file' and 'captions', got "
                            f"{type(r).__name__}")
        if not isinstance(r["file"], str) or not r["file"] or "\0" in r["file"]:
            raise DataError(f"{path}:{ln}: 'file' must be a non-empty path string, got {r['file']!r:.60}")
        caps = r["captions"]
        if isinstance(caps, str):
            caps = [caps]
        if not isinstance(caps, list):
            raise DataError(f"{path}:{ln}: 'captions' must be a string or a list of strings, got "
                            f"{type(caps).__name__}")
        if not caps or not all(isinstance(c, str) and c.strip() for c in caps):
            raise DataError(f"{path}:{ln}: 'captions' must be a non-empty list of non-empty strings")
        cls = r.get("class")
        if cls is not None and (isinstance(cls, bool) or not isinstance(cls, int)):
            raise DataError(f"{path}:{ln}: 'class' must be an integer, got {cls!r:.60}")
        rows.append({"file": r["file"], "captions": caps, "class": cls})
    if not rows:
        raise DataError(f"{path} holds no captions")
    return rows


def prepare_captions(images: str, captions: str, encoder: str, out: str, workers: int = 1,
                     max_count: int = DEFAULT_SHARD_COUNT, max_bytes: int = DEFAULT_SHARD_BYTES,
                     progress: bool = True, batch_size: int = 256) -> dict:
    rows = read_jsonl(captions)
    paths = [os.path.join(images, r["file"]) for r in rows]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{len(missing)} of {len(paths)} images not found, first: {missing[0]}")
    enc = make_encoder(encoder)
    flat = [c for r in rows for c in r["captions"]]
    embs = [enc.encode(flat[i:i + batch_size]) for i in range(0, len(flat), batch_size)]
    flat_emb = np.concatenate(embs).astype(np.float32)
    offs = np.cumsum([0] + [len(r["captions"]) for r in rows])
    spec = enc.spec()
    del enc  # no model (nor its threads) in the forked image workers

    def build(i: int):
        try:
            with Image.open(paths[i]) as im:
                jpg = encode_image(im)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            return f"{paths[i]}: {type(e).__name__}: {e}"
        key = f"{i:07d}_" + os.path.splitext(os.path.basename(rows[i]["file"]))[0].replace(".", "_")
        return make_sample(key, jpg, flat_emb[offs[i]:offs[i + 1]], rows[i]["captions"], rows[i]["class"])

    shards, skipped = write_parallel(out, len(rows), build, workers, max_count, max_bytes, desc="captions",
                                     progress=progress)
    for s in skipped:
        print(f"skipped (does not decode): {s}")
    return write_manifest(out, shards, spec, "captions",
                          {"captions_file": os.path.abspath(captions), "images": os.path.abspath(images),
                           "skipped": skipped})


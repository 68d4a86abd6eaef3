"""Shards from one's own images and captions: how to make embeddings for one's own data.

Three ways to give captions (``stackgan prepare captions``):
- sidecars: ``--images DIR`` alone; each image ``a/b.jpg`` has ``a/b.txt`` beside it, one caption a line.
- ``captions.jsonl``: one JSON object per line, ``{"file": "a/b.jpg", "captions": ["...", ...], "class": 3}``
  (``file`` relative to the images folder; ``class`` optional; ``captions`` may also be one string).
- ``captions.csv``: a header row naming an image column (file, image, path, filename) and a caption column
  (caption, text, captions); several rows of one image add captions; an optional ``class`` column.
Text files are UTF-8, with or without a BOM; anything else is one error naming the file and line.

``--out`` is the dataset folder: ``OUT/train`` and ``OUT/test`` are written, the test split a deterministic
``--test-fraction`` of the images chosen by a hash of the file name (the same image lands in the same split
on every run). Captions are embedded in the parent process (batched; a sentence-transformers model is loaded
once), then image workers only decode, resize and write. The manifest records the encoder, so ``stackgan
sample --text`` embeds free text the same way.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os

import numpy as np
from PIL import Image

from ...errors import DataError
from ...safety.budgets import MAX_CLASS_ID
from ..format import MAX_CAPTION_CHARS
from ..read.index import utf8_text
from ..text.text_encoders import make_encoder
from .writer import DEFAULT_SHARD_BYTES, DEFAULT_SHARD_COUNT, encode_image, make_sample, write_manifest, write_parallel

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
FILE_COLUMNS = ("file", "image", "path", "filename", "image_path", "file_name")
CAPTION_COLUMNS = ("caption", "text", "captions", "description")


def read_text(path: str) -> str:
    """The file as text: UTF-8, a BOM allowed; anything else one DataError line naming file and line."""
    if not os.path.isfile(path):
        raise DataError(f"captions file not found: {path}")
    with open(path, "rb") as f:
        raw = f.read()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{path}: UTF-16 text (it starts with a UTF-16 byte-order mark); save it as UTF-8")
    text = utf8_text(raw, path, "; latin-1 or another code page?); save it as UTF-8")
    if "\0" in text:
        line = text[:text.index("\0")].count("\n") + 1
        raise DataError(f"{path}:{line}: holds NUL characters (UTF-16 without a byte-order mark?); save it as UTF-8")
    return text


def _caption_lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def _check_row(where: str, caps: list[str], cls) -> None:
    """Bounds of one row: caption length (format.MAX_CAPTION_CHARS says why) and an int64 class id >= 0."""
    for c in caps:
        if len(c) > MAX_CAPTION_CHARS:
            raise DataError(f"{where}: a caption of {len(c)} characters (at most {MAX_CAPTION_CHARS}; an unbalanced "
                            "quote in a CSV file?)")
    if cls is not None and not 0 <= cls <= MAX_CLASS_ID:
        raise DataError(f"{where}: class {cls} is outside 0 to 2**63-1")


def _check_inside(rows: list[dict], images: str, allow_outside: bool) -> None:
    """Image names stay inside the images folder unless the user allows otherwise: a captions file naming
    ``../x.png`` or ``/etc/...`` would read (and publish in shards) files from elsewhere."""
    if allow_outside:
        return
    for r in rows:
        f = r["file"]
        if os.path.isabs(f) or os.path.normpath(f).split(os.sep)[0] == os.pardir:
            raise DataError(f"image {f!r} lies outside the images folder {images}; give names relative to it, or "
                            "pass --allow-outside-images")


def read_jsonl(path: str) -> list[dict]:
    rows = []
    for ln, line in enumerate(read_text(path).split("\n"), 1):
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
        _check_row(f"{path}:{ln}", caps, cls)
        rows.append({"file": r["file"], "captions": caps, "class": cls})
    if not rows:
        raise DataError(f"{path} holds no captions")
    return rows


def read_csv(path: str) -> list[dict]:
    """Rows of (image, caption[, class]); several rows of one image add captions, in file order."""
    reader = csv.reader(io.StringIO(read_text(path)))
    try:
        header = [h.strip().lower() for h in next(reader)]
    except StopIteration:
        raise DataError(f"{path} is empty") from None
    fcol = next((header.index(c) for c in FILE_COLUMNS if c in header), None)
    ccol = next((header.index(c) for c in CAPTION_COLUMNS if c in header), None)
    if fcol is None or ccol is None:
        raise DataError(f"{path}:1: the header needs an image column ({'/'.join(FILE_COLUMNS)}) and a caption "
                        f"column ({'/'.join(CAPTION_COLUMNS)}); got {header}")
    kcol = header.index("class") if "class" in header else None
    by_file: dict[str, dict] = {}
    try:
        records = list(reader)
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: {e} (an unbalanced quote?)") from None
    for ln, rec in enumerate(records, 2):
        if not any(x.strip() for x in rec):
            continue
        if len(rec) <= max(fcol, ccol):
            raise DataError(f"{path}:{ln}: {len(rec)} columns, the header has {len(header)}")
        file, cap = rec[fcol].strip(), rec[ccol].strip()
        if not file or not cap:
            raise DataError(f"{path}:{ln}: empty image or caption")
        row = by_file.setdefault(file, {"file": file, "captions": [], "class": None})
        row["captions"].append(cap)
        if kcol is not None and len(rec) > kcol and rec[kcol].strip():
            try:
                row["class"] = int(rec[kcol])
            except ValueError:
                raise DataError(f"{path}:{ln}: class must be an integer, got {rec[kcol]!r:.60}") from None
        _check_row(f"{path}:{ln}", [cap], row["class"])
    if not by_file:
        raise DataError(f"{path} holds no captions")
    return list(by_file.values())


def read_sidecars(images: str) -> tuple[list[dict], list[str]]:
    """Every image under ``images`` with a ``.txt`` of the same name beside it. -> (rows, images without one)."""
    rows, missing = [], []
    for root, dirs, files in os.walk(images):
        dirs.sort()
        for name in sorted(files):
            if not name.lower().endswith(IMAGE_EXTS):
                continue
            rel = os.path.relpath(os.path.join(root, name), images)
            txt = os.path.splitext(os.path.join(root, name))[0] + ".txt"
            if not os.path.isfile(txt):
                missing.append(rel)
                continue
            caps = _caption_lines(read_text(txt))
            if not caps:
                raise DataError(f"{txt}: no caption (one caption a line)")
            _check_row(txt, caps, None)
            rows.append({"file": rel, "captions": caps, "class": None})
    if not rows:
        raise DataError(f"no image in {images} has a .txt caption file beside it (img.jpg + img.txt, one caption a "
                        "line); or give --captions FILE.jsonl|FILE.csv")
    return rows, missing


def read_rows(images: str, captions: str | None) -> tuple[list[dict], list[str]]:
    if not os.path.isdir(images):
        raise DataError(f"images folder not found: {images}")
    if not captions:
        return read_sidecars(images)
    if captions.lower().endswith(".csv"):
        return read_csv(captions), []
    return read_jsonl(captions), []


def in_test_split(file: str, fraction: float) -> bool:
    """Deterministic by file name: the same image lands in the same split on every run and machine."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(file.replace(os.sep, "/").encode(), digest_size=8).digest(), "little")
    return h / 2**64 < fraction


def prepare_captions(images: str, captions: str | None, encoder: str, out: str, workers: int = 1,
                     max_count: int = DEFAULT_SHARD_COUNT, max_bytes: int = DEFAULT_SHARD_BYTES,
                     progress: bool = True, batch_size: int = 256, test_fraction: float = 0.05,
                     fit: str = "crop", allow_outside: bool = False) -> dict:
    """Writes ``out/train`` and ``out/test`` (the latter may be empty of samples). -> summary dict."""
    if not 0 <= test_fraction < 1:
        raise DataError(f"--test-fraction must be in [0, 1), got {test_fraction}")
    rows, no_caption = read_rows(images, captions)
    _check_inside(rows, images, allow_outside)
    for r in no_caption[:5]:
        print(f"skipped (no .txt caption beside it): {r}")
    paths = [os.path.join(images, r["file"]) for r in rows]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{len(missing)} of {len(paths)} images not found, first: {missing[0]}")
    enc = make_encoder(encoder)
    flat = [c for r in rows for c in r["captions"]]
    embs = []
    bar = _progress(len(flat), progress and len(flat) > batch_size, "embedding captions")
    for i in range(0, len(flat), batch_size):
        embs.append(enc.encode(flat[i:i + batch_size]))
        bar.update(min(batch_size, len(flat) - i))
    bar.close()
    flat_emb = np.concatenate(embs).astype(np.float32)
    offs = np.cumsum([0] + [len(r["captions"]) for r in rows])
    spec = enc.spec()
    del enc  # no model (nor its threads) in the forked image workers

    def build_from(idx: list[int]):
        def build(j: int):
            i = idx[j]
            try:
                with Image.open(paths[i]) as im:
                    jpg = encode_image(im, fit=fit)
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                return f"{paths[i]}: {type(e).__name__}: {e}"
            key = f"{i:07d}_" + os.path.splitext(os.path.basename(rows[i]["file"]))[0].replace(".", "_")
            return make_sample(key, jpg, flat_emb[offs[i]:offs[i + 1]], rows[i]["captions"], rows[i]["class"])
        return build

    test_idx = [i for i, r in enumerate(rows) if in_test_split(r["file"], test_fraction)]
    tset = set(test_idx)
    train_idx = [i for i in range(len(rows)) if i not in tset]
    if not train_idx:
        raise DataError(f"--test-fraction {test_fraction} leaves no training image of {len(rows)}")
    summary = {}
    for split, idx in (("train", train_idx), ("test", test_idx)):
        d = os.path.join(out, split)
        os.makedirs(d, exist_ok=True)
        shards, skipped = write_parallel(d, len(idx), build_from(idx), workers, max_count, max_bytes,
                                         desc=f"images ({split})", progress=progress) if idx else ([], [])
        for sk in skipped:
            print(f"skipped (does not decode): {sk}")
        summary[split] = write_manifest(d, shards, spec, "captions", {
            "captions_file": os.path.basename(captions) if captions else "sidecar .txt files",
            "images": os.path.basename(os.path.abspath(images)), "fit": fit, "test_fraction": test_fraction,
            "skipped": skipped, "no_caption": len(no_caption)})
    return summary


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="caption", dynamic_ncols=True)

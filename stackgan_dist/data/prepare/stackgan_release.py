"""Converter for the StackGAN data releases (CUB-200-2011 birds, Oxford-102 flowers) into shards.

Layout read (as the authors' loaders expect it)::

    ROOT/<split>/filenames.pickle               list of names, e.g. '002.Laysan_Albatross/Laysan_Albatross_0002_1027'
    ROOT/<split>/char-CNN-RNN-embeddings.pickle (N, 10, 1024) float: 10 caption embeddings per image
    ROOT/<split>/class_info.pickle              N class ids (optional)
    birds:   ROOT/CUB_200_2011/images/<name>.jpg, CUB_200_2011/bounding_boxes.txt + images.txt
    flowers: ROOT/jpg/<name>.jpg (a name that already starts with 'jpg/' is taken as is)
    captions (optional): ROOT/text_c10/<name>.txt, else ROOT/text_c10/**/<basename>.txt

Birds are cropped as the original loader does: a square of side 1.5 x the box's larger side, centred on
the box, clipped to the image; then resized (aspect not kept, as the authors do) to the stored size.
Pickles are read with the restricted unpickler (safety/unpickle.py), never ``pickle.load``.
"""
from __future__ import annotations

import os
import sys

import numpy as np
from PIL import Image

from ...errors import DataError
from ...safety.unpickle import safe_load
from .writer import DEFAULT_SHARD_BYTES, DEFAULT_SHARD_COUNT, encode_image, make_sample, write_manifest, write_parallel

EMB_FILE = "char-CNN-RNN-embeddings.pickle"


def load_bboxes(cub_dir: str) -> dict[str, tuple[float, float, float, float]]:
    """name (relative path without .jpg) -> (x, y, w, h), from images.txt + bounding_boxes.txt."""
    paths = {}
    for fn in ("images.txt", "bounding_boxes.txt"):
        if not os.path.isfile(os.path.join(cub_dir, fn)):
            raise DataError(f"birds layout: {os.path.join(cub_dir, fn)} not found")
    with open(os.path.join(cub_dir, "images.txt")) as f:
        for line in f:
            if line.strip():
                idx, rel = line.split()
                paths[idx] = rel[:-4] if rel.endswith(".jpg") else rel
    out = {}
    with open(os.path.join(cub_dir, "bounding_boxes.txt")) as f:
        for line in f:
            if line.strip():
                idx, *box = line.split()
                out[paths[idx]] = tuple(float(v) for v in box)
    return out


def crop_box(img: Image.Image, bbox) -> Image.Image:
    """The original loader's crop: r = 0.75 x max(w, h) around the box centre, clipped to the image."""
    width, height = img.size
    r = int(max(bbox[2], bbox[3]) * 0.75)
    cx, cy = int((2 * bbox[0] + bbox[2]) / 2), int((2 * bbox[1] + bbox[3]) / 2)
    y1, y2 = max(0, cy - r), min(height, cy + r)
    x1, x2 = max(0, cx - r), min(width, cx + r)
    return img.crop((x1, y1, x2, y2))


# where releases keep one .txt of captions per image: the authors' birds/flowers archives use text_c10/,
# StackGAN-Pytorch's and AttnGAN's CUB layout text/ (the same files)
CAPTION_DIRS = ("text_c10", "text")


def _caption_index(root: str) -> dict[str, str]:
    idx: dict[str, str] = {}
    for sub in CAPTION_DIRS:
        for d, dirs, files in os.walk(os.path.join(root, sub)):
            dirs.sort()
            for fn in sorted(files):
                if fn.endswith(".txt"):
                    idx.setdefault(fn[:-4], os.path.join(d, fn))
    return idx


def read_captions(path: str) -> list[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        return [ln.strip() for ln in f if ln.strip()]


def load_split(root: str, split: str) -> tuple[list[str], np.ndarray, list | None]:
    d = os.path.join(root, split)
    if not os.path.isdir(d):
        raise DataError(f"{d} not found (expected ROOT/{split}/filenames.pickle, ROOT/{split}/{EMB_FILE})")
    npath = os.path.join(d, "filenames.pickle")
    names = _names(safe_load(npath), npath)
    emb = safe_load(os.path.join(d, EMB_FILE))
    if isinstance(emb, np.ndarray) and emb.dtype.kind not in "biuf" or \
            not isinstance(emb, (np.ndarray, list, tuple)):
        raise DataError(f"{os.path.join(d, EMB_FILE)}: expected a numeric array (or a list of them), "
                        f"found {type(emb).__name__}")
    try:
        emb = np.asarray(emb, dtype=np.float32)
    except (ValueError, TypeError) as e:
        raise DataError(f"{os.path.join(d, EMB_FILE)}: embeddings are not a regular array ({e})") from None
    if emb.ndim == 2:
        emb = emb[:, None]
    if emb.ndim != 3 or emb.shape[0] != len(names):
        raise DataError(f"{os.path.join(d, EMB_FILE)}: shape {emb.shape}, expected ({len(names)}, captions, dim)")
    cpath = os.path.join(d, "class_info.pickle")
    classes = _classes(safe_load(cpath), cpath) if os.path.isfile(cpath) else None
    if classes is not None and len(classes) != len(names):
        raise DataError(f"{cpath}: {len(classes)} entries for {len(names)} filenames")
    return names, emb, classes


def _names(obj, path: str) -> list[str]:
    """filenames.pickle: a list of relative image names. Anything else (a name that is not text, an
    absolute path, a '..' that would read images from outside the release) is refused."""
    if isinstance(obj, np.ndarray) and obj.ndim == 1 and obj.dtype.kind in "SU":
        obj = obj.tolist()
    if not isinstance(obj, (list, tuple)):
        raise DataError(f"{path}: expected a list of image names, found {type(obj).__name__}")
    out = []
    for i, n in enumerate(obj):
        if isinstance(n, (bytes, np.bytes_)):
            n = bytes(n).decode("latin1")
        if not isinstance(n, str) or not n or "\0" in n or os.path.isabs(n) or \
                ".." in n.replace("\\", "/").split("/"):
            raise DataError(f"{path}: entry {i} ({str(n)[:60]!r}) is not a relative image name inside the release")
        out.append(n)
    return out


def _classes(obj, path: str) -> list[int]:
    if isinstance(obj, np.ndarray) and obj.ndim == 1 and obj.dtype.kind in "iu":
        obj = obj.tolist()
    if not isinstance(obj, (list, tuple)) or not all(isinstance(c, (int, np.integer)) and not isinstance(c, bool)
                                                     for c in obj):
        raise DataError(f"{path}: expected a list of integer class ids")
    return [int(c) for c in obj]


def image_path(root: str, dataset: str, name: str) -> str:
    if dataset == "birds":
        return os.path.join(root, "CUB_200_2011", "images", name + ".jpg")
    if name.startswith("jpg/"):
        return os.path.join(root, name + ".jpg")
    return os.path.join(root, "jpg", name + ".jpg")


def prepare_stackgan(root: str, dataset: str, split: str, out: str, workers: int = 1,
                     max_count: int = DEFAULT_SHARD_COUNT, max_bytes: int = DEFAULT_SHARD_BYTES,
                     progress: bool = True) -> dict:
    if dataset not in ("birds", "flowers"):
        raise DataError(f"unknown dataset '{dataset}' (birds or flowers)")
    names, emb, classes = load_split(root, split)
    paths = [image_path(root, dataset, n) for n in names]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:  # before any worker starts
        raise DataError(f"{len(missing)} of {len(paths)} images not found, first: {missing[0]}")
    bboxes = load_bboxes(os.path.join(root, "CUB_200_2011")) if dataset == "birds" else {}
    if dataset == "birds":
        nobox = [n for n in names if n not in bboxes]
        if nobox:
            raise DataError(f"{len(nobox)} birds images have no bounding box, first: {nobox[0]}")
    cap_idx = _caption_index(root)

    def captions_of(name: str) -> list[str]:
        p = next((q for q in (os.path.join(root, sub, name + ".txt") for sub in CAPTION_DIRS) if os.path.isfile(q)),
                 cap_idx.get(os.path.basename(name), ""))
        return read_captions(p) if p else []

    captions = [captions_of(n) for n in names]  # read here, before the writers start: reported up front
    captioned = sum(1 for c in captions if c)
    print(f"captions: {captioned} of {len(names)} samples have captions (from {root}/"
          f"{'/ or '.join(CAPTION_DIRS)}/)", file=sys.stderr)
    if not captioned:
        print(f"warning: no sample has captions: none of {root}/{'/, '.join(CAPTION_DIRS)}/ holds NAME.txt for the "
              "release's images; the shards store embeddings only (captions appear in sample grids and reports)",
              file=sys.stderr)

    def build(i: int):
        try:
            with Image.open(paths[i]) as im:
                img = im.convert("RGB")
            if dataset == "birds":
                img = crop_box(img, bboxes[names[i]])
            jpg = encode_image(img)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            return f"{paths[i]}: {type(e).__name__}: {e}"
        cls = None if classes is None else int(classes[i])
        return make_sample(f"{i:06d}_{os.path.basename(names[i])}", jpg, emb[i], captions[i], cls)

    shards, skipped = write_parallel(out, len(names), build, workers, max_count, max_bytes,
                                     desc=f"{dataset} {split}", progress=progress)
    for s in skipped:
        print(f"skipped (does not decode): {s}")
    return write_manifest(out, shards, {"name": "precomputed", "dim": int(emb.shape[-1]),
                                        "source": "char-CNN-RNN (StackGAN release)"},
                          f"stackgan-{dataset}", {"split": split, "root": os.path.abspath(root),
                                                  "skipped": skipped, "captions_per_image": int(emb.shape[1]),
                                                  "captioned": captioned})

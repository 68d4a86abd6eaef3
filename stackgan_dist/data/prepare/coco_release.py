"""Converter for the authors' COCO release (StackGAN's third dataset: about 80k training images, 5 captions
each) into shards: ``stackgan prepare coco --root ROOT --split train|test --out DIR``.

Layout read (the birds release's pickles, COCO's image folders)::

    ROOT/<split>/filenames.pickle               list of image keys, e.g. 'COCO_train2014_000000000009'
    ROOT/<split>/char-CNN-RNN-embeddings.pickle (N, 5, 1024) float, or a list of N (captions, 1024) arrays
                                                (COCO images have 5 to 7 captions: a ragged list is kept)
    images, the first that exists:  ROOT/images/<key>.jpg  (the authors' loader), ROOT/<key>.jpg (a key that
                                    names its folder), ROOT/train2014/<key>.jpg or ROOT/val2014/<key>.jpg
                                    (the folder the key's own name says: COCO's downloads unzip to these)
    captions (optional):            ROOT/text/<key>.txt (StackGAN-Pytorch / AttnGAN) or ROOT/text_c10/<key>.txt

No bounding boxes and no class ids: each image is resized whole to the stored square (aspect not kept, as
the authors' loader does). Every file is read as hostile: pickles through the restricted unpickler, image
keys that are absolute or climb out of ROOT refused, embeddings checked for shape and finite values.
"""
from __future__ import annotations

import os
import sys

import numpy as np
from PIL import Image

from ...errors import DataError, UserError
from ...safety.unpickle import safe_load
from .stackgan_release import EMB_FILE, read_captions
from .writer import DEFAULT_SHARD_BYTES, DEFAULT_SHARD_COUNT, encode_image, make_sample, write_manifest, write_parallel

IMAGE_FOLDERS = ("train2014", "val2014")  # COCO 2014's own folders; StackGAN's test split is val2014 images


def coco_keys(obj, path: str) -> list[str]:
    """filenames.pickle -> relative image keys (a trailing '.jpg' dropped). Anything that is not a relative
    name inside the release (not text, empty, absolute, a '..' part, a NUL) is refused with its index."""
    if isinstance(obj, np.ndarray) and obj.ndim == 1 and obj.dtype.kind in "SU":
        obj = obj.tolist()
    if not isinstance(obj, (list, tuple)):
        raise DataError(f"{path}: expected a list of image names, found {type(obj).__name__}")
    keys = []
    for i, n in enumerate(obj):
        if isinstance(n, (bytes, np.bytes_)):
            n = bytes(n).decode("latin1")
        if isinstance(n, str):
            n = n[:-4] if n.lower().endswith(".jpg") else n
        if not isinstance(n, str) or not n.strip() or "\0" in n or os.path.isabs(n) or n.startswith(("/", "\\")) \
                or ".." in n.replace("\\", "/").split("/"):
            raise DataError(f"{path}: entry {i} ({str(n)[:60]!r}) is not a relative image name inside the release")
        keys.append(n)
    return keys


def coco_embeddings(obj, n: int, path: str) -> list[np.ndarray]:
    """The embeddings pickle -> n float32 arrays of shape (captions, dim), one dim for all. A regular
    (N, C, D) array, (N, D), or a list of per-image arrays with their own caption counts."""
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biuf" or obj.ndim not in (2, 3):
            raise DataError(f"{path}: expected (images, captions, dim) numbers, found {obj.dtype} {obj.shape}")
        rows = list(obj if obj.ndim == 3 else obj[:, None])
    elif isinstance(obj, (list, tuple)):
        rows = list(obj)
    else:
        raise DataError(f"{path}: expected an array or a list of arrays, found {type(obj).__name__}")
    if len(rows) != n:
        raise DataError(f"{path}: {len(rows)} embedding entries for {n} filenames")
    out, dim = [], None
    for i, r in enumerate(rows):
        if isinstance(r, np.ndarray) and r.dtype.kind not in "biuf":
            raise DataError(f"{path}: entry {i} is {r.dtype}, not numbers")
        try:
            a = np.asarray(r, dtype=np.float32)
        except (ValueError, TypeError) as e:
            raise DataError(f"{path}: entry {i} is not a numeric array ({e})") from None
        a = a[None] if a.ndim == 1 else a
        if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
            raise DataError(f"{path}: entry {i} has shape {a.shape}, expected (captions, dim)")
        if dim is None:
            dim = a.shape[1]
        if a.shape[1] != dim:
            raise DataError(f"{path}: entry {i} has dim {a.shape[1]}, entry 0 has {dim}")
        if not np.isfinite(a).all():
            raise DataError(f"{path}: entry {i} holds a non-finite value")
        out.append(a)
    return out


def image_candidates(root: str, key: str) -> list[str]:
    """Where the image of ``key`` may be, in the order tried."""
    base = os.path.basename(key)
    c = [os.path.join(root, "images", key + ".jpg"), os.path.join(root, key + ".jpg")]
    c += [os.path.join(root, f, base + ".jpg") for f in IMAGE_FOLDERS if f in base]
    return c


def find_image(root: str, key: str) -> str | None:
    return next((p for p in image_candidates(root, key) if os.path.isfile(p)), None)


def load_coco_split(root: str, split: str) -> tuple[list[str], list[np.ndarray]]:
    d = os.path.join(root, split)
    npath, epath = os.path.join(d, "filenames.pickle"), os.path.join(d, EMB_FILE)
    for p in (npath, epath):
        if not os.path.isfile(p):
            raise DataError(f"{p} not found (the COCO release holds ROOT/{split}/filenames.pickle and "
                            f"ROOT/{split}/{EMB_FILE})")
    keys = coco_keys(safe_load(npath), npath)
    return keys, coco_embeddings(safe_load(epath), len(keys), epath)


def prepare_coco(root: str, split: str, out: str, workers: int = 1, max_count: int = DEFAULT_SHARD_COUNT,
                 max_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True) -> dict:
    keys, emb = load_coco_split(root, split)
    paths = [find_image(root, k) for k in keys]
    missing = [i for i, p in enumerate(paths) if p is None]
    if missing:  # before any worker starts or anything is written
        k = keys[missing[0]]
        raise DataError(f"{len(missing)} of {len(keys)} images not found, first: {k} (looked for "
                        f"{', '.join(image_candidates(root, k))})")
    captions = []
    for k in keys:
        p = next((q for q in (os.path.join(root, t, k + ".txt") for t in ("text", "text_c10")) if os.path.isfile(q)),
                 "")
        captions.append(read_captions(p) if p else [])
    captioned = sum(1 for c in captions if c)
    if not captioned:  # training works without captions; only sample grids and caption metrics miss them
        print(f"prepare coco: no captions under {root}/text or {root}/text_c10: sample grids are labelled by "
              "index", file=sys.stderr, flush=True)

    def build(i: int):
        try:
            with Image.open(paths[i]) as im:
                jpg = encode_image(im.convert("RGB"))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            return f"{paths[i]}: {type(e).__name__}: {e}"
        return make_sample(f"{i:06d}_{os.path.basename(keys[i])}", jpg, emb[i], captions[i])

    shards, skipped = write_parallel(out, len(keys), build, workers, max_count, max_bytes, desc=f"coco {split}",
                                     progress=progress)
    for s in skipped:
        print(f"skipped (does not decode): {s}")
    counts = [e.shape[0] for e in emb]
    return write_manifest(out, shards, {"name": "precomputed", "dim": int(emb[0].shape[1]) if emb else 0,
                                        "source": "char-CNN-RNN (StackGAN COCO release)"},
                          "stackgan-coco", {"split": split, "root": os.path.abspath(root), "skipped": skipped,
                                            "captions_per_image": counts[0] if len(set(counts)) == 1 else
                                            [min(counts), max(counts)],
                                            "captioned": captioned})


def add_coco_parser(psub, shard_args, check_out, summary) -> None:
    """``prepare coco``, registered by prepare_cli.add_parsers with its shared option and output helpers."""
    p = psub.add_parser("coco", help="the authors' COCO release (filenames.pickle, char-CNN-RNN embeddings, "
                                     "train2014/val2014 images)")
    p.add_argument("--root", required=True, help="release root (holding train/, test/ and images/ or "
                                                 "train2014/ + val2014/)")
    p.add_argument("--split", required=True, choices=["train", "test"])
    shard_args(p)

    def run(a) -> int:
        if not os.path.isdir(a.root):
            raise UserError(f"--root {a.root} is not a directory")
        kw = check_out(a)
        summary(prepare_coco(a.root, a.split, a.out, **kw))
        return 0

    p.set_defaults(func=run)

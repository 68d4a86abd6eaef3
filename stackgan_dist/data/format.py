"""The shard format: what ``stackgan prepare`` writes and the loader reads, defined once for both sides.

A split is a folder of WebDataset tar shards plus ``dataset.json``. Each sample is a group of contiguous
tar members sharing a key: ``KEY.jpg`` (square image stored at ``STORE_SIZE``), ``KEY.emb.npy`` (captions x
text_dim float32), ``KEY.txt.json`` (its captions), ``KEY.cls`` (class id, when known). Shards indexed in
place (``stackgan prepare index``) hold img2dataset's ``KEY.jpg``/``KEY.txt``/``KEY.json`` instead.

Readers bound what they accept by these numbers: a file is untrusted, so a count or a version beyond them
is refused before anything is allocated for it.
"""
from __future__ import annotations

import hashlib

MANIFEST = "dataset.json"
DATASET_FORMAT = "stackgan_dist.webdataset"  # dataset.json's "format"
# dataset.json's "version": what writers write; readers read 1..DATASET_VERSION and refuse newer files
DATASET_VERSION = 1
MAX_SAMPLES = 1 << 40  # per dataset file
MAX_TEXT_DIM = 1 << 16  # text embedding width

# Stage-I crops 64 from 76, Stage-II 256 from 304 (the authors load at 76/64 of the target size).
# One JPEG is stored at 304: Stage-I decodes it with JPEG draft mode at 1/4 scale = 76 px directly.
STORE_SIZE = 304
LOAD_SIZES = {1: 76, 2: 304}
CROP_SIZES = {1: 64, 2: 256}

# A caption longer than this is refused by prepare, not cut: in practice it is an unbalanced CSV quote that
# swallowed the rows after it, and truncating would silently train on those rows as one caption.
MAX_CAPTION_CHARS = 2000
MAX_CAPTIONS = 1024  # rows of a sample's emb.npy (CUB has 10 captions an image, COCO 5)
REQUIRED = ("jpg", "emb.npy")  # the members every prepared sample has
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")  # what an indexed shard's image member may be called
CAPTION_KEYS = ("txt", "json")  # a text file (one caption a line) or img2dataset's JSON with "caption"


def sha256_file(path: str, bufsize: int = 1 << 20) -> str:
    """The digest dataset.json records per shard (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(bufsize)
            if not b:
                break
            h.update(b)
    return h.hexdigest()

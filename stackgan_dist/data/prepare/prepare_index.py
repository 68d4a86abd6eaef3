"""``stackgan prepare index``: index existing WebDataset shards in place (img2dataset's layout: ``KEY.jpg``,
``KEY.txt``, ``KEY.json`` per sample, shards ``00000.tar`` ...), so that training reads them without
re-sharding.

One pass over the shards counts samples and the image and caption members they hold; ``OUT/train`` and
``OUT/test`` then get a ``dataset.json`` each, and nothing else: each names its shards by absolute path with
their size and sha256, and says how to read a sample (``index``: image keys, caption key). Training embeds
the captions on the fly with the encoder the file names: the hashing encoder in the loader workers
(``index.embed_on`` "worker"), the sentence encoder batched on the training device ("device": the workers
pass the chosen caption strings, the trainer embeds them just before the step, see data/text/device_text.py). The held-out split
is a ``--test-fraction`` of the shards, chosen by a hash of the shard's file name (deterministic).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter

from ...errors import DataError
from ...safety.files import require_regular
from ..read.index import expand_braces, is_remote
from ..read.samples import iter_samples
from ..format import CAPTION_KEYS, DATASET_FORMAT, DATASET_VERSION, IMAGE_KEYS, MANIFEST, STORE_SIZE, sha256_file


def scan_shard(path: str) -> dict:
    """-> {"samples", "image_keys": Counter, "caption_keys": Counter, "complete": Counter} for one shard;
    complete[k]: samples with an image and a caption member k."""
    n = 0
    img, cap, complete = Counter(), Counter(), Counter()
    try:
        for s in iter_samples(path):
            n += 1
            ik = [k for k in IMAGE_KEYS if k in s]
            ck = [k for k in CAPTION_KEYS if k in s]
            img.update(ik)
            cap.update(ck)
            if ik:
                complete.update(ck)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged tar is named, not indexed
        raise DataError(f"shard {path} is unreadable after {n} samples ({type(e).__name__}: {e}); "
                        "repair or leave it out of the pattern") from None
    return {"samples": n, "image_keys": img, "caption_keys": cap, "complete": complete}


def _shard_hash(path: str) -> float:
    return int.from_bytes(hashlib.blake2b(os.path.basename(path).encode(), digest_size=8).digest(), "little") / 2**64


def split_shards(paths: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """(train, test): round(fraction x shards) test shards (at least one when fraction > 0 and there are two
    or more), those with the smallest hash of their file name: the same shards on every run and machine."""
    k = round(fraction * len(paths))
    if fraction > 0 and len(paths) >= 2:
        k = max(1, k)
    k = min(k, len(paths) - 1)
    test = set(sorted(paths, key=_shard_hash)[:k])
    return [p for p in paths if p not in test], [p for p in paths if p in test]


def _index_encoder(encoder: str) -> tuple[dict, str]:
    """``--encoder`` -> (the text_encoder record, where captions are embedded): hashing in the loader workers
    ("worker"); the sentence encoder batched on the training device ("device"), recorded as ``prepare
    captions`` records it (model package and version, never a path)."""
    name, _, arg = encoder.partition(":")
    if name == "sentence-transformers":
        if arg:  # a local directory is recorded without its path: nothing could resolve it at training time
            raise DataError("prepare index takes the packaged sentence model only (--encoder sentence-transformers,"
                            " the 'text' extra); a local model directory works with `stackgan prepare captions`")
        from ..text.text_encoders import SentenceTransformerEncoder

        return SentenceTransformerEncoder(None).spec(), "device"
    if name != "hashing":
        raise DataError(f"--encoder {encoder}: choose hashing[:DIM] (embedded in the loader workers) or "
                        "sentence-transformers (embedded on the training device)")
    try:
        dim = int(arg) if arg else 256
    except ValueError:
        raise DataError(f"--encoder {encoder}: DIM must be an integer") from None
    if not 1 <= dim <= 65536:
        raise DataError(f"--encoder {encoder}: DIM must be in 1..65536")
    return {"name": "hashing", "dim": dim}, "worker"


def prepare_index(pattern: str, encoder: str, out: str, test_fraction: float = 0.05, progress: bool = True,
                  caption_key: str = "") -> dict:
    if is_remote(pattern):
        raise DataError("prepare index reads local shard files (a pipe: or URL pattern cannot be indexed in place)")
    if not 0 <= test_fraction < 1:
        raise DataError(f"--test-fraction must be in [0, 1), got {test_fraction}")
    enc_spec, embed_on = _index_encoder(encoder)
    paths = [os.path.abspath(p) for p in expand_braces(pattern)]
    if not paths:
        raise DataError(f"shard pattern {pattern} matches nothing")
    missing = [p for p in paths if not os.path.lexists(p)]
    if missing:
        raise DataError(f"{len(missing)} of {len(paths)} shards not found, first: {missing[0]}")
    for p in paths:  # a FIFO would block the scan below
        require_regular(p, "shard")
    from tqdm import tqdm

    scans = {}
    for p in tqdm(paths, desc="indexing shards", unit="shard", disable=not progress, dynamic_ncols=True):
        scans[p] = scan_shard(p)
    total = sum(s["samples"] for s in scans.values())
    if total == 0:
        raise DataError(f"the shards of {pattern} hold no samples")
    img = sum((s["image_keys"] for s in scans.values()), Counter())
    caps = sum((s["caption_keys"] for s in scans.values()), Counter())
    image_keys = [k for k in IMAGE_KEYS if img[k]]
    if not image_keys:
        raise DataError(f"no sample of {pattern} holds an image ({'/'.join(IMAGE_KEYS)} members)")
    ckey = caption_key or ("txt" if caps["txt"] else "json" if caps["json"] else "")
    if ckey not in CAPTION_KEYS or not caps[ckey]:
        raise DataError(f"no sample of {pattern} holds a caption (.txt, or .json with a 'caption'); "
                        f"members seen: {sorted(img) + sorted(caps)}")
    train, test = split_shards(paths, test_fraction)
    summary = {"out": out, "shards": len(paths), "samples": total, "image_keys": image_keys, "caption_key": ckey,
               # skipped and counted while training (data.max_bad_fraction bounds them)
               "incomplete_samples": total - sum(s["complete"][ckey] for s in scans.values())}
    for split, group in (("train", train), ("test", test)):
        entries = [{"path": p, "samples": scans[p]["samples"], "size": os.path.getsize(p), "sha256": sha256_file(p)}
                   for p in group]
        m = {"format": DATASET_FORMAT, "version": DATASET_VERSION, "source": "index",
             "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "num_samples": sum(e["samples"] for e in entries),
             "text_encoder": enc_spec, "text_dim": enc_spec["dim"], "image_size": STORE_SIZE,
             "index": {"image_keys": image_keys, "caption_key": ckey, "fit": "crop", "embed_on": embed_on},
             "shards": entries}
        d = os.path.join(out, split)
        os.makedirs(d, exist_ok=True)
        tmp = os.path.join(d, MANIFEST + ".tmp")
        with open(tmp, "w") as f:
            json.dump(m, f, indent=1)
        os.replace(tmp, os.path.join(d, MANIFEST))
        summary[split] = m["num_samples"]
    return summary

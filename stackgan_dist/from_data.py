"""Captions and embeddings from a run's test split, for ``stackgan sample RUN --from-data``.

A model trained on precomputed embeddings (the StackGAN releases' char-CNN-RNN) cannot embed free text, so
its grids take real test captions with their stored embeddings; see docs/evaluation.md.
"""
from __future__ import annotations

import os

import torch

from .config import load_config
from .data.text.device_text import caption_embedder
from .data.read.index import is_remote, resolve_dataset
from .data.read.reader import read_batches
from .errors import UserError
from .inference import run_dir_of


def run_test_split(run) -> str:
    """``data.test`` of the run's own config.yaml, read as untrusted: a regular file of at most 1 MiB, safe YAML,
    validated, and never a ``pipe:`` command or URL."""
    root = run_dir_of(run.path)
    cfg_file = os.path.join(root, "config.yaml") if root else ""
    if not cfg_file or not os.path.isfile(cfg_file) or os.path.getsize(cfg_file) > 1 << 20:
        raise UserError(f"{run.path} has no readable run config.yaml beside its checkpoints to name its test split; "
                        "give the split with --data DIR")
    test = load_config(cfg_file).data.test
    if not test:
        raise UserError(f"the run's config {cfg_file} sets no data.test; give the split with --data DIR")
    if is_remote(test):  # a run's files are untrusted: a pipe: command from one would run code here
        raise UserError(f"the run's data.test is a stream ({test[:60]!r}); a run's config is not trusted to run "
                        "commands: give the split with --data")
    return test


def captions_from_split(run, data: str, n: int):
    """The first ``n`` samples of a test split (the run's own unless ``data``): their first captions and the
    embeddings the model was trained on (stored, or embedded as in training)."""
    info = resolve_dataset(data or run_test_split(run), key="--data" if data else "the run's data.test")
    if info.text_dim != run.model_config.text_dim:
        raise UserError(f"data {info.root or data} has text_dim {info.text_dim}, the model expects "
                        f"{run.model_config.text_dim}: it was trained on other data")
    if info.num_samples < 1:
        raise UserError(f"the test split {info.root or data} holds no samples")
    embed = caption_embedder(info.manifest, torch.device("cpu"))
    b = next(read_batches(info, run.stage, min(n, info.num_samples), embed=embed))
    captions = [c or f"sample {k}" for c, k in zip(b["caption"], b["key"])]
    return captions, b["text"].float().cpu()

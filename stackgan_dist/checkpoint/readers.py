"""Reading the newest checkpoint of a run that may be writing and pruning while we read it.

``inspect``, ``eval``, ``sample`` and Stage-II's start read a run that can be live: with
``checkpoint.keep_last=1`` the checkpoint chosen a moment ago is pruned as soon as the next one commits.
So a reader takes a snapshot: it resolves the newest valid checkpoint, reads its manifest and ``model.pt``
into memory, and checks the bytes it holds against the manifest; from then on pruning cannot touch what it
reads. A file that vanishes under a reader is not damage: it resolves the run again and takes the newest
valid checkpoint then, a bounded number of times, and only then reports the last error (one line, exit 2).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time

import torch

from ..errors import CheckpointError
from .files import open_read
from .manager import MAX_MODEL_FILE_BYTES, STEP_RE, resolve_checkpoint
from .manifest import MANIFEST, MAX_MANIFEST_BYTES, check_manifest

log = logging.getLogger("stackgan_dist.checkpoint")
READ_ATTEMPTS = 20  # each lost race means a newer checkpoint was committed meanwhile


class _Vanished(Exception):
    pass


def _read(path: str, limit: int) -> bytes:
    f = open_read(path, "checkpoint file", limit)
    if f is None:
        raise _Vanished(path)
    with f:
        return f.read(limit + 1)


def _snapshot(ck: str) -> tuple[dict, dict]:
    """(manifest, model.pt) of ``ck`` read into memory, model.pt checked against the manifest's sha256."""
    try:
        man = json.loads(_read(os.path.join(ck, MANIFEST), MAX_MANIFEST_BYTES))
        raw = _read(os.path.join(ck, "model.pt"), MAX_MODEL_FILE_BYTES)
    except FileNotFoundError as e:
        raise _Vanished(str(e)) from None
    problem = check_manifest(man, ck)
    if problem:
        raise CheckpointError(f"checkpoint {ck}: {problem}")
    if hashlib.sha256(raw).hexdigest() != man["files"]["model.pt"]["sha256"]:
        if not os.path.isdir(ck):
            raise _Vanished(ck)
        raise CheckpointError(f"checkpoint {ck}: model.pt does not match its manifest (corrupt)")
    try:
        saved = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- a damaged or hostile file is one clear line
        raise CheckpointError(f"refused to load checkpoint file {ck}/model.pt: {str(e).splitlines()[0][:200]}"
                              ) from None
    return man, saved


def load_newest(path: str, check=None, with_manifest: bool = False):
    """-> (checkpoint folder, loaded model.pt, ``check(saved, ck)``'s result[, manifest]). ``path`` as for
    ``resolve_checkpoint``; ``check`` (e.g. train_state.read_checkpoint) runs before anything is built. A
    named step folder is read once; a run directory is retried on its newest valid checkpoint while the one
    chosen keeps vanishing."""
    fixed = bool(STEP_RE.match(os.path.basename(os.path.normpath(path))))
    last: Exception | None = None
    for attempt in range(READ_ATTEMPTS):  # a named step folder leaves at its first failure (below)
        ck = None
        try:
            ck = resolve_checkpoint(path)
            man, saved = _snapshot(ck)
            res = check(saved, ck) if check is not None else None
            return (ck, saved, res, man) if with_manifest else (ck, saved, res)
        except (CheckpointError, _Vanished, OSError) as e:
            if isinstance(e, CheckpointError) and (fixed or ck is not None and os.path.isdir(ck)
                                                   or not os.path.exists(path)):
                raise  # one folder named, or it is there and bad, or the path names nothing: no race to wait out
            last = e
            if fixed:
                break
            log.info("checkpoint changed while it was read (%s); reading the newest again", e)
            time.sleep(min(0.2, 0.01 * (attempt + 1)))  # a writer between its rename and its prune
    if isinstance(last, CheckpointError):
        raise last
    raise CheckpointError(f"the checkpoints of {path} kept vanishing while they were read ({last}); try again")

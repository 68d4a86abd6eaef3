"""Reading the newest checkpoint of a run that may be writing and pruning while we read it.

``inspect``, ``eval``, ``sample`` and Stage-II's start read a run that can be live: with
``checkpoint.keep_last=1`` the checkpoint chosen a moment ago is pruned as soon as the next one commits.
A file that vanishes under a reader is not damage: the reader resolves the run again and takes the newest
valid checkpoint then, a few times, and only then reports the last error (one line, exit 2).
"""
from __future__ import annotations

import logging
import os
import time

from ..errors import CheckpointError
from .manager import STEP_RE, load_file, resolve_checkpoint

log = logging.getLogger("stackgan_dist.checkpoint")
READ_ATTEMPTS = 8  # each lost race means a newer checkpoint was committed: a few are plenty


def _vanished(ck: str) -> bool:
    """Whether ``ck`` was removed (or is being removed) since it was resolved: pruning, not damage."""
    return not os.path.isfile(os.path.join(ck, "manifest.json")) or not os.path.isfile(os.path.join(ck, "model.pt"))


def load_newest(path: str, check=None):
    """-> (checkpoint folder, loaded model.pt, ``check(saved, ck)``'s result). ``path`` as for
    ``resolve_checkpoint``; ``check`` (e.g. train_state.read_checkpoint) runs before anything is built.
    A named step folder is read once; a run directory is retried on its newest valid checkpoint while the one
    chosen keeps vanishing."""
    fixed = bool(STEP_RE.match(os.path.basename(os.path.normpath(path))))
    last: CheckpointError | None = None
    for attempt in range(1 if fixed else READ_ATTEMPTS):
        ck = None
        try:
            ck = resolve_checkpoint(path)
            saved = load_file(os.path.join(ck, "model.pt"))
            if _vanished(ck):  # the bytes may be from a folder mid-removal: read the newest again
                raise CheckpointError(f"checkpoint {ck} was removed while it was read")
            return ck, saved, (check(saved, ck) if check is not None else None)
        except CheckpointError as e:
            last = e
            if ck is not None and not _vanished(ck):
                raise  # the checkpoint is there and bad: damage, not a race
            log.info("checkpoint changed while it was read (%s); reading the newest again", e)
            time.sleep(0.01 * (attempt + 1))  # a writer between its rename and its prune: let it finish
    assert last is not None
    raise last

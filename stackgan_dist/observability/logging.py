"""Every rank logs warnings and errors with its rank; only rank 0 logs info.

Two streams: ``stackgan_dist`` (stderr, stamped with time and rank: the banner, step lines, warnings) and
``stackgan_dist.user`` (stdout, the bare line: what a run tells its user and scripts read, such as "resumed
from CKPT at step N", "received SIGTERM: ...", the end summary).
"""
from __future__ import annotations

import logging
import os
import shlex
import sys

user_log = logging.getLogger("stackgan_dist.user")


class _Current(logging.StreamHandler):
    """Writes to the current ``sys.<name>`` at each record, not the stream of the moment it was set up: a
    command run in-process after another (tests, a notebook) must not log into a stream that was closed."""

    def __init__(self, name: str):
        self._which = name
        super().__init__(getattr(sys, name))

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = getattr(sys, self._which)  # not setStream: it flushes the old one, which may be closed
        super().emit(record)


def setup_logging(rank: int = 0, level: str = "INFO") -> None:
    root = logging.getLogger("stackgan_dist")
    root.handlers.clear()
    h = _Current("stderr")
    h.setFormatter(logging.Formatter(f"[%(asctime)s rank{rank} %(levelname)s] %(message)s", "%H:%M:%S"))
    root.addHandler(h)
    root.setLevel(getattr(logging, level) if rank == 0 else logging.WARNING)
    root.propagate = False
    user_log.handlers.clear()
    user_log.addHandler(_Current("stdout"))
    user_log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    user_log.propagate = False


def reset_logging() -> None:
    """Back to a fresh process's state (no handlers, levels unset, records propagate to the root logger):
    what ``setup_logging`` changed, undone, so one in-process command does not inherit another's levels."""
    for lg in (logging.getLogger("stackgan_dist"), user_log):
        lg.handlers.clear()
        lg.setLevel(logging.NOTSET)
        lg.propagate = True


def show_progress(setting: str, is_main: bool, batch_job: bool, stream=None) -> bool:
    """The tqdm bar for ``log.progress``: "true"/"false" as said; "auto" only on rank 0 with stderr on a
    terminal outside a batch job (a job log is a file: a bar there is one endless carriage-return line)."""
    stream = sys.stderr if stream is None else stream
    if not is_main or setting == "false":
        return False
    return setting == "true" or (not batch_job and hasattr(stream, "isatty") and stream.isatty())


def resume_hint(run_dir: str) -> str:
    """How to resume a stopped run, for the line its stop prints: this command again, without --fresh."""
    argv = [a for a in sys.argv[1:] if a != "--fresh"]
    if os.path.basename(sys.argv[0]) in ("stackgan", "__main__.py") and argv[:1] == ["train"]:
        return "stackgan " + shlex.join(argv)
    return f"the same command without --fresh (it resumes from {run_dir}/checkpoints)"

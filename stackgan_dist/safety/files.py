"""Opening input files (shards, dataset files, release files) so that nothing blocks on a special file.

A FIFO, a device or a socket where a regular file belongs would make a plain ``open`` wait for a writer
forever (or read without end). Here the file is opened non-blocking (opening a FIFO then returns at once),
its type is checked on the open descriptor (no window between check and open), and only a regular file is
handed back, in blocking mode. Links are followed: datasets are often linked into place. ``pipe:`` and URL
shards are streams named by the config, opened elsewhere (read/samples.py).
"""
from __future__ import annotations

import os
import stat

from ..errors import DataError

_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def require_regular(path: str, what: str = "file") -> os.stat_result:
    """stat ``path`` (following links) and refuse anything but a regular file, in one line."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise DataError(f"cannot read {what} {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"{what} {path} is {_kind(st.st_mode)}, not a regular file")
    return st


def open_regular(path: str, what: str = "file"):
    """``open(path, "rb")`` for a regular file only; DataError (one line) for anything else."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise DataError(f"cannot read {what} {path}: {e.strerror or e}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise DataError(f"{what} {path} is {_kind(mode)}, not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise

"""Crash-loop guard: ``RUN/restarts.json`` counts resumes from one checkpoint that made no progress since.

Only a resume that passed every check and then began training counts (``record`` is called at that point);
a start refused for bad input never does. A resume from a newer step, or with another config (the command
corrected), starts the count afresh. More than ``checkpoint.max_restarts`` resumes from the same step with the
same config means the run dies before its next checkpoint every time: it stops instead of burning the
allocation, with a line saying so. The file is written atomically; an empty or torn one (a crash mid-write
on a filesystem without ordered renames) is ignored with a warning, never a traceback.
"""
from __future__ import annotations

import json
import logging
import os

from ..errors import UserError
from .files import RunFileError, RunFileTooLarge, read_bounded, write_atomic

log = logging.getLogger("stackgan_dist.checkpoint")
RESTARTS_FILE = "restarts.json"
MAX_RESTARTS_BYTES = 1 << 16  # the record is one short line


class CrashLoop(UserError):
    """Too many resumes from one checkpoint without progress."""


class RestartGuard:
    def __init__(self, run_dir: str, max_restarts: int, config_hash: str = ""):
        self.path = os.path.join(run_dir, RESTARTS_FILE)
        self.max = max_restarts
        self.config_hash = config_hash

    def read(self) -> dict:
        """The record, or an empty one when absent or unreadable (said once, as a warning)."""
        try:  # a regular file of bounded size only (a FIFO or a link here is refused, never waited on)
            raw = read_bounded(self.path, MAX_RESTARTS_BYTES, "restart record")
            if raw is None:
                return {}
            data = json.loads(raw.decode("utf-8"))
        except RunFileTooLarge as e:
            log.warning("%s; counting restarts afresh", e)
            return {}
        except RunFileError:  # a link, FIFO or folder: refused (one line, exit 2), never followed or waited on
            raise
        except (OSError, ValueError, RecursionError, UserError) as e:
            log.warning("%s is unreadable (%s: a crash while it was written?); counting restarts afresh",
                        self.path, type(e).__name__)
            return {}
        if not isinstance(data, dict) or type(data.get("step")) is not int or type(data.get("count")) is not int:
            log.warning("%s does not hold a restart record; counting restarts afresh", self.path)
            return {}
        return data

    def check(self, step: int) -> int:
        """Raises CrashLoop if resuming from ``step`` once more would exceed the bound; returns the count this
        resume would make. Writes nothing."""
        data = self.read()
        same = data.get("step") == step and data.get("config", "") == self.config_hash
        count = data["count"] + 1 if same else 1
        if count > self.max:
            raise CrashLoop(f"run resumed {count - 1} times from step {step} without reaching a new checkpoint "
                            f"(checkpoint.max_restarts={self.max}); stopping instead of burning the allocation. "
                            f"Fix the cause (see the previous attempts' logs), then run again: a changed config "
                            f"starts the count afresh, or delete {self.path}")
        return count

    def record(self, step: int) -> None:
        """Counts one resume from ``step`` (call it once every check has passed, as training begins)."""
        count = self.check(step)
        write_atomic(self.path, json.dumps({"step": step, "count": count, "config": self.config_hash}),
                     "restart record")

"""``RUN/metrics.jsonl`` (the machine-readable record) and TensorBoard scalars/images under ``RUN/tb``."""
from __future__ import annotations

import json
import logging
import os
import threading

import numpy as np

from ..checkpoint.files import check_entry, open_append, open_read, os_error, run_subdir, write_atomic

log = logging.getLogger("stackgan_dist.metrics")


def read_records(path: str, up_to_step: float = float("inf")) -> tuple[list[dict], int]:
    """The records of a metrics.jsonl with step <= ``up_to_step``, and how many lines were unreadable: a
    last line cut short, NUL padding a crashed filesystem left, or anything else that is not a JSON object
    with an integer step. Never raises on the file's content."""
    keep, torn = [], 0
    f = open_read(path, "metrics file")  # a regular file: a FIFO here must not hang a resume
    if f is None:
        return keep, torn
    with f:
        for raw in f:
            text = raw.strip()
            if not text:
                continue
            try:
                rec = json.loads(text.decode("utf-8")) if b"\0" not in text else None
            except (ValueError, RecursionError):
                rec = None
            if not isinstance(rec, dict) or type(rec.get("step")) is not int:
                torn += 1
                continue
            if rec["step"] <= up_to_step:
                keep.append(rec)
    return keep, torn


class MetricsWriter:
    def __init__(self, run_dir: str, enabled: bool, resume_step: int = 0, tensorboard: bool = True):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.tb = None
        if not enabled:
            return
        if check_entry(self.path, rewrite=True) is not None:  # drop records past the resume step: redone
            keep, torn = read_records(self.path, resume_step)
            if torn:
                log.warning("%s: dropped %d unreadable line(s) (a record cut short or NUL-padded by a crash "
                            "mid-write); the records before and after are kept", self.path, torn)
            write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in keep), "metrics file")
        self.f = open_append(self.path, "metrics file")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb_dir = run_subdir(run_dir, "tb")
                self.tb = self._tb(SummaryWriter, self.tb_dir, purge_step=resume_step + 1 if resume_step else None)
                _quiet_event_writer_threads()
            except ImportError:
                self.tb = None

    def _tb(self, fn, *args, **kw):
        """A TensorBoard call; its write errors (raised here by the writer thread's next check) as ours."""
        try:
            return fn(*args, **kw)
        except OSError as e:  # a full disk: transient (exit 75), one line
            raise os_error(e, f"cannot write TensorBoard events in {self.tb_dir}") from None

    def log(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        rec = {"step": step, **record}
        try:
            self.f.write(json.dumps(rec) + "\n")
        except OSError as e:  # a full disk: transient (exit 75), one line
            raise os_error(e, f"cannot append to {self.path}") from None
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb(self.tb.add_scalar, _tb_tag(k), v, step)

    def image(self, step: int, tag: str, grid_hwc: np.ndarray) -> None:
        if self.enabled and self.tb is not None:
            self._tb(self.tb.add_image, tag, grid_hwc, step, dataformats="HWC")

    def close(self) -> None:
        if self.enabled:
            try:
                self.f.close()
            except OSError as e:
                raise os_error(e, f"cannot append to {self.path}") from None
            if self.tb is not None:
                self._tb(self.tb.flush)  # raises what the writer thread met; close() alone would drop it
                self._tb(self.tb.close)


def _quiet_event_writer_threads() -> None:
    """TensorBoard's writer thread re-raises a write error, and threading prints its traceback; the error
    itself reaches the run through the writer's next call (MetricsWriter._tb, one line, exit 75)."""
    prev = threading.excepthook
    if getattr(prev, "_stackgan_quiet_tb", False):
        return

    def hook(args):
        if type(args.thread).__name__ == "_AsyncWriterThread" and issubclass(args.exc_type, OSError):
            return
        prev(args)

    hook._stackgan_quiet_tb = True
    threading.excepthook = hook


def _tb_tag(k: str) -> str:
    if k.startswith(("d_", "g_", "kl")):
        return f"loss/{k}"
    if k.startswith("lr"):
        return f"lr/{k}"
    return f"train/{k}"

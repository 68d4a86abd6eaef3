"""Test hooks, all in one place, driven by environment variables and no-ops when those are unset.

Production code imports this module in one place (the trainer). Hooks:
- ``STACKGAN_TEST_DIGEST_DIR=D``: after every step each rank appends digests of its own G and D
  parameters and buffers to ``D/rank{r}.jsonl``, so a test can check that ranks stay identical.
- ``STACKGAN_TEST_PAUSE_AT_STEP=N`` + ``STACKGAN_TEST_RENDEZVOUS_DIR=D``: a deterministic rendezvous. After
  step N each rank writes ``D/rank{r}.step{N}`` and waits until ``D/go`` exists, so a test can signal or kill
  processes at a known step without sleeping. The wait is bounded (``STACKGAN_TEST_RENDEZVOUS_TIMEOUT_S``,
  default 300 s): a test that never answers fails the run loudly instead of hanging it.
- ``STACKGAN_TEST_PID_DIR=D``: every training process (not a dry run) appends its pid to ``D/rank{r}.pid`` when
  its trainer is made, so a test can count attempts (a restarted group appends a second line).
- ``STACKGAN_TEST_PAUSE_IN_SAVE=N`` + ``STACKGAN_TEST_RENDEZVOUS_DIR=D``: the same rendezvous inside the
  step-N checkpoint save, after this rank's files are written and before the save is committed (marker
  ``D/rank{r}.save{N}``), so a test can kill a process with a save provably half done.
- ``STACKGAN_TEST_PAUSE_IN_START=1`` + ``STACKGAN_TEST_RENDEZVOUS_DIR=D``: the same rendezvous while the run
  is starting (its trainer just made, nothing checked or built yet; marker ``D/rank{r}.start0``), so a test
  can signal a process provably blocked in start-up.
While a rank waits at a rendezvous, a signal it receives (its handler ran) adds the marker
``D/rank{r}.{what}{N}.signalled``: a test whose signal travels through a launcher (scancel -> slurmstepd ->
the task) waits for it before ``go``, instead of racing the delivery.
"""
from __future__ import annotations

import json
import os
import time


class Hooks:
    def __init__(self, environ=None):
        e = os.environ if environ is None else environ
        self.digest_dir = e.get("STACKGAN_TEST_DIGEST_DIR", "")
        self.pause_at = int(e.get("STACKGAN_TEST_PAUSE_AT_STEP", "0") or 0)
        self.pause_in_save = int(e.get("STACKGAN_TEST_PAUSE_IN_SAVE", "0") or 0)
        self.pause_in_start = e.get("STACKGAN_TEST_PAUSE_IN_START", "") not in ("", "0")
        self.pid_dir = e.get("STACKGAN_TEST_PID_DIR", "")
        self.rendezvous_dir = e.get("STACKGAN_TEST_RENDEZVOUS_DIR", "")
        self.rendezvous_timeout_s = float(e.get("STACKGAN_TEST_RENDEZVOUS_TIMEOUT_S", "300") or 300)
        if (self.pause_at or self.pause_in_save or self.pause_in_start) and not self.rendezvous_dir:
            raise RuntimeError("STACKGAN_TEST_PAUSE_AT_STEP / _IN_SAVE / _IN_START need STACKGAN_TEST_RENDEZVOUS_DIR")

    def started(self, rank: int) -> None:
        if self.pid_dir:
            os.makedirs(self.pid_dir, exist_ok=True)
            with open(os.path.join(self.pid_dir, f"rank{rank}.pid"), "a") as f:
                f.write(f"{os.getpid()}\n")
        if self.pause_in_start:
            rendezvous(self.rendezvous_dir, 0, rank, self.rendezvous_timeout_s, what="start")

    def after_step(self, step: int, strategy, rank: int) -> None:
        if self.digest_dir:
            write_digest(self.digest_dir, step, strategy, rank)
        if self.pause_at and step == self.pause_at:
            rendezvous(self.rendezvous_dir, step, rank, self.rendezvous_timeout_s)

    def after_save_written(self, step: int, rank: int) -> None:
        """Called by the checkpoint writer (possibly its background thread) once this rank's files of the
        step-``step`` save are on disk and before the save is committed."""
        if self.pause_in_save and step == self.pause_in_save:
            rendezvous(self.rendezvous_dir, step, rank, self.rendezvous_timeout_s, what="save")


def write_digest(out: str, step: int, strategy, rank: int) -> None:
    from .checkpoint.manager import params_digest
    from .distributed import unwrap

    G, D = unwrap(strategy.g.net), unwrap(strategy.d.net)
    rec = {"step": step, "rank": rank,
           "G_params": params_digest(dict(G.named_parameters())),
           "D_params": params_digest(dict(D.named_parameters())),
           "G_buffers": params_digest(dict(G.named_buffers())), "D_buffers": params_digest(dict(D.named_buffers())),
           "G_sum": float(sum(p.detach().double().sum() for p in G.parameters())),
           "D_sum": float(sum(p.detach().double().sum() for p in D.parameters()))}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"rank{rank}.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")


def rendezvous(d: str, step: int, rank: int, timeout_s: float, what: str = "step") -> None:
    """Tell the test this rank reached ``what`` ``step`` (finished the step, or wrote its save); wait for
    the test's ``go``."""
    os.makedirs(d, exist_ok=True)
    mark = os.path.join(d, f"rank{rank}.{what}{step}")
    with open(mark + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(mark + ".tmp", mark)  # the test never sees a half-written marker
    from .checkpoint import signals

    go, told = os.path.join(d, "go"), False
    t0 = time.monotonic()
    while not os.path.exists(go):
        if signals.last_received() and not told:  # a signal that travels through a launcher arrived
            open(f"{mark}.signalled", "w").close()
            told = True
        if time.monotonic() - t0 > timeout_s:
            raise RuntimeError(f"test rendezvous: no {go} within {timeout_s:.0f}s at {what} {step}")
        time.sleep(0.01)

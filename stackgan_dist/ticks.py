"""What the step that just ran makes due: a log line, a sample grid, a checkpoint (on schedule, or late by
the every_minutes clock), the commit of a background save, a stop on a signal, the lower collective timeout
after the first steps. The trainer's loop asks once per step and acts; this object owns the counting.

The stop flag and the clock are agreed by every rank in one collective, every ``train.stop_check_every``
steps, after the first step (a warning signal that came while the run started stops it there) and at the
last; everything else here is decided from the step and images seen alone, equally on every rank.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from .distributed.collectives import any_flags

STARTUP_STEPS = 3  # collectives of the first steps run under train.dist_startup_timeout_s


@dataclass(frozen=True)
class Due:
    log: bool
    sample: bool
    checkpoint: bool
    commit: bool  # commit the background save still pending
    stop: bool  # a signal arrived (on some rank): checkpoint, then leave
    lower_timeout: bool


class Ticks:
    def __init__(self, cfg, schedule, env, flag, start_step: int):
        self.schedule, self.env, self.flag = schedule, env, flag
        self.log_every = cfg.log.every_steps
        self.stop_check_every = cfg.train.stop_check_every
        self.every_s = 60 * cfg.checkpoint.every_minutes
        # a background save is committed this many steps after it began (or at the next save, stop or end)
        self.commit_lag = max(1, min(10, cfg.checkpoint.every_steps // 2))
        self.start_step = start_step
        self.last_checkpoint_t = time.monotonic()
        self.timeout_lowered = False

    def after_step(self, st, images_before: int, pending_step: int | None) -> Due:
        """Collective on the steps that agree on the stop flag: every rank calls it after every step."""
        steps_run = st.step - self.start_step
        last = self.schedule.done(st)
        checkpoint = self.schedule.checkpoint_due(st, images_before)
        stop = False
        if steps_run % self.stop_check_every == 0 or steps_run == 1 or last:
            late = self.every_s > 0 and time.monotonic() - self.last_checkpoint_t > self.every_s
            stop, late = any_flags([self.flag.received is not None, late], self.env)
            checkpoint = checkpoint or late
        commit = pending_step is not None and not (checkpoint or stop) and st.step >= pending_step + self.commit_lag
        lower = not self.timeout_lowered and steps_run >= STARTUP_STEPS
        self.timeout_lowered = self.timeout_lowered or lower
        return Due(log=st.step % self.log_every == 0 or last, sample=self.schedule.sample_due(st, images_before),
                   checkpoint=checkpoint, commit=commit, stop=stop, lower_timeout=lower)

    def checkpointed(self) -> None:
        self.last_checkpoint_t = time.monotonic()

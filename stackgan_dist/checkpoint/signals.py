"""Preemption signals: the handler only sets a flag; the trainer acts on it at a step boundary.

Saving inside a signal handler is a known source of hangs and torn files (Lightning #21406), so the
handler does nothing else. At the next step boundary the ranks agree on the flag with one collective
(any rank signalled -> all stop after the same step), write a checkpoint and exit with
``EXIT_REQUEUE``, which the launchers treat as "requeue me".
"""
from __future__ import annotations

import signal

EXIT_REQUEUE = 75  # EX_TEMPFAIL: checkpointed on a signal; resubmit/requeue to continue
EXIT_USER_ERROR = 2

_last_received: int | None = None  # kept after restore(): a launcher asks which signal stopped the run


def last_received() -> str:
    """Name of the last signal a SignalFlag caught in this process ("SIGTERM", "SIGUSR2"...), or ""."""
    return signal.Signals(_last_received).name if _last_received else ""


class SignalFlag:
    def __init__(self, warning_signal: str = "USR1"):
        self.received: int | None = None
        names = {"TERM", "USR1", "USR2", warning_signal}
        self.signals = [getattr(signal, f"SIG{n}") for n in sorted(names)]
        self._old: dict = {}

    def _handler(self, signum, _frame):
        global _last_received
        self.received = signum
        _last_received = signum

    def install(self) -> "SignalFlag":
        for s in self.signals:
            try:
                self._old[s] = signal.signal(s, self._handler)
            except ValueError:  # not the main thread (e.g. some Ray actors): the launcher handles signals
                pass
        return self

    def restore(self) -> None:
        for s, h in self._old.items():
            try:
                signal.signal(s, h)
            except ValueError:
                pass
        self._old.clear()

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""

"""Preemption signals: the handler only sets a flag; the trainer acts on it at a step boundary.

Saving inside a signal handler is a known source of hangs and torn files (Lightning #21406), so the
handler does nothing else. At the next step boundary the ranks agree on the flag with one collective
(any rank signalled -> all stop after the same step), write a checkpoint and exit: ``EXIT_REQUEUE`` (75)
after SIGTERM or the scheduler's warning signal, which the launchers treat as "requeue me", and
``EXIT_INTERRUPTED`` (130) after Ctrl-C (SIGINT), which they do not requeue. A second Ctrl-C interrupts at
once, without a checkpoint.

``install_early`` catches the same signals from the moment the command starts. A warning signal (USR1,
USR2) that arrives while the run is still starting (imports, data checks, process group) is not fatal (exit
138): the trainer's flag picks it up, and the run checkpoints and exits 75 at its first step boundary.
SIGTERM and SIGINT while starting end the process at once (``StartupSignal``: 75 after SIGTERM, 130 after
SIGINT): there is nothing to checkpoint yet, and a start blocked somewhere (a hung filesystem, a peer that
never comes) would otherwise never reach the step boundary where a flag is read. Once the trainer's flag is
installed (the step loop runs), every signal is a flag again.
"""
from __future__ import annotations

import signal

from ..errors import EXIT_INTERRUPTED, EXIT_REQUEUE, EXIT_USER_ERROR, StartupSignal  # noqa: F401 -- re-exported

_last_received: int | None = None  # kept after restore(): a launcher asks which signal stopped the run
_early: "SignalFlag | None" = None


def last_received() -> str:
    """Name of the last signal a SignalFlag caught in this process ("SIGTERM", "SIGUSR2"...), or ""."""
    return signal.Signals(_last_received).name if _last_received else ""


class SignalFlag:
    def __init__(self, warning_signal: str = "USR1", interrupt: bool = True):
        self.received: int | None = None
        names = {"TERM", "USR1", "USR2", warning_signal} | ({"INT"} if interrupt else set())
        self.signals = [getattr(signal, f"SIG{n}") for n in sorted(names)]
        self._old: dict = {}
        self.starting = False  # install_early's: TERM and INT raise StartupSignal until the loop takes over

    def _handler(self, signum, _frame):
        global _last_received
        if self.starting and signum in (signal.SIGTERM, signal.SIGINT):
            _last_received = signum
            raise StartupSignal(signal.Signals(signum).name,
                                EXIT_INTERRUPTED if signum == signal.SIGINT else EXIT_REQUEUE)
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without a checkpoint
        self.received = signum
        _last_received = signum

    def install(self) -> "SignalFlag":
        global _early
        if _early is not None and _early is not self:  # a signal caught while the run was starting counts
            self.received = self.received or _early.received
            _early.starting = False  # the loop runs: its handlers, restored after it, only set the flag
            _early = None
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

    @property
    def exit_code(self) -> int:
        """130 after Ctrl-C, else 75 (requeue me)."""
        return EXIT_INTERRUPTED if self.received == signal.SIGINT else EXIT_REQUEUE


def install_early() -> SignalFlag:
    """Catches TERM, INT, USR1 and USR2 (every warning signal the config may name) from process start (see
    the module docstring): TERM and INT end the start at once, USR1/USR2 are kept for the trainer's flag."""
    global _early
    _early = None
    flag = SignalFlag("USR1", interrupt=True)
    flag.starting = True
    _early = flag.install()
    return _early


def pending_early() -> str:
    """The signal caught before training began, if any ("" otherwise)."""
    return _early.name if _early is not None else ""

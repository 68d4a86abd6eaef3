"""How a ``stackgan`` process ends when it formed a process group: the group is left to the kernel.

Tearing a gloo group down at the end of a process (``destroy_process_group``, then the interpreter's own
finalisation of torch's objects) has ended finished runs with SIGABRT ("terminate called without an active
exception") on loaded 2-core machines: a rank of a torchrun run that had written its final checkpoint, so
torchrun reported the whole run failed, and a Slurm job would fail after its work was done. The cause inside
torch was not pinned down (faulthandler, enabled by the command, now prints every thread's stack if it
comes back). What removes the window: after the ranks' closing barrier (distributed/env.teardown), a process
that exits anyway skips both steps. Output is flushed and the exit code kept; the kernel closes the sockets.

Only the process's own command does this (``cli.main`` without argv); code that calls ``run_training`` in a
process it keeps (submitit, Ray Train, tests, a notebook) gets the group destroyed as before.
"""
from __future__ import annotations

import logging
import os
import sys

leave_groups = False  # True once cli.main runs as the process's own command line


def begin() -> None:
    """For the process's own command: a crash in native code (SIGSEGV, SIGABRT) prints every thread's Python
    stack into the job log, and a process group is left to the kernel at exit."""
    import faulthandler

    global leave_groups
    faulthandler.enable(all_threads=True)
    leave_groups = True


def end(rc: int) -> int:
    """-> ``rc`` where no group is left; else flushes and ends the process with ``rc`` at once."""
    dist = sys.modules.get("torch.distributed")
    if not (leave_groups and dist is not None and dist.is_available() and dist.is_initialized()):
        return rc
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader gone or a closed stream: the exit code still stands
            pass
    os._exit(rc)

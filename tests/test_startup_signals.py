"""SIGTERM and SIGINT while a run is still starting end it at once, with the documented exit code.

Before the step loop runs there is no step boundary where a flag would be read, so a start blocked somewhere
(a hung filesystem, a peer that never comes) ignored SIGTERM, which is all that ``timeout``, Slurm and Ray
send. The run below is provably blocked in start-up (the test rendezvous of stackgan_dist/testing.py holds it
there until told to go, which never happens): the signal must end it within seconds, exit 75 after SIGTERM
(requeue: nothing was lost) and 130 after SIGINT, in one line, with nothing written to the run directory.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from conftest import PY, REPO, tiny_overrides, wait_for
from stackgan_dist.errors import EXIT_INTERRUPTED, EXIT_REQUEUE


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, EXIT_REQUEUE), (signal.SIGINT, EXIT_INTERRUPTED)],
                         ids=["TERM", "INT"])
def test_a_signal_while_blocked_in_start_up_ends_the_run_within_seconds(synth_data, tmp_path, sig, code):
    run, rv = tmp_path / "run", tmp_path / "rv"
    env = dict(os.environ, OMP_NUM_THREADS="1", STACKGAN_TEST_PAUSE_IN_START="1",
               STACKGAN_TEST_RENDEZVOUS_DIR=str(rv))
    p = subprocess.Popen([PY, "-m", "stackgan_dist", "train", "configs/demo/stage1.yaml",
                          *tiny_overrides(synth_data, run, 1, steps=4)], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: os.path.isfile(rv / "rank0.start0"), p, what="the run blocked in start-up", poll=0.01)
        t0 = time.monotonic()
        p.send_signal(sig)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    took = time.monotonic() - t0
    assert p.returncode == code, err[-3000:]
    assert took < 20, f"took {took:.1f}s to stop"
    assert "Traceback" not in err, err
    lines = [ln for ln in err.strip().splitlines() if signal.Signals(sig).name in ln]
    assert len(lines) == 1 and "while starting" in lines[0] and f"exiting with {code}" in lines[0], err
    assert not run.exists() or not os.listdir(run), "a run stopped while starting wrote its run directory"

"""Preemption signals with real processes: SIGUSR1 (the scheduler's warning signal) and SIGTERM make every
rank finish the same step, write a checkpoint and exit with 75 (requeue me); the resumed run ends with the
uninterrupted run's parameters. The handler only sets a flag: the save happens at a step boundary."""
from __future__ import annotations

import os
import re
import signal

import pytest

from stackgan_dist.checkpoint.manager import read_latest
from stackgan_dist.checkpoint.signals import EXIT_REQUEUE
from conftest import committed, digest, finish, start
from test_resume import single_cmd, torchrun_cmd, train_args, wait_for, worker_pid

STEPS = 12
SLOW = {"STACKGAN_TEST_STEP_DELAY_S": "0.4"}  # the signal lands mid-run, well before the last step


def wait_for_step(run, step, p):
    wait_for(lambda: committed(run, step), p, what=f"the step-{step} checkpoint")


@pytest.fixture(scope="module")
def ref1(synth_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("sigref1")
    finish(start(single_cmd(train_args(synth_data, d / "run", 1, STEPS)), log_path=d / "log"), d / "log")
    return digest(d / "run")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["USR1", "TERM"])
def test_signal_checkpoints_exits_75_and_resumes_exactly(synth_data, tmp_path, ref1, sig):
    run = tmp_path / "run"
    p = start(single_cmd(train_args(synth_data, run, 1, STEPS)), env=SLOW, log_path=tmp_path / "a.log")
    wait_for_step(run, 4, p)
    p.send_signal(sig)
    text = finish(p, tmp_path / "a.log", expect=EXIT_REQUEUE)
    line = next(ln for ln in text.splitlines() if ln.startswith("received"))
    stopped_at = int(line.split("checkpoint written at step ")[1].split(";")[0])
    assert 4 < stopped_at < STEPS and committed(run, stopped_at), text[-2000:]
    assert read_latest(str(run / "checkpoints")) == f"step_{stopped_at:08d}"
    text = finish(start(single_cmd(train_args(synth_data, run, 1, STEPS)), log_path=tmp_path / "b.log"),
                  tmp_path / "b.log")
    assert f"step_{stopped_at:08d} at step {stopped_at}" in text
    assert digest(run) == ref1


@pytest.mark.slow
def test_usr1_to_one_rank_stops_both_at_the_same_step(synth_data, tmp_path):
    """srun delivers the warning to every task, but a signal that reaches only one rank must still stop
    the whole group at one agreed step (torchrun forwards no USR1: the test signals the worker itself)."""
    run = tmp_path / "run"
    p = start(torchrun_cmd(train_args(synth_data, run, 1, STEPS)), env=SLOW, log_path=tmp_path / "a.log")
    wait_for_step(run, 4, p)
    os.kill(worker_pid(p.pid, 1), signal.SIGUSR1)
    # torchrun itself exits 1 when a worker exits non-zero; each worker's own code is in its summary
    # (under Slurm, srun starts the workers and 75 reaches the batch script)
    text = finish(p, tmp_path / "a.log", expect=1)
    # once the first worker exits non-zero torchrun SIGTERMs the other, which may still be on its way out
    codes = set(re.findall(r"exitcode\s*: (-?\d+)", text))
    assert str(EXIT_REQUEUE) in codes and codes <= {str(EXIT_REQUEUE), "-15"}, text[-3000:]
    assert "received a signal on another rank" in text or "received USR1" in text, text[-2000:]
    line = next(ln for ln in text.splitlines() if "checkpoint written at step" in ln)
    stopped_at = int(line.split("checkpoint written at step ")[1].split(";")[0])
    assert committed(run, stopped_at)
    assert sorted(f.name for f in (run / "checkpoints" / f"step_{stopped_at:08d}").glob("rank_*.pt")) == \
        ["rank_00000.pt", "rank_00001.pt"]

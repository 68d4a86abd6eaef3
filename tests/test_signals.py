"""Preemption signals with real processes: SIGUSR1 (the scheduler's warning signal) and SIGTERM make every
rank finish the same step, write a checkpoint and exit with 75 (requeue me); the resumed run ends with the
uninterrupted run's parameters. The handler only sets a flag; the ranks agree on it every
``train.stop_check_every`` steps (one collective, with the every_minutes clock), so the stop step is known
in advance: signals land at a rendezvous, never after a sleep."""
from __future__ import annotations

import os
import re
import signal

import pytest

from stackgan_dist.checkpoint.manager import read_latest
from conftest import (Rendezvous, committed, digest, finish, metrics, run_cli, single_cmd, start, tiny_overrides,
                      torchrun_cmd, worker_pid)
from stackgan_dist.checkpoint.signals import EXIT_REQUEUE

STEPS = 12
CFG = "configs/demo/stage1.yaml"


def train_args(data, run, steps=STEPS, extra=()):
    return ["train", CFG, *tiny_overrides(data, run, 1, steps, ["checkpoint.every_steps=4", *extra])]


def stopped_at(text: str) -> int:
    line = next(ln for ln in text.splitlines() if "checkpoint written at step" in ln)
    return int(line.split("checkpoint written at step ")[1].split(";")[0])


@pytest.fixture(scope="module")
def ref1(synth_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("sigref1")
    finish(start(single_cmd(train_args(synth_data, d / "run")), log_path=d / "log"), d / "log")
    return digest(d / "run")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["USR1", "TERM"])
def test_signal_checkpoints_exits_75_and_resumes_exactly(synth_data, tmp_path, ref1, sig):
    """Signalled while paused after step 5; the flag is agreed at the next check (every 3 steps: step 6)."""
    run = tmp_path / "run"
    rv = Rendezvous(tmp_path / "rv", 5)
    p = start(single_cmd(train_args(synth_data, run, extra=["train.stop_check_every=3"])), env=rv.env,
              log_path=tmp_path / "a.log")
    rv.wait(p)
    p.send_signal(sig)
    rv.go()
    text = finish(p, tmp_path / "a.log", expect=EXIT_REQUEUE)
    assert f"received {signal.Signals(sig).name}: checkpoint written at step 6;" in text, text[-2000:]
    assert committed(run, 6) and read_latest(str(run / "checkpoints")) == "step_00000006"
    text = finish(start(single_cmd(train_args(synth_data, run)), log_path=tmp_path / "b.log"), tmp_path / "b.log")
    assert "step_00000006 at step 6" in text
    assert digest(run) == ref1


@pytest.mark.slow
def test_usr1_to_one_rank_stops_both_at_the_same_step(synth_data, tmp_path):
    """srun delivers the warning to every task, but a signal that reaches only one rank must still stop
    the whole group at one agreed step (torchrun forwards no USR1: the test signals the worker itself)."""
    run = tmp_path / "run"
    rv = Rendezvous(tmp_path / "rv", 5, ranks=(0, 1))
    p = start(torchrun_cmd(train_args(synth_data, run, extra=["train.stop_check_every=2"])), env=rv.env,
              log_path=tmp_path / "a.log")
    rv.wait(p)
    os.kill(worker_pid(p.pid, 1), signal.SIGUSR1)
    rv.go()
    # torchrun itself exits 1 when a worker exits non-zero; each worker's own code is in its summary
    # (under Slurm, srun starts the workers and 75 reaches the batch script)
    text = finish(p, tmp_path / "a.log", expect=1)
    # once the first worker exits non-zero torchrun SIGTERMs the other, which may still be on its way out
    codes = set(re.findall(r"exitcode\s*: (-?\d+)", text))
    assert str(EXIT_REQUEUE) in codes and codes <= {str(EXIT_REQUEUE), "-15"}, text[-3000:]
    # rank 0 prints, and it was not the one signalled
    assert "received a signal on another rank: checkpoint written at step 6;" in text, text[-2000:]
    assert stopped_at(text) == 6 and committed(run, 6)
    assert sorted(f.name for f in (run / "checkpoints" / "step_00000006").glob("rank_*.pt")) == \
        ["rank_00000.pt", "rank_00001.pt"]


@pytest.mark.slow
def test_every_minutes_checkpoints_at_the_stop_checks(synth_data, tmp_path):
    """checkpoint.every_minutes is read on the same cadence as the stop flag: with a clock that is always
    late and every_steps out of reach, a checkpoint is written at every check (after the first step, which is
    checked too, then steps 2, 4, 6) and no other."""
    run = tmp_path / "run"
    run_cli(*train_args(synth_data, run, 6, ["checkpoint.every_steps=1000", "checkpoint.every_minutes=1e-9",
                                             "train.stop_check_every=2", "checkpoint.keep_last=10"]), check=True)
    steps = sorted(int(n.split("_")[1]) for n in os.listdir(run / "checkpoints") if n.startswith("step_"))
    assert steps == [1, 2, 4, 6], steps


@pytest.mark.slow
def test_lr_decay_and_length_in_epochs(synth_data, tmp_path):
    """96 training samples, global batch 4: max_epochs=0.5 is 12 steps; lr_decay_epochs=0.25 halves the
    learning rates after 24 images (step 6); sample grids every 0.25 epochs too."""
    run = tmp_path / "run"
    run_cli(*train_args(synth_data, run, 1000, ["train.max_epochs=0.5", "train.lr_decay_epochs=0.25",
                                                "train.lr_g=0.001", "train.lr_d=0.002",
                                                "log.sample_every_epochs=0.25"]), check=True)
    recs = metrics(run)
    assert [r["step"] for r in recs] == [2, 4, 6, 8, 10, 12]
    assert [r["lr_g"] for r in recs] == [0.001] * 3 + [0.0005] * 3
    assert [r["lr_d"] for r in recs] == [0.002] * 3 + [0.001] * 3
    assert [r["images_seen"] for r in recs] == [8, 16, 24, 32, 40, 48]
    assert sorted(f for f in os.listdir(run / "samples") if f.endswith(".png")) == [f"step_{s:08d}.png" for s in (6, 12)]


def test_a_crash_in_native_code_leaves_the_python_stack_in_the_log(synth_data, tmp_path):
    """SIGABRT (what a C++ std::terminate raises) while paused after step 2: the job log shows where every
    thread was, so a crash in a native library can be traced from a Slurm log."""
    rv = Rendezvous(tmp_path / "rv", 2)
    p = start(single_cmd(train_args(synth_data, tmp_path / "run", steps=4)), env=rv.env, log_path=tmp_path / "a.log")
    rv.wait(p)
    p.send_signal(signal.SIGABRT)
    text = finish(p, tmp_path / "a.log", expect=-signal.SIGABRT)
    assert "Fatal Python error: Aborted" in text, text[-3000:]
    assert "stackgan_dist/testing.py" in text and "stackgan_dist/trainer.py" in text, text[-3000:]

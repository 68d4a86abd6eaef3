"""Kill-and-resume exactness with real processes and real SIGKILLs.

A run killed at any moment (mid-step, or in the middle of writing a checkpoint) and resumed from its last
complete checkpoint ends with bitwise the parameters of the run that was never interrupted
(``stackgan inspect`` params_sha256), for 1 and 2 processes, at Stage-I and Stage-II; and under
``torchrun --max-restarts`` a SIGKILLed worker makes the group restart and finish with the same digest.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from stackgan_dist.checkpoint.manager import read_latest
from conftest import PY, committed, digest, finish, run_cli, start, tiny_overrides

CFG = {1: "configs/demo/stage1.yaml", 2: "configs/demo/stage2.yaml"}
# `stackgan inspect` needs only the committed checkpoint; these are the shared knobs of the runs here.
EVERY = 4


def train_args(data, run, stage, steps, extra=()):
    return ["train", CFG[stage], *tiny_overrides(data, run, stage, steps=steps,
                                                 extra=[f"checkpoint.every_steps={EVERY}", *extra])]


def single_cmd(args):
    return [PY, "-m", "stackgan_dist", *map(str, args)]


def torchrun_cmd(args, nproc=2, max_restarts=0):
    return [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            f"--max-restarts={max_restarts}", "--monitor-interval=0.5", "-m", "stackgan_dist", *map(str, args)]


def wait_for(pred, p: subprocess.Popen, timeout=300, what="condition", poll=0.02):
    t0 = time.monotonic()
    while not pred():
        if p.poll() is not None:
            raise AssertionError(f"process exited ({p.returncode}) before {what}")
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll)


def mid_save(run, step, ranks=(0,)) -> bool:
    """Every rank's file is in the temporary folder, the manifest is not: the save is in progress."""
    tmp = os.path.join(run, "checkpoints", f".tmp-step_{step:08d}")
    return all(os.path.isfile(os.path.join(tmp, f"rank_{r:05d}.pt")) for r in ranks) \
        and not os.path.exists(os.path.join(tmp, "manifest.json"))


def children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return out


def worker_pid(launcher_pid: int, rank: int, timeout=120) -> int:
    """The pid of the torchrun worker with RANK=rank (a child of the launcher)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        for c in children(launcher_pid):
            try:
                env = open(f"/proc/{c}/environ", "rb").read().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env and b"LOCAL_RANK=" + str(rank).encode() in env:
                return c
        time.sleep(0.1)
    raise AssertionError(f"no worker with RANK={rank} under {launcher_pid}")


def resume_line(text: str) -> str:
    return next((ln for ln in text.splitlines() if ln.startswith("resumed from")), "")


# -- fixtures -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stage1_ckpt(synth_data, tmp_path_factory):
    """A tiny Stage-I run for Stage-II to build on."""
    run = tmp_path_factory.mktemp("s1src") / "run"
    run_cli(*train_args(synth_data, run, 1, 2), check=True)
    return run


def s2(stage1_ckpt):
    return [f"model.stage1_checkpoint={stage1_ckpt}"]


# -- tests --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_stage1_single_kill_during_save_then_mid_step(synth_data, tmp_path):
    steps = 12
    ref_run, run = tmp_path / "ref", tmp_path / "run"
    ref = start(single_cmd(train_args(synth_data, ref_run, 1, steps)), log_path=tmp_path / "ref.log")
    # 1) killed while writing the step-8 checkpoint: files written, manifest not yet
    p = start(single_cmd(train_args(synth_data, run, 1, steps)), env={"STACKGAN_TEST_SAVE_DELAY_S": "30"},
              log_path=tmp_path / "a.log")
    wait_for(lambda: committed(run, 4) and mid_save(run, 8), p, what="the step-8 save in progress")
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not committed(run, 8)
    assert read_latest(str(run / "checkpoints")) == "step_00000004"
    # 2) resumed from step 4, killed again between checkpoints (after the step-8 one, before step 12)
    p = start(single_cmd(train_args(synth_data, run, 1, steps)), log_path=tmp_path / "b.log",
              env={"STACKGAN_TEST_STEP_DELAY_S": "0.5"})  # steps 9..12 take >= 2 s: the kill lands before 12
    wait_for(lambda: committed(run, 8), p, what="step-8 checkpoint")
    time.sleep(0.3)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert resume_line(open(tmp_path / "b.log").read()).endswith("step_00000004 at step 4")
    # 3) resumed to the end
    text = finish(start(single_cmd(train_args(synth_data, run, 1, steps)), log_path=tmp_path / "c.log"),
                  tmp_path / "c.log")
    assert resume_line(text).endswith("at step 8") or resume_line(text).endswith("at step 12"), text[-2000:]
    finish(ref, tmp_path / "ref.log")
    assert not [n for n in os.listdir(run / "checkpoints") if n.startswith(".tmp-")]
    assert digest(run) == digest(ref_run)


@pytest.mark.slow
def test_stage2_single_kill_mid_step(synth_data, tmp_path, stage1_ckpt):
    steps = 8
    ref_run, run = tmp_path / "ref", tmp_path / "run"
    ref = start(single_cmd(train_args(synth_data, ref_run, 2, steps, s2(stage1_ckpt))), log_path=tmp_path / "ref.log")
    p = start(single_cmd(train_args(synth_data, run, 2, steps, s2(stage1_ckpt))), log_path=tmp_path / "a.log",
              env={"STACKGAN_TEST_STEP_DELAY_S": "0.5"})  # steps 5..8 take >= 2 s: the kill lands before 8
    wait_for(lambda: committed(run, 4), p, what="step-4 checkpoint")
    time.sleep(0.5)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    text = finish(start(single_cmd(train_args(synth_data, run, 2, steps, s2(stage1_ckpt))),
                        log_path=tmp_path / "b.log"), tmp_path / "b.log")
    assert resume_line(text).endswith("step_00000004 at step 4"), text[-2000:]
    finish(ref, tmp_path / "ref.log")
    assert digest(run) == digest(ref_run)


@pytest.fixture(scope="module")
def ref2_stage1(synth_data, tmp_path_factory):
    """The uninterrupted 2-process Stage-I run (8 steps) that the killed ones must reproduce."""
    d = tmp_path_factory.mktemp("ref2")
    finish(start(torchrun_cmd(train_args(synth_data, d / "run", 1, 8)), log_path=d / "log"), d / "log")
    return digest(d / "run")


@pytest.mark.slow
def test_stage1_two_ranks_kill_worker_during_save(synth_data, tmp_path, ref2_stage1):
    run = tmp_path / "run"
    p = start(torchrun_cmd(train_args(synth_data, run, 1, 8)), env={"STACKGAN_TEST_SAVE_DELAY_S": "30"},
              log_path=tmp_path / "a.log")
    wait_for(lambda: mid_save(run, 4, ranks=(0, 1)), p, what="the step-4 save in progress on both ranks")
    os.kill(worker_pid(p.pid, 1), signal.SIGKILL)
    try:
        p.wait(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode != 0
    assert not committed(run, 4)
    # the torn step-4 folder is never used: the resume starts from scratch and re-creates it
    text = finish(start(torchrun_cmd(train_args(synth_data, run, 1, 8)), log_path=tmp_path / "b.log"),
                  tmp_path / "b.log")
    assert "resumed from" not in text
    assert digest(run) == ref2_stage1


@pytest.mark.slow
def test_torchrun_max_restarts_sigkilled_worker(synth_data, tmp_path, ref2_stage1):
    run = tmp_path / "run"
    p = start(torchrun_cmd(train_args(synth_data, run, 1, 8), max_restarts=1), log_path=tmp_path / "a.log",
              env={"STACKGAN_TEST_STEP_DELAY_S": "0.5"})  # steps 5..8 take >= 2 s: the kill lands before 8
    wait_for(lambda: committed(run, 4), p, what="step-4 checkpoint")
    time.sleep(0.3)
    os.kill(worker_pid(p.pid, 1), signal.SIGKILL)  # mid-run, after the step-4 commit
    text = finish(p, tmp_path / "a.log")
    assert "step_00000004 at step 4" in text, text[-3000:]
    assert digest(run) == ref2_stage1


@pytest.mark.slow
def test_stage2_two_ranks_kill_rank0_then_resume(synth_data, tmp_path, stage1_ckpt):
    steps = 8
    ref_run, run = tmp_path / "ref", tmp_path / "run"
    args = lambda r: train_args(synth_data, r, 2, steps, s2(stage1_ckpt))  # noqa: E731
    finish(start(torchrun_cmd(args(ref_run)), log_path=tmp_path / "ref.log"), tmp_path / "ref.log")
    p = start(torchrun_cmd(args(run)), log_path=tmp_path / "a.log", env={"STACKGAN_TEST_STEP_DELAY_S": "0.5"})
    wait_for(lambda: committed(run, 4), p, what="step-4 checkpoint")
    time.sleep(0.3)
    os.kill(worker_pid(p.pid, 0), signal.SIGKILL)
    try:
        p.wait(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    text = finish(start(torchrun_cmd(args(run)), log_path=tmp_path / "b.log"), tmp_path / "b.log")
    assert "step_00000004 at step 4" in text, text[-3000:]
    assert digest(run) == digest(ref_run)


@pytest.mark.slow
def test_deepspeed_zero2_kill_then_resume(synth_data, tmp_path):
    """ZeRO-2 engines save into our step folder; a SIGKILLed rank, then a resume, gives the digest of the
    DeepSpeed run that was never interrupted."""
    ds = ["train.backend=deepspeed", "train.zero_stage=2"]
    ref_run, run = tmp_path / "ref", tmp_path / "run"
    finish(start(torchrun_cmd(train_args(synth_data, ref_run, 1, 8, ds)), log_path=tmp_path / "ref.log"),
           tmp_path / "ref.log")
    p = start(torchrun_cmd(train_args(synth_data, run, 1, 8, ds)), log_path=tmp_path / "a.log",
              env={"STACKGAN_TEST_STEP_DELAY_S": "0.5"})
    wait_for(lambda: committed(run, 4), p, what="step-4 checkpoint")
    os.kill(worker_pid(p.pid, 1), signal.SIGKILL)
    try:
        p.wait(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert os.path.isdir(run / "checkpoints" / "step_00000004" / "engine")
    text = finish(start(torchrun_cmd(train_args(synth_data, run, 1, 8, ds)), log_path=tmp_path / "b.log"),
                  tmp_path / "b.log")
    assert "step_00000004 at step 4" in text, text[-3000:]
    assert digest(run) == digest(ref_run)

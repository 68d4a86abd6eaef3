"""Kill-and-resume exactness with real processes and real SIGKILLs.

A run killed at any moment (mid-step, or in the middle of writing a checkpoint) and resumed from its last
complete checkpoint ends with bitwise the parameters of the run that was never interrupted
(``stackgan inspect`` params_sha256), for 1 and 2 processes, at Stage-I and Stage-II; and under
``torchrun --max-restarts`` a SIGKILLed worker makes the group restart and finish with the same digest.
"""
from __future__ import annotations

import os
import signal

import pytest

from stackgan_dist.checkpoint.manager import read_latest
from conftest import (Rendezvous, check, committed, digest, finish, kill_tree, resume_line, run_cli, single_cmd,
                      start, tiny_overrides, torchrun, torchrun_cmd, wait_for, worker_pid)

CFG = {1: "configs/demo/stage1.yaml", 2: "configs/demo/stage2.yaml"}
# `stackgan inspect` needs only the committed checkpoint; these are the shared knobs of the runs here.
EVERY = 4


def train_args(data, run, stage, steps, extra=()):
    return ["train", CFG[stage], *tiny_overrides(data, run, stage, steps=steps,
                                                 extra=[f"checkpoint.every_steps={EVERY}", *extra])]


def mid_save(run, step, ranks=(0,)) -> bool:
    """Every rank's file is in the temporary folder, the manifest is not: the save is in progress."""
    tmp = os.path.join(run, "checkpoints", f".tmp-step_{step:08d}")
    return all(os.path.isfile(os.path.join(tmp, f"rank_{r:05d}.pt")) for r in ranks) \
        and not os.path.exists(os.path.join(tmp, "manifest.json"))


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
    # 1) killed while writing the step-8 checkpoint: files written, manifest not yet (the writer is paused
    # in the save by the test rendezvous)
    sv = Rendezvous(tmp_path / "sv", 8, at="save")
    p = start(single_cmd(train_args(synth_data, run, 1, steps)), env=sv.env, log_path=tmp_path / "a.log")
    sv.wait(p)
    wait_for(lambda: committed(run, 4), p, what="the step-4 commit")
    assert mid_save(run, 8)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not committed(run, 8)
    assert read_latest(str(run / "checkpoints")) == "step_00000004"
    # 2) resumed from step 4, killed again between checkpoints: paused after step 11 (the background step-8
    # save was committed at step 10), killed there
    rv = Rendezvous(tmp_path / "rv", 11)
    p = start(single_cmd(train_args(synth_data, run, 1, steps)), log_path=tmp_path / "b.log", env=rv.env)
    rv.wait(p)
    assert committed(run, 8) and not committed(run, 12)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert resume_line(open(tmp_path / "b.log").read()).endswith("step_00000004 at step 4")
    # 3) resumed to the end
    text = finish(start(single_cmd(train_args(synth_data, run, 1, steps)), log_path=tmp_path / "c.log"),
                  tmp_path / "c.log")
    assert resume_line(text).endswith("step_00000008 at step 8"), text[-2000:]
    finish(ref, tmp_path / "ref.log")
    assert not [n for n in os.listdir(run / "checkpoints") if n.startswith(".tmp-")]
    assert digest(run) == digest(ref_run)


@pytest.mark.slow
def test_stage2_single_kill_mid_step(synth_data, tmp_path, stage1_ckpt):
    steps = 8
    ref_run, run = tmp_path / "ref", tmp_path / "run"
    ref = start(single_cmd(train_args(synth_data, ref_run, 2, steps, s2(stage1_ckpt))), log_path=tmp_path / "ref.log")
    rv = Rendezvous(tmp_path / "rv", 7)  # the background step-4 save is committed at step 6
    p = start(single_cmd(train_args(synth_data, run, 2, steps, s2(stage1_ckpt))), log_path=tmp_path / "a.log",
              env=rv.env)
    rv.wait(p)
    assert committed(run, 4)
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
    sv = Rendezvous(tmp_path / "sv", 4, ranks=(0, 1), at="save")
    p = start(torchrun_cmd(train_args(synth_data, run, 1, 8)), env=sv.env, log_path=tmp_path / "a.log")
    sv.wait(p)  # both ranks' files of the step-4 save are written; neither has committed
    assert mid_save(run, 4, ranks=(0, 1))
    os.kill(sv.pid(1), signal.SIGKILL)
    sv.go()  # rank 0 goes on to the commit's agreement, which fails without rank 1
    assert kill_tree(p) != 0
    assert not committed(run, 4)
    # the torn step-4 folder is never used: the resume starts from scratch and re-creates it
    text = finish(start(torchrun_cmd(train_args(synth_data, run, 1, 8)), log_path=tmp_path / "b.log"),
                  tmp_path / "b.log")
    assert "resumed from" not in text
    assert digest(run) == ref2_stage1


@pytest.mark.slow
def test_torchrun_max_restarts_sigkilled_worker(synth_data, tmp_path, ref2_stage1):
    run = tmp_path / "run"
    rv = Rendezvous(tmp_path / "rv", 7, ranks=(0, 1))  # the restarted group passes step 7 again: go is there
    p = start(torchrun_cmd(train_args(synth_data, run, 1, 8), max_restarts=1), log_path=tmp_path / "a.log",
              env=rv.env)
    rv.wait(p)
    assert committed(run, 4)
    os.kill(worker_pid(p.pid, 1), signal.SIGKILL)  # mid-run, after the step-4 commit
    rv.go()
    text = finish(p, tmp_path / "a.log")
    assert "step_00000004 at step 4" in text, text[-3000:]
    assert digest(run) == ref2_stage1


@pytest.mark.slow
def test_stage2_two_ranks_kill_rank0_then_resume(synth_data, tmp_path, stage1_ckpt):
    steps = 8
    ref_run, run = tmp_path / "ref", tmp_path / "run"
    args = lambda r: train_args(synth_data, r, 2, steps, s2(stage1_ckpt))  # noqa: E731
    finish(start(torchrun_cmd(args(ref_run)), log_path=tmp_path / "ref.log"), tmp_path / "ref.log")
    rv = Rendezvous(tmp_path / "rv", 7, ranks=(0, 1))
    p = start(torchrun_cmd(args(run)), log_path=tmp_path / "a.log", env=rv.env)
    rv.wait(p)
    assert committed(run, 4)
    os.kill(worker_pid(p.pid, 0), signal.SIGKILL)
    rv.go()  # rank 1 goes on and fails at its next collective
    kill_tree(p)
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
    rv = Rendezvous(tmp_path / "rv", 5, ranks=(0, 1))  # DeepSpeed saves in the foreground: 4 is committed
    p = start(torchrun_cmd(train_args(synth_data, run, 1, 8, ds)), log_path=tmp_path / "a.log", env=rv.env)
    rv.wait(p)
    assert committed(run, 4)
    os.kill(worker_pid(p.pid, 1), signal.SIGKILL)
    rv.go()
    kill_tree(p)
    assert os.path.isdir(run / "checkpoints" / "step_00000004" / "engine")
    text = finish(start(torchrun_cmd(train_args(synth_data, run, 1, 8, ds)), log_path=tmp_path / "b.log"),
                  tmp_path / "b.log")
    assert "step_00000004 at step 4" in text, text[-3000:]
    assert digest(run) == digest(ref_run)


# -- version-1 checkpoints (written before TrainState) keep resuming ------------------------------------

def rewrite_as_v1(ck) -> None:
    """Rewrites a committed step folder into the layout the version-1 trainer wrote (its model_state and
    rank_state, field for field), then re-seals the manifest: ``step``/``epoch`` at the top of model.pt, no
    format_version or train_state, an untagged DDP strategy state, the RNG streams and ``batches_consumed``
    at the top of each rank file."""
    import torch

    m = torch.load(ck / "model.pt", weights_only=True)
    ts = m.pop("train_state")
    m.pop("format_version")
    m["step"] = ts["step"]
    m["epoch"] = ts["step"] * m["config"]["train"]["grad_accum"] // 24  # the unread v1 field, any value
    m["strategy"].pop("backend")
    m["model_config"].pop("d_condition")  # added after version 1: such checkpoints resume with its default
    m["model_config"].pop("cond_reinject")  # likewise
    m["model_config"].pop("g_padding")
    torch.save(m, ck / "model.pt")
    for f in sorted(ck.glob("rank_*.pt")):
        r = torch.load(f, weights_only=True)
        v1 = {"rank": r["rank"], "world_size": r["world_size"], "step": ts["step"],
              "batches_consumed": ts["step"] * m["config"]["train"]["grad_accum"],
              "num_workers": m["config"]["data"]["num_workers"], **r["rng"]}
        torch.save(v1, f)
    reseal(ck)


def reseal(ck) -> None:
    """Re-hashes every file of a step folder into its manifest (after a test rewrote them on purpose)."""
    import json

    from stackgan_dist.checkpoint.manager import sha256_file

    man = json.loads((ck / "manifest.json").read_text())
    for rel in man["files"]:
        man["files"][rel] = {"size": os.path.getsize(ck / rel), "sha256": sha256_file(ck / rel)}
    (ck / "manifest.json").write_text(json.dumps(man, indent=1))


@pytest.mark.slow
def test_version1_checkpoint_resumes_exactly(synth_data, tmp_path):
    ref_run, run = tmp_path / "ref", tmp_path / "run"
    run_cli(*train_args(synth_data, ref_run, 1, 8), check=True)
    run_cli(*train_args(synth_data, run, 1, 4), check=True)
    rewrite_as_v1(run / "checkpoints" / "step_00000004")
    p = run_cli(*train_args(synth_data, run, 1, 8), check=True)
    assert resume_line(p.stdout).endswith("step_00000004 at step 4"), p.stdout[-2000:]
    assert digest(run) == digest(ref_run)


@pytest.mark.slow
def test_newer_checkpoint_format_is_refused_with_one_line(synth_data, tmp_path):
    import torch

    run = tmp_path / "run"
    run_cli(*train_args(synth_data, run, 1, 4), check=True)
    ck = run / "checkpoints" / "step_00000004"
    m = torch.load(ck / "model.pt", weights_only=True)
    m["format_version"] = 99
    torch.save(m, ck / "model.pt")
    reseal(ck)
    p = run_cli(*train_args(synth_data, run, 1, 8))
    assert p.returncode == 2, p.stderr[-2000:]
    err = [ln for ln in p.stderr.splitlines() if "error" in ln]
    assert len(err) == 1 and "state format version 99" in err[0] and "Traceback" not in p.stderr, p.stderr[-2000:]


# -- resume with another world size ---------------------------------------------------------------------

def _consumed(cursor: dict) -> int:
    """Samples of the epochs in flight that the merged cursor counts as consumed (a union of runs: a sample
    read twice would count once)."""
    return sum(hi - lo for e in cursor["epochs"].values() for runs in e["consumed"].values() for lo, hi in runs)


@pytest.mark.slow
def test_resume_two_ranks_on_one_keeps_global_batch_and_samples(synth_data, tmp_path):
    """DDP 2 -> 1: the weights and Adam's state come back (its step counters continue from 4); the global
    batch is kept (train.grad_accum 1 -> 2); the merged loader cursor goes on where two ranks stopped: no
    sample of the epoch read twice (the union of consumed runs grows by exactly the images seen)."""
    import torch

    run = tmp_path / "run"
    finish(start(torchrun_cmd(train_args(synth_data, run, 1, 4)), log_path=tmp_path / "a.log"), tmp_path / "a.log")
    before = torch.load(run / "checkpoints" / "step_00000004" / "model.pt", weights_only=True)
    assert _consumed(before["train_state"]["cursor"]) == before["train_state"]["images_seen"] == 32
    p = run_cli(*train_args(synth_data, run, 1, 6), check=True)
    assert resume_line(p.stdout).endswith("step_00000004 at step 4")
    assert "train.grad_accum 1 -> 2 keeps the global batch of 8" in p.stderr, p.stderr[-2000:]
    after = torch.load(run / "checkpoints" / "step_00000006" / "model.pt", weights_only=True)
    for net in ("opt_g", "opt_d"):
        steps = {float(s["step"]) for s in after["strategy"][net]["state"].values()}
        assert steps == {6.0}, (net, steps)  # a fresh optimizer would be at 2
    assert after["train_state"]["images_seen"] == before["train_state"]["images_seen"] + 2 * 8
    assert _consumed(after["train_state"]["cursor"]) == 48
    assert after["world_size"] == 1


@pytest.mark.slow
def test_resume_at_another_world_size_refuses_a_changed_global_batch(synth_data, tmp_path):
    """One rank -> two with a per-worker batch that cannot keep the global batch: one line naming the fix,
    exit 2, the run directory as it was; train.elastic_batch=free accepts the new batch."""
    run = tmp_path / "run"
    run_cli(*train_args(synth_data, run, 1, 2), "train.batch_size=6", check=True)
    p = torchrun(2, *train_args(synth_data, run, 1, 4), "train.batch_size=4")
    assert p.returncode != 0
    line = [ln for ln in p.stderr.splitlines() if "error" in ln][0]
    assert "global batch of 8" in line and "it was trained with 6" in line and "train.elastic_batch=free" in line
    assert sorted(os.listdir(run / "checkpoints")) == ["latest", "step_00000002"]
    check(torchrun(2, *train_args(synth_data, run, 1, 4), "train.batch_size=4", "train.elastic_batch=free"))


# -- Stage-II leaves the frozen Stage-I generator as it was -----------------------------------------------

@pytest.mark.slow
def test_frozen_stage1_generator_unchanged_after_stage2_steps(synth_data, tmp_path, stage1_ckpt):
    import torch

    run = tmp_path / "s2"
    run_cli(*train_args(synth_data, run, 2, 3, s2(stage1_ckpt)), check=True)
    s1 = torch.load(stage1_ckpt / "checkpoints" / "step_00000002" / "model.pt", weights_only=True)["G"]
    saved = torch.load(run / "checkpoints" / "step_00000003" / "model.pt", weights_only=True)
    assert saved["stage1_G"].keys() == s1.keys()
    for k, v in s1.items():  # weights and BatchNorm statistics, bitwise
        assert torch.equal(saved["stage1_G"][k], v), k
    assert saved["train_state"]["step"] == 3  # and Stage-II really took its steps

"""DeepSpeed strategy on CPU: real processes, gloo, ZeRO-1 and ZeRO-2, both stages, save and resume.

The first DeepSpeed use JIT-builds its small shared-memory op with gcc (~1-2 min, cached in
~/.cache/torch_extensions). The worker of the non-finite-gradient test is
tests/workers/deepspeed_guard.py.
"""
import json
import os
import subprocess

import pytest

from conftest import (CFG1, CFG2, KEYS, PY, REPO, check, digests, inspect_run, metrics, run_cli, tiny_overrides,
                      torchrun, worker_pythonpath, worker_script)



def train2(data, run_dir, stage, steps, zero, extra=(), digest=None):
    cfg = CFG1 if stage == 1 else CFG2
    o = tiny_overrides(data, run_dir, stage, steps, ["train.backend=deepspeed", f"train.zero_stage={zero}",
                                                    "checkpoint.every_steps=2", *extra])
    return check(torchrun(2, "train", cfg, *o,
                          env={"STACKGAN_TEST_DIGEST_DIR": str(digest)} if digest else None))


@pytest.fixture(scope="module")
def ds_runs(synth_data, tmp_path_factory):
    """Per ZeRO stage: Stage-I straight to step 4; Stage-I to step 2, then resumed to 4; Stage-II (from the
    Stage-I run) to step 2 (ZeRO-1: with grad_accum=2; ZeRO-2: then resumed to 3). Every rank writes
    per-step digests."""
    root = tmp_path_factory.mktemp("ds")
    runs = {}
    for zero in (1, 2):
        r = {k: root / f"z{zero}_{k}" for k in ("s1", "s1b", "s2")}
        train2(synth_data, r["s1"], 1, 4, zero, digest=root / f"z{zero}_dg_s1")
        first = train2(synth_data, r["s1b"], 1, 2, zero)
        resumed = train2(synth_data, r["s1b"], 1, 4, zero, digest=root / f"z{zero}_dg_s1b")
        extra = [f"model.stage1_checkpoint={r['s1']}"]
        if zero == 2:  # Stage-II: 2 steps, then resumed to 3 (ZeRO-2 only, to keep the suite short)
            train2(synth_data, r["s2"], 2, 2, zero, extra)
            resumed2 = train2(synth_data, r["s2"], 2, 3, zero, extra, digest=root / f"z{zero}_dg_s2")
        else:
            resumed2 = train2(synth_data, r["s2"], 2, 2, zero, extra + ["train.grad_accum=2"],
                              digest=root / f"z{zero}_dg_s2")
        runs[zero] = {"dirs": r, "root": root, "first": first, "resumed": resumed, "resumed2": resumed2}
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("zero", [1, 2])
def test_deepspeed_trains_both_stages_with_finite_losses_and_identical_ranks(ds_runs, zero):
    run = ds_runs[zero]
    s2_steps = [3] if zero == 2 else [1, 2]
    for key, dg, steps in (("s1", "dg_s1", [1, 2, 3, 4]), ("s1b", "dg_s1b", [3, 4]), ("s2", "dg_s2", s2_steps)):
        r0, r1 = (digests(run["root"] / f"z{zero}_{dg}", k) for k in (0, 1))
        assert [d["step"] for d in r0] == [d["step"] for d in r1] == steps
        for a, b in zip(r0, r1):
            for k in KEYS:
                assert a[k] == b[k], f"ZeRO-{zero} {key} step {a['step']}: {k} differ between ranks"
        recs = metrics(run["dirs"][key])
        assert recs, key
        for rec in recs:
            for k in ("d_loss", "g_loss", "kl"):
                assert rec[k] == rec[k] and abs(rec[k]) < 1e6, (key, rec)
    s1 = digests(run["root"] / f"z{zero}_dg_s1", 0)
    assert len({d["G_params"] for d in s1}) == 4 and len({d["D_params"] for d in s1}) == 4  # it trains
    info = inspect_run(run["dirs"]["s2"])
    assert info["valid"] and info["step"] == s2_steps[-1] and info["stage"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("zero", [1, 2])
def test_deepspeed_resume_restores_optimizer_partitions(ds_runs, zero):
    """Stage-I 2 steps + resume to 4 == 4 steps straight: weights, Adam partitions, RNG and data cursor
    all came back (a fresh optimizer would give other weights)."""
    run = ds_runs[zero]
    assert "resumed from" in run["resumed"].stdout and "step_00000002" in run["resumed"].stdout
    if zero == 2:
        assert "resumed from" in run["resumed2"].stdout and "step_00000002" in run["resumed2"].stdout
    ck = run["dirs"]["s1b"] / "checkpoints" / "step_00000004" / "engine"
    for net in ("G", "D"):
        files = sorted(os.listdir(ck / net))
        assert [f for f in files if "optim_states" in f] == [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
                                                           for r in (0, 1)], files
    straight = digests(run["root"] / f"z{zero}_dg_s1", 0)[-1]
    resumed = digests(run["root"] / f"z{zero}_dg_s1b", 0)[-1]
    for k in KEYS:
        assert straight[k] == resumed[k], f"ZeRO-{zero}: {k} after resume differs from the uninterrupted run"
    assert inspect_run(run["dirs"]["s1"])["params_sha256"] == inspect_run(run["dirs"]["s1b"])["params_sha256"]


@pytest.mark.slow
def test_deepspeed_checkpoint_refuses_other_zero_stage_and_backend(ds_runs, synth_data):
    d = ds_runs[1]["dirs"]["s1"]
    p = run_cli("train", CFG1, *tiny_overrides(synth_data, d, 1, 6, []), timeout=300)  # ddp on a deepspeed run
    assert p.returncode == 2 and "train.backend=deepspeed checkpoint with train.backend=ddp" in p.stderr, p.stderr
    p = run_cli("train", CFG1, *tiny_overrides(synth_data, d, 1, 6, ["train.backend=deepspeed",
                                                                  "train.zero_stage=2"]), timeout=300)
    assert p.returncode == 2 and "zero_stage changed (1 -> 2)" in p.stderr, p.stderr[-3000:]


@pytest.mark.slow
def test_deepspeed_one_process_zero0_trains_and_resumes(synth_data, tmp_path):
    """No launcher: DeepSpeed gets a private one-process group (and the LOCAL_RANK it insists on)."""
    o = ["train.backend=deepspeed", "train.zero_stage=0", "checkpoint.every_steps=2"]
    check(run_cli("train", CFG1, *tiny_overrides(synth_data, tmp_path / "r", 1, 2, o), timeout=600))
    p = check(run_cli("train", CFG1, *tiny_overrides(synth_data, tmp_path / "r", 1, 3, o), timeout=600))
    assert "resumed from" in p.stdout
    assert [r["step"] for r in metrics(tmp_path / "r")] == [2, 3]
    assert inspect_run(tmp_path / "r")["step"] == 3


# -- the non-finite guard (DeepSpeed PR #8035): 2 ranks, a NaN on one rank skips the step on both ----

@pytest.mark.slow
def test_deepspeed_non_finite_gradients_skip_the_step_on_every_rank(tmp_path):
    out = tmp_path / "guard"
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    p = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        worker_script("deepspeed_guard"), str(out)], capture_output=True, text=True, timeout=600,
                       env=dict(e, OMP_NUM_THREADS="1", PYTHONPATH=worker_pythonpath()), cwd=REPO)
    check(p)
    for rank in (0, 1):
        res = json.loads((tmp_path / f"guard.rank{rank}.json").read_text())
        for zero, r in res.items():
            assert [row["changed"] for row in r["rows"]] == [True, False, True], (rank, zero, r)
            assert all(row["finite_params"] and row["finite_adam"] for row in r["rows"]), (rank, zero, r)
            assert r["skipped"] == 1, (rank, zero, r)


# -- the DeepSpeed JSON: generated from our YAML, or the user's file checked against it ----------------

def _cfg(*ov):
    from stackgan_dist.config import load_config

    return load_config(None, ["train.backend=deepspeed", *ov])


def test_generated_deepspeed_config_follows_train_keys():
    from stackgan_dist.distributed.deepspeed import build_ds_config

    ds = build_ds_config(_cfg("train.zero_stage=2", "train.batch_size=6", "train.grad_accum=3",
                              "train.precision=bf16"), world_size=4)
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["train_micro_batch_size_per_gpu"] == 6 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 6 * 3 * 4
    # bf16 is torch autocast over fp32 weights, not DeepSpeed's bf16 mode (tests/test_cuda_contracts.py)
    assert ds["bf16"] == ds["fp16"] == {"enabled": False} and ds["torch_autocast"]["dtype"] == "bfloat16"
    assert "optimizer" not in ds
    ds16 = build_ds_config(_cfg("train.precision=fp16"), world_size=1)
    assert ds16["torch_autocast"]["dtype"] == "float16" and not ds16["fp16"]["enabled"]


def test_user_deepspeed_config_is_checked_against_our_keys(tmp_path):
    from stackgan_dist.distributed.deepspeed import build_ds_config
    from stackgan_dist.errors import UserError

    def write(d):
        p = tmp_path / "ds.json"
        p.write_text(json.dumps(d))
        return str(p)

    user = write({"zero_optimization": {"stage": 1, "reduce_bucket_size": 1000}, "gradient_clipping": 1.0})
    ok = build_ds_config(_cfg("train.zero_stage=1", f"train.deepspeed_config={user}"), 2)
    assert ok["zero_optimization"]["reduce_bucket_size"] == 1000 and ok["gradient_clipping"] == 1.0
    assert ok["train_batch_size"] == 64 * 2
    bad = [({"train_micro_batch_size_per_gpu": 3}, "disagrees with train.*"),
           ({"optimizer": {"type": "Adam"}}, "remove 'optimizer'"),
           ({"zero_optimization": {"stage": 2}}, "disagrees with train.zero_stage=1"),
           ({"bf16": {"enabled": True}}, "remove 'bf16'")]
    for d, msg in bad:
        with pytest.raises(UserError, match=msg.replace("*", r"\*")):
            build_ds_config(_cfg("train.zero_stage=1", f"train.deepspeed_config={write(d)}"), 2)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        build_ds_config(_cfg(f"train.deepspeed_config={tmp_path / 'broken.json'}"), 1)
    with pytest.raises(UserError, match="cannot read"):
        build_ds_config(_cfg(f"train.deepspeed_config={tmp_path / 'missing.json'}"), 1)


def test_deepspeed_bf16_on_cpu_is_refused(synth_data, tmp_path):
    p = run_cli("train", CFG1, *tiny_overrides(synth_data, tmp_path / "r", 1, 2, [
        "train.backend=deepspeed", "train.zero_stage=2", "train.precision=bf16"]), timeout=300)
    assert p.returncode == 2 and "train.precision=bf16 needs CUDA" in p.stderr, p.stderr[-2000:]


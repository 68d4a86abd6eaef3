"""Distributed training with the DDP strategy: real processes, gloo on CPU.

The worker of the batch-equivalence tests is tests/workers/ddp_equiv.py, launched under torchrun (2 ranks) or
as one plain process.
"""
import json
import os
import subprocess
import time

import pytest

from conftest import (CFG1, CFG2, KEYS, PY, REPO, check, cli_main, digests, finish_all, free_port,
                      tiny_overrides, torchrun, worker_pythonpath, worker_script)




# -- 2-rank consistency through the real CLI --------------------------------------------------------

@pytest.fixture(scope="module")
def ddp_runs(synth_data, tmp_path_factory):
    """Stage-I (BN buffers averaged after each step, grad_accum=2: no_sync on the first micro-batch) then
    Stage-II (model.sync_bn=true), 2 ranks each."""
    root = tmp_path_factory.mktemp("ddp")
    out = {}
    plan = ((1, CFG1, ["train.grad_accum=2"]),
            (2, CFG2, [f"model.stage1_checkpoint={root / 'stage1'}", "model.sync_bn=true"]))
    for stage, cfg, extra in plan:
        dg = root / f"digest{stage}"
        t0 = time.monotonic()
        p = check(torchrun(2, "train", cfg, *tiny_overrides(synth_data, root / f"stage{stage}", stage, 3, extra),
                           env={"STACKGAN_TEST_DIGEST_DIR": str(dg)}))
        out[stage] = {"dir": root / f"stage{stage}", "digests": [digests(dg, 0), digests(dg, 1)],
                      "stderr": p.stderr, "seconds": time.monotonic() - t0}
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_ddp_two_ranks_keep_params_and_bn_buffers_identical(ddp_runs, stage):
    r0, r1 = ddp_runs[stage]["digests"]
    assert [d["step"] for d in r0] == [d["step"] for d in r1] == [1, 2, 3]
    for a, b in zip(r0, r1):
        for k in KEYS:
            assert a[k] == b[k], f"stage {stage} step {a['step']}: {k} differ between ranks"
    # the models really trained: parameters and BN running statistics change from step to step
    for k in KEYS:
        assert len({d[k] for d in r0}) == 3, f"{k} did not change across steps"
    # only rank 0 writes the run directory's logs
    assert (ddp_runs[stage]["dir"] / "metrics.jsonl").is_file()
    recs = [json.loads(x) for x in (ddp_runs[stage]["dir"] / "metrics.jsonl").read_text().splitlines()]
    assert all(r["d_loss"] == r["d_loss"] and r["g_loss"] == r["g_loss"] for r in recs)


@pytest.mark.slow
def test_ddp_checkpoint_matches_rank_digest(ddp_runs):
    """What rank 0 saves is what every rank holds."""
    import torch

    from stackgan_dist.checkpoint.manager import params_digest

    sd = torch.load(ddp_runs[1]["dir"] / "checkpoints" / "step_00000003" / "model.pt", weights_only=True)
    G = {k: v for k, v in sd["G"].items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert params_digest(G) == ddp_runs[1]["digests"][1][-1]["G_params"]


# -- batch equivalence: 2 ranks x B/2 vs 1 process ---------------------------------------------------

def _run_equiv(tmp_path, mode, nproc):
    out = tmp_path / f"{mode}_{nproc}.pt"
    e = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    me = worker_script("ddp_equiv")
    e["PYTHONPATH"] = worker_pythonpath()
    cmd = ([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", me] if nproc == 2
           else [PY, me])
    check(subprocess.run(cmd + [str(out), mode], capture_output=True, text=True, timeout=300, env=e,
                         cwd=REPO))
    import torch

    return torch.load(out, weights_only=True)


def _compare(a, b, keys, atol=1e-6, rtol=1e-4):
    import torch

    worst = 0.0
    for net in ("G", "D"):
        for k in keys(a[net]):
            x, y = a[net][k].double(), b[net][k].double()
            assert x.shape == y.shape, k
            worst = max(worst, (x - y).abs().max().item())
            assert torch.allclose(x, y, atol=atol, rtol=rtol), f"{net}.{k}: max diff {(x - y).abs().max().item()}"
    return worst


def _params(sd):
    return [k for k in sd if not k.endswith("num_batches_tracked")]


@pytest.mark.slow
def test_ddp_sync_bn_two_ranks_half_batch_equals_one_process_full_batch(tmp_path):
    one, two = _run_equiv(tmp_path, "sync_bn", 1), _run_equiv(tmp_path, "sync_bn", 2)
    # parameters and BN running statistics: global-batch BN over 2 x B/2 == BN over B
    worst = _compare(one, two, _params)
    print(f"sync_bn: max |diff| after one step = {worst:.2e}")
    # and the step did something (a mismatch would not hide behind an unchanged model)
    import torch

    from stackgan_dist.config import load_config
    from stackgan_dist.distributed.seeding import seed_all
    from stackgan_dist.models.build import build_models

    seed_all(0)
    init = build_models(load_config(None, ["model.gf_dim=16", "model.df_dim=8", "model.condition_dim=16",
                                           "model.z_dim=16", "model.text_dim=32"]).model)
    moved = max((one["G"][k].double() - v.double()).abs().max().item()
                for k, v in init.G.state_dict().items() if k.endswith("weight"))
    assert moved > 1e-4
    del torch


@pytest.mark.slow
def test_ddp_local_bn_two_ranks_equal_one_process_ghost_batches(tmp_path):
    """Without sync_bn each rank normalises with its own B/2 statistics: 2 ranks x B/2 give the same
    parameters *and BatchNorm running statistics* (and counters) as 1 process with batch B/2 and
    grad_accum=2: the accumulating step averages its micro-batches' statistic updates as the ranks'
    buffer averaging does, and G's second forward per micro-batch does not move them again."""
    one, two = _run_equiv(tmp_path, "local_bn", 1), _run_equiv(tmp_path, "local_bn", 2)
    worst = _compare(one, two, lambda sd: list(sd))
    bn = [k for k in one["G"] if k.endswith("running_mean")]
    assert bn, "the generator has BatchNorm layers"
    for net in ("G", "D"):
        for k in one[net]:
            if k.endswith("num_batches_tracked"):
                assert int(one[net][k]) == int(two[net][k]), (net, k)
    print(f"local BN vs ghost batches: max |diff| after one step (parameters and buffers) = {worst:.2e}")


# -- a group that cannot form fails clearly, within its timeout ---------------------------------------

def _spawn_rank(synth_data, run_dir, rank, world, port, addr="127.0.0.1", timeout_s=3):
    e = dict(os.environ, OMP_NUM_THREADS="1", RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
             MASTER_ADDR=addr, MASTER_PORT=str(port))
    args = tiny_overrides(synth_data, run_dir, 1, 2, [f"train.dist_timeout_s={timeout_s}"])
    return subprocess.Popen([PY, "-m", "stackgan_dist", "train", CFG1, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=e, cwd=REPO)


@pytest.mark.slow
def test_wrong_master_port_fails_clearly_within_timeout(synth_data, tmp_path):
    """Rank 1 is told the wrong rendezvous address: both ranks stop with a one-line error, no hang."""
    good, bad = free_port(), free_port()
    procs = [_spawn_rank(synth_data, tmp_path / "r", 0, 2, good),
             _spawn_rank(synth_data, tmp_path / "r", 1, 2, bad)]
    res, dt = finish_all(procs, 120)
    for rc, err in res:
        assert rc == 2, err[-2000:]
        assert "process group" in err and "did not form within 3s" in err, err[-2000:]
        assert "Traceback" not in err
    assert "(rank 1)" in res[1][1]


@pytest.mark.slow
def test_world_size_mismatch_fails_clearly_within_timeout(synth_data, tmp_path):
    """WORLD_SIZE=3 but only two workers exist."""
    port = free_port()
    procs = [_spawn_rank(synth_data, tmp_path / "r", r, 3, port) for r in (0, 1)]
    res, dt = finish_all(procs, 120)
    for rc, err in res:
        assert rc == 2, err[-2000:]
        assert "world size 3" in err and "did not form" in err, err[-2000:]


# -- precision and optimizer choices on CPU -----------------------------------------------------------

@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_on_cpu_is_refused(synth_data, tmp_path, precision):
    p = cli_main("train", CFG1, *tiny_overrides(synth_data, tmp_path / "r", 1, 2,
                                                [f"train.precision={precision}", "train.device=cpu"]))
    assert p.returncode == 2, p.stderr[-2000:]
    assert f"train.precision={precision} needs CUDA" in p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_apex_fused_adam_without_apex_is_a_clear_error(synth_data, tmp_path):
    import importlib.util

    assert importlib.util.find_spec("apex") is None, "this test checks the message when apex is missing"
    p = cli_main("train", CFG1, *tiny_overrides(synth_data, tmp_path / "r", 1, 2, ["train.optimizer=apex_fused_adam"]))
    assert p.returncode == 2, p.stderr[-2000:]
    assert "apex_fused_adam needs NVIDIA apex" in p.stderr and "Traceback" not in p.stderr


# -- the non-finite guard and the GradScaler wiring, in one process -----------------------------------

def _tiny_strategy(precision="fp32"):
    import torch

    from stackgan_dist.config import load_config
    from stackgan_dist.distributed.env import DistEnv
    from stackgan_dist.distributed.ddp import DDPStrategy
    from stackgan_dist.models.build import build_models

    cfg = load_config(None, ["model.gf_dim=16", "model.df_dim=8", "model.condition_dim=16", "model.z_dim=16",
                             "model.text_dim=32", f"train.precision={precision}"])
    m = build_models(cfg.model)
    s = DDPStrategy(cfg, DistEnv(device=torch.device("cpu")))
    return s, m


def test_non_finite_gradients_skip_the_step_and_keep_adam_state_finite():
    import torch

    s, m = _tiny_strategy()
    s.setup(m.G, m.D)
    x = torch.randn(4, 32)
    for bad in (False, True, False):
        before = [p.detach().clone() for p in s.d.net.parameters()]
        out = s.d.wrapped(torch.randn(4, 3, 64, 64), x)
        loss = out["cond"].float().mean() * (float("nan") if bad else 1.0)
        s.d.backward(loss)
        s.d.step()
        after = list(s.d.net.parameters())
        same = all(torch.equal(a, b) for a, b in zip(before, after))
        assert same == bad
    assert s.skipped_steps()["d"] == 1
    for st in s.d.optimizer.state.values():
        assert all(torch.isfinite(v).all() for v in st.values() if torch.is_tensor(v))


def test_grad_scaler_per_optimizer_skips_overflow_and_round_trips():
    """The fp16 path's GradScaler logic, exercised on CPU (the CPU refusal is a policy, lifted here)."""
    import torch

    from stackgan_dist.distributed import strategy as base  # where setup looks refuse_cpu_amp up

    s, m = _tiny_strategy("fp16")
    orig = base.refuse_cpu_amp
    base.refuse_cpu_amp = lambda *a: None
    try:
        s.setup(m.G, m.D)
    finally:
        base.refuse_cpu_amp = orig
    assert s.d.scaler is not None and s.g.scaler is not None and s.d.scaler is not s.g.scaler
    scale0 = s.d.scaler.get_scale()
    before = [p.detach().clone() for p in s.d.net.parameters()]
    out = s.d.wrapped(torch.randn(4, 3, 64, 64), torch.randn(4, 32))
    s.d.backward(out["cond"].float().mean() * float("inf"))
    s.d.step()
    assert all(torch.equal(a, b) for a, b in zip(before, s.d.net.parameters())), "overflow step not skipped"
    assert s.d.scaler.get_scale() == scale0 / 2 and s.g.scaler.get_scale() == scale0
    out = s.d.wrapped(torch.randn(4, 3, 64, 64), torch.randn(4, 32))
    s.d.backward(out["cond"].float().mean())
    s.d.step()
    assert not all(torch.equal(a, b) for a, b in zip(before, s.d.net.parameters()))
    sd = s.state_dict()
    s2, m2 = _tiny_strategy("fp16")
    base.refuse_cpu_amp = lambda *a: None
    try:
        s2.setup(m2.G, m2.D)
    finally:
        base.refuse_cpu_amp = orig
    s2.load_state_dict(sd)
    assert s2.d.scaler.get_scale() == scale0 / 2



_END = """
import atexit, sys
import torch.distributed as dist
from stackgan_dist import process_end
process_end.leave_groups = True
assert process_end.end(5) == 5  # no group: the caller exits as usual
dist.init_process_group("gloo", rank=0, world_size=1, init_method="tcp://127.0.0.1:" + sys.argv[1])
atexit.register(lambda: print("interpreter teardown ran"))
sys.stdout.write("the last line, unflushed")
process_end.end(3)
print("not reached")
"""


def test_a_stackgan_process_with_a_group_ends_without_teardown_and_keeps_its_output():
    """process_end.end: the exit code kept, buffered output flushed, and neither the group's destruction nor the
    interpreter's teardown run (where finished gloo runs were seen to abort)."""
    p = subprocess.run([PY, "-c", _END, str(free_port())], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert p.returncode == 3, p.stderr[-2000:]
    assert p.stdout == "the last line, unflushed", p.stdout
    assert "teardown ran" not in p.stdout + p.stderr

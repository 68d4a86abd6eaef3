"""Benchmark suite: the FLOP counter against a hand count; every script runs end to end at tiny sizes on CPU
and writes valid JSON with the documented fields. No timing assertions."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from conftest import PY, REPO
from stackgan_dist.observability.flops import (compute_precision, conv2d_flops, count_flops, linear_flops, mfu,
                                               stated_peak)

BENCH = os.path.join(REPO, "benchmarks")
sys.path.insert(0, BENCH)

THROUGHPUT_FIELDS = {"stage", "precision", "backend", "batch_size", "img_per_s", "step_ms_p50", "step_ms_p90",
                     "peak_mem_mb", "flops_per_img", "mfu", "baseline_img_per_s", "speedup", "achieved_flop_s",
                     "matmul_flop_s_measured", "compute_precision"}


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),            # -> 8 x 16 x 16
                         nn.Conv2d(8, 16, 4, stride=2, padding=1), nn.ReLU(),  # -> 16 x 8 x 8
                         nn.Conv2d(16, 16, 3, padding=1, bias=False),          # -> 16 x 8 x 8
                         nn.Flatten(), nn.Linear(16 * 8 * 8, 10))


def test_flop_counter_matches_hand_count():
    b = 5
    net, x = _net(), torch.randn(b, 3, 16, 16)
    # forward, by hand: 2 x multiply-accumulates per conv / linear, nothing for ReLU and bias
    c1 = 2 * b * 8 * 16 * 16 * 3 * 3 * 3
    c2 = 2 * b * 16 * 8 * 8 * 8 * 4 * 4
    c3 = 2 * b * 16 * 8 * 8 * 16 * 3 * 3
    fc = 2 * b * 1024 * 10
    assert (conv2d_flops(b, 3, 8, 3, 16, 16), conv2d_flops(b, 8, 16, 4, 8, 8), conv2d_flops(b, 16, 16, 3, 8, 8),
            linear_flops(b, 1024, 10)) == (c1, c2, c3, fc)
    fwd = c1 + c2 + c3 + fc
    assert count_flops(lambda: net(x)) == fwd
    # backward: a weight gradient per layer and an input gradient per layer but the first (the input does
    # not require grad), each as costly as that layer's forward
    assert count_flops(lambda: net(x).sum().backward()) == fwd + 2 * fwd - c1
    # grouped convolution, forward: C_in / groups inputs per output. (torch 2.13's counter charges the
    # backward of a grouped conv as if ungrouped; StackGAN has no grouped convs.)
    g = nn.Conv2d(16, 16, 3, padding=1, groups=4)
    assert count_flops(lambda: g(torch.randn(b, 16, 8, 8))) == conv2d_flops(b, 16, 16, 3, 8, 8, groups=4) == c3 // 4


def test_mfu_is_never_above_one():
    assert math.isclose(mfu(0.35 * 989e12, 989e12), 0.35)
    for rate, peak in ((1.26 * 27e9, 27e9), (1.0001e15, 989e12)):  # the CPU table's old 126%; just over
        with pytest.raises(ValueError, match="> 1"):
            mfu(rate, peak)
    with pytest.raises(ValueError):
        mfu(1e12, 0.0)


def test_peak_follows_the_precision_that_runs():
    # fp32 convolutions on CUDA run on TF32 tensor cores (cudnn.allow_tf32 is on by torch's default)
    assert compute_precision("fp32", "cuda", cudnn_allow_tf32=True, matmul_allow_tf32=False) == "tf32"
    assert compute_precision("fp32", "cuda", cudnn_allow_tf32=False, matmul_allow_tf32=False) == "fp32"
    assert compute_precision("bf16", "cuda", True, True) == "bf16"
    assert compute_precision("fp32", "cpu", True, True) == "fp32"
    assert torch.backends.cudnn.allow_tf32  # torch's default, which the fp32 baseline runs with
    assert stated_peak("NVIDIA H100 80GB HBM3", "tf32") == 495e12 and stated_peak("NVIDIA H200", "tf32") == 495e12
    assert stated_peak("NVIDIA H100 80GB HBM3", "bf16") == stated_peak("NVIDIA H200", "bf16") == 989e12
    assert stated_peak("NVIDIA H100 PCIe", "bf16") == 756e12  # the more specific name wins
    assert stated_peak("x86_64 CPU, 2 cores", "fp32") is None and stated_peak("NVIDIA H100", "int8") is None


def test_cpu_throughput_reports_no_mfu():
    import throughput

    r = {"flops_per_img": 1e10, "img_per_s": 3.0, "precision": "fp32"}
    throughput.add_mfu(r, torch.device("cpu"), 2.7e10)
    assert r["achieved_flop_s"] == 3e10 and r["matmul_flop_s_measured"] == 2.7e10  # beside each other, no ratio
    assert r["mfu"] is None and r["peak_flops_stated"] is None
    assert "% (" not in throughput.format_row({**r, "stage": 1, "batch_size": 4, "gf_dim": 8, "df_dim": 4,
                                               "channels_last": False, "compile": False, "step_ms_p50": 1.0,
                                               "step_ms_p90": 1.0})


def test_flop_counter_on_the_stage1_models_is_plausible():
    from stackgan_dist.config import ModelConfig
    from stackgan_dist.models.build import build_models

    m = build_models(ModelConfig(stage=1, gf_dim=16, df_dim=8, condition_dim=8, z_dim=8, text_dim=16))
    text, z = torch.randn(2, 16), torch.randn(2, 8)
    with torch.no_grad():
        g = count_flops(lambda: m.G(text, z))
    # the last 3x3 conv to RGB at 64 x 64 alone: 2 * B * 3 * 64 * 64 * (gf/16) * 9
    assert g > conv2d_flops(2, 16 // 16, 3, 3, 64, 64) and g < 1e9


def _check_throughput(out, baseline=True):
    assert {"device", "versions", "commit", "results"} <= set(out)
    assert out["versions"]["torch"] == torch.__version__
    for r in out["results"]:
        assert THROUGHPUT_FIELDS <= set(r), THROUGHPUT_FIELDS - set(r)
        assert r["img_per_s"] > 0 and r["step_ms_p90"] >= r["step_ms_p50"] > 0 and r["flops_per_img"] > 0
        assert r["peak_mem_mb"] > 0 and r["achieved_flop_s"] > 0 and r["matmul_flop_s_measured"] > 0
        assert r["mfu"] is None and r["mfu_basis"] is None and r["timer"] == "perf_counter"  # CPU: no datasheet
        if baseline:
            assert r["baseline_img_per_s"] > 0 and math.isclose(r["speedup"], r["img_per_s"] / r["baseline_img_per_s"],
                                                                rel_tol=1e-6)


@pytest.mark.parametrize("stage", [1, 2])
def test_throughput_with_baseline_writes_json(tmp_path, stage):
    import throughput

    path = tmp_path / "t.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: OMP threads wait on each other when starved
    try:
        _run_throughput(throughput, stage, path)
    finally:
        torch.set_num_threads(threads)
    out = json.loads(path.read_text())
    _check_throughput(out)
    r = out["results"][0]
    assert (r["stage"], r["precision"], r["backend"], r["batch_size"]) == (stage, "fp32", "ddp", 2)


def _run_throughput(throughput, stage, path):
    throughput.main(["--stage", str(stage), "--batch-size", "2", "--gf-dim", "16", "--df-dim", "8",
                     "--condition-dim", "8", "--z-dim", "8", "--text-dim", "16", "--warmup", "1", "--steps", "2",
                     "--peak-n", "64", "--baseline", "--json", str(path)])


def test_scaling_projection_model():
    import scaling_model
    import scaling_paper

    rows = scaling_model.projection(2, scaling_paper.paper_nets(2), [25.0], [8, 64, 512],
                                    grad_bytes_scaled=100 * 2 ** 20)
    eff = [r["efficiency"] for r in rows]
    assert all(0 < e <= 1 for e in eff) and eff[0] >= eff[1] >= eff[2]  # more GPUs, more time in all-reduce
    assert scaling_paper.paper_grad_bytes(2) > scaling_paper.paper_grad_bytes(1) > 0
    assert scaling_model.grad_bytes(scaling_paper.paper_nets(1)) == scaling_paper.paper_grad_bytes(1)


def test_hook_work_measures_powersgd_and_the_projection_uses_it(tmp_path):
    """hook_work.py times torch's PowerSGD hook (as comm_hooks.comm_hook_for makes it) in a world-size-1 DDP, for
    every rank and bucket cap the projection searches; scaling.py --from-json --hook-work-json recomputes the
    committed CPU results' projection with those times in place of the estimate."""
    import scaling
    import scaling_model
    import scaling_paper

    hw = tmp_path / "hook_work.json"
    ranks, caps = ["1", "2", "4", "8"], ["0", "5", "25", "100", "400"]
    p = subprocess.run([PY, os.path.join(BENCH, "hook_work.py"), "--device", "cpu", "--gf-dim", "8", "--df-dim", "4",
                        "--condition-dim", "8", "--z-dim", "8", "--text-dim", "16", "--warmup", "0", "--steps", "2",
                        "--ranks", *ranks, "--caps", *caps, "--json", str(hw)],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    data = json.loads(hw.read_text())
    assert {(r["stage"], r["rank"], r["bucket_cap_mb"]) for r in data["rows"]} == \
        {(s, int(r), float(c)) for s in (1, 2) for r in ranks for c in caps}
    for r in data["rows"]:
        assert r["t_hook_ms"] == pytest.approx(sum(m["t_hook_ms"] for m in r["modules"].values()))
        for m in r["modules"].values():
            assert m["buckets"] >= 1 and m["compression_rate"] > 1  # PowerSGD ran, past its warm-up
            assert m["t_hook_ms"] == max(0.0, m["t_hook_raw_ms"])

    src = os.path.join(BENCH, "results", "scaling-2-core-cpu-shared-2026-12-02.json")
    out = tmp_path / "proj.json"
    p = subprocess.run([PY, os.path.join(BENCH, "scaling.py"), "--from-json", src, "--hook-work-json", str(hw),
                        "--json", str(out), "--plot", str(tmp_path / "proj.png")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    pr = json.loads(out.read_text())["projection"]
    assert pr["hook_work_measured"] and "hook_work.py" in pr["assumptions"]["powersgd_hook_work"]
    table, _ = scaling.load_hook_work(str(hw))
    for st in ("1", "2"):
        for r in pr["candidates"][st]:  # every PowerSGD candidate carries the measured time, no other one any
            want = table[(int(st), r["rank"], float(r["bucket_cap_mb"]))] if r["hook"] == "powersgd" else 0.0
            assert r["hook_ms"] == pytest.approx(1e3 * want)
            assert r["efficiency"] == pytest.approx(r["compute_ms"] / (r["compute_ms"] + r["exposed_ms"]))
    assert (tmp_path / "proj.png").stat().st_size > 0
    with pytest.raises(KeyError, match="not measured for stage 1, rank 3"):
        scaling_model.hook_work_gpu(scaling_paper.paper_nets(1), "powersgd", 25.0, 3, 1, table)
    p = subprocess.run([PY, os.path.join(BENCH, "scaling.py"), "--hook-work-json", str(hw)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "give both" in p.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_suite_tiny_end_to_end(tmp_path):
    """run_suite.py --tiny: every benchmark script in its own process, JSON + markdown + scaling plot."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, os.path.join(BENCH, "run_suite.py"), "--tiny", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=1200, env=env, cwd=REPO)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    files = os.listdir(tmp_path)
    suite = json.loads((tmp_path / next(f for f in files if f.startswith("suite-") and f.endswith(".json")))
                       .read_text())
    assert suite["tiny"] is True and {"device", "versions", "commit", "results"} <= set(suite)
    res = suite["results"]
    assert set(res) == {"throughput_stage1", "throughput_stage2", "scaling", "goodput", "dataloader"}
    for k in ("throughput_stage1", "throughput_stage2"):
        _check_throughput(res[k])
    sc = res["scaling"]
    assert [m["workers"] for m in sc["measured"]] == [1, 2]
    for m in sc["measured"]:
        assert {"img_per_s_per_worker", "efficiency", "grad_bytes", "allreduce_busbw_GBps"} <= set(m)
    assert sc["measured"][0]["efficiency"] == 1.0 and sc["measured"][1]["allreduce_busbw_GBps"] > 0
    assert sc["projection"]["label"].startswith("MODEL") and sc["projection"]["assumptions"]
    assert {r["gpus"] for r in sc["projection"]["rows"]} == {8, 16, 32, 64, 128, 256, 512}
    assert any(f.startswith("scaling-") and f.endswith(".png") for f in files)
    g = res["goodput"]["goodput"]
    for k in ("checkpoint_save_ms_sync", "stall_share_at_default_interval", "restart_to_first_step_s",
              "steps_lost_per_preemption_with_signal", "steps_lost_per_preemption_hard_kill_expected"):
        assert g[k] is not None and g[k] >= 0, k
    assert g["resumed_at_step"] > 0
    d = res["dataloader"]["dataloader"]
    for k in ("ours_per_worker", "reference_per_worker", "ours_total", "reference_total", "speedup"):
        assert d[k] > 0, k
    md = (tmp_path / "latest-tiny.md").read_text()
    assert "| stage |" in md and "speedup" in md and "Goodput" in md and "Loader" in md


# -- the GPU check and its Makefile targets, as far as a machine without CUDA can show them -----------------

GPU_CHECK = os.path.join(BENCH, "gpu_check.sh")


def _gpu_check(*args, env=None):
    return subprocess.run(["bash", GPU_CHECK, *map(str, args)], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env=dict(os.environ, **(env or {})))


def test_gpu_check_refuses_at_once_without_cuda(tmp_path):
    out = tmp_path / "out"
    # no driver at all (this machine): one line, exit 3, before torch is imported or anything is written
    p = _gpu_check(out, env={"PATH": "/usr/bin:/bin"})
    assert p.returncode == 3 and p.stdout == "" and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "no CUDA device" in p.stderr and not out.exists()
    # a driver's nvidia-smi but a torch without CUDA: refused by torch's own answer, still one line
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: fake'\n")
    (fake / "nvidia-smi").chmod(0o755)
    p = _gpu_check(out, "--phases", "env", env={"PATH": f"{fake}:/usr/bin:/bin", "GPU_CHECK_PYTHON": PY})
    assert p.returncode == 3 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "no CUDA device visible to" in p.stderr and not out.exists()


def test_gpu_check_usage_errors():
    for args, msg in (((), "usage"), (("out", "--phases", "env,bogus"), "unknown phase 'bogus'"),
                      (("out", "--fast"), "unknown argument")):
        p = _gpu_check(*args)
        assert p.returncode == 2 and msg in p.stderr, (args, p.stderr)


def _make_env() -> dict:
    """The environment of `make` as from a shell, also when this test runs under `make test` (a nested make
    prints "Entering directory" and inherits the outer make's flags)."""
    return {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")}


def test_gpu_make_targets_never_see_the_cpu_torch_constraint(tmp_path):
    """The Makefile exports PIP_CONSTRAINT (the CPU torch) to every recipe: test-gpu and gpu-wheels unset it
    first; test-gpu installs nothing from a registry and runs the GPU check with the system python."""
    clean = _make_env()
    for target in ("test-gpu", "gpu-wheels"):
        p = subprocess.run(["make", "--no-print-directory", "-n", "-o", ".venv/bin/.full", "-o", ".venv/bin/.core",
                            target, f"GPU_OUT={tmp_path}"], capture_output=True, text=True, timeout=60, cwd=REPO,
                           env=clean)
        assert p.returncode == 0, p.stderr
        recipe = p.stdout
        assert recipe.startswith("unset PIP_CONSTRAINT;"), recipe
        if target == "test-gpu":
            assert "gpu_check.sh" in recipe and "pip" not in recipe and ".venv" not in recipe, recipe
        else:
            assert "--only-binary=:all: --platform manylinux2014_x86_64" in recipe and "--python-version 3.12" in recipe
            assert "DS_BUILD_OPS=0" in recipe and "--no-build-isolation" in recipe, recipe
    # and for real: on this machine the GPU check stops at once, with its one line, through make
    p = subprocess.run(["make", "test-gpu", f"GPU_OUT={tmp_path / 'gc'}"], capture_output=True, text=True,
                       timeout=120, cwd=REPO, env=dict(clean, PATH="/usr/bin:/bin"))
    assert p.returncode != 0 and "gpu_check: no CUDA device" in p.stderr, p.stderr


def test_demo_targets_run_the_measured_recipes():
    """`make demo` and `make demo-shape` are one pipeline with the overrides README "Demo results" measured:
    the shape recipe is Stage-I at 2 x 64 for 5,000 steps and Stage-II with replicate padding, each under its
    own run directory, and both targets score Stage-I and Stage-II on the held-out captions."""
    clean = _make_env()
    recipes = {}
    for target in ("demo", "demo-shape"):
        p = subprocess.run(["make", "--no-print-directory", "-n", "-o", ".venv/bin/.core", target],
                           capture_output=True, text=True, timeout=60, cwd=REPO, env=clean)
        assert p.returncode == 0, p.stderr
        recipes[target] = [ln.split() for ln in p.stdout.splitlines()]
    for target, run, s1, s2 in (("demo", "runs/demo", [], []),
                                ("demo-shape", "runs/demo-shape", ["train.batch_size=64", "train.max_steps=5000"],
                                 ["model.g_padding=replicate"])):
        train = [ln for ln in recipes[target] if "train" in ln and "-m" in ln]
        assert [ln[ln.index("train") + 1] for ln in train] == ["configs/demo/stage1.yaml", "configs/demo/stage2.yaml"]
        one, two = (ln[ln.index("train") + 2:] for ln in train)
        assert one == [f"run.dir={run}/stage1", *s1], one
        assert two == [f"run.dir={run}/stage2", f"model.stage1_checkpoint={run}/stage1", *s2], two
        evals = [ln for ln in recipes[target] if ln[1:2] == ["eval"]]
        assert [(ln[2], ln[-1]) for ln in evals] == [(f"{run}/stage1", f"{run}/eval_stage1.json"),
                                                     (f"{run}/stage2", f"{run}/eval.json")], evals

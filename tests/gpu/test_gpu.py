"""CUDA-only checks: mixed precision through the CLI, autocast and scalers, fused Adam, compile + NHWC,
DeepSpeed bf16 ZeRO-2 and fp16 ZeRO-0, bf16 against fp32 at the paper's widths, the sync-free step, a bitwise
resume, the throughput benchmark on CUDA; two-GPU NCCL runs where two GPUs exist.

Run on a GPU machine through ``benchmarks/gpu_check.sh OUT --phases tests`` (or ``make test-gpu``), which puts
the wheels of ``make gpu-wheels`` and this checkout on PYTHONPATH. Every test is short: the whole file is
budgeted at about two minutes on one H100/H200. Without CUDA every test fails (on purpose: not skipped),
except the two-GPU ones, which say why they are skipped where fewer than two GPUs are visible.
It must collect on CPU: nothing touches CUDA at import.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

CFG1 = os.path.join(REPO, "configs", "demo", "stage1.yaml")
CFG2 = os.path.join(REPO, "configs", "demo", "stage2.yaml")
TINY = ["model.gf_dim=16", "model.df_dim=8", "model.condition_dim=16", "model.z_dim=16", "model.text_dim=64",
        "model.res_blocks=1", "train.batch_size=8", "data.num_workers=0", "log.progress=false",
        "log.every_steps=1", "log.sample_every=1000", "checkpoint.every_steps=1000", "train.device=cuda"]
PAPER = ["model.gf_dim=128", "model.df_dim=64", "model.condition_dim=128", "model.z_dim=100", "model.text_dim=1024"]
TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2,
                              reason="needs two CUDA devices for a two-rank NCCL group (not faked with one)")


def need_cuda():
    assert torch.cuda.is_available(), "tests/gpu needs a CUDA device (benchmarks/gpu_check.sh on a GPU machine)"


def _env(**extra):
    e = dict(os.environ, OMP_NUM_THREADS="2")
    e["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in e.get("PYTHONPATH", "").split(os.pathsep) if p])
    e.update(extra)
    return e


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from stackgan_dist.data.prepare.synthetic import prepare_synthetic

    out = tmp_path_factory.mktemp("gpu_synth")
    prepare_synthetic(str(out), n_train=64, n_test=16, seed=0, text_dim=64, samples_per_shard=32)
    return out


def train(data, run_dir, *extra, stage=1, steps=3, nproc=1, timeout=300, env=None):
    need_cuda()
    cfg = CFG1 if stage == 1 else CFG2
    args = [f"run.dir={run_dir}", f"data.train={data}/train", f"data.test={data}/test", f"model.stage={stage}",
            f"train.max_steps={steps}", *TINY, *extra]
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else []
    p = subprocess.run([sys.executable, *launcher, "-m", "stackgan_dist", "train", cfg, *args], capture_output=True,
                       text=True, timeout=timeout, cwd=REPO, env=_env(**(env or {})))
    assert p.returncode == 0, f"exit {p.returncode}\nSTDOUT:\n{p.stdout[-3000:]}\nSTDERR:\n{p.stderr[-6000:]}"
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        recs = [json.loads(x) for x in f]
    assert recs and all(r["d_loss"] == r["d_loss"] and r["g_loss"] == r["g_loss"] for r in recs), recs
    return recs


def params_digest(run_dir) -> str:
    p = subprocess.run([sys.executable, "-m", "stackgan_dist", "inspect", str(run_dir)], capture_output=True,
                       text=True, timeout=120, cwd=REPO, env=_env())
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout)["params_sha256"]


DETERMINISTIC = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}


@pytest.fixture(scope="module")
def s1_bf16(data, tmp_path_factory):
    """Stage-I, bf16, deterministic, 4 steps straight (checkpoints at 2 and 4): the reference of the resume
    test and the Stage-I generator of the Stage-II test."""
    run = tmp_path_factory.mktemp("s1") / "run"
    recs = train(data, run, "train.precision=bf16", "train.deterministic=true", "checkpoint.every_steps=2",
                 steps=4, env=DETERMINISTIC)
    return run, recs


# -- mixed precision through the CLI ---------------------------------------------------------------------

def test_bf16_trains_both_stages_on_cuda(data, tmp_path, s1_bf16):
    run, recs = s1_bf16
    assert len(recs) == 4 and all("grad_scale" not in r for r in recs), recs  # bf16 needs no scaler
    train(data, tmp_path / "s2", "train.precision=bf16", f"model.stage1_checkpoint={run}", stage=2, steps=2)


def test_fp16_trains_with_a_loss_scale(data, tmp_path):
    recs = train(data, tmp_path / "s1", "train.precision=fp16", steps=2)
    assert all("grad_scale" in r and r["grad_scale"] > 0 for r in recs), recs


def test_bitwise_resume_with_deterministic(data, tmp_path, s1_bf16):
    """Stage-I bf16 with train.deterministic: 2 steps, then resumed to 4 == 4 steps straight, bit for bit
    (weights, BN buffers: the checkpoint's digest), so the CUDA RNG state of the device in use came back."""
    straight, _ = s1_bf16
    run = tmp_path / "r"
    common = ["train.precision=bf16", "train.deterministic=true", "checkpoint.every_steps=2"]
    train(data, run, *common, steps=2, env=DETERMINISTIC)
    train(data, run, *common, steps=4, env=DETERMINISTIC)
    assert params_digest(run) == params_digest(straight)


# -- the strategy in this process ------------------------------------------------------------------------

def _strategy(precision, *extra, widths=("model.gf_dim=16", "model.df_dim=8", "model.condition_dim=16",
                                         "model.z_dim=16", "model.text_dim=32")):
    need_cuda()
    from stackgan_dist.config import load_config
    from stackgan_dist.distributed.env import DistEnv
    from stackgan_dist.distributed.ddp import DDPStrategy
    from stackgan_dist.models.build import build_models

    cfg = load_config(None, [*widths, f"train.precision={precision}", "train.device=cuda", *extra])
    m = build_models(cfg.model)
    s = DDPStrategy(cfg, DistEnv(device=torch.device("cuda", torch.cuda.current_device())))
    s.setup(m.G, m.D)
    return s, cfg


@pytest.mark.parametrize("precision,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16),
                                             ("fp32", torch.float32)])
def test_autocast_dtype_and_scaler_per_optimizer(precision, dtype):
    s, _ = _strategy(precision)
    dev = s.device
    text = torch.randn(4, 32, device=dev)
    z, eps = torch.randn(4, 16, device=dev), torch.randn(4, 16, device=dev)
    with s.autocast():
        img, mu, logvar = s.g.wrapped(text, z, eps)
        logits = s.d.wrapped(img.detach(), text)["cond"]
    assert img.dtype == dtype, img.dtype
    assert all(p.dtype == torch.float32 for p in s.g.net.parameters())  # master weights stay fp32
    if precision == "fp16":
        assert s.d.scaler is not None and s.d.scaler is not s.g.scaler
        before = [p.detach().clone() for p in s.d.net.parameters()]
        s.d.backward(logits.float().mean() * float("inf"))
        s.d.step()  # overflow: the scaler skips the step and lowers the scale
        assert all(torch.equal(a, b) for a, b in zip(before, s.d.net.parameters()))
        assert s.d.scaler.get_scale() < s.g.scaler.get_scale()
        sd = s.state_dict()
        assert "scaler_g" in sd and "scaler_d" in sd
    else:
        assert s.d.scaler is None and s.g.scaler is None


def test_adam_is_fused_on_cuda():
    s, _ = _strategy("fp32")
    for o in (s.d.optimizer, s.g.optimizer):
        assert isinstance(o, torch.optim.Adam) and o.defaults["fused"] is True


def test_channels_last_memory_format_reaches_the_models():
    s, _ = _strategy("bf16", "train.channels_last=true")
    w = next(p for n, p in s.d.net.named_parameters() if p.dim() == 4)
    assert w.is_contiguous(memory_format=torch.channels_last)


def _pinned_batch(b, size, text_dim, seed):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=g).pin_memory(),
            "text": torch.randn(b, text_dim, generator=g).pin_memory(), "cls": (torch.arange(b) % 4).pin_memory()}


def test_steady_state_step_never_synchronises_with_the_host():
    """100 bf16 steps of GANStep under torch.cuda.set_sync_debug_mode("error"): no .item(), no bool(tensor),
    no pageable copy. (The log and checkpoint ticks of the trainer are outside the step.)"""
    from stackgan_dist.train_step import GANStep

    s, cfg = _strategy("bf16", "train.channels_last=true")
    gen = torch.Generator(device=s.device).manual_seed(0)
    step = GANStep(s, 1, cfg.model.z_dim, cfg.model.condition_dim, cfg.train.kl_coeff, None, gen, 1, True)
    batches = [_pinned_batch(8, 64, 32, i) for i in range(4)]
    for b in batches[:3]:  # warm-up: cudnn autotuning, lazy optimizer state
        step([b])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(100):
            out = step([batches[i % 4]])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert torch.isfinite(out["d_loss"]).item() and torch.isfinite(out["g_loss"]).item()


@pytest.mark.parametrize("stage", [1, 2])
def test_bf16_losses_and_d_gradient_close_to_fp32_at_paper_widths(stage):
    """Same weights, data and noise; fp32 with TF32 off as the reference: bf16 autocast gives the D and G
    losses within 5% and D's gradient pointing the same way (cosine > 0.98, norm within 10%)."""
    from stackgan_dist.config import ModelConfig
    from stackgan_dist.losses import mismatched_conditions
    from stackgan_dist.models.build import build_models, build_stage1_generator
    from stackgan_dist.train_step import GANStep, to_model_input

    need_cuda()
    torch.manual_seed(0)
    ref = build_models(ModelConfig(stage=stage, gf_dim=128, df_dim=64, condition_dim=128, z_dim=100, text_dim=1024))
    G1 = build_stage1_generator(ModelConfig(stage=1, gf_dim=128, df_dim=64, condition_dim=128, z_dim=100,
                                            text_dim=1024)).eval().requires_grad_(False) if stage == 2 else None
    b, size = 8, 64 if stage == 1 else 256
    batch = _pinned_batch(b, size, 1024, 1)
    results = {}
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        for precision in ("fp32", "bf16"):
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = precision != "fp32"
            s, cfg = _strategy(precision, f"model.stage={stage}", widths=PAPER)
            s.g.net.load_state_dict(ref.G.state_dict())
            s.d.net.load_state_dict(ref.D.state_dict())
            g1 = G1.to(s.device) if G1 is not None else None
            step = GANStep(s, stage, 100, 128, cfg.train.kl_coeff, g1, torch.Generator(device=s.device), 1)
            gn = torch.Generator(device=s.device).manual_seed(3)
            noise = {k: torch.randn(b, n, device=s.device, generator=gn)
                     for k, n in (("z", 100), ("eps", 128), ("eps1", 128))}
            real, text, cls = to_model_input(batch, s.device)
            with s.autocast():
                fake, mu, logvar, s0 = step.generate(s.g.wrapped, text, noise)
                dl = step.d_losses(real, text, mismatched_conditions(text, cls), fake)
            dl["d_loss"].backward()
            dgrad = torch.cat([p.grad.flatten().float() for p in s.d.net.parameters() if p.grad is not None])
            with s.autocast():
                gl = step.g_losses(fake, text, mu, logvar, s0)
            results[precision] = (float(dl["d_loss"]), float(gl["g_loss"]), dgrad)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    (d32, g32, gr32), (d16, g16, gr16) = results["fp32"], results["bf16"]
    assert abs(d16 - d32) <= 0.05 * abs(d32) and abs(g16 - g32) <= 0.05 * abs(g32), results
    cos = torch.nn.functional.cosine_similarity(gr16, gr32, dim=0).item()
    assert cos > 0.98 and abs(gr16.norm().item() / gr32.norm().item() - 1) < 0.10, (cos, gr16.norm(), gr32.norm())


# -- compile, DeepSpeed, the benchmark -------------------------------------------------------------------

def test_compile_and_channels_last_train(data, tmp_path):
    train(data, tmp_path / "c", "train.compile=true", "train.channels_last=true", "train.precision=bf16", steps=2)


@pytest.mark.parametrize("precision,zero", [("bf16", 2), ("fp16", 0)])
def test_deepspeed_mixed_precision_one_process(data, tmp_path, precision, zero):
    """DeepSpeed keeps fp32 weights and BatchNorm buffers and computes under torch autocast (its own bf16
    mode would hand BatchNorm bf16 weights next to fp32 running statistics and fail at step 1)."""
    import deepspeed  # noqa: F401  (from the wheels of make gpu-wheels; fail loudly if missing)

    recs = train(data, tmp_path / "ds", "train.backend=deepspeed", f"train.zero_stage={zero}",
                 f"train.precision={precision}", steps=3)
    assert len(recs) == 3


def test_throughput_benchmark_runs_on_cuda(tmp_path):
    """benchmarks/throughput.py --device cuda at tiny widths: CUDA events, 30 timed steps, the baseline beside,
    MFU either absent (a GPU without a datasheet entry) or in (0, 1]."""
    need_cuda()
    out = tmp_path / "t.json"
    p = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "throughput.py"), "--device", "cuda",
                        "--stage", "2", "--batch-size", "4", "--gf-dim", "16", "--df-dim", "8", "--condition-dim",
                        "8", "--z-dim", "8", "--text-dim", "16", "--precision", "bf16", "--channels-last",
                        "--baseline", "--warmup", "2", "--steps", "30", "--peak-n", "1024", "--json", str(out)],
                       capture_output=True, text=True, timeout=180, cwd=REPO, env=_env())
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    r = json.loads(out.read_text())["results"][0]
    assert r["timer"] == "cuda_events" and r["steps"] == 30 and r["img_per_s"] > 0 and r["speedup"] > 0
    assert r["compute_precision"] == "bf16" and r["peak_mem_kind"] == "cuda_max_allocated"
    assert r["mfu"] is None or 0 < r["mfu"] <= 1, r


# -- two GPUs --------------------------------------------------------------------------------------------

@TWO_GPUS
def test_two_rank_nccl_ddp_sync_bn_bf16(data, tmp_path):
    train(data, tmp_path / "ddp", "model.sync_bn=true", "train.precision=bf16", nproc=2)


@TWO_GPUS
def test_two_rank_nccl_deepspeed_bf16_zero2_sync_bn(data, tmp_path):
    """SyncBatchNorm under DeepSpeed bf16: fp32 weights and running statistics, bf16 input (the AMP mixed case
    of the CUDA kernels), statistics gathered over NCCL."""
    train(data, tmp_path / "ds2", "train.backend=deepspeed", "train.zero_stage=2", "train.precision=bf16",
          "model.sync_bn=true", nproc=2)


@TWO_GPUS
@pytest.mark.parametrize("hook", ["bf16", "powersgd"])
def test_two_rank_nccl_ddp_comm_hooks(data, tmp_path, hook):
    """The communication options of configs/birds and configs/flowers on NCCL (PowerSGD from the first step on,
    so its compression runs; on CUDA its buckets are not serialised as on gloo)."""
    train(data, tmp_path / hook, f"distributed.comm_hook={hook}", "distributed.powersgd_start_step=1",
          "distributed.powersgd_rank=2", "train.precision=bf16", nproc=2, steps=4)

"""CUDA-only checks: fp16 / bf16 autocast, GradScaler, fused Adam, torch.compile, channels_last, DeepSpeed bf16.

Run on a GPU machine with ``make test-gpu`` (``python3 -m pytest -q tests/gpu``). Imports only torch,
numpy, webdataset, deepspeed and this package. Without CUDA every test fails (on purpose: not skipped).
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


def need_cuda():
    assert torch.cuda.is_available(), "tests/gpu needs a CUDA device (run them with `make test-gpu` on a GPU box)"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from stackgan_dist.data.synthetic import prepare_synthetic

    out = tmp_path_factory.mktemp("gpu_synth")
    prepare_synthetic(str(out), n_train=64, n_test=16, seed=0, text_dim=64, samples_per_shard=32)
    return out


def train(data, run_dir, *extra, stage=1, steps=3, nproc=1, timeout=900):
    need_cuda()
    cfg = CFG1 if stage == 1 else CFG2
    args = [f"run.dir={run_dir}", f"data.train={data}/train", f"data.test={data}/test", f"model.stage={stage}",
            f"train.max_steps={steps}", *TINY, *extra]
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else []
    p = subprocess.run([sys.executable, *launcher, "-m", "stackgan_dist", "train", cfg, *args], capture_output=True,
                       text=True, timeout=timeout, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert p.returncode == 0, f"exit {p.returncode}\nSTDOUT:\n{p.stdout[-3000:]}\nSTDERR:\n{p.stderr[-6000:]}"
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        recs = [json.loads(x) for x in f]
    assert recs and all(r["d_loss"] == r["d_loss"] and r["g_loss"] == r["g_loss"] for r in recs), recs
    return recs


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_trains_both_stages_on_cuda(data, tmp_path, precision):
    recs = train(data, tmp_path / "s1", f"train.precision={precision}")
    if precision == "fp16":
        assert all("grad_scale" in r and r["grad_scale"] > 0 for r in recs), recs
    else:
        assert all("grad_scale" not in r for r in recs), recs  # bf16 needs no scaler
    train(data, tmp_path / "s2", f"train.precision={precision}", f"model.stage1_checkpoint={tmp_path / 's1'}",
          stage=2, steps=2)


def _strategy(precision, *extra):
    need_cuda()
    from stackgan_dist.config import load_config
    from stackgan_dist.distributed.env import DistEnv
    from stackgan_dist.distributed.wrap import DDPStrategy
    from stackgan_dist.models.build import build_models

    cfg = load_config(None, ["model.gf_dim=16", "model.df_dim=8", "model.condition_dim=16", "model.z_dim=16",
                             "model.text_dim=32", f"train.precision={precision}", "train.device=cuda", *extra])
    m = build_models(cfg.model)
    s = DDPStrategy(cfg, DistEnv(device=torch.device("cuda", 0)))
    s.setup(m.G, m.D)
    return s


@pytest.mark.parametrize("precision,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16),
                                             ("fp32", torch.float32)])
def test_autocast_dtype_and_scaler_per_optimizer(precision, dtype):
    s = _strategy(precision)
    text = torch.randn(4, 32, device="cuda")
    z, eps = torch.randn(4, 16, device="cuda"), torch.randn(4, 16, device="cuda")
    with s.autocast():
        img, mu, logvar = s.G(text, z, eps)
        logits = s.D(img.detach(), text)["cond"]
    assert img.dtype == dtype, img.dtype
    assert all(p.dtype == torch.float32 for p in s.G_module.parameters())  # master weights stay fp32
    if precision == "fp16":
        assert s.d.scaler is not None and s.d.scaler is not s.g.scaler
        before = [p.detach().clone() for p in s.D_module.parameters()]
        s.d.backward(logits.float().mean() * float("inf"))
        s.d.step()  # overflow: the scaler skips the step and lowers the scale
        assert all(torch.equal(a, b) for a, b in zip(before, s.D_module.parameters()))
        assert s.d.scaler.get_scale() < s.g.scaler.get_scale()
        sd = s.state_dict()
        assert "scaler_g" in sd and "scaler_d" in sd
    else:
        assert s.d.scaler is None and s.g.scaler is None


def test_adam_is_fused_on_cuda():
    s = _strategy("fp32")
    for o in (s.d.optimizer, s.g.optimizer):
        assert isinstance(o, torch.optim.Adam) and o.defaults["fused"] is True


def test_compile_and_channels_last_train(data, tmp_path):
    train(data, tmp_path / "c", "train.compile=true", "train.channels_last=true", steps=3, timeout=1200)


def test_channels_last_memory_format_reaches_the_models():
    s = _strategy("bf16", "train.channels_last=true")
    w = next(p for n, p in s.D_module.named_parameters() if p.dim() == 4)
    assert w.is_contiguous(memory_format=torch.channels_last)


def test_deepspeed_bf16_zero2_one_process(data, tmp_path):
    import deepspeed  # noqa: F401  (the GPU box has it; fail loudly if not)

    recs = train(data, tmp_path / "ds", "train.backend=deepspeed", "train.zero_stage=2", "train.precision=bf16",
                 steps=3)
    assert len(recs) == 3


def test_ddp_sync_bn_on_cuda(data, tmp_path):
    """NCCL DDP with SyncBatchNorm on 2 GPUs when the box has them; one process otherwise."""
    need_cuda()
    train(data, tmp_path / "ddp", "model.sync_bn=true", nproc=min(2, torch.cuda.device_count()))

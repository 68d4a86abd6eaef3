"""PowerSGD's own work per training step, measured on one device: the scaling projection's one input that is
otherwise an estimate (``scaling_model.MODEL_ASSUMPTIONS["powersgd_hook_work"]``).

For each stage (paper widths by default), PowerSGD rank and bucket cap, and each of the two DDP modules (G and
D, each with its own hook state, as ``ddp.DDPStrategy`` sets them up): DDP at world size 1 over the real
module with the hook ``comm_hooks.comm_hook_for`` makes (torch's PowerSGD: error feedback, warm start), and a
backward whose gradients cost almost nothing (every parameter times one scalar), so that the hook is most of
the step; subtracted from it, the same backward through a DDP copy whose hook hands the bucket back untouched.
Both alternate step by step, past PowerSGD's own warm-up (``distributed.powersgd_start_step``); the device is
synchronised around each step. ``t_hook`` = median(PowerSGD step) - median(no-op step), clipped at 0 (the raw
difference is kept). At world size 1 the hook's three all-reduces per bucket still run on the device (a copy
each); the projection adds the collectives of N GPUs on top, so this slightly over-counts.

    python benchmarks/hook_work.py --device cuda --json OUT.json      # on the GPU machine (gpu_check.sh comm)
    python benchmarks/scaling.py --from-json CPU.json --hook-work-json OUT.json --json PROJ.json --plot P.png
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import common  # also puts the repo on sys.path
import torch
import torch.distributed as dist
from torch import nn

from scaling_paper import PAPER

from stackgan_dist.config import Config, DistributedConfig
from stackgan_dist.distributed.comm_hooks import comm_hook_for
from stackgan_dist.models.build import build_models


class EveryParameter(nn.Module):
    """forward(s) = sum of every parameter of ``m`` times s: a backward that gives each parameter a gradient
    (s everywhere) at almost no cost, so that a step's time is autograd plus the communication hook."""

    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return sum((p * s).sum() for p in self.m.parameters())


def _noop_hook(state, bucket):  # no annotations: DDP compares them with its own objects
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def _ddp(module: nn.Module, cap_mb: float, hook) -> nn.parallel.DistributedDataParallel:
    kw = {"bucket_cap_mb": cap_mb} if cap_mb > 0 else {}
    w = nn.parallel.DistributedDataParallel(EveryParameter(module), gradient_as_bucket_view=True, **kw)
    w.register_comm_hook(hook[1], hook[0])
    return w


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(w, s: torch.Tensor, device: torch.device) -> float:
    _sync(device)
    t = time.perf_counter()
    w(s).backward()
    _sync(device)
    dt = time.perf_counter() - t
    for p in w.parameters():
        p.grad = None
    return dt


def measure_module(module: nn.Module, rank: int, cap_mb: float, start_step: int, warmup: int, steps: int,
                   device: torch.device) -> dict:
    dcfg = DistributedConfig()
    dcfg.comm_hook, dcfg.powersgd_rank, dcfg.powersgd_start_step = "powersgd", rank, start_step
    psgd = comm_hook_for(dcfg, serialize=device.type != "cuda")
    w_psgd = _ddp(module, cap_mb, psgd)
    w_noop = _ddp(module, cap_mb, (_noop_hook, None))
    s = torch.ones((), device=device)
    t_psgd, t_noop = [], []
    for i in range(start_step + warmup + steps):
        a, b = _step(w_psgd, s, device), _step(w_noop, s, device)
        if i >= start_step + warmup:
            t_psgd.append(a)
            t_noop.append(b)
    state = psgd[1]
    assert state.iter > start_step, "PowerSGD never started: the measurement would time plain all-reduce"
    compress_rate = state.compression_stats()[0]
    med_psgd, med_noop = common.percentile(t_psgd, 0.5), common.percentile(t_noop, 0.5)
    raw = med_psgd - med_noop
    return {"rank": rank, "bucket_cap_mb": cap_mb, "buckets": len(state.error_dict),
            "params": sum(p.numel() for p in module.parameters()), "compression_rate": compress_rate,
            "t_powersgd_step_ms": 1e3 * med_psgd, "t_noop_step_ms": 1e3 * med_noop,
            "t_hook_raw_ms": 1e3 * raw, "t_hook_ms": 1e3 * max(0.0, raw)}


def build(stage: int, a, device: torch.device):
    cfg = Config()
    cfg.model.stage, cfg.model.gf_dim, cfg.model.df_dim = stage, a.gf_dim, a.df_dim
    cfg.model.condition_dim, cfg.model.z_dim, cfg.model.text_dim = a.condition_dim, a.z_dim, a.text_dim
    m = build_models(cfg.model)
    return {"G": m.G.to(device), "D": m.D.to(device)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--stages", type=int, nargs="+", default=[1, 2])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--caps", type=float, nargs="+", default=[0.0, 5.0, 25.0, 100.0, 400.0],
                   help="bucket_cap_mb values (0: DDP's default); the projection's search grid")
    p.add_argument("--start-step", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=15)
    for k, v in PAPER.items():
        p.add_argument("--" + k.replace("_", "-"), type=int, default=v)
    p.add_argument("--json", default="")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
    fd, store = tempfile.mkstemp(prefix="hook_work_store_")
    os.close(fd)
    os.unlink(store)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{store}", rank=0,
                            world_size=1)
    rows = []
    try:
        for stage in a.stages:
            mods = build(stage, a, device)
            for rank in a.ranks:
                for cap in a.caps:
                    per = {name: measure_module(m, rank, cap, a.start_step, a.warmup, a.steps, device)
                           for name, m in mods.items()}
                    row = {"stage": stage, "rank": rank, "bucket_cap_mb": cap,
                           "t_hook_ms": sum(r["t_hook_ms"] for r in per.values()), "modules": per}
                    rows.append(row)
                    print(f"stage {stage} rank {rank} cap {cap:g} MB: PowerSGD work {row['t_hook_ms']:.3f} ms "
                          f"per step (G {per['G']['t_hook_ms']:.3f} ms in {per['G']['buckets']} buckets, "
                          f"D {per['D']['t_hook_ms']:.3f} ms in {per['D']['buckets']})", flush=True)
    finally:
        dist.destroy_process_group()
    out = {**common.header(a.device), "widths": {k: getattr(a, k) for k in PAPER}, "rows": rows,
           "method": "world size 1 DDP per module, cheap backward, PowerSGD step minus no-op-hook step (medians)"}
    common.write_json(out, a.json)
    return out


if __name__ == "__main__":
    main()

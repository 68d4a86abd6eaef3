"""Weak scaling over 1..N worker processes (gloo on CPU, NCCL on GPUs), a measured all-reduce bandwidth,
and a projected efficiency table for 8..512 GPUs from a simple communication model (not a measurement).

Weak scaling: every worker keeps the same per-worker batch; efficiency(N) = img/s per worker at N / at 1.
"""
from __future__ import annotations

import argparse
import os
import socket
import time

import common  # noqa: F401
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stackgan_dist.config import Config
from stackgan_dist.distributed.env import DistEnv
from stackgan_dist.distributed.wrap import make_strategy
from stackgan_dist.models.build import build_models
from stackgan_dist.train_step import GANStep

# Assumptions of the projection (stated in every output):
MODEL_ASSUMPTIONS = {
    "per_gpu_batch": 64,
    "mfu": 0.35,  # the compute side runs at the MFU target on an H100 (989 TFLOP/s dense bf16)
    "peak_flops": 989e12,
    "gpus_per_node": 8,
    "intra_node_busbw_GBps": 450.0,  # NVLink 4 (H100 SXM), all-reduce bus bandwidth
    "latency_us_per_hop": 5.0,
    "grad_dtype_bytes": 4,  # DDP reduces fp32 gradients (autocast keeps fp32 parameters)
    "overlap": "none: communication added to compute (DDP's bucket overlap with backward would only help)",
    "algorithm": "ring all-reduce: t = 2 (N-1)/N * bytes / busbw + 2 (N-1) * latency",
    "stage_flops_per_img": {"1": 10.0e9, "2": 122.4e9},  # throughput.py (torch.utils.flop_counter), paper widths
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(a) -> Config:
    cfg = Config()
    m = cfg.model
    m.stage, m.gf_dim, m.df_dim, m.condition_dim, m.z_dim, m.text_dim = 1, a.gf_dim, a.df_dim, 32, 32, 256
    cfg.train.batch_size = a.batch_size
    return cfg


def _worker(rank: int, world: int, port: int, a, q) -> None:
    torch.set_num_threads(max(1, a.threads))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cfg = _cfg(a)
        torch.manual_seed(0)
        models = build_models(cfg.model)
        env = DistEnv(rank=rank, world_size=world, device=torch.device("cpu"))
        s = make_strategy(cfg, env)
        s.setup(models.G, models.D)
        gen = torch.Generator().manual_seed(rank)
        step = GANStep(s, 1, 32, 32, 1.0, None, gen)
        g = torch.Generator().manual_seed(rank + 100)
        b = cfg.train.batch_size
        batch = {"image": torch.randint(0, 256, (b, 3, 64, 64), dtype=torch.uint8, generator=g),
                 "text": torch.randn(b, 256, generator=g), "cls": torch.arange(b) % 4}
        for _ in range(a.warmup):
            step([batch])
        times = []
        for _ in range(a.steps):
            dist.barrier()
            t = time.perf_counter()
            step([batch])
            times.append(time.perf_counter() - t)
        grad_bytes = sum(p.numel() * p.element_size() for m in (models.G, models.D) for p in m.parameters())
        bw = None
        if world > 1:  # all-reduce of one step's gradient volume
            buf = torch.zeros(max(grad_bytes // 4, 1))
            dist.all_reduce(buf)
            ts = []
            for _ in range(5):
                dist.barrier()
                t = time.perf_counter()
                dist.all_reduce(buf)
                ts.append(time.perf_counter() - t)
            bw = 2 * (world - 1) / world * grad_bytes / common.percentile(ts, 0.5)  # bus bandwidth
        q.put((rank, common.percentile(times, 0.5), grad_bytes, bw))
    finally:
        dist.destroy_process_group()


def measure(a, world: int) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, a, q)) for r in range(world)]
    for p in procs:
        p.start()
    res = [q.get(timeout=a.timeout) for _ in range(world)]
    for p in procs:
        p.join(timeout=60)
        if p.exitcode != 0:
            raise RuntimeError(f"scaling worker exited with {p.exitcode}")
    step_s = max(r[1] for r in res)  # the slowest rank sets the pace
    bws = [r[3] for r in res if r[3]]
    return {"workers": world, "step_ms_p50": 1e3 * step_s, "img_per_s_per_worker": a.batch_size / step_s,
            "img_per_s_total": world * a.batch_size / step_s, "grad_bytes": res[0][2],
            "allreduce_busbw_GBps": (min(bws) / 1e9) if bws else None}


def projection(stage: int, grad_bytes: int, inter_node_GBps: list[float], sizes: list[int]) -> list[dict]:
    A = MODEL_ASSUMPTIONS
    t_comp = A["per_gpu_batch"] * A["stage_flops_per_img"][str(stage)] / (A["mfu"] * A["peak_flops"])
    rows = []
    for bw in inter_node_GBps:
        for n in sizes:
            busbw = A["intra_node_busbw_GBps"] if n <= A["gpus_per_node"] else bw
            t_comm = 2 * (n - 1) / n * grad_bytes / (busbw * 1e9) + 2 * (n - 1) * A["latency_us_per_hop"] * 1e-6
            rows.append({"stage": stage, "gpus": n, "inter_node_GBps": bw, "compute_ms": 1e3 * t_comp,
                         "comm_ms": 1e3 * t_comm, "efficiency": t_comp / (t_comp + t_comm)})
    return rows


def paper_grad_bytes(stage: int) -> int:
    cfg = Config()
    cfg.model.stage = stage
    with torch.device("meta"):  # shapes only: no memory, no init cost
        m = build_models(cfg.model)
    return sum(p.numel() * 4 for mod in (m.G, m.D) for p in mod.parameters())


def plot(measured: list[dict], proj: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    base = measured[0]["img_per_s_per_worker"]
    ax1.plot([m["workers"] for m in measured], [m["img_per_s_per_worker"] / base for m in measured], "o-")
    ax1.set(xlabel="worker processes", ylabel="weak-scaling efficiency", title="measured (this machine)",
            ylim=(0, 1.1))
    for stage in sorted({r["stage"] for r in proj}):
        for bw in sorted({r["inter_node_GBps"] for r in proj}):
            rs = [r for r in proj if r["stage"] == stage and r["inter_node_GBps"] == bw]
            ax2.plot([r["gpus"] for r in rs], [r["efficiency"] for r in rs], "o-", label=f"stage {stage}, {bw:g} GB/s")
    ax2.set(xscale="log", xlabel="GPUs", ylabel="efficiency", title="MODEL: ring all-reduce, no overlap",
            ylim=(0, 1.05))
    ax2.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--max-procs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--gf-dim", type=int, default=16)
    p.add_argument("--df-dim", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--inter-node-GBps", type=float, nargs="+", default=[25.0, 50.0, 100.0],
                   help="all-reduce bus bandwidth between nodes (200/400/800 Gb/s InfiniBand)")
    p.add_argument("--json", default="")
    p.add_argument("--plot", default="")
    a = p.parse_args(argv)
    measured = [measure(a, n) for n in range(1, a.max_procs + 1)]
    base = measured[0]["img_per_s_per_worker"]
    for m in measured:
        m["efficiency"] = m["img_per_s_per_worker"] / base
    sizes = [8, 16, 32, 64, 128, 256, 512]
    proj = [r for st in (1, 2) for r in projection(st, paper_grad_bytes(st), a.inter_node_GBps, sizes)]
    out = {**common.header("cpu"), "measured": measured,
           "measured_setup": {"stage": 1, "batch_per_worker": a.batch_size, "gf_dim": a.gf_dim, "df_dim": a.df_dim,
                              "threads_per_worker": a.threads, "backend": "gloo"},
           "projection": {"label": "MODEL, not a measurement", "assumptions": MODEL_ASSUMPTIONS,
                          "grad_bytes_paper": {"1": paper_grad_bytes(1), "2": paper_grad_bytes(2)}, "rows": proj}}
    common.write_json(out, a.json)
    if a.plot:
        plot(measured, proj, a.plot)
    for m in measured:
        print(f"{m['workers']} workers: {m['img_per_s_per_worker']:.1f} img/s/worker, efficiency "
              f"{m['efficiency']:.2f}, all-reduce {m['allreduce_busbw_GBps'] or 0:.2f} GB/s", flush=True)
    return out


if __name__ == "__main__":
    main()

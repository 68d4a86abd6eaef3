"""Weak scaling: measured with gloo over 1..N CPU processes per stage and gradient-communication option, a
communication model fed with those measurements and checked against them, and its projection to 8..512 GPUs.

Measured here (per stage, per ``distributed.comm_hook``; 2 processes, one thread each, alternating steps):
- ``t_nosync``: a training step with both DDP modules under ``no_sync`` (no gradient all-reduce at all);
- ``t_sync``: the same step with DDP's reduction through the hook;
- ``t_ar``: the collectives that step issued, replayed alone, back to back (sizes and dtypes as counted);
- bytes per step and collectives per step: counted from the calls the hook makes (the built-in fp32 path
  reduces in C++: its bytes are DDP's bucket sizes), BatchNorm buffer averaging apart;
- ``t_hook``: PowerSGD's own arithmetic (projections, orthogonalisation, decompression) for the same
  shapes, timed alone;
- overlap = (t_nosync + t_ar + t_hook - t_sync) / (t_ar + t_hook), clipped to [0, 1]: the share of the
  communication (and the hook's work) hidden behind the backward pass;
- an all-reduce sweep over message sizes: latency and bus bandwidth (t = alpha + bytes / busbw at 2 ranks).

Validation before the projection is believed: for 2 CPU processes the model predicts
t_sync = t_nosync + (1 - overlap) * (t_ar,model + t_hook), with t_ar,model from the sweep's alpha and busbw
applied to the counted messages and the overlap the same hook's at the other stage (leave-one-out); the
prediction must be within ``--tolerance`` of the measured t_sync. Reported beside it: how much slower a
worker's compute is with a second worker running (the weak-scaling premise the GPU projection assumes holds;
on 2 shared cores it does not). Limits: 2 cores for 2 processes, gloo's reduction runs on the same cores as the
backward (so overlap here is a lower bound of what a GPU with its own copy engines and NCCL gets), and 2
ranks cannot show how latency grows with the ring.

The projection (a MODEL, not a measurement) at the paper widths, bf16 compute at the benchmark suite's MFU
targets on H100, per-GPU batch 64: see MODEL_ASSUMPTIONS (stated in the JSON and the figure's legend). It
searches hook, bucket size and all-reduce algorithm (flat ring, or hierarchical: in-node then across nodes)
for the option that reaches 0.8 weak-scaling efficiency at 64 GPUs with 25 GB/s between nodes.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import socket
import time
from types import SimpleNamespace

import common  # noqa: F401  (puts the repo on sys.path)
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stackgan_dist.config import Config, ModelConfig
from stackgan_dist.distributed import make_strategy
from stackgan_dist.distributed.env import DistEnv
from stackgan_dist.models.build import build_models, build_stage1_generator
from stackgan_dist.train_step import GANStep

HOOKS = ("none", "bf16", "fp16", "powersgd")
PAPER = {"gf_dim": 128, "df_dim": 64, "condition_dim": 128, "z_dim": 100, "text_dim": 1024}
# Assumptions of the projection (stated in every output). Measured inputs (overlap, bytes, collectives) come
# from this run; FLOPs per image are counted at the paper widths by throughput.py's counter in this run.
MODEL_ASSUMPTIONS = {
    "per_gpu_batch": 64,  # the paper's batch; fixed (weak scaling), never raised to hide communication
    "mfu": {"1": 0.25, "2": 0.35},  # the benchmark suite's GPU targets (README, gpu_check): Stage I 25 %, II 35 %
    "peak_flops": 989e12,  # H100 SXM dense bf16
    "gpus_per_node": 8,
    "intra_node_busbw_GBps": 450.0,  # NVLink 4 (H100 SXM) all-reduce bus bandwidth
    "inter_node_busbw_GBps": 25.0,  # per node (one 200 Gb/s NIC), the figure; others: --inter-node-GBps
    "latency_us_intra": 2.0,  # per step of an NVLink ring or chain
    "latency_us_inter": 5.0,  # per step of a ring or tree across nodes
    "algorithms": {
        "ring": "flat ring over all N GPUs: 2(N-1)/N * B / busbw_inter + 2(N-1) * lat_inter",
        "hierarchical": "reduce-scatter in the node, all-reduce of the shard across M nodes, all-gather in the "
                        "node (NCCL's tree/NVLS path): 2(g-1)/g * B / busbw_intra + 2(M-1)/M * B / busbw_inter "
                        "+ 2((g-1) lat_intra + ceil(log2 M) lat_inter)",
    },
    "overlap": "measured on CPU per stage and hook (2 gloo processes) where resolved (communication + hook work > "
               "2 standard errors of t_sync - t_nosync; otherwise 0), applied to communication and hook work, "
               "at most the backward share of compute (2/3 of a step's FLOPs); the last bucket of each module "
               "is never hidden (it is reduced after the backward ends)",
    "grad_bytes": "fp32 gradients (autocast keeps fp32 weights); fp16/bf16 hooks halve them; PowerSGD sends "
                  "rank x (n + m) per compressed n x m matrix and the rest uncompressed (torch's rule, checked "
                  "against the bytes the hook sent in this run)",
    "powersgd_hook_work": "6 n m r FLOPs per compressed matrix at 30 % of H100 fp32 (67 TFLOP/s) + 30 us per "
                          "compressed matrix (two orthogonalisations, three batched matmuls) + 20 us per bucket "
                          "(the hook synchronises the device in decompress): an estimate, not measured on a GPU",
    "bn_buffer_sync": "one all-reduce of BatchNorm running statistics per step (never overlapped)",
}
TARGET = {"gpus": 64, "inter_node_GBps": 25.0, "efficiency": 0.8}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- measurement ---------------------------------------------------------------------------------------

def bench_cfg(a, stage: int, hook: str) -> Config:
    cfg = Config()
    m = cfg.model
    m.stage, m.condition_dim, m.z_dim, m.text_dim = stage, 32, 32, 256
    if stage == 1:
        m.gf_dim, m.df_dim, cfg.train.batch_size = a.gf_dim, a.df_dim, a.batch_size
    else:
        m.gf_dim, m.df_dim, cfg.train.batch_size = a.stage2_gf_dim, a.stage2_df_dim, a.stage2_batch_size
    d = cfg.distributed
    d.comm_hook, d.powersgd_rank, d.powersgd_start_step = hook, a.powersgd_rank, 2
    return cfg


def make_step(cfg: Config, env: DistEnv, rank: int):
    torch.manual_seed(0)
    models = build_models(cfg.model)
    G1 = None
    if cfg.model.stage == 2:
        m = cfg.model
        G1 = build_stage1_generator(ModelConfig(stage=1, gf_dim=max(16, m.gf_dim // 16 * 16), df_dim=m.df_dim,
                                                condition_dim=m.condition_dim, z_dim=m.z_dim,
                                                text_dim=m.text_dim)).eval().requires_grad_(False)
    s = make_strategy(cfg, env)
    s.setup(models.G, models.D)
    step = GANStep(s, cfg.model.stage, cfg.model.z_dim, cfg.model.condition_dim, 1.0, G1,
                   torch.Generator().manual_seed(rank))
    g = torch.Generator().manual_seed(rank + 100)
    b, size = cfg.train.batch_size, 64 if cfg.model.stage == 1 else 256
    batch = {"image": torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=g),
             "text": torch.randn(b, cfg.model.text_dim, generator=g), "cls": torch.arange(b) % 4}
    return s, step, batch


class CountCollectives:
    """Records every ``torch.distributed.all_reduce`` made while active (the hooks call it through the module
    attribute), tagged "bn" while the strategy averages BatchNorm buffers, "grad" otherwise."""

    def __init__(self, strategy):
        self.s, self.calls, self.tag = strategy, [], "grad"

    def __enter__(self):
        self.orig, self.orig_after = dist.all_reduce, self.s.after_step

        def counted(t, *args, **kw):
            self.calls.append((self.tag, t.numel(), t.dtype))
            return self.orig(t, *args, **kw)

        def after():
            self.tag = "bn"
            try:
                self.orig_after()
            finally:
                self.tag = "grad"

        dist.all_reduce, self.s.after_step = counted, after
        return self

    def __exit__(self, *exc):
        dist.all_reduce, self.s.after_step = self.orig, self.orig_after
        return False


def ddp_buckets(strategy) -> list[int]:
    """Bytes of every bucket of G's and D's reducers (DDP's own logging data)."""
    out = []
    for ph in strategy.phases:
        sizes = str(ph._ddp._get_ddp_logging_data().get("bucket_sizes", ""))
        out += [int(x) for x in sizes.split(",") if x.strip()]
    return out


def powersgd_shapes(modules, rank: int) -> list[tuple[int, int, int]]:
    """(n, m, r) of every matrix torch's PowerSGD compresses (its rule: n x m = shape[0] x rest, rank
    min(n, m, r), compressed when (n + m) r * 2 < n m, min_compression_rate 2)."""
    out = []
    for mod in modules:
        for p in mod.parameters():
            if p.dim() == 0:
                continue
            n, m = p.shape[0], p.numel() // p.shape[0]
            r = min(n, m, rank)
            if (n + m) * r * 2 < n * m:
                out.append((n, m, r))
    return out


def powersgd_sent_elements(modules, rank: int) -> int:
    comp = powersgd_shapes(modules, rank)
    total = sum(p.numel() for mod in modules for p in mod.parameters())
    return total - sum(n * m for n, m, _ in comp) + sum((n + m) * r for n, m, r in comp)


def powersgd_work_s(shapes, reps: int = 3) -> float:
    """PowerSGD's arithmetic for these shapes, timed alone (median of ``reps``): P = M Q, orthogonalise P,
    Q = M^T P, orthogonalise Q, M = P Q^T, as powerSGD_hook does them."""
    from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import _orthogonalize

    mats = [(torch.randn(1, n, m), torch.randn(1, m, r), torch.empty(1, n, r)) for n, m, r in shapes]
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        for M, q, p in mats:
            _orthogonalize(q)
            torch.bmm(M, q, out=p)
            _orthogonalize(p)
            torch.bmm(M.transpose(1, 2), p, out=q)
            torch.bmm(p, q.transpose(1, 2), out=M)
        ts.append(time.perf_counter() - t)
    return common.percentile(ts, 0.5)


def _timed(fn) -> float:
    dist.barrier()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _replay(calls) -> None:
    for _tag, n, dtype, buf in calls:
        dist.all_reduce(buf)


def _measure_config(a, stage: int, hook: str, env: DistEnv, rank: int) -> dict:
    cfg = bench_cfg(a, stage, hook)
    s, step, batch = make_step(cfg, env, rank)
    world = env.world_size
    for _ in range(max(a.warmup, 3)):  # PowerSGD starts at its step 3 (2 steps of plain all-reduce first)
        step([batch])
    out = {"stage": stage, "hook": hook, "workers": world, "batch_per_worker": cfg.train.batch_size,
           "gf_dim": cfg.model.gf_dim, "df_dim": cfg.model.df_dim,
           "grad_bytes_fp32": sum(p.numel() * 4 for m in (s.G_module, s.D_module) for p in m.parameters())}
    if world == 1:
        out["step_s"] = common.percentile([_timed(lambda: step([batch])) for _ in range(a.steps)], 0.5)
        return out
    with CountCollectives(s) as cc:
        step([batch])
    buckets = ddp_buckets(s)
    grad = [(t, n, dt) for t, n, dt in cc.calls if t == "grad"]
    if hook == "none":  # the C++ reducer: one fp32 all-reduce per bucket, invisible to Python
        grad = [("grad", b // 4, torch.float32) for b in buckets]
    bn = [(t, n, dt) for t, n, dt in cc.calls if t == "bn"]
    calls = [(t, n, dt, torch.zeros(n, dtype=dt)) for t, n, dt in grad]
    nosync = contextlib.ExitStack

    def step_nosync():
        with nosync() as st:
            for ph in s.phases:
                st.enter_context(ph._ddp.no_sync())
            step([batch])

    t_ns, t_sy, t_ar = [], [], []
    for _ in range(a.steps):  # alternating, so all three see the same machine load
        t_ns.append(_timed(step_nosync))
        t_sy.append(_timed(lambda: step([batch])))
        t_ar.append(_timed(lambda: _replay(calls)))
    shapes = powersgd_shapes((s.G_module, s.D_module), a.powersgd_rank) if hook == "powersgd" else []
    import statistics

    se = math.sqrt((statistics.pvariance(t_ns) + statistics.pvariance(t_sy)) / len(t_ns)) if len(t_ns) > 1 else 0.0
    out.update(t_nosync_s=common.percentile(t_ns, 0.5), t_sync_s=common.percentile(t_sy, 0.5), se_diff_s=se,
               t_ar_s=common.percentile(t_ar, 0.5), t_hook_s=powersgd_work_s(shapes) if shapes else 0.0,
               bytes_per_step=sum(n * dt.itemsize for _t, n, dt in grad),
               collectives_per_step=len(grad), buckets=len(buckets),
               collective_bytes=[n * dt.itemsize for _t, n, dt in grad],
               bn_bytes_per_step=sum(n * dt.itemsize for _t, n, dt in bn), bn_collectives_per_step=len(bn))
    if hook == "powersgd":  # the byte rule the projection applies at the paper widths, checked here
        pred = powersgd_sent_elements((s.G_module, s.D_module), a.powersgd_rank) * 4
        out["powersgd_rule_bytes"] = pred
        out["powersgd_rule_matches"] = pred == out["bytes_per_step"]
    work = out["t_ar_s"] + out["t_hook_s"]
    out["overlap_raw"] = (out["t_nosync_s"] + work - out["t_sync_s"]) / work if work > 0 else 0.0
    out["overlap"] = min(1.0, max(0.0, out["overlap_raw"]))
    return out


def _sweep(world: int, sizes: list[int], reps: int) -> list[dict]:
    rows = []
    for nbytes in sizes:
        buf = torch.zeros(max(1, nbytes // 4))
        dist.all_reduce(buf)
        ts = [_timed(lambda: dist.all_reduce(buf)) for _ in range(reps)]
        rows.append({"bytes": nbytes, "t_s": common.percentile(ts, 0.5)})
    return rows


def _worker(rank: int, world: int, port: int, a, q) -> None:
    torch.set_num_threads(max(1, a.threads))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        env = DistEnv(rank=rank, world_size=world, device=torch.device("cpu"))
        res = []
        for stage in a.stages:
            for hook in (a.hooks if world > 1 else ["none"]):
                res.append(_measure_config(a, stage, hook, env, rank))
        sweep = _sweep(world, a.sweep_bytes, a.sweep_reps) if world > 1 else []
        q.put((rank, res, sweep))
    finally:
        dist.destroy_process_group()


def run_workers(a, world: int) -> tuple[list[dict], list[dict]]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, a, q)) for r in range(world)]
    for p in procs:
        p.start()
    got = [q.get(timeout=a.timeout) for _ in range(world)]
    for p in procs:
        p.join(timeout=60)
        if p.exitcode != 0:
            raise RuntimeError(f"scaling worker exited with {p.exitcode}")
    # the slowest rank sets the pace: per configuration, every time is the maximum over ranks
    per_rank = [g[1] for g in sorted(got, key=lambda g: g[0])]
    merged = []
    for rows in zip(*per_rank):
        m = dict(rows[0])
        for k in ("step_s", "t_nosync_s", "t_sync_s", "t_ar_s", "t_hook_s", "se_diff_s"):
            if k in m:
                m[k] = max(r[k] for r in rows)
        if "t_ar_s" in m:
            work = m["t_ar_s"] + m["t_hook_s"]
            m["overlap_raw"] = (m["t_nosync_s"] + work - m["t_sync_s"]) / work if work > 0 else 0.0
            m["overlap"] = min(1.0, max(0.0, m["overlap_raw"]))
            # the difference t_sync - t_nosync is known to +-2 standard errors: an overlap is resolved only
            # when the communication it divides is larger than that; else the projection assumes none
            m["overlap_resolved"] = work > 2 * m["se_diff_s"]
            m["overlap_for_projection"] = m["overlap"] if m["overlap_resolved"] else 0.0
        merged.append(m)
    sweep = [{"bytes": rs[0]["bytes"], "t_s": max(r["t_s"] for r in rs)} for rs in zip(*[g[2] for g in got])]
    return merged, sweep


def fit_alpha_beta(sweep: list[dict], world: int) -> dict:
    """Least squares t = alpha + bytes * beta; bus bandwidth = 2 (N-1)/N / beta."""
    xs, ys = [r["bytes"] for r in sweep], [r["t_s"] for r in sweep]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    beta = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    alpha = max(0.0, my - beta * mx)
    return {"alpha_s": alpha, "busbw_Bps": 2 * (world - 1) / world / beta if beta > 0 else float("inf"),
            "beta_s_per_byte": beta}


def t_allreduce_cpu(nbytes: int, fit: dict) -> float:
    return fit["alpha_s"] + nbytes * fit["beta_s_per_byte"]


def validate(one: dict, two: list[dict], fit: dict, tol: float) -> list[dict]:
    """The model's 2-process step against the measured one. Inputs kept apart from the measured t_sync:
    compute = the 2-process step without gradient sync (what FLOPs / MFU stand for on a GPU), collectives =
    the alpha-beta fit of the sweep applied to the counted messages, hook work = timed alone, overlap = the
    same hook's overlap measured at the *other* stage (leave-one-out; a stage measured alone uses its own,
    and says so). Also reported: t_1proc / t_nosync(2), whether a worker's compute stays the same when a
    second worker runs (the weak-scaling premise; on 2 shared cores it does not)."""
    rows = []
    for m in two:
        other = [x for x in two if x["hook"] == m["hook"] and x["stage"] != m["stage"]]
        f, f_src = (other[0]["overlap"], f"stage {other[0]['stage']}") if other else (m["overlap"], "own (circular)")
        t_ar_model = sum(t_allreduce_cpu(b, fit) for b in m["collective_bytes"])
        pred = m["t_nosync_s"] + (1 - f) * (t_ar_model + m["t_hook_s"])
        err = pred / m["t_sync_s"] - 1
        t1 = one[m["stage"]]["step_s"]
        rows.append({"stage": m["stage"], "hook": m["hook"], "t_1proc_s": t1, "t_nosync_2proc_s": m["t_nosync_s"],
                     "compute_ratio_2proc_over_1proc": m["t_nosync_s"] / t1, "overlap_used": f,
                     "overlap_from": f_src, "t_ar_model_s": t_ar_model, "t_ar_measured_s": m["t_ar_s"],
                     "t_hook_s": m["t_hook_s"], "predicted_step_s": pred, "measured_step_s": m["t_sync_s"],
                     "rel_error": err, "within_tolerance": abs(err) <= tol,
                     "efficiency_measured": t1 / m["t_sync_s"], "efficiency_predicted": t1 / pred})
    return rows


# -- the model at the paper widths ---------------------------------------------------------------------

def paper_modules(stage: int):
    cfg = Config()
    cfg.model.stage, cfg.model.text_dim = stage, PAPER["text_dim"]  # char-CNN-RNN embeddings (no dataset here)
    with torch.device("meta"):  # shapes only: no memory, no init cost
        m = build_models(cfg.model)
    return m.G, m.D


def paper_grad_bytes(stage: int) -> int:
    return sum(p.numel() * 4 for mod in paper_modules(stage) for p in mod.parameters())


def paper_flops_per_img(stage: int) -> float:
    """throughput.py's FLOP count (torch.utils.flop_counter) of one training step at the paper widths, per
    image (batch 2, fp32 on CPU: the count does not depend on the precision)."""
    import throughput

    a = SimpleNamespace(stage=stage, batch_size=2, precision="fp32", backend="ddp", compile=False,
                        channels_last=False, device="cpu", baseline=False, **PAPER)
    _cfg, ours, _base, batch, _dev = throughput.build(a)
    return throughput.step_flops(ours, batch) / 2


def buckets_of(module, cap_mb: float, elem_bytes: int = 4) -> list[list]:
    """DDP's bucketing of a module's parameters (reverse registration order; the default 25 MB cap starts
    with a 1 MiB bucket, an explicit cap does not)."""
    ps = [p for p in module.parameters()][::-1]
    caps = [2**20, 25 * 2**20] if cap_mb == 0 else [int(cap_mb * 2**20)]
    out, cur, size = [], [], 0
    for p in ps:
        cap = caps[min(len(out), len(caps) - 1)]
        b = p.numel() * elem_bytes
        if cur and size + b > cap:
            out.append(cur)
            cur, size = [], 0
        cur.append(p)
        size += b
    if cur:
        out.append(cur)
    return out


def collectives_for(modules, hook: str, cap_mb: float, rank: int) -> list[list[int]]:
    """Per module, per bucket: the bytes of each collective the hook issues (in order)."""
    per_module = []
    for mod in modules:
        rows = []
        for bucket in buckets_of(mod, cap_mb):
            n = sum(p.numel() for p in bucket)
            if hook == "none":
                rows.append([n * 4])
            elif hook in ("fp16", "bf16"):
                rows.append([n * 2])
            else:
                unc, P, Q = 0, 0, 0
                for p in bucket:
                    a, b = (p.shape[0], p.numel() // p.shape[0]) if p.dim() else (1, 1)
                    r = min(a, b, rank)
                    if (a + b) * r * 2 < a * b:
                        P, Q = P + a * r, Q + b * r
                    else:
                        unc += p.numel()
                rows.append([unc * 4, P * 4, Q * 4])
        per_module.append(rows)
    return per_module


def t_allreduce(nbytes: int, n: int, algo: str, inter_GBps: float) -> float:
    A = MODEL_ASSUMPTIONS
    g = A["gpus_per_node"]
    intra, inter = A["intra_node_busbw_GBps"] * 1e9, inter_GBps * 1e9
    li, lx = A["latency_us_intra"] * 1e-6, A["latency_us_inter"] * 1e-6
    if n <= 1:
        return 0.0
    if n <= g:  # one node: NVLink ring
        return 2 * (n - 1) / n * nbytes / intra + 2 * (n - 1) * li
    nodes = math.ceil(n / g)
    if algo == "ring":
        return 2 * (n - 1) / n * nbytes / inter + 2 * (n - 1) * lx
    return (2 * (g - 1) / g * nbytes / intra + 2 * (nodes - 1) / nodes * nbytes / inter
            + 2 * ((g - 1) * li + math.ceil(math.log2(nodes)) * lx))


def hook_work_gpu(modules, hook: str, cap_mb: float, rank: int, stage: int = 0, measured: dict | None = None) -> float:
    """PowerSGD's own work per step on the GPU: measured (``measured``: (stage, rank, bucket_cap_mb) -> s, from
    hook_work.py's JSON) or, without a measurement, MODEL_ASSUMPTIONS' estimate."""
    if hook != "powersgd":
        return 0.0
    if measured is not None:
        key = (stage, rank, float(cap_mb))
        if key not in measured:
            raise KeyError(f"PowerSGD hook work not measured for stage {stage}, rank {rank}, bucket_cap_mb {cap_mb:g}")
        return measured[key]
    shapes = powersgd_shapes(modules, rank)
    nb = sum(len(buckets_of(m, cap_mb)) for m in modules)
    flops = sum(6 * n * m * r for n, m, r in shapes)
    return flops / (0.30 * 67e12) + 30e-6 * len(shapes) + 20e-6 * nb


def predict(stage: int, n: int, opt: dict, overlap: float, flops_img: float, inter_GBps: float,
            modules=None, hook_work: dict | None = None) -> dict:
    """Step time and efficiency at ``n`` GPUs with options ``opt`` (hook, bucket_cap_mb, algo, rank)."""
    A = MODEL_ASSUMPTIONS
    modules = modules or paper_modules(stage)
    t_comp = A["per_gpu_batch"] * flops_img / (A["mfu"][str(stage)] * A["peak_flops"])
    colls = collectives_for(modules, opt["hook"], opt["bucket_cap_mb"], opt.get("rank", 1))
    per_bucket = [[sum(t_allreduce(b, n, opt["algo"], inter_GBps) for b in bucket) for bucket in mod]
                  for mod in colls]
    t_comm = sum(sum(m) for m in per_bucket)
    t_tail = sum(m[-1] for m in per_bucket if m)  # each module's last bucket: after its backward
    t_hook = (hook_work_gpu(modules, opt["hook"], opt["bucket_cap_mb"], opt.get("rank", 1), stage, hook_work)
              if n > 1 else 0.0)
    bn_bytes = sum(b.numel() * 4 for mod in modules for b in mod.buffers() if b.is_floating_point())
    t_bn = t_allreduce(bn_bytes, n, opt["algo"], inter_GBps)
    work = t_comm + t_hook
    hidden = min(overlap * work, (2 / 3) * t_comp, max(0.0, work - t_tail))
    exposed = work - hidden + t_bn
    sent = sum(sum(b) for mod in colls for b in mod)
    return {"stage": stage, "gpus": n, "inter_node_GBps": inter_GBps, **opt, "compute_ms": 1e3 * t_comp,
            "comm_ms": 1e3 * t_comm, "hook_ms": 1e3 * t_hook, "bn_sync_ms": 1e3 * t_bn, "exposed_ms": 1e3 * exposed,
            "overlap": overlap, "bytes_per_step": sent, "collectives_per_step": sum(len(b) for m in colls for b in m),
            "efficiency": t_comp / (t_comp + exposed)}


def projection(stage: int, grad_bytes: int, inter_node_GBps: list[float], sizes: list[int],
               opt: dict | None = None, overlap: float = 0.0, flops_img: float | None = None,
               hook_work: dict | None = None) -> list[dict]:
    """Efficiency rows over ``sizes`` GPUs (default options: today's: no hook, DDP's default buckets, ring).
    ``grad_bytes`` scales the paper model's gradients (the suite's call passes the paper's own)."""
    opt = opt or {"hook": "none", "bucket_cap_mb": 0.0, "algo": "ring", "rank": 1}
    flops_img = flops_img or {1: 10.0e9, 2: 122.4e9}[stage]
    modules = paper_modules(stage)
    scale = grad_bytes / paper_grad_bytes(stage)
    rows = []
    for bw in inter_node_GBps:
        for n in sizes:
            r = predict(stage, n, opt, overlap, flops_img, bw, modules, hook_work)
            if scale != 1.0:  # a hypothetical model of another size: communication scaled with it
                t_comp = r["compute_ms"]
                exposed = r["exposed_ms"] * scale
                r.update(exposed_ms=exposed, efficiency=t_comp / (t_comp + exposed))
            rows.append(r)
    return rows


def choose(stage: int, overlaps: dict, flops_img: float, ranks=(1, 2, 4, 8), caps=(0.0, 5.0, 25.0, 100.0, 400.0),
           algos=("ring", "hierarchical"), hook_work: dict | None = None) -> dict:
    """The least lossy option that reaches the target (no compression before bf16 before fp16 before PowerSGD,
    and PowerSGD's highest rank); when none does, the most efficient. -> the chosen row and every row."""
    modules = paper_modules(stage)
    cands = [("none", 1), ("bf16", 1), ("fp16", 1)] + [("powersgd", r) for r in sorted(ranks, reverse=True)]
    rows = []
    for order, (hook, rank) in enumerate(cands):
        for algo in algos:
            for cap in caps:
                opt = {"hook": hook, "bucket_cap_mb": cap, "algo": algo, "rank": rank}
                r = predict(stage, TARGET["gpus"], opt, overlaps.get(hook, 0.0), flops_img, TARGET["inter_node_GBps"],
                            modules, hook_work)
                r["order"] = order
                rows.append(r)
    ok = [r for r in rows if r["efficiency"] >= TARGET["efficiency"]]
    best = (min(ok, key=lambda r: (r["order"], -r["efficiency"])) if ok
            else max(rows, key=lambda r: r["efficiency"]))
    return {"chosen": best, "meets_target": bool(ok), "candidates": rows}


# -- output --------------------------------------------------------------------------------------------

def plot(measured: list[dict], validation: list[dict], proj: list[dict], path: str, hook_note: str = "estimated") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    A = MODEL_ASSUMPTIONS
    fig, ax = plt.subplots(figsize=(10, 5.5))
    colors = {1: "tab:blue", 2: "tab:red"}
    for st in sorted({v["stage"] for v in validation}):
        vs = [v for v in validation if v["stage"] == st]
        for i, v in enumerate(vs):
            x = 2 * (1 + 0.04 * (i - len(vs) / 2))  # spread the hooks around x = 2
            ax.plot([1, x], [1.0, v["efficiency_measured"]], "-", color=colors[st], alpha=0.3)
            ax.plot(x, v["efficiency_measured"], "o", color=colors[st],
                    label=f"stage {st}, measured CPU gloo ({', '.join(w['hook'] for w in vs)})" if i == 0 else None)
            ax.plot(x, v["efficiency_predicted"], "x", color=colors[st],
                    label=f"stage {st}, model at 2 CPU processes" if i == 0 else None)
    styles = {"today": "--", "chosen": "-"}
    proj = [r for r in proj if r["inter_node_GBps"] == TARGET["inter_node_GBps"]]  # the JSON holds the others
    for (st, kind), rows in _group(proj).items():
        rows = sorted(rows, key=lambda r: r["gpus"])
        o = rows[0]
        desc = (f"{o['hook']}{' r=' + str(o['rank']) if o['hook'] == 'powersgd' else ''}, "
                f"bucket {o['bucket_cap_mb']:g} MB{' (default)' if o['bucket_cap_mb'] == 0 else ''}, {o['algo']}, "
                f"overlap {o['overlap']:.2f}")
        ax.plot([r["gpus"] for r in rows], [r["efficiency"] for r in rows], styles[kind], color=colors[st],
                marker=".", label=f"stage {st} MODEL, {kind}: {desc}")
    ax.axhline(TARGET["efficiency"], color="gray", lw=0.8, ls=":")
    ax.axvline(TARGET["gpus"], color="gray", lw=0.8, ls=":")
    ax.set(xscale="log", xlabel="workers (CPU processes measured; GPUs projected)", ylabel="weak-scaling efficiency",
           ylim=(0, 1.08), title="Weak scaling: measured (CPU, gloo) and projected (MODEL, H100)")
    ax.plot([], [], " ", label=(f"MODEL: paper widths, batch {A['per_gpu_batch']}/GPU, bf16 at MFU "
                                f"{A['mfu']['1']:.0%} (I) / {A['mfu']['2']:.0%} (II) of 989 TFLOP/s;\n"
                                f"{A['gpus_per_node']} GPUs/node, NVLink {A['intra_node_busbw_GBps']:g} GB/s, "
                                f"{TARGET['inter_node_GBps']:g} GB/s between nodes; latency "
                                f"{A['latency_us_intra']:g}/{A['latency_us_inter']:g} us per hop;\noverlap measured "
                                f"on CPU where resolved, else 0; PowerSGD hook work {hook_note}"))
    ax.legend(fontsize=6.5, loc="lower left", framealpha=0.9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown(out: dict) -> str:
    """The results section for benchmarks/results/latest.md."""
    v, pr, c = out["validation"], out["projection"], out["comm"]
    ms = out["measured_setup"]
    L = [f"## Gradient communication and scaling (gloo, 2 processes x 1 thread; commit {out['commit']}, {out['date']})",
         "", f"Stage I gf {ms['gf_dim']}/df {ms['df_dim']}, {ms['batch_per_worker']} img/worker; Stage II gf "
         f"{ms['stage2']['gf_dim']}/df {ms['stage2']['df_dim']}, {ms['stage2']['batch_per_worker']} img/worker; "
         f"median of {ms['steps']} alternating steps. Limits: {ms['limits']}.", "",
         "| stage | hook | step no sync ms | step with sync ms | all-reduce alone ms | hook work ms | sent MiB/step "
         "| collectives | buckets | overlap (raw) | +-2 s.e. ms | used in the projection |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in c["two_processes"]:
        L.append(f"| {m['stage']} | {m['hook']} | {1e3 * m['t_nosync_s']:.0f} | {1e3 * m['t_sync_s']:.0f} | "
                 f"{1e3 * m['t_ar_s']:.1f} | {1e3 * m['t_hook_s']:.1f} | {m['bytes_per_step'] / 2**20:.3f} | "
                 f"{m['collectives_per_step']} | {m['buckets']} | {m['overlap']:.2f} ({m['overlap_raw']:+.2f}) | "
                 f"{2e3 * m['se_diff_s']:.0f} | {m['overlap_for_projection']:.2f}"
                 f"{'' if m['overlap_resolved'] else ' (unresolved)'} |")
    f = c["allreduce_fit"]
    L += ["", f"gloo all-reduce at 2 ranks (sweep {len(c['allreduce_sweep'])} sizes): latency "
              f"{1e6 * f['alpha_s']:.0f} us, bus bandwidth {f['busbw_Bps'] / 1e9:.2f} GB/s.", "",
          f"Model check at 2 CPU processes ({v['formula']}; tolerance {100 * v['tolerance']:.0f} %): "
          f"**{'validated' if v['validated'] else 'NOT validated'}**", "",
          "| stage | hook | predicted ms | measured ms | error | overlap used (from) | compute 2 proc / 1 proc |",
          "|---|---|---|---|---|---|---|"]
    for r in v["rows"]:
        L.append(f"| {r['stage']} | {r['hook']} | {1e3 * r['predicted_step_s']:.0f} | {1e3 * r['measured_step_s']:.0f}"
                 f" | {100 * r['rel_error']:+.0f} % {'' if r['within_tolerance'] else '(missed)'} | "
                 f"{r['overlap_used']:.2f} ({r['overlap_from']}) | {r['compute_ratio_2proc_over_1proc']:.2f}x |")
    A = pr["assumptions"]
    L += ["", f"Projection (a MODEL, not a measurement): paper widths, per-GPU batch {A['per_gpu_batch']}, bf16 at MFU "
              f"{A['mfu']['1']:.0%} (Stage I) / {A['mfu']['2']:.0%} (Stage II) of 989 TFLOP/s, FLOPs/img counted "
              f"here ({pr['flops_per_img_paper']['1'] / 1e9:.1f} / {pr['flops_per_img_paper']['2'] / 1e9:.1f} GFLOP), "
              f"{A['gpus_per_node']} GPUs/node, NVLink {A['intra_node_busbw_GBps']:g} GB/s, latency "
              f"{A['latency_us_intra']:g}/{A['latency_us_inter']:g} us per hop in/between nodes, overlap as measured "
              "above per hook; full list in the JSON.", "",
          "| stage | options | inter-node GB/s | " + " | ".join(f"{n}" for n in sorted({r['gpus'] for r in pr['rows']}))
          + " GPUs |", "|---|---|---|" + "---|" * len({r['gpus'] for r in pr['rows']})]
    groups = {}
    for r in pr["rows"] + pr.get("rows_today", []):
        groups.setdefault((r["stage"], r["kind"], r["inter_node_GBps"]), []).append(r)
    for (st, kind, bw), rows in sorted(groups.items()):
        o = rows[0]
        desc = (f"{kind}: {o['hook']}{' r=' + str(o['rank']) if o['hook'] == 'powersgd' else ''}, bucket "
                f"{'default' if o['bucket_cap_mb'] == 0 else str(o['bucket_cap_mb']) + ' MB'}, {o['algo']}")
        L.append(f"| {st} | {desc} | {bw:g} | " + " | ".join(f"{r['efficiency']:.2f}" for r in
                                                            sorted(rows, key=lambda r: r["gpus"])) + " |")
    L.append("")
    for st, ch in pr["chosen"].items():
        L.append(f"- Stage {st} at {pr['target']['gpus']} GPUs, {pr['target']['inter_node_GBps']:g} GB/s: "
                 f"{ch['hook']}{' rank ' + str(ch['rank']) if ch['hook'] == 'powersgd' else ''}, bucket_cap_mb "
                 f"{ch['bucket_cap_mb']:g}, {ch['algo']}: efficiency {ch['efficiency']:.2f} "
                 f"({'meets' if ch['meets_target'] else 'MISSES'} {pr['target']['efficiency']}); compute "
                 f"{ch['compute_ms']:.2f} ms, exposed communication {ch['exposed_ms']:.2f} ms "
                 f"(of which hook work {ch['hook_ms']:.2f} ms, BN sync {ch['bn_sync_ms']:.2f} ms).")
    return "\n".join(L) + "\n"


def _group(proj):
    out = {}
    for r in proj:
        out.setdefault((r["stage"], r["kind"]), []).append(r)
    return out


SIZES = [8, 16, 32, 64, 128, 256, 512]


def project(ov: dict, flops: dict, inter_node_GBps: list[float], hook_work: dict | None = None) -> tuple[dict, list]:
    """Per stage: the option ``choose`` picks and the rows over SIZES of it ("chosen") and of no option ("today")."""
    chosen, proj = {}, []
    for st in (1, 2):
        c = choose(st, ov[st], flops[st], hook_work=hook_work)
        chosen[st] = c
        today = {"hook": "none", "bucket_cap_mb": 0.0, "algo": "ring", "rank": 1}
        pick = {k: c["chosen"][k] for k in ("hook", "bucket_cap_mb", "algo", "rank")}
        for kind, opt in (("today", today), ("chosen", pick)):
            for r in projection(st, paper_grad_bytes(st), inter_node_GBps, SIZES, opt,
                                ov[st].get(opt["hook"], 0.0), flops[st], hook_work):
                r["kind"] = kind
                proj.append(r)
    return chosen, proj


def projection_fields(chosen: dict, proj: list) -> dict:
    """``project``'s result as the results JSON keeps it under "projection"."""
    return {"chosen": {str(st): {"meets_target": c["meets_target"], **c["chosen"]} for st, c in chosen.items()},
            "candidates": {str(st): c["candidates"] for st, c in chosen.items()},
            # rows: the chosen options (what run_suite.py tabulates); rows_today: no options
            "rows": [r for r in proj if r["kind"] == "chosen"], "rows_today": [r for r in proj if r["kind"] == "today"]}


def load_hook_work(path: str) -> tuple[dict, str]:
    """hook_work.py's JSON -> ({(stage, rank, bucket_cap_mb): seconds}, a line saying where it was measured)."""
    import json

    with open(path) as f:
        data = json.load(f)
    table = {(int(r["stage"]), int(r["rank"]), float(r["bucket_cap_mb"])): float(r["t_hook_ms"]) / 1e3
             for r in data["rows"]}
    return table, (f"measured on {data['device']} ({data['date']}, commit {data['commit']}) by benchmarks/hook_work.py "
                   f"({os.path.basename(path)}): {data['method']}")


def reproject(data: dict, hook_work: dict, note: str, inter_node_GBps: list[float]) -> dict:
    """A scaling results JSON with its projection recomputed from its own measured inputs (overlap, FLOPs) and
    PowerSGD's hook work measured on a GPU instead of estimated."""
    pr = data["projection"]
    ov = {int(k): v for k, v in pr["overlap_used"].items()}
    flops = {int(k): float(v) for k, v in pr["flops_per_img_paper"].items()}
    chosen, proj = project(ov, flops, inter_node_GBps, hook_work)
    pr.update(assumptions={**pr["assumptions"], "powersgd_hook_work": note}, hook_work_measured=True,
              **projection_fields(chosen, proj))
    return data


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--max-procs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4, help="Stage-I images per worker")
    p.add_argument("--gf-dim", type=int, default=32)
    p.add_argument("--df-dim", type=int, default=16)
    p.add_argument("--stage2-batch-size", type=int, default=1)
    p.add_argument("--stage2-gf-dim", type=int, default=16)
    p.add_argument("--stage2-df-dim", type=int, default=8)
    p.add_argument("--stages", type=int, nargs="+", default=[1, 2])
    p.add_argument("--hooks", nargs="+", default=list(HOOKS), choices=HOOKS)
    p.add_argument("--powersgd-rank", type=int, default=2, help="the rank measured on CPU")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--sweep-bytes", type=int, nargs="+", default=[2**12, 2**16, 2**19, 2**21, 2**23])
    p.add_argument("--sweep-reps", type=int, default=7)
    p.add_argument("--tolerance", type=float, default=0.25, help="model vs measured 2-process step time")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--inter-node-GBps", type=float, nargs="+", default=[25.0, 50.0, 100.0],
                   help="all-reduce bus bandwidth between nodes (200/400/800 Gb/s InfiniBand)")
    p.add_argument("--paper-flops", choices=["count", "suite"], default="count",
                   help="count FLOPs at the paper widths here (throughput.py's counter) or use the suite's figures")
    p.add_argument("--json", default="")
    p.add_argument("--plot", default="")
    p.add_argument("--md", default="", help="write the markdown section here")
    p.add_argument("--from-json", default="", help="no measurement: the markdown section of a results JSON")
    p.add_argument("--hook-work-json", default="",
                   help="with --from-json: recompute its projection with PowerSGD's work measured by hook_work.py")
    a = p.parse_args(argv)
    if a.hook_work_json and not a.from_json:
        p.error("--hook-work-json recomputes the projection of --from-json's results; give both")
    if a.from_json:
        import json

        with open(a.from_json) as f:
            data = json.load(f)
        if a.hook_work_json:
            table, note = load_hook_work(a.hook_work_json)
            data = reproject(data, table, note, a.inter_node_GBps)
            common.write_json(data, a.json)
        text = markdown(data)
        if a.plot:
            plot(data["measured"], data["validation"]["rows"],
                 data["projection"]["rows"] + data["projection"].get("rows_today", []), a.plot,
                 hook_note="measured on a GPU" if data["projection"].get("hook_work_measured") else "estimated")
        if a.md:
            with open(a.md, "w") as f:
                f.write(text)
        print(text)
        return {}
    one_rows, _ = run_workers(a, 1)
    one = {m["stage"]: m for m in one_rows}
    two_rows, sweep = run_workers(a, 2) if a.max_procs >= 2 else ([], [])
    fit = fit_alpha_beta(sweep, 2) if sweep else None
    val = validate(one, two_rows, fit, a.tolerance) if fit else []
    validated = bool(val) and all(v["within_tolerance"] for v in val)
    flops = {st: (paper_flops_per_img(st) if a.paper_flops == "count" else {1: 10.0e9, 2: 122.4e9}[st])
             for st in (1, 2)}
    # overlap per stage and hook, measured; a stage not measured borrows the other's
    ov = {st: {m["hook"]: m["overlap_for_projection"] for m in two_rows if m["stage"] == st} for st in (1, 2)}
    for st in (1, 2):
        ov[st] = ov[st] or ov[3 - st]
    chosen, proj = project(ov, flops, a.inter_node_GBps)
    # weak-scaling points of the default option (no hook), kept in the suite's shape
    measured = [{"workers": 1, "step_ms_p50": 1e3 * one[1]["step_s"],
                 "img_per_s_per_worker": one[1]["batch_per_worker"] / one[1]["step_s"],
                 "img_per_s_total": one[1]["batch_per_worker"] / one[1]["step_s"],
                 "grad_bytes": one[1]["grad_bytes_fp32"], "allreduce_busbw_GBps": None, "efficiency": 1.0}]
    for m in two_rows:
        if m["stage"] == 1 and m["hook"] == "none":
            measured.append({"workers": 2, "step_ms_p50": 1e3 * m["t_sync_s"],
                             "img_per_s_per_worker": m["batch_per_worker"] / m["t_sync_s"],
                             "img_per_s_total": 2 * m["batch_per_worker"] / m["t_sync_s"],
                             "grad_bytes": m["grad_bytes_fp32"], "allreduce_busbw_GBps": fit["busbw_Bps"] / 1e9,
                             "efficiency": one[1]["step_s"] / m["t_sync_s"]})
    out = {**common.header("cpu"), "measured": measured,
           "measured_setup": {"stage": 1, "batch_per_worker": a.batch_size, "gf_dim": a.gf_dim, "df_dim": a.df_dim,
                              "stage2": {"batch_per_worker": a.stage2_batch_size, "gf_dim": a.stage2_gf_dim,
                                         "df_dim": a.stage2_df_dim},
                              "threads_per_worker": a.threads, "backend": "gloo", "steps": a.steps,
                              "powersgd_rank": a.powersgd_rank,
                              "limits": "2 processes on 2 shared cores: gloo's reduction competes with the backward "
                                        "for the same cores, so the overlap is a lower bound; 2 ranks cannot show "
                                        "latency growth with N"},
           "comm": {"one_process": one_rows, "two_processes": two_rows, "allreduce_sweep": sweep,
                    "allreduce_fit": fit},
           "validation": {"tolerance": a.tolerance, "validated": validated, "rows": val,
                          "formula": "t_sync(2) = t_nosync(2) + (1 - overlap of the other stage) "
                                     "(t_ar,model + t_hook)"},
           "projection": {"label": "MODEL, not a measurement", "assumptions": MODEL_ASSUMPTIONS, "target": TARGET,
                          "flops_per_img_paper": {str(k): v for k, v in flops.items()},
                          "flops_source": a.paper_flops, "overlap_used": {str(k): v for k, v in ov.items()},
                          "grad_bytes_paper": {"1": paper_grad_bytes(1), "2": paper_grad_bytes(2)},
                          **projection_fields(chosen, proj)}}
    common.write_json(out, a.json)
    if a.md:
        with open(a.md, "w") as f:
            f.write(markdown(out))
    if a.plot:
        plot(measured, val, proj, a.plot)
    for m in two_rows:
        print(f"stage {m['stage']} {m['hook']:>8}: step no-sync {1e3 * m['t_nosync_s']:.0f} ms, sync "
              f"{1e3 * m['t_sync_s']:.0f} ms, all-reduce alone {1e3 * m['t_ar_s']:.1f} ms "
              f"({m['bytes_per_step'] / 2**20:.2f} MiB in {m['collectives_per_step']} collectives), hook work "
              f"{1e3 * m['t_hook_s']:.1f} ms, overlap {m['overlap']:.2f} (raw {m['overlap_raw']:.2f}, "
              f"{'resolved' if m['overlap_resolved'] else 'UNRESOLVED: +-%.0f ms' % (2e3 * m['se_diff_s'])})", flush=True)
    if fit:
        print(f"gloo all-reduce at 2 ranks: latency {1e6 * fit['alpha_s']:.0f} us, bus bandwidth "
              f"{fit['busbw_Bps'] / 1e9:.2f} GB/s")
    for v in val:
        print(f"validation stage {v['stage']} {v['hook']:>8}: predicted {1e3 * v['predicted_step_s']:.0f} ms, "
              f"measured {1e3 * v['measured_step_s']:.0f} ms ({100 * v['rel_error']:+.0f} %, tolerance "
              f"{100 * a.tolerance:.0f} %: {'ok' if v['within_tolerance'] else 'MISSED'}); compute at 2 processes "
              f"{v['compute_ratio_2proc_over_1proc']:.2f}x the 1-process step")
    print(f"model {'validated' if validated else 'NOT validated'} at 2 CPU processes")
    for st, c in chosen.items():
        r = c["chosen"]
        print(f"stage {st} chosen (MODEL, {TARGET['gpus']} GPUs, {TARGET['inter_node_GBps']:g} GB/s): {r['hook']}"
              f"{' rank ' + str(r['rank']) if r['hook'] == 'powersgd' else ''}, bucket_cap_mb {r['bucket_cap_mb']:g}, "
              f"{r['algo']}: efficiency {r['efficiency']:.2f} ({'meets' if c['meets_target'] else 'MISSES'} "
              f"{TARGET['efficiency']}); compute {r['compute_ms']:.2f} ms, exposed comm {r['exposed_ms']:.2f} ms")
    return out


if __name__ == "__main__":
    main()

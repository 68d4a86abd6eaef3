"""The measurement half of the scaling benchmark: 1 or 2 gloo processes on CPU, each timing a training step
with and without gradient sync, the collectives that step issued (counted, then replayed alone), PowerSGD's own
arithmetic, and an all-reduce sweep over message sizes. The slowest rank sets every time."""
from __future__ import annotations

import contextlib
import math
import os
import socket
import time

import common
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from scaling_model import Net, powersgd_sent_elements, powersgd_shapes
from stackgan_dist.config import Config, ModelConfig
from stackgan_dist.distributed import make_strategy
from stackgan_dist.distributed.env import DistEnv
from stackgan_dist.models.build import build_models, build_stage1_generator
from stackgan_dist.train_step import GANStep


def _nets(modules) -> list[Net]:
    return [Net(params=tuple(tuple(p.shape) for p in m.parameters())) for m in modules]


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
           "grad_bytes_fp32": sum(p.numel() * 4 for m in (s.g.net, s.d.net) for p in m.parameters())}
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
    shapes = powersgd_shapes(_nets((s.g.net, s.d.net)), a.powersgd_rank) if hook == "powersgd" else []
    import statistics

    se = math.sqrt((statistics.pvariance(t_ns) + statistics.pvariance(t_sy)) / len(t_ns)) if len(t_ns) > 1 else 0.0
    out.update(t_nosync_s=common.percentile(t_ns, 0.5), t_sync_s=common.percentile(t_sy, 0.5), se_diff_s=se,
               t_ar_s=common.percentile(t_ar, 0.5), t_hook_s=powersgd_work_s(shapes) if shapes else 0.0,
               bytes_per_step=sum(n * dt.itemsize for _t, n, dt in grad),
               collectives_per_step=len(grad), buckets=len(buckets),
               collective_bytes=[n * dt.itemsize for _t, n, dt in grad],
               bn_bytes_per_step=sum(n * dt.itemsize for _t, n, dt in bn), bn_collectives_per_step=len(bn))
    if hook == "powersgd":  # the byte rule the projection applies at the paper widths, checked here
        pred = powersgd_sent_elements(_nets((s.g.net, s.d.net)), a.powersgd_rank) * 4
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
    # The results are on their way to the parent: leave without the interpreter's teardown. Under load, a
    # suite run saw both workers abort there ("terminate called without an active exception", SIGABRT)
    # after their results had arrived, as C++ objects of the destroyed group were finalised.
    q.close()
    q.join_thread()
    os._exit(0)


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

"""The scaling model: step time and efficiency of data-parallel StackGAN on N GPUs, from each network's
parameter shapes, its FLOPs per image and stated hardware assumptions (``MODEL_ASSUMPTIONS``). Pure arithmetic:
no torch, no stackgan_dist, no measurement; ``tests/test_scaling_model.py`` checks it against hand-computed
values. Its inputs come from elsewhere: shapes and FLOPs from ``scaling_paper.py`` (the paper-width networks),
overlap from ``scaling_harness.py`` (gloo on CPU), PowerSGD's work from ``hook_work.py`` where a GPU measured it.

Two shapes of run:
- weak scaling (``predict``, ``projection``, ``choose``): per-GPU batch 64 fixed, global batch 64 N. This is
  the large-corpus case (COCO-sized and up), run with an lr rule (``train.lr_scaling``) and warmup;
- strong scaling (``strong_scaling``): the paper's global batch 64 split over N GPUs (64/N each), as CUB and
  Oxford-102 are trained. Per-GPU compute shrinks with N, the all-reduce of the full gradient does not, and
  BatchNorm needs a per-GPU batch of its own.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

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
    # strong scaling only (the weak model's per-GPU batch is always 64, where the MFU targets are stated)
    "hbm_GBps": 3350.0,  # H100 SXM HBM3: fused Adam is memory-bound
    "adam_bytes_per_param": 28,  # fused Adam reads weight, grad, m, v (16 B) and writes weight, m, v (12 B)
    # kernel launches and host work per step that no batch size removes (~250 kernels x 4 us): an estimate
    "launch_floor_ms": 1.0,
    # per-rank BatchNorm statistics from fewer images degrade training (Wu & He 2018, Group Normalization, Fig. 1)
    "bn_min_per_gpu_batch": 8,
    "sync_bn_passes": "with model.sync_bn one blocking all-reduce per BatchNorm layer and pass: G's layers forward and "
                      "backward once, D's three times (real + wrong, fake, G's loss)",
}
TARGET = {"gpus": 64, "inter_node_GBps": 25.0, "efficiency": 0.8}
SIZES = [8, 16, 32, 64, 128, 256, 512]  # weak scaling (large corpus)
STRONG_SIZES = [1, 2, 4, 8, 16]  # strong scaling at the paper's global batch
PAPER_GLOBAL_BATCH = 64
DATASETS = {"CUB-200-2011 (birds)": 8855, "Oxford-102 (flowers)": 7034}  # training images
TODAY = {"hook": "none", "bucket_cap_mb": 0.0, "algo": "ring", "rank": 1}


@dataclass(frozen=True)
class Net:
    """One network as the model sees it: parameter shapes in registration order (DDP buckets them in reverse),
    floating buffer elements (the per-step BatchNorm buffer average) and BatchNorm layers with their channels."""

    params: tuple
    buffer_elems: int = 0
    bn_channels: tuple = ()


def numel(shape) -> int:
    return math.prod(shape)


def grad_bytes(nets) -> int:
    return sum(numel(s) * 4 for net in nets for s in net.params)


def powersgd_shapes(nets, rank: int) -> list[tuple[int, int, int]]:
    """(n, m, r) of every matrix torch's PowerSGD compresses (its rule: n x m = shape[0] x rest, rank
    min(n, m, r), compressed when (n + m) r * 2 < n m, min_compression_rate 2)."""
    out = []
    for net in nets:
        for s in net.params:
            if len(s) == 0:
                continue
            n, m = s[0], numel(s) // s[0]
            r = min(n, m, rank)
            if (n + m) * r * 2 < n * m:
                out.append((n, m, r))
    return out


def powersgd_sent_elements(nets, rank: int) -> int:
    comp = powersgd_shapes(nets, rank)
    total = sum(numel(s) for net in nets for s in net.params)
    return total - sum(n * m for n, m, _ in comp) + sum((n + m) * r for n, m, r in comp)


def buckets_of(net: Net, cap_mb: float, elem_bytes: int = 4) -> list[list]:
    """DDP's bucketing of a network's parameters (reverse registration order; the default 25 MB cap starts
    with a 1 MiB bucket, an explicit cap does not)."""
    caps = [2**20, 25 * 2**20] if cap_mb == 0 else [int(cap_mb * 2**20)]
    out, cur, size = [], [], 0
    for s in net.params[::-1]:
        cap = caps[min(len(out), len(caps) - 1)]
        b = numel(s) * elem_bytes
        if cur and size + b > cap:
            out.append(cur)
            cur, size = [], 0
        cur.append(s)
        size += b
    if cur:
        out.append(cur)
    return out


def collectives_for(nets, hook: str, cap_mb: float, rank: int) -> list[list[list[int]]]:
    """Per network, per bucket: the bytes of each collective the hook issues (in order)."""
    per_net = []
    for net in nets:
        rows = []
        for bucket in buckets_of(net, cap_mb):
            n = sum(numel(s) for s in bucket)
            if hook == "none":
                rows.append([n * 4])
            elif hook in ("fp16", "bf16"):
                rows.append([n * 2])
            else:
                unc, P, Q = 0, 0, 0
                for s in bucket:
                    a, b = (s[0], numel(s) // s[0]) if len(s) else (1, 1)
                    r = min(a, b, rank)
                    if (a + b) * r * 2 < a * b:
                        P, Q = P + a * r, Q + b * r
                    else:
                        unc += numel(s)
                rows.append([unc * 4, P * 4, Q * 4])
        per_net.append(rows)
    return per_net


def t_allreduce(nbytes: int, n: int, algo: str, inter_GBps: float) -> float:
    """Seconds for one all-reduce of ``nbytes`` over ``n`` GPUs (``MODEL_ASSUMPTIONS["algorithms"]``)."""
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


def hook_work_gpu(nets, hook: str, cap_mb: float, rank: int, stage: int = 0, measured: dict | None = None) -> float:
    """PowerSGD's own work per step on the GPU: measured (``measured``: (stage, rank, bucket_cap_mb) -> s, from
    hook_work.py's JSON) or, without a measurement, MODEL_ASSUMPTIONS' estimate."""
    if hook != "powersgd":
        return 0.0
    if measured is not None:
        key = (stage, rank, float(cap_mb))
        if key not in measured:
            raise KeyError(f"PowerSGD hook work not measured for stage {stage}, rank {rank}, bucket_cap_mb {cap_mb:g}")
        return measured[key]
    shapes = powersgd_shapes(nets, rank)
    nb = sum(len(buckets_of(net, cap_mb)) for net in nets)
    flops = sum(6 * n * m * r for n, m, r in shapes)
    return flops / (0.30 * 67e12) + 30e-6 * len(shapes) + 20e-6 * nb


def compute_s(stage: int, batch: int, flops_img: float, nets) -> float:
    """One GPU's step at per-GPU ``batch``. At 64 images it is the MFU target's time (the weak model's); below,
    only the part above the fixed cost shrinks with the batch: the fused Adam update (memory-bound, every
    parameter read and written whatever the batch) and the kernel-launch floor stay."""
    A = MODEL_ASSUMPTIONS
    t64 = A["per_gpu_batch"] * flops_img / (A["mfu"][str(stage)] * A["peak_flops"])
    if batch == A["per_gpu_batch"]:
        return t64
    params = sum(numel(s) for net in nets for s in net.params)
    fixed = min(t64, params * A["adam_bytes_per_param"] / (A["hbm_GBps"] * 1e9) + A["launch_floor_ms"] * 1e-3)
    return fixed + batch / A["per_gpu_batch"] * (t64 - fixed)


def predict(stage: int, n: int, opt: dict, overlap: float, flops_img: float, inter_GBps: float, nets,
            hook_work: dict | None = None, batch: int | None = None) -> dict:
    """Step time and efficiency at ``n`` GPUs with options ``opt`` (hook, bucket_cap_mb, algo, rank) and a
    per-GPU ``batch`` (default 64: weak scaling); efficiency = compute / (compute + exposed communication)."""
    batch = batch or MODEL_ASSUMPTIONS["per_gpu_batch"]
    t_comp = compute_s(stage, batch, flops_img, nets)
    colls = collectives_for(nets, opt["hook"], opt["bucket_cap_mb"], opt.get("rank", 1))
    per_bucket = [[sum(t_allreduce(b, n, opt["algo"], inter_GBps) for b in bucket) for bucket in net]
                  for net in colls]
    t_comm = sum(sum(m) for m in per_bucket)
    t_tail = sum(m[-1] for m in per_bucket if m)  # each network's last bucket: after its backward
    t_hook = (hook_work_gpu(nets, opt["hook"], opt["bucket_cap_mb"], opt.get("rank", 1), stage, hook_work)
              if n > 1 else 0.0)
    t_bn = t_allreduce(sum(net.buffer_elems for net in nets) * 4, n, opt["algo"], inter_GBps)
    work = t_comm + t_hook
    hidden = min(overlap * work, (2 / 3) * t_comp, max(0.0, work - t_tail))
    exposed = work - hidden + t_bn
    sent = sum(sum(b) for net in colls for b in net)
    return {"stage": stage, "gpus": n, "inter_node_GBps": inter_GBps, **opt, "batch_per_gpu": batch,
            "compute_ms": 1e3 * t_comp, "comm_ms": 1e3 * t_comm, "hook_ms": 1e3 * t_hook, "bn_sync_ms": 1e3 * t_bn,
            "exposed_ms": 1e3 * exposed, "overlap": overlap, "bytes_per_step": sent,
            "collectives_per_step": sum(len(b) for m in colls for b in m),
            "efficiency": t_comp / (t_comp + exposed)}


def projection(stage: int, nets, inter_node_GBps: list[float], sizes: list[int], opt: dict | None = None,
               overlap: float = 0.0, flops_img: float | None = None, hook_work: dict | None = None,
               grad_bytes_scaled: int | None = None) -> list[dict]:
    """Weak-scaling rows over ``sizes`` GPUs (default options: today's: no hook, DDP's default buckets, ring).
    ``grad_bytes_scaled``: a hypothetical network of that many gradient bytes (communication scaled with it)."""
    opt = opt or dict(TODAY)
    flops_img = flops_img or {1: 10.0e9, 2: 122.4e9}[stage]
    scale = grad_bytes_scaled / grad_bytes(nets) if grad_bytes_scaled else 1.0
    rows = []
    for bw in inter_node_GBps:
        for n in sizes:
            r = predict(stage, n, opt, overlap, flops_img, bw, nets, hook_work)
            if scale != 1.0:
                t_comp = r["compute_ms"]
                exposed = r["exposed_ms"] * scale
                r.update(exposed_ms=exposed, efficiency=t_comp / (t_comp + exposed))
            rows.append(r)
    return rows


def choose(stage: int, nets, overlaps: dict, flops_img: float, ranks=(1, 2, 4, 8),
           caps=(0.0, 5.0, 25.0, 100.0, 400.0), algos=("ring", "hierarchical"), hook_work: dict | None = None) -> dict:
    """The least lossy option that reaches the target (no compression before bf16 before fp16 before PowerSGD,
    and PowerSGD's highest rank); when none does, the most efficient. -> the chosen row and every row."""
    cands = [("none", 1), ("bf16", 1), ("fp16", 1)] + [("powersgd", r) for r in sorted(ranks, reverse=True)]
    rows = []
    for order, (hook, rank) in enumerate(cands):
        for algo in algos:
            for cap in caps:
                opt = {"hook": hook, "bucket_cap_mb": cap, "algo": algo, "rank": rank}
                r = predict(stage, TARGET["gpus"], opt, overlaps.get(hook, 0.0), flops_img, TARGET["inter_node_GBps"],
                            nets, hook_work)
                r["order"] = order
                rows.append(r)
    ok = [r for r in rows if r["efficiency"] >= TARGET["efficiency"]]
    best = (min(ok, key=lambda r: (r["order"], -r["efficiency"])) if ok
            else max(rows, key=lambda r: r["efficiency"]))
    return {"chosen": best, "meets_target": bool(ok), "candidates": rows}


def project(ov: dict, flops: dict, inter_node_GBps: list[float], nets: dict, hook_work: dict | None = None):
    """Per stage: the option ``choose`` picks and the rows over SIZES of it ("chosen") and of no option ("today").
    ``nets``: stage -> its (G, D) ``Net``s. -> (chosen per stage, rows)."""
    chosen, proj = {}, []
    for st in (1, 2):
        c = choose(st, nets[st], ov[st], flops[st], hook_work=hook_work)
        chosen[st] = c
        pick = {k: c["chosen"][k] for k in ("hook", "bucket_cap_mb", "algo", "rank")}
        for kind, opt in (("today", TODAY), ("chosen", pick)):
            for r in projection(st, nets[st], inter_node_GBps, SIZES, opt, ov[st].get(opt["hook"], 0.0), flops[st],
                                hook_work):
                r["kind"] = kind
                proj.append(r)
    return chosen, proj


def projection_fields(chosen: dict, proj: list) -> dict:
    """``project``'s result as the results JSON keeps it under "projection"."""
    return {"chosen": {str(st): {"meets_target": c["meets_target"], **c["chosen"]} for st, c in chosen.items()},
            "candidates": {str(st): c["candidates"] for st, c in chosen.items()},
            # rows: the chosen options (what run_suite.py tabulates); rows_today: no options
            "rows": [r for r in proj if r["kind"] == "chosen"], "rows_today": [r for r in proj if r["kind"] == "today"]}


def reproject(data: dict, hook_work: dict, note: str, inter_node_GBps: list[float], nets: dict) -> dict:
    """A scaling results JSON with its projection recomputed from its own measured inputs (overlap, FLOPs) and
    PowerSGD's hook work measured on a GPU instead of estimated."""
    pr = data["projection"]
    ov = {int(k): v for k, v in pr["overlap_used"].items()}
    flops = {int(k): float(v) for k, v in pr["flops_per_img_paper"].items()}
    chosen, proj = project(ov, flops, inter_node_GBps, nets, hook_work)
    pr.update(assumptions={**pr["assumptions"], "powersgd_hook_work": note}, hook_work_measured=True,
              **projection_fields(chosen, proj))
    return data


def sync_bn_s(nets, n: int, inter_GBps: float) -> float:
    """``model.sync_bn``'s cost per step: one blocking all-reduce per BatchNorm layer and pass (forward: sum, sum
    of squares and count, 2C + 1 floats; backward: 2C floats), G's layers once, D's three times (real with right
    and wrong text, fake, G's loss through D). Latency-bound and never overlapped: the next layer waits for it."""
    t = 0.0
    for net, passes in zip(nets, (1, 3)):
        for c in net.bn_channels:
            t += passes * (t_allreduce((2 * c + 1) * 4, n, "hierarchical", inter_GBps)
                           + t_allreduce(2 * c * 4, n, "hierarchical", inter_GBps))
    return t


def strong_scaling(stage: int, nets, flops_img: float, inter_GBps: float, sizes=STRONG_SIZES,
                   global_batch: int = PAPER_GLOBAL_BATCH, overlap: float = 0.0) -> list[dict]:
    """The paper's global batch split over ``sizes`` GPUs, plain fp32 all-reduce (the paper recipe) with NCCL's
    hierarchical path across nodes. Per GPU count: step time with per-rank BatchNorm (valid while the per-GPU
    batch is at least ``bn_min_per_gpu_batch``) and with ``model.sync_bn`` (valid at any batch, paying
    ``sync_bn_s``); speed-up over one GPU, and each doubling's gain. Epoch time per dataset of ``DATASETS``
    (floor(images / global batch) steps: a pass drops at most global batch - 1 images)."""
    A = MODEL_ASSUMPTIONS
    opt = {"hook": "none", "bucket_cap_mb": 0.0, "algo": "hierarchical", "rank": 1}
    rows, base = [], None
    for n in sizes:
        b = global_batch // n
        r = predict(stage, n, opt, overlap, flops_img, inter_GBps, nets, batch=b)
        step = r["compute_ms"] + r["exposed_ms"]
        sync = 1e3 * sync_bn_s(nets, n, inter_GBps) if n > 1 else 0.0
        bn_ok = b >= A["bn_min_per_gpu_batch"]
        best = step if bn_ok else step + sync  # below the floor only global-batch BatchNorm is sound
        base = base or best
        r.update(global_batch=global_batch, step_ms=step, sync_bn_ms=sync, step_ms_sync_bn=step + sync,
                 per_rank_bn_ok=bn_ok, step_ms_best=best, speedup=base / best, scaling_efficiency=base / best / n,
                 epoch_s={name: (imgs // global_batch) * best / 1e3 for name, imgs in DATASETS.items()})
        rows.append(r)
    for prev, r in zip(rows, rows[1:]):
        r["gain_over_previous"] = prev["step_ms_best"] / r["step_ms_best"]
    return rows


def stops_paying_off(rows: list[dict], min_gain: float = 1.25) -> int | None:
    """The first GPU count whose step is less than ``min_gain`` x faster than the previous count's (each count
    doubles: below 1.25x, more than 37 % of the added GPU time buys nothing). None when every step pays."""
    for r in rows[1:]:
        if r["gain_over_previous"] < min_gain:
            return r["gpus"]
    return None

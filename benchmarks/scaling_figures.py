"""The scaling figures for the shapes users run, from a scaling results JSON's measured inputs (no training):

- strong scaling: the paper's global batch 64 on 1-16 GPUs (CUB 8,855 and Oxford-102 7,034 training images):
  how far the speed-up goes and why it stops (per-GPU compute shrinks, the all-reduce of the full gradient does
  not, per-rank BatchNorm needs 8 images);
- weak scaling: per-GPU batch 64 on 1-64 GPUs, global batch 64 N with an lr rule (``train.lr_scaling``): the
  large-corpus case (COCO-sized and up), where the earlier projection belongs.

Everything drawn is a PROJECTION of ``scaling_model.py``: its inputs measured on the device and date the source
JSON names (FLOPs per image counted at the paper widths, overlap), the GPU side assumed (MODEL_ASSUMPTIONS),
until GPUs measure it.

    python benchmarks/scaling_figures.py --from-json benchmarks/results/scaling-2-core-cpu-shared-2026-12-02.json \\
        --out-dir benchmarks/results
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re

import common

from scaling_model import (DATASETS, MODEL_ASSUMPTIONS, PAPER_GLOBAL_BATCH, STRONG_SIZES, TODAY, projection,
                           stops_paying_off, strong_scaling)
from scaling_paper import paper_nets

WEAK_SIZES = [1, 2, 4, 8, 16, 32, 64]
LABEL = "PROJECTION: scaling_model.py from measured inputs, not a GPU measurement"


def check_source(src: dict) -> dict:
    """The fields of a scaling results JSON this script reads, checked (a results file is input, not trusted)."""
    pr = src["projection"]
    for k in ("device", "date", "commit"):
        if not isinstance(src[k], str):
            raise ValueError(f"{k} is not a string")
    for st in ("1", "2"):
        f = float(pr["flops_per_img_paper"][st])
        if not 0 < f < 1e15:
            raise ValueError(f"flops_per_img_paper[{st}]={f} is not a positive FLOP count")
        if not all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in pr["overlap_used"][st].values()):
            raise ValueError(f"overlap_used[{st}] holds a value outside [0, 1]")
        c = pr["chosen"][st]
        if (c["hook"] not in ("none", "bf16", "fp16", "powersgd") or c["algo"] not in ("ring", "hierarchical")
                or not 0 <= float(c["bucket_cap_mb"]) < 1e6
                or not (isinstance(c["rank"], int) and 1 <= c["rank"] <= 64)):
            raise ValueError(f"chosen[{st}] is not an option the model knows")
    return src


def figures_data(src: dict, src_name: str, inter_node_GBps: list[float], date: str) -> dict:
    pr = src["projection"]
    flops = {st: float(pr["flops_per_img_paper"][str(st)]) for st in (1, 2)}
    ov = {st: pr["overlap_used"][str(st)] for st in (1, 2)}
    chosen = {st: {k: pr["chosen"][str(st)][k] for k in ("hook", "bucket_cap_mb", "algo", "rank")} for st in (1, 2)}
    strong, weak, stops = [], [], {}
    for st in (1, 2):
        nets = paper_nets(st)
        for bw in inter_node_GBps:
            rows = strong_scaling(st, nets, flops[st], bw, overlap=ov[st].get("none", 0.0))
            strong += rows
            stops[f"{st}@{bw:g}"] = stops_paying_off(rows)
        for kind, opt in (("today", TODAY), ("chosen", chosen[st])):
            for r in projection(st, nets, inter_node_GBps, WEAK_SIZES, opt, ov[st].get(opt["hook"], 0.0), flops[st],
                                None):
                r["kind"] = kind
                weak.append(r)
    inputs = (f"measured on {src['device']} ({src['date']}, commit {src['commit']}), {src_name}: FLOPs per image "
              f"counted at the paper widths ({flops[1] / 1e9:.1f} / {flops[2] / 1e9:.1f} GFLOP, Stage I / II), "
              "overlap of communication with the backward (unresolved on 2 CPU processes: 0 used)")
    return {"label": LABEL, "date": date, "commit": common.commit(), "inputs": inputs, "source": src_name,
            "assumptions": MODEL_ASSUMPTIONS, "global_batch": PAPER_GLOBAL_BATCH, "datasets": DATASETS,
            "strong": {"sizes": STRONG_SIZES, "stops_paying_off": stops, "rows": strong,
                       "rule": "a GPU count stops paying off when its step is less than 1.25x faster than at half "
                               "as many GPUs"},
            "weak": {"case": "large corpus (COCO-sized and up): per-GPU batch 64, global batch 64 N, lr rule "
                             "train.lr_scaling (sqrt or linear) with warmup", "sizes": WEAK_SIZES, "rows": weak}}


def plot(data: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    A = data["assumptions"]
    colors = {1: "tab:blue", 2: "tab:red"}
    bws = sorted({r["inter_node_GBps"] for r in data["strong"]["rows"]})
    dashes = {bw: ls for bw, ls in zip(bws, ("-", "--", ":"))}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5.6))
    n_max = max(data["strong"]["sizes"])
    ax1.plot([1, n_max], [1, n_max], color="gray", lw=0.8, ls=":", label="ideal")
    for st in (1, 2):
        for bw in bws:
            rows = [r for r in data["strong"]["rows"] if r["stage"] == st and r["inter_node_GBps"] == bw]
            ax1.plot([r["gpus"] for r in rows], [r["speedup"] for r in rows], dashes[bw], color=colors[st],
                     marker="o", mfc=colors[st] if bw == bws[0] else "white",
                     label=f"Stage {'I' * st}, {bw:g} GB/s between nodes")
            cub = list(DATASETS)[0]
            best = max(rows, key=lambda r: r["speedup"])
            if bw == bws[0]:
                ax1.annotate(f"{best['speedup']:.1f}x at {best['gpus']} GPUs\nCUB epoch {best['epoch_s'][cub]:.1f} s",
                             (best["gpus"], best["speedup"]), textcoords="offset points", xytext=(-70, 12),
                             fontsize=7, color=colors[st])
    floor = A["bn_min_per_gpu_batch"]
    ax1.axvspan(data["global_batch"] / floor * 1.0001, n_max * 1.2, color="0.9", zorder=0,
                label=f"per-GPU batch < {floor}: model.sync_bn needed (its all-reduces included)")
    ax1.axvline(A["gpus_per_node"], color="gray", lw=0.8, ls="-.")
    ax1.text(A["gpus_per_node"] * 1.05, 0.3, "one node", fontsize=7, color="gray")
    ax1.set(xscale="log", yscale="log", xlabel="GPUs (per-GPU batch = 64 / GPUs)", ylabel="speed-up over one GPU",
            title=f"Strong scaling at the paper's global batch {data['global_batch']} (CUB, Oxford-102)")
    ax1.set_xticks(data["strong"]["sizes"], [str(n) for n in data["strong"]["sizes"]])
    ax1.set_yticks([0.5, 1, 2, 4, 8, 16], ["0.5", "1", "2", "4", "8", "16"])
    ax1.legend(fontsize=6.5, loc="upper left", framealpha=0.9)
    for st in (1, 2):
        for kind, ls in (("today", "--"), ("chosen", "-")):
            rows = [r for r in data["weak"]["rows"] if r["stage"] == st and r["kind"] == kind
                    and r["inter_node_GBps"] == bws[0]]
            o = rows[0]
            desc = (f"{o['hook']}{' r=' + str(o['rank']) if o['hook'] == 'powersgd' else ''}, "
                    f"bucket {'default' if o['bucket_cap_mb'] == 0 else str(o['bucket_cap_mb']) + ' MB'}, {o['algo']}")
            ax2.plot([r["gpus"] for r in rows], [r["efficiency"] for r in rows], ls, color=colors[st], marker=".",
                     label=f"Stage {'I' * st}, {kind}: {desc}" + (" (picked for 64 GPUs)" if kind == "chosen" else ""))
    ax2.axvline(A["gpus_per_node"], color="gray", lw=0.8, ls="-.")
    ax2.set(xscale="log", xlabel="GPUs (per-GPU batch 64, global batch 64 x GPUs)", ylabel="weak-scaling efficiency",
            ylim=(0, 1.05), title=f"Weak scaling, large corpus ({bws[0]:g} GB/s between nodes; lr rule + warmup)")
    ax2.set_xticks(data["weak"]["sizes"], [str(n) for n in data["weak"]["sizes"]])
    ax2.legend(fontsize=6.5, loc="lower left", framealpha=0.9)
    fig.suptitle(f"{data['label']} ({data['date']}).\nInputs {data['inputs'].split(':')[0]}. GPU side assumed: H100 "
                 f"bf16 at MFU {A['mfu']['1']:.0%} / {A['mfu']['2']:.0%} at batch 64, launch floor "
                 f"{A['launch_floor_ms']:g} ms/step, NVLink {A['intra_node_busbw_GBps']:g} GB/s, "
                 f"{A['gpus_per_node']} GPUs/node", fontsize=7.5)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--from-json", required=True, help="a scaling.py results JSON (its measured inputs are used)")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--inter-node-GBps", type=float, nargs="+", default=[25.0, 100.0])
    p.add_argument("--date", default=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"))
    a = p.parse_args(argv)
    try:
        with open(a.from_json) as f:
            src = check_source(json.load(f))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        p.exit(2, f"scaling_figures.py: {a.from_json} is not a scaling results JSON ({type(e).__name__}: {e})\n")
    # named after the device that measured the inputs, and the day of the projection
    m = re.match(r"scaling-(.+)-\d{4}-\d{2}-\d{2}\.json$", os.path.basename(a.from_json))
    tag = m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", src["device"].lower()).strip("-")
    data = figures_data(src, os.path.basename(a.from_json), a.inter_node_GBps, a.date)
    stem = os.path.join(a.out_dir, f"scaling-strong-weak-{tag}-{a.date}")
    common.write_json(data, stem + ".json")
    plot(data, stem + ".png")
    for key, n in data["strong"]["stops_paying_off"].items():
        st, bw = key.split("@")
        print(f"strong scaling, Stage {st}, {bw} GB/s between nodes: "
              f"{'stops paying off at ' + str(n) + ' GPUs' if n else 'pays off up to ' + str(max(STRONG_SIZES))}")
    print(f"wrote {stem}.json and .png")
    return data


if __name__ == "__main__":
    main()

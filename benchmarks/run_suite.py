"""The benchmark suite (``make bench``): throughput of both stages against the baseline step, weak scaling,
goodput, loader. Each benchmark runs in its own process; results go to ``--out`` as one JSON per benchmark,
one combined JSON and a markdown table (``<device>-<date>.md`` and ``latest.md``).

CPU sizes (default) keep the suite under ~10 minutes on a 2-core machine: Stage I at the paper's widths,
Stage II at half the paper's widths (the paper's widths take ~30 s per step there; see README).
``--tiny`` shrinks everything to seconds (CI checks that the suite runs end to end and writes valid JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

import common

HERE = os.path.dirname(os.path.abspath(__file__))

# name -> (script, arguments) per mode
CPU = {
    # channels_last for our step: measured 4.5% (Stage I) and 7% (Stage II) less CPU time per step with
    # oneDNN; the baseline stays NCHW as the reference recipe is
    "throughput_stage1": ("throughput.py", ["--stage", "1", "--batch-size", "16", "--baseline", "--warmup", "2",
                                            "--steps", "10", "--peak-n", "1024", "--channels-last"]),
    "throughput_stage2": ("throughput.py", ["--stage", "2", "--batch-size", "4", "--baseline", "--gf-dim", "64",
                                            "--df-dim", "32", "--warmup", "1", "--steps", "8", "--peak-n", "1024",
                                            "--channels-last"]),
    "scaling": ("scaling.py", ["--max-procs", "2", "--batch-size", "8", "--steps", "6"]),
    "goodput": ("goodput.py", ["--steps", "10", "--saves", "3"]),
    "dataloader": ("dataloader.py", ["--images", "64", "--rounds", "5"]),
}
TINY_MODEL = ["--gf-dim", "8", "--df-dim", "4", "--condition-dim", "8", "--z-dim", "8", "--text-dim", "16",
              "--batch-size", "2", "--warmup", "1", "--steps", "2", "--peak-n", "128", "--baseline", "--channels-last"]
TINY = {
    "throughput_stage1": ("throughput.py", ["--stage", "1", *TINY_MODEL]),
    "throughput_stage2": ("throughput.py", ["--stage", "2", *TINY_MODEL]),
    "scaling": ("scaling.py", ["--max-procs", "2", "--batch-size", "2", "--gf-dim", "8", "--df-dim", "4",
                               "--warmup", "1", "--steps", "2"]),
    "goodput": ("goodput.py", ["--steps", "2", "--saves", "1", "--batch-size", "4", "--gf-dim", "16",
                               "--df-dim", "8"]),
    "dataloader": ("dataloader.py", ["--images", "12", "--image-size", "160", "120", "--text-dim", "16",
                                     "--batch-size", "2", "--batches", "2", "--rounds", "2", "--workers", "1"]),
}


def run_one(name: str, script: str, args: list[str], out_dir: str, tag: str, timeout: float,
            threads: int) -> dict:
    path = os.path.join(out_dir, f"{name}-{tag}.json")
    cmd = [sys.executable, os.path.join(HERE, script), *args, "--json", path]
    if name == "scaling":
        cmd += ["--plot", os.path.join(out_dir, f"scaling-{tag}.png")]
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=common.REPO)
    wall = time.perf_counter() - t
    sys.stdout.write(p.stdout)
    if p.returncode != 0:
        raise SystemExit(f"{name} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    with open(path) as f:
        res = json.load(f)
    res["wall_s"] = wall
    return res


def markdown(suite: dict) -> str:
    r = suite["results"]
    lines = [f"# Benchmarks: {suite['device']} (commit {suite['commit']}, {suite['date']})", "",
             "## Throughput (training step, fp32; median of alternating steps)", "",
             "| stage | widths gf/df | batch | layout | img/s | step p50 ms | step p90 ms | GFLOP/img | "
             "achieved GFLOP/s | MFU | baseline img/s | speedup | speedup (CPU time) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in ("throughput_stage1", "throughput_stage2"):
        if k not in r:
            continue
        for x in r[k]["results"]:
            # MFU only against a datasheet peak (CUDA); on CPU the matmul ceiling measured here stands beside
            mfu = f"{100 * x['mfu']:.1f}% ({x['mfu_basis']})" if x.get("mfu") is not None else (
                f"- (matmul ceiling {x['matmul_flop_s_measured'] / 1e9:.1f})" if x.get("matmul_flop_s_measured")
                else "-")
            ach = f"{x['achieved_flop_s'] / 1e9:.1f}" if x.get("achieved_flop_s") else "-"
            sc = f"{x['speedup_cpu_time']:.2f}x" if x.get("speedup_cpu_time") else "-"
            lines.append(f"| {x['stage']} | {x['gf_dim']}/{x['df_dim']} | {x['batch_size']} | "
                         f"{'NHWC' if x['channels_last'] else 'NCHW'} | {x['img_per_s']:.2f} | "
                         f"{x['step_ms_p50']:.0f} | {x['step_ms_p90']:.0f} | {x['flops_per_img'] / 1e9:.2f} | {ach} | {mfu} | "
                         f"{x['baseline_img_per_s']:.2f} | {x['speedup']:.2f}x | {sc} |")
    rows = [x for k in ("throughput_stage1", "throughput_stage2") if k in r for x in r[k]["results"]]
    if any(x.get("mfu") is None and x.get("matmul_flop_s_measured") for x in rows):
        lines += ["", "No MFU without a datasheet peak (CPU): the achieved rate stands beside an fp32 matmul "
                      "ceiling timed once in the same process, which on a shared machine can read below it."]
    if "scaling" in r:
        s = r["scaling"]
        lines += ["", f"## Weak scaling (gloo, {s['measured_setup']['batch_per_worker']} img/worker, "
                      f"gf {s['measured_setup']['gf_dim']}/df {s['measured_setup']['df_dim']})", "",
                  "| workers | img/s per worker | efficiency | gradient MB/step | all-reduce bus GB/s |",
                  "|---|---|---|---|---|"]
        for m in s["measured"]:
            bw = f"{m['allreduce_busbw_GBps']:.2f}" if m["allreduce_busbw_GBps"] else "-"
            lines.append(f"| {m['workers']} | {m['img_per_s_per_worker']:.1f} | {m['efficiency']:.2f} | "
                         f"{m['grad_bytes'] / 2**20:.2f} | {bw} |")
        rows = s["projection"]["rows"]
        bws = sorted({x["inter_node_GBps"] for x in rows})
        lines += ["", "Projected efficiency, paper widths, bf16 compute at the MFU target (a MODEL, not a "
                      "measurement; assumptions in the JSON and README):", "",
                  "| stage | inter-node GB/s | " + " | ".join(f"{n} GPUs" for n in sorted({x['gpus'] for x in rows}))
                  + " |", "|---|---|" + "---|" * len({x["gpus"] for x in rows})]
        for st in (1, 2):
            for bw in bws:
                xs = sorted((x for x in rows if x["stage"] == st and x["inter_node_GBps"] == bw),
                            key=lambda x: x["gpus"])
                lines.append(f"| {st} | {bw:g} | " + " | ".join(f"{x['efficiency']:.2f}" for x in xs) + " |")
    if "goodput" in r:
        g = r["goodput"]["goodput"]
        bg = g["checkpoint_save_ms_background"]
        lines += ["", "## Goodput", "", "| metric | value |", "|---|---|",
                  f"| checkpoint save, sync (ms) | {g['checkpoint_save_ms_sync']:.0f} |",
                  f"| checkpoint save, background (ms stalled) | {'-' if bg is None else f'{bg:.0f}'} |",
                  f"| stall share at every_steps={g['default_every_steps']}, sync / background | "
                  f"{100 * g['stall_share_at_default_interval_sync']:.3f}% / "
                  f"{100 * g['stall_share_at_default_interval_background']:.3f}% |",
                  f"| restart to first step (s) | {g['restart_to_first_step_s']:.2f} |",
                  f"| steps lost per preemption (with signal / hard kill, expected) | "
                  f"{g['steps_lost_per_preemption_with_signal']} / {g['steps_lost_per_preemption_hard_kill_expected']:g} |"]
    if "dataloader" in r:
        d = r["dataloader"]["dataloader"]
        lines += ["", f"## Loader (Stage II, {d['crop']} crops of {d['load_size']}, from "
                      f"{d['source_image_size'][0]}x{d['source_image_size'][1]} JPEGs; samples/s)", "",
                  f"| loader | per worker | total ({d['workers']} workers) |", "|---|---|---|"]
        for n in ("ours", "reference"):
            tot = d.get(f"{n}_total")
            lines.append(f"| {n} | {d[n + '_per_worker']:.1f} | {'-' if tot is None else f'{tot:.1f}'} |")
        sc = f", {d['speedup_cpu_time']:.2f}x per CPU second" if d.get("speedup_cpu_time") else ""
        lines.append(f"\nspeedup per worker (ours / reference): {d['speedup']:.2f}x wall clock{sc}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu"], help="the GPU suite: throughput.py --device cuda")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--tiny", action="store_true", help="seconds-long sizes (CI)")
    p.add_argument("--only", nargs="*", default=None, help="a subset of: " + ", ".join(CPU))
    p.add_argument("--label", default="", help="device label for file names and the table (default: detected)")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--threads", type=int, default=0,
                   help="OMP threads per benchmark process (default: all cores; 1 with --tiny)")
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    hdr = common.header("cpu")
    if a.label:
        hdr["device"] = a.label
    slug = re.sub(r"[^a-z0-9]+", "-", hdr["device"].lower()).strip("-")
    tag = f"{slug}-{hdr['date']}" + ("-tiny" if a.tiny else "")
    plan = TINY if a.tiny else CPU
    results = {}
    t0 = time.perf_counter()
    for name, (script, args) in plan.items():
        if a.only is not None and name not in a.only:
            continue
        print(f"== {name}", flush=True)
        threads = a.threads or (1 if a.tiny else os.cpu_count() or 1)
        results[name] = run_one(name, script, args, a.out, tag, a.timeout, threads)
    suite = {**hdr, "tiny": a.tiny, "wall_s": time.perf_counter() - t0, "results": results}
    common.write_json(suite, os.path.join(a.out, f"suite-{tag}.json"))
    md = markdown(suite)
    for name in (f"suite-{tag}.md", "latest-tiny.md" if a.tiny else "latest.md"):
        with open(os.path.join(a.out, name), "w") as f:
            f.write(md)
    print(md, flush=True)
    return suite


if __name__ == "__main__":
    main()

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

Files: this one is the command line; scaling_harness.py measures, scaling_fit.py checks the model at 2 CPU
processes, scaling_model.py is the model (pure arithmetic), scaling_paper.py gives it the paper-width networks,
scaling_report.py draws and tabulates; scaling_figures.py draws the strong/weak figures from a results JSON.
"""
from __future__ import annotations

import argparse
import os

import common

from scaling_fit import fit_alpha_beta, validate
from scaling_harness import run_workers
from scaling_model import MODEL_ASSUMPTIONS, TARGET, project, projection_fields, reproject
from scaling_paper import paper_flops_per_img, paper_grad_bytes, paper_nets
from scaling_report import markdown, plot

HOOKS = ("none", "bf16", "fp16", "powersgd")


def load_hook_work(path: str) -> tuple[dict, str]:
    """hook_work.py's JSON -> ({(stage, rank, bucket_cap_mb): seconds}, a line saying where it was measured)."""
    import json

    with open(path) as f:
        data = json.load(f)
    table = {(int(r["stage"]), int(r["rank"]), float(r["bucket_cap_mb"])): float(r["t_hook_ms"]) / 1e3
             for r in data["rows"]}
    return table, (f"measured on {data['device']} ({data['date']}, commit {data['commit']}) by benchmarks/hook_work.py "
                   f"({os.path.basename(path)}): {data['method']}")


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
            data = reproject(data, table, note, a.inter_node_GBps, {st: paper_nets(st) for st in (1, 2)})
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
    chosen, proj = project(ov, flops, a.inter_node_GBps, {st: paper_nets(st) for st in (1, 2)})
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

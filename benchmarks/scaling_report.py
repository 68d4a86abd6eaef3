"""What the scaling benchmark writes: the weak-scaling figure (measured CPU points and the projection) and the
markdown section of benchmarks/results/latest.md."""
from __future__ import annotations

import os

from scaling_model import MODEL_ASSUMPTIONS, TARGET


def _group(proj):
    out = {}
    for r in proj:
        out.setdefault((r["stage"], r["kind"]), []).append(r)
    return out


def plot(measured: list[dict], validation: list[dict], proj: list[dict], path: str,
         hook_note: str = "estimated") -> None:
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

"""``stackgan report RUN``: one PNG with the loss curves (from metrics.jsonl) and the latest sample grid."""
from __future__ import annotations

import glob
import json
import os
import re

from ..errors import UserError

LOSS_KEYS = ("d_loss", "d_real", "d_wrong", "d_fake", "g_loss", "g_adv")
# on axes of their own: the KL term is orders of magnitude below the adversarial losses and would flatten
# them, the colour term (Stage-II, train.color_coeff) has its own scale too
AUX_KEYS = ("kl", "g_color")


def read_metrics(path: str) -> list[dict]:
    """Records of metrics.jsonl; a torn last line (a run killed mid-write) is skipped."""
    recs = []
    with open(path) as f:
        for ln in f:
            ln = ln.strip()
            if not ln:
                continue
            try:
                recs.append(json.loads(ln))
            except json.JSONDecodeError:
                continue
    return recs


def latest_sample(run_dir: str) -> str | None:
    found = []
    for p in glob.glob(os.path.join(run_dir, "samples", "step_*.png")):
        m = re.search(r"step_(\d+)\.png$", p)
        if m:
            found.append((int(m.group(1)), p))
    return max(found)[1] if found else None


def make_report(run_dir: str, out: str = "") -> dict:
    if not os.path.isdir(run_dir):
        raise UserError(f"run directory not found: {run_dir}")
    mpath = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(mpath):
        raise UserError(f"{run_dir} has no metrics.jsonl (is it a run directory? has it logged a step yet?)")
    recs = read_metrics(mpath)
    if not recs:
        raise UserError(f"{mpath} holds no records yet")
    try:
        import matplotlib
    except ImportError:
        raise UserError("stackgan report needs matplotlib: pip install 'stackgan_dist[eval]'") from None

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from PIL import Image

    sample = latest_sample(run_dir)
    # the sample grid gets the right half at full height: 8 rows of 64x64 (or 256x256) thumbnails stay
    # legible, where a quarter of the figure shrank them to about 70 px
    fig = plt.figure(figsize=(16, 9), dpi=100)
    gs = fig.add_gridspec(3, 2, width_ratios=(1, 1), height_ratios=(2, 1, 1))

    def curves(ax, names, ylabel, title):
        shown = []
        for k in names:
            pts = [(r["step"], r[k]) for r in recs if isinstance(r.get(k), (int, float))]
            if not pts:
                continue
            # markers: a short run has one or two records, which a bare line would not draw
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k, marker="o" if len(pts) < 20 else None,
                    ms=3, lw=1.5 if k in ("d_loss", "g_loss") else 0.9)
            shown.append(k)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if shown:
            ax.legend(fontsize=8, ncol=2)
        return shown

    keys = curves(fig.add_subplot(gs[0, 0]), LOSS_KEYS, "loss", "adversarial losses")
    keys += curves(fig.add_subplot(gs[1, 0]), AUX_KEYS, "value", "KL and colour terms")
    curves(fig.add_subplot(gs[2, 0]), ("img_per_s",), "images/s", "throughput")
    axi = fig.add_subplot(gs[:, 1])
    axi.axis("off")
    if sample:
        axi.imshow(Image.open(sample).convert("RGB"), interpolation="nearest")
        axi.set_title(f"samples: {os.path.basename(sample)}")
    else:
        axi.text(0.5, 0.5, "no sample grid yet", ha="center", va="center")
    last = recs[-1]
    fig.suptitle(f"{os.path.abspath(run_dir)}  (step {last.get('step')})", fontsize=10)
    fig.tight_layout()
    out = out or os.path.join(run_dir, "report.png")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return {"out": out, "records": len(recs), "last_step": last.get("step"), "sample": sample, "curves": keys}

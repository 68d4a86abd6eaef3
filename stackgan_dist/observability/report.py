"""``stackgan report RUN``: one PNG with the loss curves (from metrics.jsonl) and the latest sample grid."""
from __future__ import annotations

import glob
import json
import os
import re

from ..errors import UserError

LOSS_KEYS = ("d_loss", "d_real", "d_wrong", "d_fake", "g_loss", "g_adv", "kl")


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
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from PIL import Image

    sample = latest_sample(run_dir)
    fig = plt.figure(figsize=(14, 6), dpi=100)
    gs = fig.add_gridspec(2, 2, width_ratios=(1.2, 1), height_ratios=(2, 1))
    ax = fig.add_subplot(gs[0, 0])
    keys = [k for k in LOSS_KEYS if any(k in r for r in recs)]
    for k in keys:
        pts = [(r["step"], r[k]) for r in recs if isinstance(r.get(k), (int, float))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k, lw=1.5 if k in ("d_loss", "g_loss") else 0.9)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("losses")
    ax.grid(alpha=0.3)
    if keys:
        ax.legend(fontsize=8, ncol=2)
    ax2 = fig.add_subplot(gs[1, 0])
    pts = [(r["step"], r["img_per_s"]) for r in recs if isinstance(r.get("img_per_s"), (int, float))]
    ax2.plot([p[0] for p in pts], [p[1] for p in pts], color="tab:gray", label="images/s")
    ax2.set_xlabel("step")
    ax2.set_ylabel("images/s")
    ax2.grid(alpha=0.3)
    axi = fig.add_subplot(gs[:, 1])
    axi.axis("off")
    if sample:
        axi.imshow(Image.open(sample).convert("RGB"))
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

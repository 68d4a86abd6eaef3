"""``stackgan report RUN``: one PNG with the loss curves (from metrics.jsonl) and the latest sample grid."""
from __future__ import annotations

import glob
import os
import re

from ..checkpoint.files import check_entry, run_subdir, write_atomic
from ..errors import UserError
from .metrics import read_records

LOSS_KEYS = ("d_loss", "d_real", "d_wrong", "d_fake", "g_loss", "g_adv")
# on axes of their own: the KL term is orders of magnitude below the adversarial losses and would flatten
# them, the colour term (Stage-II, train.color_coeff) has its own scale too
AUX_KEYS = ("kl", "g_color")


def read_metrics(path: str) -> list[dict]:
    """Records of metrics.jsonl; lines that are not a JSON object with an integer step (a torn last line,
    junk) are skipped and counted (``read_metrics_counted``)."""
    return read_records(path)[0]


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


def latest_sample(run_dir: str) -> str | None:
    found = []
    if run_subdir(run_dir, "samples", create=False, writable=False) is None:
        return None
    for p in glob.glob(os.path.join(glob.escape(run_dir), "samples", "step_*.png")):
        m = re.search(r"step_(\d+)\.png$", p)
        if m:
            found.append((int(m.group(1)), p))
    return max(found)[1] if found else None


def make_report(run_dir: str, out: str = "") -> dict:
    if not os.path.isdir(run_dir):
        raise UserError(f"run directory not found: {run_dir}")
    mpath = os.path.join(run_dir, "metrics.jsonl")
    if check_entry(mpath) is None:  # a link, a FIFO or a folder here is refused in one line
        raise UserError(f"{run_dir} has no metrics.jsonl (is it a run directory? has it logged a step yet?)")
    recs, junk = read_records(mpath)
    if not recs:
        raise UserError(f"{mpath} holds no records yet" + (f" ({junk} unreadable line(s) skipped)" if junk else ""))
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
            pts = [(r["step"], r[k]) for r in recs if _number(r.get(k))]
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
    grid, why = _read_grid(sample, Image) if sample else (None, "no sample grid yet")
    if grid is not None:
        axi.imshow(grid, interpolation="nearest")
        axi.set_title(f"samples: {os.path.basename(sample)}")
    else:
        axi.text(0.5, 0.5, why, ha="center", va="center", wrap=True)
    last = recs[-1]
    fig.suptitle(f"{os.path.abspath(run_dir)}  (step {last.get('step')})", fontsize=10)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    if out:  # a path the user named (trusted): created where it says
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "wb") as f:
            f.write(buf.getvalue())
    else:  # RUN/report.png: a run file (no link followed, written whole)
        out = os.path.join(run_dir, "report.png")
        write_atomic(out, buf.getvalue(), "report", fsync=False)
    return {"out": out, "records": len(recs), "skipped_lines": junk, "last_step": last.get("step"),
            "sample": sample if grid is not None else None, "sample_problem": None if grid is not None else why,
            "curves": keys}


MAX_GRID_PIXELS = 64 << 20  # our grids are a few megapixels; anything larger is not one of ours


def _read_grid(path: str, Image):
    """(the newest sample grid as an RGB array, None) or (None, why it cannot be shown): a damaged, huge or
    non-PNG file in samples/ is a line in the figure, not a traceback."""
    import numpy as np

    try:
        check_entry(path)
        with Image.open(path) as im:
            if im.width * im.height > MAX_GRID_PIXELS:
                return None, f"{os.path.basename(path)}: {im.width}x{im.height} is too large to be a sample grid"
            return np.asarray(im.convert("RGB")), ""
    except Exception as e:  # noqa: BLE001 -- PIL raises many types for a bad file; the report goes on
        return None, f"{os.path.basename(path)} is unreadable ({type(e).__name__})"

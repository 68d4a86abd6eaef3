"""``stackgan sweep report DIR``: one table (report.csv, report.md) of a sweep's trials (what each changed,
status, steps, the metric at each evaluation, wall time), one PNG (report.png: every trial's metric curve and
the best trial's latest sample grid), and the command line that continues the best trial.

Everything here is read from the sweep directory, which a run wrote: trial records that do not parse are
reported as unreadable rows, never trusted; a sample image larger than a sample grid can be is not opened.
"""
from __future__ import annotations

import csv
import glob
import json
import math
import os
import shlex

from ..errors import UserError
from ..observability.report import latest_sample
from .trials import RECORD, load_record

MAX_SAMPLE_PIXELS = 4096 * 4096  # a sample grid is at most a few thousand pixels a side


def _sweep_info(d: str) -> dict:
    path = os.path.join(d, "sweep.json")
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        raise UserError(f"{d} is not a sweep directory (no readable sweep.json): run `stackgan sweep` first") from None
    if not isinstance(info, dict):
        raise UserError(f"{path} does not hold a mapping")
    return info


def _last_stage(rec: dict) -> int:
    stages = rec.get("stages")
    return int(stages[-1]) if isinstance(stages, list) and stages and isinstance(stages[-1], int) else 1


def _steps(d: str, name: str, stage: int) -> int | None:
    from ..checkpoint.manager import list_checkpoints

    found = list_checkpoints(os.path.join(d, name, f"stage{stage}", "checkpoints"))
    return found[0][0] if found else None


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def collect(d: str) -> tuple[dict, list[dict]]:
    """(sweep.json, one row per trial directory, in trial order)."""
    info = _sweep_info(d)
    rows = []
    for tdir in sorted(glob.glob(os.path.join(d, "t[0-9][0-9][0-9]*"))):
        name = os.path.basename(tdir)
        rec = load_record(os.path.join(tdir, RECORD))
        if rec is None:
            rows.append({"trial": name, "status": "unreadable trial.json", "changes": {}, "evals": [], "wall_s": None,
                         "error": "", "steps": None, "stage": 1, "commands": {}})
            continue
        stage = _last_stage(rec)
        evals = [e for e in rec.get("evals", []) if e.get("stage") == stage]
        rows.append({"trial": name, "status": rec["status"], "changes": rec.get("changes", {}), "evals": evals,
                     "wall_s": rec.get("wall_s"), "error": str(rec.get("error", ""))[:500],
                     "steps": _steps(d, name, stage), "stage": stage,
                     "commands": rec.get("commands") if isinstance(rec.get("commands"), dict) else {}})
    return info, rows


def final_value(row: dict):
    vals = [(e["step"], e.get("value")) for e in row["evals"] if _finite(e.get("value"))]
    return max(vals)[1] if vals else None


def best_row(rows: list[dict], mode: str) -> dict | None:
    scored = [r for r in rows if final_value(r) is not None]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda r: final_value(r))


def continue_command(row: dict) -> str:
    """The best trial's last stage, trained on: its own command with twice the steps (it resumes exactly)."""
    args = row["commands"].get(str(row["stage"]))
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        return ""
    more = max(2 * (row["steps"] or 0), 1)
    return shlex.join(["python", "-m", "stackgan_dist", "train", *args, f"train.max_steps={more}"])


def _table(info: dict, rows: list[dict]) -> tuple[list[str], list[list]]:
    metric = (info.get("metric") or {}).get("name", "metric")
    steps = sorted({e["step"] for r in rows for e in r["evals"]})
    head = ["trial", "changes", "status", "steps", *[f"{metric}@{s}" for s in steps], "wall_s", "error"]
    body = []
    for r in rows:
        at = {e["step"]: e.get("value") for e in r["evals"]}
        body.append([r["trial"], " ".join(f"{k}={json.dumps(v)}" for k, v in r["changes"].items()), r["status"],
                     "" if r["steps"] is None else r["steps"],
                     *["" if not _finite(at.get(s)) else round(at[s], 4) for s in steps],
                     "" if not _finite(r["wall_s"]) else round(r["wall_s"], 1), r["error"]])
    return head, body


def _md(head: list[str], body: list[list]) -> str:
    def cell(v) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(cell, head)) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in body]
    return "\n".join(lines) + "\n"


def _plot(info: dict, rows: list[dict], best: dict | None, d: str, out: str) -> str | None:
    try:
        import matplotlib
    except ImportError:
        raise UserError("stackgan sweep report needs matplotlib: pip install 'stackgan_dist[eval]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    metric = (info.get("metric") or {}).get("name", "metric")
    fig, (ax, axi) = plt.subplots(1, 2, figsize=(16, 7), dpi=100)
    for r in rows:
        pts = sorted((e["step"], e["value"]) for e in r["evals"] if _finite(e.get("value")))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3,
                    lw=2.2 if r is best else 1.0, label=f"{r['trial']} ({r['status']})")
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"{info.get('name', 'sweep')}: {metric} at each evaluation")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7, ncol=2)
    axi.axis("off")
    sample = latest_sample(os.path.join(d, best["trial"], f"stage{best['stage']}")) if best else None
    if sample:
        try:
            with Image.open(sample) as im:
                if im.width * im.height > MAX_SAMPLE_PIXELS:
                    sample = None
                else:
                    axi.imshow(im.convert("RGB"), interpolation="nearest")
                    axi.set_title(f"best trial {best['trial']}: {os.path.basename(sample)}")
        except (OSError, Image.DecompressionBombError):  # not an image we can show: the table still stands
            sample = None
    if not sample:
        axi.text(0.5, 0.5, "no sample grid of a best trial", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return sample


def make_sweep_report(d: str, out: str = "") -> dict:
    if not os.path.isdir(d):
        raise UserError(f"sweep directory not found: {d}")
    info, rows = collect(d)
    if not rows:
        raise UserError(f"{d} holds no trials yet")
    out = out or d
    os.makedirs(out, exist_ok=True)
    mode = (info.get("metric") or {}).get("mode", "max")
    best = best_row(rows, "min" if mode == "min" else "max")
    head, body = _table(info, rows)
    paths = {k: os.path.join(out, f"report.{k}") for k in ("csv", "md", "png")}
    with open(paths["csv"], "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(head)
        w.writerows(body)
    cmd = continue_command(best) if best else ""
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write(f"# Sweep {info.get('name', '')}\n\n{_md(head, body)}\n")
        if best:
            f.write(f"Best: {best['trial']} ({(info.get('metric') or {}).get('name')} {final_value(best)}). "
                    f"Continue it:\n\n    {cmd}\n")
    sample = _plot(info, rows, best, d, paths["png"])
    return {"out": paths, "trials": len(rows), "best": best["trial"] if best else None,
            "best_value": final_value(best) if best else None, "continue": cmd, "sample": sample,
            "status": {s: sum(r["status"] == s for r in rows) for s in sorted({r["status"] for r in rows})}}

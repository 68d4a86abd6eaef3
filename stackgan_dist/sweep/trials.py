"""Where a trial lives and what it records: SWEEP/tNNN/trial.json beside one normal run directory per stage
(SWEEP/tNNN/stage1, SWEEP/tNNN/stage2), and the ``stackgan train`` command line of each.

trial.json is written atomically (temporary file, fsync, rename): a reader never sees half a record, and a
killed writer leaves the previous one. It is read back as untrusted input (a damaged file counts as no record;
the run directories, not trial.json, decide what is finished).
"""
from __future__ import annotations

import json
import os
import sys
import time

from ..checkpoint.manager import list_checkpoints, verify
from ..errors import UserError
from .spec import Sweep, Trial

RECORD = "trial.json"
MAX_RECORD_BYTES = 4 << 20
PENDING, RUNNING, FINISHED, FAILED, STOPPED = "pending", "running", "finished", "failed", "stopped early"
STATUSES = (PENDING, RUNNING, FINISHED, FAILED, STOPPED)


def trial_dir(sweep: Sweep, trial: Trial) -> str:
    return os.path.join(sweep.dir, trial.name)


def run_dir(sweep: Sweep, trial: Trial, stage: int) -> str:
    return os.path.join(trial_dir(sweep, trial), f"stage{stage}")


def stage_args(sweep: Sweep, trial: Trial, stage: int, max_steps: int | None = None) -> list[str]:
    """``stackgan train`` arguments for one stage of a trial: the base config, the trial's overrides, then what
    the sweep fixes (run directory, stage, each trial's Stage-II on its own Stage-I)."""
    args = [sweep.bases[stage], *sweep.stage_overrides(trial, stage), f"run.dir={run_dir(sweep, trial, stage)}",
            f"model.stage={stage}"]
    if stage == 2 and 1 in sweep.stages:
        args.append(f"model.stage1_checkpoint={run_dir(sweep, trial, 1)}")
    if max_steps is not None:
        args.append(f"train.max_steps={max_steps}")
    return args


def train_command(sweep: Sweep, trial: Trial, stage: int, max_steps: int | None = None) -> list[str]:
    return [sys.executable, "-m", "stackgan_dist", "train", *stage_args(sweep, trial, stage, max_steps)]


def stage_config(sweep: Sweep, trial: Trial, stage: int):
    from ..config import load_config

    return load_config(sweep.bases[stage], stage_args(sweep, trial, stage)[1:])


def run_finished(sweep: Sweep, trial: Trial, stage: int) -> bool:
    """The stage's run holds a valid checkpoint at its stop rule: the same check `stackgan train --dry-run`
    makes (it reads, never writes). Anything that stops the check (no run yet, no Stage-I) means unfinished."""
    from ..train import dry_run_checks

    if not list_checkpoints(os.path.join(run_dir(sweep, trial, stage), "checkpoints")):
        return False
    try:
        return bool(dry_run_checks(stage_config(sweep, trial, stage))["finished"])
    except UserError:
        return False


def trial_finished(sweep: Sweep, trial: Trial) -> bool:
    return all(run_finished(sweep, trial, s) for s in sweep.stages)


def checkpoints(sweep: Sweep, trial: Trial, stage: int) -> list[tuple[int, str]]:
    """(step, path) of the stage's valid checkpoints, oldest first."""
    root = os.path.join(run_dir(sweep, trial, stage), "checkpoints")
    return sorted((s, p) for s, p in list_checkpoints(root) if verify(p)[0])


def new_record(sweep: Sweep, trial: Trial) -> dict:
    return {"trial": trial.name, "index": trial.index, "changes": trial.changes, "status": PENDING,
            "stages": list(sweep.stages), "error": "", "evals": [], "wall_s": 0.0, "attempts": 0,
            "commands": {str(s): stage_args(sweep, trial, s) for s in sweep.stages}}


def read_record(sweep: Sweep, trial: Trial) -> dict:
    """The trial's record, or a new one where there is none or it cannot be trusted."""
    rec = load_record(os.path.join(trial_dir(sweep, trial), RECORD))
    fresh = new_record(sweep, trial)
    if rec is None or rec.get("changes") != json.loads(json.dumps(trial.changes)):
        return fresh  # another sweep's trial of the same name: its record says nothing about this one
    fresh.update({k: rec[k] for k in ("status", "error", "evals", "wall_s", "attempts") if k in rec})
    slurm = rec.get("slurm")
    if isinstance(slurm, dict) and isinstance(slurm.get("task"), int) and isinstance(slurm.get("jobs"), list) \
            and all(isinstance(j, str) and j.isdigit() for j in slurm["jobs"]):
        fresh["slurm"] = {"jobs": slurm["jobs"], "task": slurm["task"]}
    return fresh


def load_record(path: str) -> dict | None:
    """A trial.json as a dict, or None when it is missing, too large, not JSON or not of the expected shape."""
    try:
        if os.path.getsize(path) > MAX_RECORD_BYTES:
            return None
        with open(path, encoding="utf-8") as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return None
    ok = (isinstance(rec, dict) and rec.get("status") in STATUSES and isinstance(rec.get("evals", []), list)
          and isinstance(rec.get("changes", {}), dict) and isinstance(rec.get("wall_s", 0.0), (int, float))
          and all(isinstance(e, dict) and isinstance(e.get("step"), int) and isinstance(e.get("stage"), int)
                  for e in rec.get("evals", [])))
    return rec if ok else None


def write_record(sweep: Sweep, trial: Trial, rec: dict) -> None:
    d = trial_dir(sweep, trial)
    os.makedirs(d, exist_ok=True)
    rec["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    path = os.path.join(d, RECORD)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(rec, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def metric_at(rec: dict, stage: int, step: int):
    for e in rec.get("evals", []):
        if e.get("stage") == stage and e.get("step") == step:
            return e.get("value")
    return None


def rung_values(sweep: Sweep, stage: int, step: int) -> list[float]:
    """The metric of every trial of the sweep that was evaluated at (stage, step), from their records."""
    out = []
    for t in sweep.trials:
        v = metric_at(read_record(sweep, t), stage, step)
        if isinstance(v, (int, float)):
            out.append(float(v))
    return out


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:500] if lines else ""

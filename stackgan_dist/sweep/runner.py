"""One trial, start to end: each stage's ``stackgan train`` in its own process, the metric at checkpoints, the
halving rule at rungs, and the trial's record. ``--on local`` runs this in a thread per trial, ``--on ray``
inside a Tune trial; ``--on slurm`` runs the same ``train`` commands through slurm/train.sbatch instead.

A process per stage (not ``run_training`` in this process) because a Ray trial's function runs in a thread,
where the trainer cannot install its signal handlers, and because a crash or a non-finite loss then ends one
trial, not the sweep. The child dies with its parent (PR_SET_PDEATHSIG): a lost Ray trial leaves no orphan
holding the run's lock when Tune restarts it.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time

from .halving import keep_going, segments
from .spec import Sweep, Trial
from .trials import (FAILED, FINISHED, RUNNING, STOPPED, checkpoints, last_line, metric_at, read_record,
                     rung_values, run_dir, stage_config, train_command, trial_dir, write_record)

CAPTION_KEYS = ("color_accuracy", "shape_accuracy", "size_accuracy")


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def child_env(extra: dict | None = None, cpus: int = 1) -> dict:
    """The environment of a trial's processes: this one's, one intra-op thread pool of ``cpus`` (the same on
    every launcher: results are bitwise equal only at equal thread counts), and this checkout on PYTHONPATH."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["OMP_NUM_THREADS"] = str(cpus)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def run_logged(cmd: list[str], log_base: str, env: dict, cwd: str) -> tuple[int, str]:
    """Runs ``cmd``, stdout and stderr appended to LOG.out / LOG.err. -> (exit code, last stderr line of this
    attempt)."""
    err_path = log_base + ".err"
    start = os.path.getsize(err_path) if os.path.exists(err_path) else 0
    with open(log_base + ".out", "ab") as out, open(err_path, "ab") as err:
        p = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=cwd, preexec_fn=_die_with_parent)
        try:
            rc = p.wait()
        except BaseException:
            p.kill()
            p.wait()
            raise
    with open(err_path, "rb") as f:
        f.seek(start)
        text = f.read().decode("utf-8", "replace")
    return rc, last_line(text)


def eval_command(sweep: Sweep, stage: int, ckpt: str, out: str, data: str) -> list[str]:
    m = sweep.metric
    metrics = "fid" if m.name.startswith("fid") else "is" if m.name.startswith("is") else "caption"
    return [sys.executable, "-m", "stackgan_dist", "eval", ckpt, "--data", data, "--metrics", metrics, "--out", out,
            "--stage", str(stage), "--num-samples", str(m.num_samples), "--seed", str(m.eval_seed)]


def evaluate(sweep: Sweep, trial: Trial, stage: int, step: int, ckpt: str, env: dict, cwd: str, data: str) -> dict:
    """The sweep's metric of one checkpoint (``stackgan eval`` in its own process). -> an eval entry."""
    d = os.path.join(trial_dir(sweep, trial), "evals")
    os.makedirs(d, exist_ok=True)
    out = os.path.join(d, f"stage{stage}_step{step:08d}.json")
    rc, line = run_logged(eval_command(sweep, stage, ckpt, out, data), os.path.join(d, "eval"), env, cwd)
    entry = {"stage": stage, "step": step, "value": None}
    if rc != 0:
        entry["error"] = line or f"stackgan eval exited {rc}"
        return entry
    try:
        with open(out, encoding="utf-8") as f:
            res = json.load(f)
        v = res.get(sweep.metric.name) if isinstance(res, dict) else None
        entry["value"] = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
        if entry["value"] is None:
            entry["error"] = f"stackgan eval gave no '{sweep.metric.name}'"
    except (OSError, ValueError) as e:
        entry["error"] = f"cannot read {out}: {e}"
    return entry


class TrialRunner:
    """Runs one trial; ``report(step, value)`` (Ray Tune) is called after each evaluation of the last stage.
    ``halve``: apply the halving rule here (local); under Tune the ASHA scheduler decides instead."""

    def __init__(self, sweep: Sweep, trial: Trial, cwd: str, env: dict, report=None, halve: bool = True):
        self.sweep, self.trial, self.cwd, self.env, self.report, self.halve = sweep, trial, cwd, env, report, halve

    def _save(self, rec: dict, t0: float) -> None:
        rec["wall_s"] = round(self.wall0 + time.monotonic() - t0, 3)
        write_record(self.sweep, self.trial, rec)

    def run(self) -> dict:
        sweep, trial = self.sweep, self.trial
        rec = read_record(sweep, trial)
        self.wall0 = float(rec.get("wall_s", 0.0))
        t0 = time.monotonic()
        rec.update(status=RUNNING, error="", attempts=int(rec.get("attempts", 0)) + 1)
        self._save(rec, t0)
        last = sweep.stages[-1]
        for stage in sweep.stages:
            cfg = stage_config(sweep, trial, stage)
            rungs = sweep.early_stop.rungs if sweep.early_stop and stage == last else None
            segs = segments(cfg.train.max_steps, rungs) if rungs else [None]
            data = (sweep.metric.data or cfg.data.test) if sweep.metric else ""
            for seg in segs:
                log = os.path.join(trial_dir(sweep, trial), f"stage{stage}")
                rc, line = run_logged(train_command(sweep, trial, stage, seg), log, self.env, self.cwd)
                if rc != 0:
                    why = line or f"stackgan train exited {rc}"
                    rec.update(status=FAILED, error=f"stage {stage}: {why} (exit {rc})")
                    self._save(rec, t0)
                    return rec
                if seg is None or not sweep.metric or stage != last:
                    continue
                value = metric_at(rec, stage, seg)
                if value is None:  # a rerun does not score a rung twice
                    value = self._eval_at(rec, stage, seg, data)
                    self._save(rec, t0)
                if self.report is not None:
                    self.report(seg, value)
                if self.halve and seg != segs[-1] and not keep_going(rung_values(sweep, stage, seg), value,
                                                                     sweep.early_stop.eta, sweep.metric.mode):
                    rec.update(status=STOPPED, error=f"stopped at step {seg}: {sweep.metric.name} {value} "
                                                     f"outside the top 1/{sweep.early_stop.eta} at this rung")
                    self._save(rec, t0)
                    return rec
            if sweep.metric and stage == last:  # the curve: every kept checkpoint not scored yet
                for step, ck in checkpoints(sweep, trial, stage):
                    if metric_at(rec, stage, step) is None:
                        v = self._eval_at(rec, stage, step, data, ck)
                        if self.report is not None and step == cfg.train.max_steps and segs == [None]:
                            self.report(step, v)
                self._save(rec, t0)
        rec.update(status=FINISHED, error="")
        self._save(rec, t0)
        return rec

    def _eval_at(self, rec: dict, stage: int, step: int, data: str, ck: str | None = None):
        ck = ck or os.path.join(run_dir(self.sweep, self.trial, stage), "checkpoints", f"step_{step:08d}")
        entry = evaluate(self.sweep, self.trial, stage, step, ck, self.env, self.cwd, data)
        rec["evals"] = sorted([e for e in rec["evals"] if (e["stage"], e["step"]) != (stage, step)] + [entry],
                              key=lambda e: (e["stage"], e["step"]))
        return entry["value"]


def run_local(sweep: Sweep, trials: list[Trial], parallel: int, cwd: str, env: dict) -> list[dict]:
    """``--on local``: ``parallel`` trials at a time on this machine, each in its own processes."""
    from concurrent.futures import ThreadPoolExecutor

    def one(t: Trial) -> dict:
        rec = TrialRunner(sweep, t, cwd, env).run()
        print(f"sweep: {t.name} {rec['status']}{': ' + rec['error'] if rec['error'] else ''}", flush=True)
        return rec

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        return list(pool.map(one, trials))

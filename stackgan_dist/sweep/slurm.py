"""``--on slurm``: ONE job array per stage, ``sbatch --array=0-(n-1)%N``, each task a trial's stage run through
slurm/train.sbatch (requeue on the warning signal, preemption, restarts bounded by checkpoint.max_restarts).

The array index picks the trial: ``SWEEP/slurm/stageS/K.args`` holds task K's ``stackgan train`` arguments, and
array_task.sh hands them to train.sbatch. A two-stage sweep submits the Stage-II array with
``--dependency=aftercorr:STAGE1``: task K of Stage-II starts once task K of Stage-I completed, so each
trial's Stage-II chains on its own Stage-I without waiting for the other trials. train.sbatch's own #SBATCH
options are passed on the sbatch command line (a script run by another script's sbatch ignores its own).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time

from ..checkpoint.files import open_read
from ..errors import TransientError, UserError
from .runner import evaluate
from .spec import Sweep
from .trials import (FAILED, FINISHED, RUNNING, checkpoints, last_line, metric_at, read_record, stage_args,
                     stage_config, trial_finished, write_record)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_SBATCH = os.path.join(ROOT, "slurm", "train.sbatch")
ARRAY_TASK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "array_task.sh")
# set per array here (the rest of train.sbatch's directives are passed on as they are)
OWN = ("--output", "--error", "--job-name", "--cpus-per-task", "--array", "--dependency")


def script_directives(path: str = TRAIN_SBATCH) -> list[str]:
    """The ``#SBATCH`` options of train.sbatch (requeue, warning signal, append mode, time...)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            m = re.match(r"#SBATCH\s+(\S+)", line)
            if m and not m.group(1).split("=")[0] in OWN:
                out.append(m.group(1))
    return out


def _sh(cmd: list[str], env: dict | None = None, timeout: float = 60) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except FileNotFoundError:
        raise UserError(f"{cmd[0]} not found: --on slurm needs the Slurm client tools on this machine") from None
    except subprocess.TimeoutExpired:
        raise TransientError(f"{' '.join(cmd[:2])} did not answer within {timeout:.0f}s") from None
    if p.returncode != 0:
        raise UserError(f"{' '.join(cmd[:2])} failed: {last_line(p.stderr) or p.returncode}")
    return p.stdout


def submit(sweep: Sweep, trials, cwd: str, env: dict, parallel: int, cpus: int, extra: list[str]) -> list[str]:
    """Writes each task's arguments and submits the arrays. -> job ids, one per stage."""
    base = os.path.join(sweep.dir, "slurm")
    env = dict(env)
    env.setdefault("STACKGAN_PYTHON", sys.executable)
    jobs: list[str] = []
    for stage in sweep.stages:
        d = os.path.join(base, f"stage{stage}")
        os.makedirs(d, exist_ok=True)
        for k, t in enumerate(trials):
            args = stage_args(sweep, t, stage)
            if any("\n" in a for a in args):
                raise UserError(f"trial {t.name}: an argument holds a newline, which a Slurm task cannot be given")
            with open(os.path.join(d, f"{k}.args"), "w", encoding="utf-8") as f:
                f.write("".join(a + "\n" for a in args))
        with open(os.path.join(d, "tasks.txt"), "w", encoding="utf-8") as f:
            f.write("".join(f"{k} {t.name}\n" for k, t in enumerate(trials)))
        cmd = ["sbatch", "--parsable", f"--chdir={cwd}", *script_directives(), f"--cpus-per-task={cpus}",
               f"--array=0-{len(trials) - 1}%{max(1, parallel)}", f"--job-name=sweep-{sweep.name}-s{stage}",
               f"--output={d}/%a.out", f"--error={d}/%a.err", *extra]
        if jobs:
            cmd.append(f"--dependency=aftercorr:{jobs[-1]}")
        jid = _sh([*cmd, ARRAY_TASK, TRAIN_SBATCH, d], env=env).strip().split(";")[0]
        jobs.append(jid)
        print(f"sweep: stage {stage}: job array {jid} ({len(trials)} tasks, at most {parallel} at once)", flush=True)
    return jobs


def live_jobs(jobs) -> list[str]:
    """Those of ``jobs`` with a task still pending or running (requeued tasks included)."""
    jobs = sorted(set(jobs))
    if not jobs:
        return []
    p = subprocess.run(["squeue", "-h", "-r", "-j", ",".join(jobs), "-o", "%A %F"], capture_output=True, text=True,
                       timeout=60)
    alive = {f for line in p.stdout.splitlines() for f in line.split()}  # task ids and array job ids
    return [j for j in jobs if j in alive]


def wait_jobs(jobs: list[str], poll: float = 2.0) -> None:
    while live_jobs(jobs):
        time.sleep(poll)


# train.sbatch's own lines in a task's .out: one "restart N" line when an incarnation starts, one "training
# exited" line when its training ends (a hard kill leaves the first alone: that incarnation is not counted)
_START = re.compile(r"^\[(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)\] job \S+ restart \d+:")
_END = re.compile(r"^\[(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)\] training exited with ")
MAX_OUT_BYTES = 4 << 20  # the tail of a task log read for its times


def _tail(path: str, limit: int) -> str:
    """The last ``limit`` bytes of a task log as text; "" when absent, unreadable, or not a regular file (a
    planted FIFO or link is never opened)."""
    try:
        f = open_read(path, "task log")
    except (UserError, OSError):
        return ""
    if f is None:
        return ""
    with f:
        size = os.fstat(f.fileno()).st_size
        f.seek(max(0, size - limit))
        return f.read(limit).decode("utf-8", "replace")


def task_times(path: str) -> tuple[float, int]:
    """(wall seconds, incarnations) of an array task from the lines train.sbatch writes into its .out (all
    its incarnations and reruns append there): the sum of start-to-exit spans, and how many started."""
    import calendar

    text = _tail(path, MAX_OUT_BYTES)
    wall, starts, began = 0.0, 0, None
    for line in text.splitlines():
        m = _START.match(line)
        if m:
            starts += 1
            began = calendar.timegm(time.strptime(m.group(1), "%Y-%m-%dT%H:%M:%SZ"))
            continue
        m = _END.match(line)
        if m and began is not None:
            wall += max(0.0, calendar.timegm(time.strptime(m.group(1), "%Y-%m-%dT%H:%M:%SZ")) - began)
            began = None
    return wall, starts


def collect(sweep: Sweep, trials, cwd: str, env: dict) -> list[dict]:
    """After the arrays ended: each trial's status from its run directories, its failure line from the task's
    stderr, and the metric at its kept checkpoints."""
    out = []
    last = sweep.stages[-1]
    for k, t in enumerate(trials):
        rec = read_record(sweep, t)
        task = rec.get("slurm", {}).get("task", k)  # the array index this trial ran as
        times = [task_times(os.path.join(sweep.dir, "slurm", f"stage{s}", f"{task}.out")) for s in sweep.stages]
        rec.update(wall_s=round(sum(w for w, _ in times), 3), attempts=max(n for _, n in times))
        if trial_finished(sweep, t):
            rec.update(status=FINISHED, error="")
            if sweep.metric:
                cfg = stage_config(sweep, t, last)
                for step, ck in checkpoints(sweep, t, last):
                    if metric_at(rec, last, step) is None:
                        rec["evals"] = sorted(rec["evals"] + [evaluate(sweep, t, last, step, ck, env, cwd,
                                                                       sweep.metric.data or cfg.data.test)],
                                              key=lambda e: (e["stage"], e["step"]))
        else:
            line = ""
            for stage in sweep.stages:
                text = _tail(os.path.join(sweep.dir, "slurm", f"stage{stage}", f"{task}.err"), 65536)
                # training's own line, not srun's "task 0: Exited with exit code 2" after it
                line = last_line("\n".join(ln for ln in text.splitlines() if not ln.startswith("srun:"))) or line
            rec.update(status=FAILED, error=line or "the array task ended with the run unfinished")
        write_record(sweep, t, rec)
        print(f"sweep: {t.name} {rec['status']}{': ' + rec['error'] if rec['error'] else ''}", flush=True)
        out.append(rec)
    return out


def run_slurm(sweep: Sweep, trials, cwd: str, env: dict, parallel: int, cpus: int, extra: list[str],
              wait: bool = True) -> list[dict] | None:
    if sweep.early_stop:
        raise UserError("early_stop is not available --on slurm (it runs --on local and --on ray); remove it or "
                        "run the sweep there")
    # trials whose arrays still run (a rerun after --no-wait): wait for them, never submit them twice (two
    # processes on one run directory: the second is refused by the run's lock and the trial would fail)
    running = {t.name: read_record(sweep, t).get("slurm", {}).get("jobs", []) for t in trials}
    live = live_jobs(j for jobs in running.values() for j in jobs)
    if live:
        print(f"sweep: job arrays {', '.join(live)} of this sweep still run; waiting for them", flush=True)
        if not wait:
            return None
        wait_jobs(live)
        return collect(sweep, [t for t in trials if set(running[t.name]) & set(live)], cwd, env)
    jobs = submit(sweep, trials, cwd, env, parallel, cpus, extra)
    for k, t in enumerate(trials):
        rec = read_record(sweep, t)
        rec.update(status=RUNNING, error="", slurm={"jobs": jobs, "task": k})
        write_record(sweep, t, rec)
    if not wait:
        return None
    wait_jobs(jobs)
    return collect(sweep, trials, cwd, env)

"""``stackgan sweep SWEEP.yaml [--on local|slurm|ray] [--dry-run] [key=value ...]`` and
``stackgan sweep report DIR``.

Running the same command again finishes what is unfinished and touches nothing finished (a trial is finished
when each stage's run holds a valid checkpoint at its stop rule). Exit codes: 0 every trial finished (or was
stopped early by the halving rule), 1 some trial failed (each named with its one line), 2 a bad sweep file or
command line, 75 a transient failure of the launcher.
"""
from __future__ import annotations

import argparse
import json
import os

from .spec import Sweep, SweepError, load_sweep
from .trials import FAILED, STOPPED, trial_finished

SWEEP_RECORD = "sweep.json"


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(prog="stackgan sweep", formatter_class=fmt,
                                description="Run many trials of a config (grid / random / seeds) and compare them; "
                                            "`stackgan sweep report DIR` tabulates a sweep (docs/sweeps.md)")
    p.add_argument("sweep", help="sweep YAML, e.g. configs/sweeps/demo-seeds.yaml")
    p.add_argument("overrides", nargs="*", help="key=value applied to every trial (stage1.KEY / stage2.KEY: one stage)")
    p.add_argument("--dry-run", action="store_true", help="list the trials and what each changes; run nothing")
    p.add_argument("--on", choices=("local", "slurm", "ray"), default="local", help="where the trials run")
    p.add_argument("--parallel", type=int, default=1, help="trials at once (Slurm: the array's %%N)")
    p.add_argument("--cpus-per-trial", type=int, default=1, help="CPUs (and intra-op threads) of each trial")
    p.add_argument("--gpus-per-trial", type=float, default=0, help="--on ray: GPUs per trial")
    p.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS", "auto"), help="--on ray: GCS address")
    p.add_argument("--max-failures", type=int, default=2, help="--on ray: restarts of a crashed or lost trial")
    p.add_argument("--sbatch-arg", action="append", default=[], help="--on slurm: an extra sbatch option (repeat)")
    p.add_argument("--no-wait", action="store_true", help="--on slurm: submit and return (rerun to collect)")
    return p


def report_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stackgan sweep report",
                                description="one table (CSV, markdown) and one PNG of a sweep's trials")
    p.add_argument("dir", help="the sweep directory")
    p.add_argument("--out", default="", help="where report.csv / report.md / report.png go (default DIR)")
    return p


def _describe(sweep: Sweep) -> dict:
    return {"name": sweep.name, "file": os.path.abspath(sweep.path), "bases": {str(k): v for k, v in sweep.bases.items()},
            "stages": list(sweep.stages), "overrides": sweep.overrides, "seed": sweep.seed,
            "metric": sweep.metric.__dict__ if sweep.metric else None,
            "early_stop": {"rungs": list(sweep.early_stop.rungs), "eta": sweep.early_stop.eta} if sweep.early_stop else None,
            "trials": [{"trial": t.name, "changes": t.changes} for t in sweep.trials]}


def _claim_dir(sweep: Sweep) -> None:
    """SWEEP/sweep.json: what this directory's trials are. Another sweep's directory is refused, so that trials
    of the same name never resume each other's runs."""
    desc = json.loads(json.dumps(_describe(sweep), default=str))
    path = os.path.join(sweep.dir, SWEEP_RECORD)
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = None
        same = isinstance(old, dict) and all(old.get(k) == desc[k] for k in ("bases", "stages", "overrides", "trials"))
        if not same:
            raise SweepError(f"{sweep.dir} holds another sweep (its {SWEEP_RECORD} differs in trials, bases or "
                             "overrides); give this sweep its own dir")
        return
    os.makedirs(sweep.dir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(desc, f, indent=1)
    os.replace(tmp, path)


def dry_run(sweep: Sweep) -> int:
    print(f"sweep {sweep.name}: {len(sweep.trials)} trials, stage {'+'.join(map(str, sweep.stages))}, dir {sweep.dir}")
    if sweep.overrides:
        print(f"every trial: {' '.join(sweep.overrides)}")
    for t in sweep.trials:
        what = " ".join(f"{k}={json.dumps(v)}" for k, v in t.changes.items()) or "(the base config)"
        print(f"{t.name}  {what}")
    return 0


def run(a) -> int:
    from .runner import child_env

    for name, v in (("--parallel", a.parallel), ("--cpus-per-trial", a.cpus_per_trial)):
        if v < 1:
            raise SweepError(f"{name} must be >= 1, got {v}")
    sweep = load_sweep(a.sweep, a.overrides)
    if a.dry_run:
        return dry_run(sweep)
    _claim_dir(sweep)
    todo = []
    for t in sweep.trials:
        if trial_finished(sweep, t):
            print(f"sweep: {t.name} finished (left as it is)", flush=True)
        else:
            todo.append(t)
    cwd, env = os.getcwd(), child_env(cpus=a.cpus_per_trial)
    recs: list[dict] | None = []
    if todo and a.on == "local":
        from .runner import run_local

        recs = run_local(sweep, todo, a.parallel, cwd, env)
    elif todo and a.on == "slurm":
        from .slurm import run_slurm

        recs = run_slurm(sweep, todo, cwd, env, a.parallel, a.cpus_per_trial, a.sbatch_arg, wait=not a.no_wait)
        if recs is None:
            print(f"sweep: submitted; run the same command again to collect the results into {sweep.dir}")
            return 0
    elif todo:
        from .ray_tune import run_ray

        recs = run_ray(sweep, todo, cwd, env, a.ray_address, a.parallel, a.cpus_per_trial, a.gpus_per_trial,
                       a.max_failures)
    failed = [r for r in recs if r["status"] == FAILED]
    stopped = [r for r in recs if r["status"] == STOPPED]
    print(f"sweep {sweep.name}: {len(sweep.trials) - len(failed) - len(stopped)} finished, {len(stopped)} stopped early, "
          f"{len(failed)} failed; `stackgan sweep report {sweep.dir}` compares them", flush=True)
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    if argv and argv[0] == "report":
        a = report_parser().parse_args(argv[1:])
        from .report import make_sweep_report

        print(json.dumps(make_sweep_report(a.dir, a.out), indent=1))
        return 0
    parser = build_parser()
    a, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides may come after flags, as with `stackgan train`
        if not all("=" in x and not x.startswith("-") for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        a.overrides = list(a.overrides) + extra
    return run(a)

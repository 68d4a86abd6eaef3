"""``--on ray``: one Ray Tune trial per sweep trial, each running the same ``TrialRunner`` as ``--on local``.

- Resources per trial: ``tune.with_resources`` (``--cpus-per-trial``, ``--gpus-per-trial``); at most
  ``--parallel`` trials at once.
- Restarts: ``FailureConfig(max_failures)``. A restarted trial calls the runner again, which resumes every
  stage from the trial's OWN run directory (its checkpoints), never from a Tune checkpoint: Tune stores none.
  A user error (exit 2) is not retried: relaunching fails the same way.
- Early stopping: Tune's ``ASHAScheduler`` (time_attr "step", grace_period = the first rung, reduction_factor
  = eta, max_t = the stop step) on the metric the runner reports after each evaluation at a rung.
- Workers import this checkout: the driver passes its PYTHONPATH in the job's runtime_env (Ray workers do not
  inherit the shell's environment).
"""
from __future__ import annotations

import math
import os
import time

from ..errors import UserError
from .runner import TrialRunner
from .spec import Sweep
from .trials import FAILED, FINISHED, RUNNING, STOPPED, read_record, stage_config, trial_finished, write_record


class TrialCrashed(RuntimeError):
    """A trial's process died of something other than a user error: Tune may retry it (it resumes)."""


def _trainable(config: dict, sweep: Sweep, cwd: str, env: dict) -> None:
    from ray import tune

    trial = sweep.trials[config["trial"]]
    os.chdir(cwd)  # Tune starts a trial in its own folder; the sweep's relative paths mean the driver's cwd

    def report(step: int, value) -> None:
        tune.report({"step": step, "metric": value if value is not None else math.nan})

    rec = TrialRunner(sweep, trial, cwd, env, report=report, halve=False).run()
    if rec["status"] == FAILED and "(exit 2)" not in rec["error"]:
        raise TrialCrashed(rec["error"])


def run_ray(sweep: Sweep, trials, cwd: str, env: dict, address: str, parallel: int, cpus: float, gpus: float,
            max_failures: int) -> list[dict]:
    import ray
    from ray import tune

    ray.init(address=address, runtime_env={"env_vars": {k: env[k] for k in ("PYTHONPATH", "OMP_NUM_THREADS")}},
             log_to_driver=True, ignore_reinit_error=True)
    scheduler = None
    if sweep.early_stop:
        from ray.tune.schedulers import ASHAScheduler

        max_t = stage_config(sweep, trials[0], sweep.stages[-1]).train.max_steps
        scheduler = ASHAScheduler(time_attr="step", metric="metric", mode=sweep.metric.mode, max_t=max_t,
                                  grace_period=sweep.early_stop.rungs[0], reduction_factor=sweep.early_stop.eta)
    fn = tune.with_parameters(_trainable, sweep=sweep, cwd=cwd, env=env)
    fn = tune.with_resources(fn, {"cpu": cpus} | ({"gpu": gpus} if gpus else {}))
    tuner = tune.Tuner(
        fn, param_space={"trial": tune.grid_search([t.index for t in trials])},
        tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=max(1, parallel), reuse_actors=False),
        run_config=tune.RunConfig(name=f"tune-{time.strftime('%Y%m%dT%H%M%S')}",
                                  storage_path=os.path.join(sweep.dir, "ray"), verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=max_failures)))
    try:
        grid = tuner.fit()
    except Exception as e:  # noqa: BLE001 -- the experiment itself could not run: one line
        raise UserError(f"Ray Tune could not run the sweep: {str(e).strip().splitlines()[-1][:300]}") from None
    errors = {}
    for r in grid:
        if r.error is not None and r.config:
            errors[r.config["trial"]] = (str(r.error).strip().splitlines() or ["error"])[-1][:300]
    out = []
    for t in trials:
        rec = read_record(sweep, t)
        if trial_finished(sweep, t):
            rec.update(status=FINISHED, error="")
        elif rec["status"] in (RUNNING, "pending"):
            # ended by Tune mid-run: by ASHA (no error) or after max_failures restarts
            if t.index in errors:
                rec.update(status=FAILED, error=rec["error"] or errors[t.index])
            else:
                rec.update(status=STOPPED if sweep.early_stop else FAILED,
                           error="stopped by ASHA" if sweep.early_stop else "ended by Ray Tune unfinished")
        write_record(sweep, t, rec)
        print(f"sweep: {t.name} {rec['status']}{': ' + rec['error'] if rec['error'] else ''}", flush=True)
        out.append(rec)
    return out

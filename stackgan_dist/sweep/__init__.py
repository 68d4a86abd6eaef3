"""Sweeps: many trials of one config, run as a Slurm job array, Ray Tune trials or local processes, each trial a
normal, exactly resumable run directory, compared in one report (docs/sweeps.md).

spec.py (sweep file -> trials, pure) -> trials.py (where a trial lives, trial.json) -> runner.py (one trial:
train processes, metric, halving rule; --on local) | slurm.py (--on slurm) | ray_tune.py (--on ray) ->
report.py (table and PNG). halving.py: the successive-halving rule, pure.
"""

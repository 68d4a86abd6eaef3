"""Training entry point: config -> start checks and plan -> Trainer.build() -> train(); always tears down
the process group.

Every launcher (plain process, torchrun, srun, submitit, Ray Train) ends up calling ``run_training``; a dry
run (``stackgan train --dry-run``, launchers before they submit) calls ``dry_run_checks``, which runs the
same start checks (start.py) and returns the same plan, printed as JSON.
"""
from __future__ import annotations

from .config import Config
from .distributed.env import DistEnv, init_distributed, planned_env, teardown
from .observability.logging import setup_logging
from .trainer import Trainer


def run_training(cfg: Config, fresh: bool = False, on_checkpoint=None) -> dict:
    """``on_checkpoint(path, step, env)``: called on every rank after each committed checkpoint (see Trainer)."""
    env = init_distributed(cfg.train.device, cfg.train.dist_timeout_s, cfg.train.dist_startup_timeout_s,
                           need_group=cfg.train.backend == "deepspeed")  # DeepSpeed wants a group even for one
    setup_logging(env.rank, cfg.log.level)
    done = False
    try:
        trainer = Trainer(cfg, env, fresh=fresh, on_checkpoint=on_checkpoint)
        trainer.build()
        result = trainer.train()
        done = True
        return result
    finally:
        teardown(env, synchronize=done)


def dry_run_checks(cfg: Config, fresh: bool = False, env: DistEnv | None = None) -> dict:
    """Every check a start makes (start.check_start: config, data and its text_dim, run directory and lock,
    resume compatibility, the plan's batch split and stop rule, the Stage-I checkpoint, the loader's share,
    precision on the device), without forming a process group and without writing anything. ``env``: the
    layout to check for (default: this process's, as a launcher set it up; ``planned_env`` plans another,
    e.g. a CUDA layout from a login node). -> the plan and a summary; raises the UserError a real start
    would raise."""
    env = env or planned_env(cfg.train.device)
    t = Trainer(cfg, env, fresh=fresh, dry_run=True)
    plan = t.check_start()  # tests the run's lock without taking it: a live run's own start is never blocked
    c = t.cfg
    return plan.to_dict() | {
        "launcher": env.launcher, "world_size": env.world_size, "device": str(env.device), "run_dir": c.run.dir,
        "text_dim": c.model.text_dim, "train_samples": t.data.num_samples,
        "test_samples": t.test_data.num_samples if t.test_data else 0, "finished": plan.finished,
        "stage1_checkpoint": t.stage1.ref if t.stage1 else None, "banner": plan.banner(), "config": c.to_dict()}

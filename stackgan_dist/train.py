"""Training entry point: config -> Trainer(cfg).train(); always tears down the process group.

Every launcher (plain process, torchrun, srun, submitit, Ray Train) ends up calling ``run_training``.
"""
from __future__ import annotations

from .config import Config
from .distributed.env import DistEnv, init_distributed, probe_env, teardown
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
    """Every check a start makes (``Trainer.check_start``: config, data and its text_dim, run directory and
    lock, resume compatibility, the Stage-I checkpoint, precision on the device), without forming a process
    group and without writing anything. ``env``: the layout to check for (default: this process's, as a
    launcher set it up). -> a summary; raises the UserError a real start would raise."""
    env = env or probe_env(cfg.train.device)
    t = Trainer(cfg, env, fresh=fresh, dry_run=True)
    try:
        t.check_start()
    finally:
        lock = getattr(t, "lock", None)
        if lock is not None:
            lock.release()  # the check may have taken an existing lock file's lock for a moment
    return {"launcher": env.launcher, "world_size": env.world_size, "device": str(env.device),
            "batch_per_worker": cfg.train.batch_size, "grad_accum": cfg.train.grad_accum,
            "global_batch": t.global_batch, "run_dir": cfg.run.dir, "text_dim": cfg.model.text_dim,
            "train_samples": t.data.num_samples, "test_samples": t.test_data.num_samples if t.test_data else 0,
            "resume_from": t.resume_from, "finished": t.finished_at is not None,
            "stage1_checkpoint": getattr(t, "stage1_ref", "") or None, "config": cfg.to_dict()}

"""Training entry point: config -> Trainer(cfg).train(); always tears down the process group.

Every launcher (plain process, torchrun, srun, submitit, Ray Train) ends up calling ``run_training``.
"""
from __future__ import annotations

from .config import Config
from .distributed.env import init_distributed, teardown
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

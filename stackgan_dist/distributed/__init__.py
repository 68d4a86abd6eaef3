"""Process group, seeding and model wrapping: the only place that knows about torch.distributed.

The interface the rest of the package uses is imported from here (the modules behind it may move):
``make_strategy``, ``Strategy``/``Phase`` (``strategy.py``), ``unwrap``, ``set_requires_grad`` and
``refuse_cpu_amp`` (``amp.py``). Files: env.py (the process group), strategy.py (the backend bases), ddp.py,
deepspeed.py with deepspeed_files.py (its engine files, loaded weights-only), comm_hooks.py, optim.py,
amp.py (precision, the non-finite guard), batchnorm.py, collectives.py, device.py, seeding.py.
"""
from __future__ import annotations

from .amp import refuse_cpu_amp
from .ddp import DDPStrategy
from .env import DistEnv
from .strategy import Phase, Strategy, set_requires_grad, unwrap

__all__ = ["Phase", "Strategy", "make_strategy", "refuse_cpu_amp", "set_requires_grad", "unwrap"]


def make_strategy(cfg, env: DistEnv) -> Strategy:
    """The strategy for ``train.backend``; deepspeed is imported only when asked for."""
    if cfg.train.backend == "ddp":
        return DDPStrategy(cfg, env)
    from .deepspeed import DeepSpeedStrategy

    return DeepSpeedStrategy(cfg, env)

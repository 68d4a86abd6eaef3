"""The collectives other modules need, as plain functions of a ``DistEnv``.

Outside ``stackgan_dist/distributed`` no module imports ``torch.distributed``: checkpointing, logging
statistics and evaluation call these instead. Each is a no-op (or the identity) at world size 1.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist


def group_active() -> bool:
    """Whether a process group is formed in this process (torchmetrics, for one, syncs its states then)."""
    return dist.is_available() and dist.is_initialized()


def barrier(env) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_max(value: float | int, env) -> float:
    """One host value -> its maximum over ranks (a host sync: for ticks and error agreement only)."""
    if not env.distributed:
        return value
    t = torch.tensor([float(value)], device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def any_flags(flags: Sequence[bool], env) -> list[bool]:
    """Several yes/no questions agreed in ONE all-reduce: entry i is true when it is true on any rank."""
    if not env.distributed:
        return [bool(f) for f in flags]
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [v > 0 for v in t.tolist()]


def all_reduce_sum_(t: torch.Tensor, env) -> torch.Tensor:
    """In-place sum over ranks of a device tensor (no host sync of its own)."""
    if env.distributed:
        dist.all_reduce(t)
    return t


def all_reduce_sum_group(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over the formed group, whoever formed it (evaluation under a torchmetrics-synced group)."""
    if group_active() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def all_gather_object(obj, env) -> list:
    """Every rank's ``obj`` (picklable, small), in rank order, on every rank."""
    if not env.distributed:
        return [obj]
    out: list = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out

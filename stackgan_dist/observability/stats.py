"""Training statistics between two log ticks: kept on the device, reduced over ranks once per log tick."""
from __future__ import annotations

import math
import time

import torch

from ..distributed.collectives import all_reduce_sum_


class StepStats:
    """Sums of the step's detached losses (device tensors: adding them never waits for the device)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.sums: dict = {}
        self.n = 0
        self.t0 = time.perf_counter()

    def add(self, losses: dict) -> None:
        for k, v in losses.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.n += 1

    def reduce(self, env, extra: dict) -> dict:
        """One all-reduce over ranks: the mean of every loss over steps and ranks, plus the *sums* over
        ranks of ``extra`` (host or device scalars such as skipped-step and bad-sample counts)."""
        keys = sorted(self.sums)
        dev = self.sums[keys[0]].device
        ext = sorted(extra)
        vec = torch.stack([self.sums[k].float() / self.n for k in keys]
                          + [torch.as_tensor(extra[k], dtype=torch.float32, device=dev).reshape(()) for k in ext])
        all_reduce_sum_(vec, env)
        vals = vec.tolist()  # the host read of the log tick
        rec = {k: v / env.world_size for k, v in zip(keys, vals[:len(keys)])}
        rec.update({k: v for k, v in zip(ext, vals[len(keys):])})
        return rec


def finite_losses(rec: dict, keys) -> bool:
    return all(math.isfinite(rec[k]) for k in keys)

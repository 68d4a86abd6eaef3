"""Successive halving by checkpoints (the rule of ASHA, Li et al. 2020), as pure functions.

At a rung (a step count), a trial goes on only when its metric ranks in the top 1/eta of the trials that have
reached that rung so far, itself included. Asynchronous on purpose: a trial never waits for slower ones, so
the first trial to reach a rung always goes on (as in ASHA), and the rule needs no barrier across launchers.
A non-finite metric ranks last: a diverged generator is never promoted.
"""
from __future__ import annotations

import math


def _score(value: float, mode: str) -> float:
    """Larger is better, whatever the mode; NaN and infinities of the wrong sign rank last."""
    if value is None or not math.isfinite(value):
        return -math.inf
    return value if mode == "max" else -value


def keep_going(seen: list[float], mine: float, eta: int, mode: str = "max") -> bool:
    """Whether a trial with metric ``mine`` continues past a rung where ``seen`` are the metrics of every trial
    that reached it so far (``mine`` included). Top ``ceil(len(seen) / eta)`` go on; ties go on."""
    if eta < 2:
        raise ValueError("eta must be >= 2")
    if mode not in ("max", "min"):
        raise ValueError("mode must be max or min")
    scores = sorted((_score(v, mode) for v in seen), reverse=True)
    if not scores:
        return True
    keep = math.ceil(len(scores) / eta)
    mine_score = _score(mine, mode)
    return mine_score > -math.inf and mine_score >= scores[keep - 1]


def segments(max_steps: int, rungs: tuple[int, ...] | None) -> list[int]:
    """The step counts a trial trains to in turn: each rung below ``max_steps``, then ``max_steps``."""
    return [r for r in (rungs or ()) if r < max_steps] + [max_steps]

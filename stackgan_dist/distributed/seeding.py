"""Same initial weights on every rank; different noise on every rank."""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int) -> int:
    return (seed * 1_000_003 + rank * 7919 + 17) % (2**63)

"""An epoch's sample order and how ranks share it (the plan). Pure: numpy only, no files, no processes.

Order (fixed by the data, the seed and two config keys; independent of world size and loader workers):

1. The shards are permuted with an RNG seeded by (seed, epoch); their samples, in file order, form the
   epoch's global sequence of N samples.
2. The sequence is cut into S *slots*: contiguous ranges of N // S or N // S + 1 samples (S =
   ``data.slots``; 0 picks ``auto_slots``; at most N: ``check_slots``). Each slot is shuffled by a buffer
   shuffle of ``data.shuffle_buffer`` seeded by (seed, epoch, slot), computed on indices, so any position
   of a slot's order can be read without reading the positions before it.
3. The epoch's *order* is slot 0's shuffled samples, then slot 1's, and so on. A sample is named by
   (slot, position in its slot's order). Per-sample randomness (crop, flip, caption) is seeded by
   (seed, epoch, slot, position): it does not depend on who decodes the sample.

Plan (how W ranks share what remains of an epoch): each rank takes one contiguous run of the same whole
number of batches, ``grad_accum`` x B samples at a time (a rank's optimizer steps never straddle the
plan's end), as many as the remaining samples allow: so every rank yields the same number of batches (no
collective hangs at an epoch's end) and fewer than one global batch (W x B x grad_accum) is dropped per
pass. Loader workers do not change the plan: the K workers of a rank share its batches (worker k reads
batches k, k + K, ... of the rank's stream, read.loader), so K does not change which samples are used.
A fresh epoch's plan starts from nothing consumed; ``plan_numbers`` gives its counts.

The cursor that resumes an epoch at any world size is in read/cursor.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import DataError

CURSOR_FORMAT = "stackgan_dist.cursor"
CURSOR_VERSION = 1  # the loader cursor's layout (read/cursor.py); a different version is refused
MAX_EPOCH = 1 << 40


def auto_slots(num_samples: int, shuffle_buffer: int) -> int:
    """Slots of at least one shuffle buffer (so that the buffer shuffle mixes a slot), at most 64."""
    return max(1, min(64, num_samples // max(64, shuffle_buffer)))


def buffer_shuffle_order(n: int, buffer: int, rng: np.random.Generator) -> list[int]:
    """The order in which a buffer shuffle of ``buffer`` samples emits inputs 0..n-1 (a permutation)."""
    if buffer <= 1 or n <= 1:
        return list(range(n))
    out: list[int] = []
    buf = list(range(min(buffer, n)))
    if n > buffer:
        picks = rng.integers(0, buffer, size=n - buffer).tolist()
        for i, j in zip(range(buffer, n), picks):
            out.append(buf[j])
            buf[j] = i
    tail = np.asarray(buf)
    rng.shuffle(tail)
    return out + tail.tolist()


@dataclass(frozen=True)
class Order:
    """What fixes an epoch's sample order (see the module docstring)."""

    num_samples: int
    slots: int
    seed: int
    shuffle_buffer: int
    train: bool = True

    def __post_init__(self):
        if self.slots < 1 or self.num_samples < 0:
            raise ValueError(f"bad order {self}")

    def slot_range(self, s: int) -> tuple[int, int]:
        """Slot s's range of the epoch's global sequence."""
        n, r = divmod(self.num_samples, self.slots)
        lo = s * n + min(s, r)
        return lo, lo + n + (1 if s < r else 0)

    def slot_size(self, s: int) -> int:
        lo, hi = self.slot_range(s)
        return hi - lo

    def shard_order(self, epoch: int, num_shards: int) -> list[int]:
        if not self.train:
            return list(range(num_shards))
        return np.random.default_rng([self.seed, epoch, 0x5AAD]).permutation(num_shards).tolist()

    def slot_order(self, epoch: int, s: int) -> list[int]:
        """Slot s's inputs (indices into its range) in the order the epoch reads them."""
        n = self.slot_size(s)
        if not self.train:
            return list(range(n))
        return buffer_shuffle_order(n, self.shuffle_buffer, np.random.default_rng([self.seed, epoch, s, 0xB0F]))

    def header(self) -> dict:
        return {"format": CURSOR_FORMAT, "version": CURSOR_VERSION, "num_samples": self.num_samples,
                "slots": self.slots, "seed": self.seed, "shuffle_buffer": self.shuffle_buffer, "train": self.train}


# -- runs: sorted disjoint [lo, hi) lists per slot ------------------------------------------------------
Runs = dict  # slot -> list[[lo, hi]]


def add_run(runs: list, lo: int, hi: int) -> None:
    if runs and runs[-1][1] == lo:  # the common case: the next samples of the same run
        runs[-1][1] = hi
    else:
        runs.append([lo, hi])


def normal_runs(runs: list) -> list:
    out: list = []
    for lo, hi in sorted(runs):
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return out


def union_runs(a: Runs, b: Runs) -> Runs:
    return {s: normal_runs(a.get(s, []) + b.get(s, [])) for s in set(a) | set(b)}


def count_runs(runs: Runs) -> int:
    return sum(hi - lo for rs in runs.values() for lo, hi in rs)


def check_slots(slots: int, num_samples: int, key: str = "data.slots") -> None:
    """A slot holds at least one sample: more slots than samples is refused in one line (planning walks
    every slot, so an unbounded count would spin instead of failing)."""
    if slots < 0 or slots > max(1, num_samples):
        raise DataError(f"{key}={slots} but the dataset holds {num_samples} samples: use 0 (auto) or 1 to "
                        f"{max(1, num_samples)} slots")


@dataclass(frozen=True)
class PlanNumbers:
    """A fresh epoch under the plan (per rank batches are micro-batches of B; every rank the same)."""

    batches_per_rank: int
    images_used: int  # = global batch x floor(N / global batch)
    images_dropped: int  # < global batch


def plan_numbers(num_samples: int, world_size: int, batch_size: int, grad_accum: int = 1) -> PlanNumbers:
    """Images used and dropped per epoch and batches per rank, for a dataset of ``num_samples``. Raises
    DataError when the dataset holds fewer samples than one global batch (world_size x batch_size x
    grad_accum)."""
    if min(world_size, batch_size, grad_accum) < 1 or num_samples < 0:
        raise ValueError(f"bad plan: {num_samples} samples, {world_size} ranks, batch {batch_size} x {grad_accum}")
    glob = world_size * batch_size * grad_accum
    steps = num_samples // glob
    if steps == 0:
        raise DataError(f"dataset of {num_samples} samples is too small for one global batch of {glob} "
                        f"(world size {world_size} x batch {batch_size}"
                        f"{f' x {grad_accum} accumulation steps' if grad_accum > 1 else ''})")
    return PlanNumbers(steps * grad_accum, steps * glob, num_samples - steps * glob)


def remaining(order: Order, consumed: Runs) -> list[tuple]:
    """The epoch's runs (slot, lo, hi) not yet consumed, in order."""
    rem = []
    for s in range(order.slots):
        p, size = 0, order.slot_size(s)
        for lo, hi in consumed.get(s, ()):
            if lo > p:
                rem.append((s, p, lo))
            p = max(p, hi)
        if p < size:
            rem.append((s, p, size))
    return rem


def plan(order: Order, consumed: Runs, world_size: int, batch_size: int, grad_accum: int = 1) -> list[list[tuple]]:
    """What remains of an epoch, shared by ranks: rank r -> its runs [(slot, lo, hi), ...] in order, the
    same whole number of ``grad_accum`` x ``batch_size`` samples for every rank (empty when fewer than one
    global batch remain)."""
    rem = remaining(order, consumed)
    unit = batch_size * grad_accum
    q = sum(hi - lo for _, lo, hi in rem) // (world_size * unit) * unit
    shares: list[list[tuple]] = [[] for _ in range(world_size)]
    if q == 0:
        return shares
    g, need = 0, q
    for s, lo, hi in rem:
        while lo < hi and g < world_size:
            take = min(hi - lo, need)
            shares[g].append((s, lo, lo + take))
            lo += take
            need -= take
            if need == 0:
                g, need = g + 1, q
        if g == world_size:
            break
    return shares


def batches_of(share: list[tuple], batch_size: int) -> list[list[tuple]]:
    """A share cut into batches of ``batch_size`` samples, each a list of runs (slot, lo, hi)."""
    out: list[list[tuple]] = []
    cur: list[tuple] = []
    n = 0
    for s, lo, hi in share:
        while lo < hi:
            take = min(hi - lo, batch_size - n)
            cur.append((s, lo, lo + take))
            lo += take
            n += take
            if n == batch_size:
                out.append(cur)
                cur, n = [], 0
    if cur:
        raise ValueError(f"a share of {sum(h - l for _, l, h in share)} samples is no whole number of batches")
    return out

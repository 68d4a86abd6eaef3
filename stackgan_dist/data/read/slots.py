"""An epoch's sample order, how readers share it, and the cursor that resumes it at any world size.

Pure functions and a small pure class (numpy only): no files, no processes.

Order (fixed by the data, the seed and two config keys; independent of world size and loader workers):

1. The shards are permuted with an RNG seeded by (seed, epoch); their samples, in file order, form the
   epoch's global sequence of N samples.
2. The sequence is cut into S *slots*: contiguous ranges of N // S or N // S + 1 samples (S =
   ``data.slots``; 0 picks ``auto_slots``). Each slot is shuffled by a buffer shuffle of
   ``data.shuffle_buffer`` seeded by (seed, epoch, slot), computed on indices, so any position of a
   slot's order can be read without reading the positions before it.
3. The epoch's *order* is slot 0's shuffled samples, then slot 1's, and so on. A sample is named by
   (slot, position in its slot's order). Per-sample randomness (crop, flip, caption) is seeded by
   (seed, epoch, slot, position): it does not depend on who decodes the sample.

Plan (how the W x K readers, K loader workers on each of W ranks, share an epoch): the samples of the
order not yet consumed are dealt out as contiguous runs of q samples each, q the largest multiple of the
batch size with W K q <= what remains; reader g = rank K + worker reads run g. So every rank yields the
same number of batches (no collective hangs at an epoch's end) and the last samples, fewer than W K B,
are dropped. A fresh epoch's plan starts from nothing consumed.

Cursor: every batch carries the (slot, lo, hi) runs it holds; a ``CursorTracker`` per rank adds them up;
``merge_cursors`` unions the ranks' states into the global cursor (JSON: epoch, per-epoch plan and the
consumed runs of each slot). Resuming (``resume``): an epoch in flight keeps its plan when the layout
(W, K, B) is unchanged and the readers' progress fits it, so the batches are exactly those of an
uninterrupted run; otherwise it gets a new plan over what is left, so at any world size no sample of the
epoch is seen twice and none is skipped beyond the new plan's drop-last remainder.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from ...errors import DataError

CURSOR_FORMAT = "stackgan_dist.cursor"
CURSOR_VERSION = 1
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


def _add(runs: list, lo: int, hi: int) -> None:
    if runs and runs[-1][1] == lo:  # the common case: the next samples of the same run
        runs[-1][1] = hi
    else:
        runs.append([lo, hi])


def _normal(runs: list) -> list:
    out: list = []
    for lo, hi in sorted(runs):
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return out


def _union(a: Runs, b: Runs) -> Runs:
    return {s: _normal(a.get(s, []) + b.get(s, [])) for s in set(a) | set(b)}


def _count(runs: Runs) -> int:
    return sum(hi - lo for rs in runs.values() for lo, hi in rs)


def plan(order: Order, consumed: Runs, world_size: int, workers: int, batch_size: int) -> list[list[tuple]]:
    """Shares of what remains of an epoch: reader g -> [(slot, lo, hi), ...], q samples each."""
    readers = world_size * workers
    rem = []
    for s in range(order.slots):
        p, size = 0, order.slot_size(s)
        for lo, hi in consumed.get(s, ()):
            if lo > p:
                rem.append((s, p, lo))
            p = max(p, hi)
        if p < size:
            rem.append((s, p, size))
    total = sum(hi - lo for _, lo, hi in rem)
    q = total // (readers * batch_size) * batch_size
    shares: list[list[tuple]] = [[] for _ in range(readers)]
    if q == 0:
        return shares
    g, need = 0, q
    for s, lo, hi in rem:
        while lo < hi and g < readers:
            take = min(hi - lo, need)
            shares[g].append((s, lo, lo + take))
            lo += take
            need -= take
            if need == 0:
                g, need = g + 1, q
        if g == readers:
            break
    return shares


def _done_in_share(share: list[tuple], consumed: Runs) -> int | None:
    """How many samples at the start of ``share`` are consumed; None if the consumed ones are no prefix."""
    done, ended = 0, False
    for s, lo, hi in share:
        parts = [(max(lo, a), min(hi, b)) for a, b in consumed.get(s, ()) if min(hi, b) > max(lo, a)]
        covered = sum(y - x for x, y in parts)
        if ended:
            if covered:
                return None
            continue
        if covered == hi - lo:
            done += covered
            continue
        if covered and (len(parts) != 1 or parts[0][0] != lo):
            return None
        done += covered
        ended = True
    return done


def _skip(share: list[tuple], n: int) -> list[tuple]:
    out = []
    for s, lo, hi in share:
        if n >= hi - lo:
            n -= hi - lo
            continue
        out.append((s, lo + n, hi))
        n = 0
    return out


def _runs_from_json(d, where: str, order: Order) -> Runs:
    if not isinstance(d, dict):
        raise ValueError(f"{where} must be an object")
    out: Runs = {}
    for k, rs in d.items():
        if not (isinstance(k, str) and k.isdigit() and int(k) < order.slots):
            raise ValueError(f"{where} names slot {k!r}; the data has {order.slots} slots")
        s, size = int(k), order.slot_size(int(k))
        if not isinstance(rs, list):
            raise ValueError(f"{where}[{k}] must be a list of [lo, hi] runs")
        runs = []
        for r in rs:
            if not (isinstance(r, list) and len(r) == 2 and all(type(v) is int for v in r)
                    and 0 <= r[0] < r[1] <= size):
                raise ValueError(f"{where}[{k}] holds {r!r}, not a run [lo, hi) inside the slot's {size} samples")
            runs.append([r[0], r[1]])
        if runs:
            out[s] = _normal(runs)
    return out


def _runs_to_json(runs: Runs) -> dict:
    return {str(s): [list(r) for r in _normal(rs)] for s, rs in sorted(runs.items()) if rs}


def _layout(world_size: int, workers: int, batch_size: int) -> dict:
    return {"world_size": world_size, "workers": workers, "batch_size": batch_size}


def check_cursor(cursor, order: Order) -> dict:
    """A saved cursor (an untrusted file's content) -> its epochs as {epoch: (plan_layout, base, consumed)}.
    Raises DataError with one line naming the problem."""
    try:
        if not isinstance(cursor, dict):
            raise ValueError("it is not an object")
        h = order.header()
        if cursor.get("format") != CURSOR_FORMAT or cursor.get("version") != CURSOR_VERSION:
            raise ValueError(f"format {cursor.get('format')!r} version {cursor.get('version')!r} is not "
                             f"{CURSOR_FORMAT} version {CURSOR_VERSION}")
        for k, hint in (("num_samples", "the dataset changed"), ("slots", "set data.slots back"),
                        ("seed", "set train.seed back"), ("shuffle_buffer", "set data.shuffle_buffer back"),
                        ("train", "a training cursor")):
            if cursor.get(k) != h[k]:
                raise _Mismatch(f"the checkpoint's loader cursor has {k}={cursor.get(k)!r}, this run "
                                f"{h[k]!r} ({hint}, or start a new run)")
        first = cursor.get("epoch")
        if type(first) is not int or not 0 <= first <= MAX_EPOCH:
            raise ValueError(f"epoch {first!r}")
        eps = cursor.get("epochs")
        if not isinstance(eps, dict):
            raise ValueError("'epochs' must be an object")
        out = {}
        for k, v in eps.items():
            if not (isinstance(k, str) and k.isdigit() and first <= int(k) <= MAX_EPOCH):
                raise ValueError(f"epoch key {k!r}")
            if not isinstance(v, dict) or not isinstance(v.get("plan"), dict):
                raise ValueError(f"epoch {k} must hold 'plan' and 'consumed'")
            p = v["plan"]
            lay = tuple(p.get(x) for x in ("world_size", "workers", "batch_size"))
            if not all(type(x) is int and 1 <= x <= 1 << 30 for x in lay):
                raise ValueError(f"epoch {k}: plan layout {lay!r}")
            base = _runs_from_json(p.get("base"), f"epoch {k} plan base", order)
            cons = _runs_from_json(v.get("consumed"), f"epoch {k} consumed", order)
            out[int(k)] = (lay, base, _union(cons, base))
        return {"epoch": first, "epochs": out}
    except _Mismatch as e:
        raise DataError(str(e)) from None
    except ValueError as e:
        raise DataError(f"the checkpoint's loader cursor is malformed ({e})") from None


class _Mismatch(ValueError):
    pass


@dataclass
class Resume:
    """How a loader starts: per in-flight epoch its plan and each reader's remaining share; the first
    fresh epoch; the worker rotation; and the cursor the trackers start from."""

    epochs: list  # [(epoch, shares_remaining: list per reader)]
    next_epoch: int
    rotation: int
    start: dict


def fresh_start(order: Order, world_size: int, workers: int, batch_size: int) -> Resume:
    return Resume([], 0, 0, {**order.header(), "layout": _layout(world_size, workers, batch_size),
                             "epoch": 0, "epochs": {}})


def resume(order: Order, cursor: dict, world_size: int, workers: int, batch_size: int) -> Resume:
    """Where each reader of the layout (world_size, workers, batch_size) continues, from a merged cursor."""
    c = check_cursor(cursor, order)
    layout = (world_size, workers, batch_size)
    K = workers
    eps = sorted(c["epochs"].items())
    keep = bool(eps) and all(lay == layout for _, (lay, _, _) in eps)
    progress: list[list[int]] = []  # per in-flight epoch, per reader: consumed samples of its share
    shares_by_epoch = []
    if keep:
        for e, (lay, base, cons) in eps:
            shares = plan(order, base, *layout)
            planned = _union(base, {})
            for sh in shares:
                for s, lo, hi in sh:
                    planned.setdefault(s, []).append([lo, hi])
            planned = {s: _normal(r) for s, r in planned.items()}
            if _count(_union(planned, cons)) != _count(planned):  # consumed outside the plan
                keep = False
                break
            done = [_done_in_share(sh, _minus_base(cons, base)) for sh in shares]
            if any(d is None or d % batch_size for d in done):
                keep = False
                break
            progress.append(done)
            shares_by_epoch.append(shares)
    if keep:  # readers walk epochs in order: a reader with a partial share has nothing in later epochs
        for g in range(world_size * K):
            partial = False
            for i, shares in enumerate(shares_by_epoch):
                d, n = progress[i][g], sum(hi - lo for _, lo, hi in shares[g])
                if partial and d:
                    keep = False
                if d < n:
                    partial = True
        totals = [[sum(p[r * K + i] for p in progress) // batch_size for i in range(K)] for r in range(world_size)]
        t = sum(totals[0])
        for r in range(world_size):  # round-robin over workers, ranks in lockstep
            if totals[r] != [t // K + (1 if i < t % K else 0) for i in range(K)]:
                keep = False
    start = {**order.header(), "layout": _layout(*layout), "epoch": c["epoch"], "epochs": {}}
    out_epochs = []
    rotation = 0
    for i, (e, (lay, base, cons)) in enumerate(eps):
        if keep:
            shares, done, plan_lay, plan_base = shares_by_epoch[i], progress[i], lay, base
        else:
            shares = plan(order, cons, *layout)
            done, plan_lay, plan_base = [0] * len(shares), layout, cons
        remaining = [_skip(sh, d) for sh, d in zip(shares, done)]
        if not any(sh for sh in shares):
            continue  # nothing left that this layout can deal out: the epoch is complete
        out_epochs.append((e, remaining))
        start["epochs"][str(e)] = {"plan": {**_layout(*plan_lay), "base": _runs_to_json(plan_base)},
                                   "consumed": _runs_to_json(cons)}
    if keep:
        rotation = sum(sum(p[:K]) for p in progress) // batch_size % K
    last = max([e for e, _ in eps], default=c["epoch"] - 1)
    next_epoch = max(c["epoch"], last + 1)
    start["epoch"] = min([e for e, _ in out_epochs], default=next_epoch)
    return Resume(out_epochs, next_epoch, rotation, start)


def _minus_base(cons: Runs, base: Runs) -> Runs:
    out: Runs = {}
    for s, rs in cons.items():
        cut = base.get(s, [])
        for lo, hi in rs:
            pieces = [[lo, hi]]
            for a, b in cut:
                nxt = []
                for x, y in pieces:
                    if b <= x or a >= y:
                        nxt.append([x, y])
                    else:
                        if x < a:
                            nxt.append([x, a])
                        if b < y:
                            nxt.append([b, y])
                pieces = nxt
            out.setdefault(s, []).extend(pieces)
    return {s: _normal(r) for s, r in out.items() if r}


def cursor_after_batches(order: Order, world_size: int, workers: int, batch_size: int, batches: int) -> dict:
    """The merged cursor of an uninterrupted run of this layout after ``batches`` batches per rank (to
    resume a checkpoint that only counted batches)."""
    shares = plan(order, {}, world_size, workers, batch_size)
    per_epoch = sum(hi - lo for _, lo, hi in shares[0]) // batch_size
    if per_epoch == 0:
        raise DataError(f"dataset of {order.num_samples} samples is too small for {world_size} x {workers} "
                        f"readers at batch size {batch_size}")
    K = workers
    reader_batches = [batches // K + (1 if i < batches % K else 0) for i in range(K)]
    first = min(reader_batches) // per_epoch
    eps: dict = {}
    for r in range(world_size):
        for i, b in enumerate(reader_batches):
            e, within = divmod(b, per_epoch)
            for ep in range(first, e + 1):
                n = per_epoch * batch_size if ep < e else within * batch_size
                runs = eps.setdefault(ep, {})
                for s, lo, hi in shares[r * K + i]:
                    if n <= 0:
                        break
                    take = min(n, hi - lo)
                    runs.setdefault(s, []).append([lo, lo + take])
                    n -= take
    lay = _layout(world_size, workers, batch_size)
    return {**order.header(), "layout": lay, "epoch": first,
            "epochs": {str(e): {"plan": {**lay, "base": {}}, "consumed": _runs_to_json(r)}
                       for e, r in sorted(eps.items())}}


class CursorTracker:
    """Per rank: adds up the (slot, lo, hi) runs of the batches this rank consumed. Pure.

    ``tracker.update(batch)`` after each batch is taken from the loader; ``tracker.state()`` -> a JSON-able
    dict; ``merge_cursors([state of every rank])`` -> the cursor to save and to pass to make_loader."""

    def __init__(self, start: dict, rank: int = 0):
        self._head = {k: v for k, v in start.items() if k != "epochs"}
        self._order = Order(start["num_samples"], start["slots"], start["seed"], start["shuffle_buffer"],
                            start["train"])
        lay = start["layout"]
        self._layout = (lay["world_size"], lay["workers"], lay["batch_size"])
        self.rank = rank
        self._epochs: dict[int, dict] = {}
        for k, v in start["epochs"].items():
            self._epochs[int(k)] = {"plan": copy.deepcopy(v["plan"]),
                                    "consumed": {int(s): [list(r) for r in rs] for s, rs in v["consumed"].items()}}
        self._first = start["epoch"]
        self._left: dict[int, int] = {}  # epoch -> samples this rank still has to consume under its plan
        for e, v in self._epochs.items():
            self._left[e] = self._rank_left(v)

    def _rank_left(self, v: dict) -> int:
        p = v["plan"]
        base = {int(s): rs for s, rs in p["base"].items()}
        shares = plan(self._order, base, p["world_size"], p["workers"], p["batch_size"])
        K = p["workers"]
        mine = shares[self.rank * K:(self.rank + 1) * K] if p["world_size"] > self.rank else []
        cons = {s: _normal(rs) for s, rs in v["consumed"].items()}
        total = 0
        for sh in mine:
            for s, lo, hi in sh:
                covered = sum(max(0, min(hi, b) - max(lo, a)) for a, b in cons.get(s, ()))
                total += hi - lo - covered
        return total

    def update(self, batch) -> None:
        e = int(batch["epoch"])
        runs = batch["cursor"].tolist()
        v = self._epochs.get(e)
        if v is None:
            if e < self._first:
                raise ValueError(f"a batch of epoch {e} after the cursor moved past it")
            v = self._epochs[e] = {"plan": {**_layout(*self._layout), "base": {}}, "consumed": {}}
            self._left[e] = self._rank_left(v)
        n = 0
        for s, lo, hi in runs:
            _add(v["consumed"].setdefault(s, []), lo, hi)
            n += hi - lo
        self._left[e] -= n
        if self._left[e] <= 0:  # this rank read its whole share; ranks run in lockstep, so all have
            del self._epochs[e], self._left[e]
            self._first = max(self._first, e + 1)

    def state(self) -> dict:
        """JSON-able: the data order, the first epoch not yet complete, and per epoch in flight its plan
        and the consumed runs of each slot."""
        return {**copy.deepcopy(self._head), "epoch": min(min(self._epochs, default=self._first), self._first),
                "epochs": {str(e): {"plan": copy.deepcopy(v["plan"]), "consumed": _runs_to_json(v["consumed"])}
                           for e, v in sorted(self._epochs.items())}}


def merge_cursors(states: list[dict]) -> dict:
    """The global cursor from every rank's ``CursorTracker.state()`` (pure; any order)."""
    if not states:
        raise ValueError("merge_cursors needs at least one rank's state")
    head = {k: v for k, v in states[0].items() if k != "epochs"}
    eps: dict[str, dict] = {}
    for st in states:
        if {k: v for k, v in st.items() if k != "epochs"} != head:
            raise ValueError("the ranks' cursors disagree on the data order or the epoch; they were not taken "
                             "at the same step")
        for e, v in st["epochs"].items():
            if e not in eps:
                eps[e] = {"plan": copy.deepcopy(v["plan"]), "consumed": {}}
            elif eps[e]["plan"] != v["plan"]:
                raise ValueError(f"the ranks' cursors hold different plans for epoch {e}")
            a = {int(s): rs for s, rs in eps[e]["consumed"].items()}
            b = {int(s): [list(r) for r in rs] for s, rs in v["consumed"].items()}
            eps[e]["consumed"] = _runs_to_json(_union(a, b))
    return {**copy.deepcopy(head), "epochs": dict(sorted(eps.items(), key=lambda kv: int(kv[0])))}

"""The loader cursor: what every rank consumed, merged into one world-size-independent record that resumes
an epoch at any world size (the order and the plan are in read/slots.py).

Every batch carries the (slot, lo, hi) runs it holds; a ``CursorTracker`` per rank adds them up;
``merge_cursors`` unions the ranks' states into the global cursor (JSON: epoch, per-epoch plan and the
consumed runs of each slot). Resuming (``resume``): an epoch in flight keeps its plan when the layout
(world size, batch, grad_accum; loader workers do not matter) is unchanged and every rank consumed the
same whole-batch prefix of its share, so the batches are exactly those of an uninterrupted run; otherwise
it gets a new plan over what is left, so at any world size no sample of the epoch is seen twice and none
is skipped beyond the new plan's drop-last remainder (less than one global batch).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

from ...errors import DataError
from .slots import (CURSOR_FORMAT, CURSOR_VERSION, MAX_EPOCH, Order, Runs, add_run, count_runs, normal_runs, plan,
                    plan_numbers, union_runs)


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
            out[s] = normal_runs(runs)
    return out


def _runs_to_json(runs: Runs) -> dict:
    return {str(s): [list(r) for r in normal_runs(rs)] for s, rs in sorted(runs.items()) if rs}


def _layout(world_size: int, batch_size: int, grad_accum: int = 1) -> dict:
    return {"world_size": world_size, "batch_size": batch_size, "grad_accum": grad_accum}


def check_cursor(cursor, order: Order) -> dict:
    """A saved cursor (an untrusted file's content) -> its epochs as
    {epoch: ((world_size, batch_size, grad_accum), base, consumed)}.
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
            # a saved "workers" is ignored: loader workers share their rank's batches, they do not shape the plan
            lay = (p.get("world_size"), p.get("batch_size"), p.get("grad_accum", 1))
            if not all(type(x) is int and 1 <= x <= 1 << 30 for x in lay):
                raise ValueError(f"epoch {k}: plan layout {lay!r}")
            base = _runs_from_json(p.get("base"), f"epoch {k} plan base", order)
            cons = _runs_from_json(v.get("consumed"), f"epoch {k} consumed", order)
            out[int(k)] = (lay, base, union_runs(cons, base))
        return {"epoch": first, "epochs": out}
    except _Mismatch as e:
        raise DataError(str(e)) from None
    except ValueError as e:
        raise DataError(f"the checkpoint's loader cursor is malformed ({e})") from None


class _Mismatch(ValueError):
    pass


@dataclass
class Resume:
    """How a rank's loader starts: per in-flight epoch each rank's remaining share; the first fresh epoch;
    and the cursor the trackers start from."""

    epochs: list  # [(epoch, shares_remaining: list per rank)]
    next_epoch: int
    start: dict


def fresh_start(order: Order, world_size: int, batch_size: int, grad_accum: int = 1) -> Resume:
    return Resume([], 0, {**order.header(), "layout": _layout(world_size, batch_size, grad_accum),
                          "epoch": 0, "epochs": {}})


def _kept_progress(order: Order, eps: list, layout: tuple) -> list | None:
    """Per in-flight epoch, per rank: samples consumed of its share under the saved plans, when the saved
    plans are this layout's and every rank consumed the same whole-batch prefix of its stream; else None."""
    world_size, batch_size = layout[0], layout[1]
    progress, all_shares = [], []
    for _, (lay, base, cons) in eps:
        if lay != layout:
            return None
        shares = plan(order, base, *layout)
        planned = union_runs(base, {})
        for sh in shares:
            for s, lo, hi in sh:
                planned.setdefault(s, []).append([lo, hi])
        planned = {s: normal_runs(r) for s, r in planned.items()}
        if count_runs(union_runs(planned, cons)) != count_runs(planned):  # consumed outside the plan
            return None
        done = [_done_in_share(sh, _minus_base(cons, base)) for sh in shares]
        if any(d is None or d % batch_size for d in done):
            return None
        progress.append(done)
        all_shares.append(shares)
    for r in range(world_size):  # a rank reads its epochs in order: a partial share ends its progress
        partial = False
        for done, shares in zip(progress, all_shares):
            if partial and done[r]:
                return None
            partial = partial or done[r] < sum(hi - lo for _, lo, hi in shares[r])
    if len({sum(p[r] for p in progress) for r in range(world_size)}) > 1:  # ranks run in lockstep
        return None
    return [(p, sh) for p, sh in zip(progress, all_shares)]


def resume(order: Order, cursor: dict, world_size: int, batch_size: int, grad_accum: int = 1) -> Resume:
    """Where each rank of the layout continues, from a merged cursor (see the module docstring)."""
    c = check_cursor(cursor, order)
    layout = (world_size, batch_size, grad_accum)
    eps = sorted(c["epochs"].items())
    kept = _kept_progress(order, eps, layout) if eps else None
    start = {**order.header(), "layout": _layout(*layout), "epoch": c["epoch"], "epochs": {}}
    out_epochs = []
    for i, (e, (lay, base, cons)) in enumerate(eps):
        if kept is not None:
            done, shares = kept[i]
            plan_base = base
        else:
            shares = plan(order, cons, *layout)
            done, plan_base = [0] * len(shares), cons
        rest = [_skip(sh, d) for sh, d in zip(shares, done)]
        if not any(rest):
            continue  # nothing left that this layout can deal out: the epoch is complete
        out_epochs.append((e, rest))
        start["epochs"][str(e)] = {"plan": {**_layout(*layout), "base": _runs_to_json(plan_base)},
                                   "consumed": _runs_to_json(cons)}
    last = max([e for e, _ in eps], default=c["epoch"] - 1)
    next_epoch = max(c["epoch"], last + 1)
    start["epoch"] = min([e for e, _ in out_epochs], default=next_epoch)
    return Resume(out_epochs, next_epoch, start)


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
    return {s: normal_runs(r) for s, r in out.items() if r}


def cursor_after_batches(order: Order, world_size: int, batch_size: int, batches: int, grad_accum: int = 1) -> dict:
    """The merged cursor of an uninterrupted run of this layout after ``batches`` batches per rank (to
    resume a checkpoint that only counted batches)."""
    per_epoch = plan_numbers(order.num_samples, world_size, batch_size, grad_accum).batches_per_rank
    shares = plan(order, {}, world_size, batch_size, grad_accum)
    e, within = divmod(batches, per_epoch)
    lay = _layout(world_size, batch_size, grad_accum)
    runs: Runs = {}
    for r in range(world_size):
        n = within * batch_size
        for s, lo, hi in shares[r]:
            if n <= 0:
                break
            take = min(n, hi - lo)
            runs.setdefault(s, []).append([lo, lo + take])
            n -= take
    eps = {str(e): {"plan": {**lay, "base": {}}, "consumed": _runs_to_json(runs)}} if runs else {}
    return {**order.header(), "layout": lay, "epoch": e, "epochs": eps}


class CursorTracker:
    """Per rank: adds up the (slot, lo, hi) runs of the batches this rank consumed. Pure.

    ``tracker.update(batch)`` after each batch is taken from the loader; ``tracker.state()`` -> a JSON-able
    dict; ``merge_cursors([state of every rank])`` -> the cursor to save and to pass to make_loader."""

    def __init__(self, start: dict, rank: int = 0):
        self._head = {k: v for k, v in start.items() if k != "epochs"}
        self._order = Order(start["num_samples"], start["slots"], start["seed"], start["shuffle_buffer"],
                            start["train"])
        lay = start["layout"]
        self._layout = (lay["world_size"], lay["batch_size"], lay.get("grad_accum", 1))
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
        shares = plan(self._order, base, p["world_size"], p["batch_size"], p.get("grad_accum", 1))
        mine = shares[self.rank] if p["world_size"] > self.rank else []
        cons = {s: normal_runs(rs) for s, rs in v["consumed"].items()}
        total = 0
        for s, lo, hi in mine:
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
            add_run(v["consumed"].setdefault(s, []), lo, hi)
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
            eps[e]["consumed"] = _runs_to_json(union_runs(a, b))
    return {**copy.deepcopy(head), "epochs": dict(sorted(eps.items(), key=lambda kv: int(kv[0])))}

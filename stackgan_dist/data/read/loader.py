"""The training loader: per rank, an infinite stream of decoded batches that follows slots.py's plan.

A rank's stream is its share of each epoch (a contiguous run of whole batches), epoch after epoch. Its K
loader workers (K = max(1, num_workers)) share that stream: worker k decodes the stream's batches k,
k + K, k + 2K, ... (counted from where this loader started), and torch's DataLoader takes one batch from
each worker in turn, so the rank yields its batches in stream order whatever K, also across epochs whose
batch count is no multiple of K. A worker reads, per slot, only the inputs its batches need (the others are
seeked over), in one pass. Every batch carries ``epoch`` and ``cursor`` (int64 (m, 3): the slot, lo, hi
runs it holds) for ``CursorTracker``.

Samples a damaged shard cannot deliver become holes: counted in ``bad``, replaced by the last good sample
of the batch (or zeros), so that batch size and batch count never change.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ...errors import DataError
from ...safety.budgets import DEFAULT_MAX_IMAGE_PIXELS
from ..format import CROP_SIZES, LOAD_SIZES
from .decode import BadSample, Decoded, check_sample, decode, sample_format
from .index import DatasetInfo, Shard
from .samples import iter_samples
from .cursor import CursorTracker, cursor_after_batches, fresh_start, resume
from .slots import Order, PlanNumbers, auto_slots, batches_of, check_slots, plan, plan_numbers

log = logging.getLogger("stackgan_dist.data")


@dataclass(frozen=True)
class LoaderSpec:
    """What a rank's training loader reads and how (everything but the dataset).

    ``cursor``: a merged cursor (cursor.merge_cursors) to resume from, at any world size; ``start_batches``:
    batches per rank an uninterrupted run of this layout consumed (checkpoints that only counted batches);
    ``grad_accum``: micro-batches per optimizer step, so that a rank's epoch is whole optimizer steps."""

    stage: int
    batch_size: int
    seed: int
    rank: int = 0
    world_size: int = 1
    num_workers: int = 2
    shuffle_buffer: int = 512
    slots: int = 0
    grad_accum: int = 1
    prefetch_factor: int = 4
    pin_memory: bool = False
    train: bool = True
    start_batches: int = 0
    cursor: dict | None = None
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # larger images are bad samples (safety/budgets.py)


def make_order(info: DatasetInfo, seed: int, shuffle_buffer: int, slots: int = 0, train: bool = True) -> Order:
    n = info.num_samples
    check_slots(slots, n)
    return Order(n, slots or auto_slots(n, shuffle_buffer), seed, shuffle_buffer if train else 1, train)


class ShardStream(IterableDataset):
    """Infinite stream of ready batches for one rank (see the module docstring and slots.py)."""

    def __init__(self, info: DatasetInfo, spec: LoaderSpec):
        sp = spec
        if (min(sp.batch_size, sp.world_size, sp.grad_accum) < 1 or not 0 <= sp.rank < sp.world_size
                or sp.num_workers < 0 or sp.slots < 0):
            raise ValueError(f"bad loader layout: batch {sp.batch_size} x {sp.grad_accum}, rank {sp.rank} of "
                             f"{sp.world_size}, {sp.num_workers} workers, {sp.slots} slots")
        self.info, self.spec = info, sp
        self.fmt = sample_format(info.manifest)  # None: stored embeddings; else captions embedded on the fly
        # captions embedded on the training device: batches carry them as "caption" and a zero "text"
        self.captions_out = self.fmt is not None and self.fmt.embed_on == "device"
        self.load_size, self.crop = LOAD_SIZES[sp.stage], CROP_SIZES[sp.stage]
        self.batch_size, self.seed, self.train = sp.batch_size, sp.seed, sp.train
        self.rank, self.world = sp.rank, sp.world_size
        self.k = max(1, sp.num_workers)
        self.order = make_order(info, sp.seed, sp.shuffle_buffer, sp.slots, sp.train)
        layout = (sp.world_size, sp.batch_size, sp.grad_accum)
        self.numbers = plan_numbers(info.num_samples, *layout)  # DataError when smaller than a global batch
        self._fresh = plan(self.order, {}, *layout)[sp.rank]
        cursor = sp.cursor
        if cursor is None and sp.start_batches:
            cursor = cursor_after_batches(self.order, sp.world_size, sp.batch_size, sp.start_batches, sp.grad_accum)
        self.resume = resume(self.order, cursor, *layout) if cursor is not None else fresh_start(self.order, *layout)
        self._starts: dict[int, list[tuple[Shard, int]]] = {}

    @property
    def batches_per_epoch(self) -> int:
        """Per rank, in a fresh epoch; equal on every rank."""
        return self.numbers.batches_per_rank

    def tracker(self) -> CursorTracker:
        """A CursorTracker for this rank, starting from the cursor this stream resumed from."""
        return CursorTracker(self.resume.start, self.rank)

    # -- reading ------------------------------------------------------------------------------------
    def _shards_in_order(self, epoch: int) -> list[tuple[Shard, int]]:
        """(shard, its first global index) in the epoch's shard order."""
        if epoch not in self._starts:
            self._starts = {}  # one epoch at a time
            out, pos = [], 0
            for i in self.order.shard_order(epoch, len(self.info.shards)):
                out.append((self.info.shards[i], pos))
                pos += self.info.shards[i].samples
            self._starts[epoch] = out
        return self._starts[epoch]

    def _slot_inputs(self, epoch: int, slot: int, needed: list[int]):
        """(input index within the slot, raw sample) for the sorted ``needed`` inputs, ascending."""
        base = self.order.slot_range(slot)[0]
        k = 0
        for shard, s_lo in self._shards_in_order(epoch):
            if k == len(needed):
                return
            s_hi = s_lo + shard.samples
            if base + needed[k] >= s_hi:
                continue
            want = []
            while k < len(needed) and base + needed[k] < s_hi:
                want.append(base + needed[k] - s_lo)
                k += 1
            wanted, last, j = set(want), want[-1], -1
            got = 0
            try:
                for j, sample in enumerate(iter_samples(shard.url, keep=wanted.__contains__)):
                    if j in wanted:
                        got += 1
                        yield s_lo + j - base, sample
                    if j >= last:
                        break
            except DataError:
                raise
            except Exception as e:  # noqa: BLE001 - truncated / corrupt tar: the rest of the range is lost
                log.warning("shard %s unreadable after %d samples (%s: %s); skipping its remaining samples",
                            shard.url, j + 1, type(e).__name__, e)
            else:
                if got < len(want):  # a tar cut at a member boundary ends without an error
                    log.warning("shard %s ended after %d of %d samples; skipping the rest", shard.url, j + 1,
                                shard.samples)
            for jj in want[got:]:  # what the shard could not deliver becomes holes, filled downstream
                yield s_lo + jj - base, {"__key__": f"<missing {shard.url}#{jj}>", "__url__": shard.url,
                                         "__bad__": True}

    def _positions_samples(self, epoch: int, slot: int, positions: list[int], order_cache: dict):
        """(position, raw sample) for the ascending ``positions`` of the slot's order, in that order (one
        pass over the slot's shards; samples read ahead of their turn are held)."""
        if (epoch, slot) not in order_cache:
            order_cache.clear()  # a worker walks slots in order: one slot's order at a time
            order_cache[epoch, slot] = self.order.slot_order(epoch, slot)
        outs = [order_cache[epoch, slot][p] for p in positions]
        held: dict[int, dict] = {}
        k = 0
        for idx, sample in self._slot_inputs(epoch, slot, sorted(outs)):
            held[idx] = sample
            while k < len(outs) and outs[k] in held:
                yield positions[k], held.pop(outs[k])
                k += 1
        if k != len(outs):
            raise RuntimeError(f"slot {slot} of epoch {epoch}: {len(outs) - k} samples not delivered")

    def _stream(self):
        """This rank's batches, in order, forever: (epoch, runs of the batch)."""
        for e, shares in self.resume.epochs:
            for b in batches_of(shares[self.rank], self.batch_size):
                yield e, b
        e = self.resume.next_epoch
        fresh = batches_of(self._fresh, self.batch_size)  # not empty: plan_numbers checked it
        while True:
            for b in fresh:
                yield e, b
            e += 1

    def _worker_samples(self, worker: int):
        """(epoch, slot, position, raw sample) of the batches worker ``worker`` of K decodes, in order: its
        batches are grouped per (epoch, slot) so that each group's shards are read in one pass."""
        group, key = [], None
        order_cache: dict = {}
        for t, (e, runs) in enumerate(self._stream()):
            if t % self.k != worker:
                continue
            for s, lo, hi in runs:
                if (e, s) != key and group:
                    yield from ((key[0], key[1], p, x) for p, x in
                                self._positions_samples(key[0], key[1], group, order_cache))
                    group = []
                key = (e, s)
                group.extend(range(lo, hi))
            if len(group) >= 64 * self.batch_size:  # bound what is planned ahead: the stream is endless
                yield from ((key[0], key[1], p, x) for p, x in
                            self._positions_samples(key[0], key[1], group, order_cache))
                group = []

    def worker_batches(self, worker: int = 0):
        """Infinite batches of worker ``worker`` of this rank's K (all of the rank's batches when K = 1)."""
        B = self.batch_size
        zero = Decoded(np.zeros((3, self.crop, self.crop), np.uint8), np.zeros(self.info.text_dim, np.float32),
                       -1, 0, "")
        imgs, texts, classes, caps, runs, bad, last_good = [], [], [], [], [], 0, None
        for epoch, slot, pos, sample in self._worker_samples(worker):
            try:
                if sample.get("__bad__"):
                    raise BadSample("sample missing from an unreadable shard")
                rng = np.random.default_rng([self.seed, epoch, slot, pos]) if self.train else None
                out = last_good = decode(sample, self.load_size, self.crop, rng, self.info.text_dim,
                                         self.train, self.fmt, self.spec.max_image_pixels)
            except BadSample as e:
                bad += 1
                log.warning("bad sample %s in %s: %s", sample["__key__"], sample.get("__url__"), e)
                out = zero if last_good is None else last_good  # batch size and count stay fixed
            imgs.append(out.image)
            texts.append(out.text)
            classes.append(out.cls)
            caps.append(out.caption)
            if runs and runs[-1][0] == slot and runs[-1][2] == pos:
                runs[-1][2] += 1
            else:
                runs.append([slot, pos, pos + 1])
            if len(imgs) == B:
                batch = {"image": torch.from_numpy(np.stack(imgs)), "text": torch.from_numpy(np.stack(texts)),
                         "cls": torch.tensor(classes, dtype=torch.int64), "bad": torch.tensor(bad),
                         "epoch": torch.tensor(epoch), "cursor": torch.tensor(runs, dtype=torch.int64)}
                if self.captions_out:  # "" for a hole with no good sample before it: embedded as zeros
                    batch["caption"] = caps
                yield batch
                imgs, texts, classes, caps, runs, bad, last_good = [], [], [], [], [], 0, None

    def __iter__(self):
        wi = get_worker_info()
        wid, nw = (wi.id, wi.num_workers) if wi is not None else (0, 1)
        if not (nw == self.k or (wi is None and self.k == 1)):
            raise RuntimeError(f"the stream was made for {self.k} workers, the DataLoader has {nw}")
        yield from self.worker_batches(wid)


def dataset_text_dim(info: DatasetInfo, text_dim: int | None, key: str = "data.train") -> int:
    """``model.text_dim``: unset (None) -> the dimension the dataset records for its encoder; set -> checked
    against it (one line naming both numbers and the dataset file)."""
    if text_dim is None:
        return info.text_dim
    if info.text_dim != text_dim:
        enc = (info.manifest.get("text_encoder") or {}).get("name", "")
        raise DataError(f"model.text_dim is {text_dim} but {key} {info.source or info.root} holds {info.text_dim}-d "
                        f"{enc + ' ' if enc else ''}embeddings: leave model.text_dim unset (it is read from the "
                        f"dataset) or set it to {info.text_dim}")
    return text_dim


def first_sample_check(info: DatasetInfo, text_dim: int, key: str = "data.train") -> None:
    """Check the first sample against the config before training starts."""
    dataset_text_dim(info, text_dim, key)
    try:
        first = next(iter_samples(info.shards[0].url), None)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001
        raise DataError(f"cannot read shard {info.shards[0].url}: {e}") from None
    if first is None:
        raise DataError(f"shard {info.shards[0].url} holds no samples")
    check_sample(first, text_dim, sample_format(info.manifest))


def check_loader_plan(info: DatasetInfo, world_size: int, batch_size: int, grad_accum: int = 1,
                      slots: int = 0) -> PlanNumbers:
    """The loader's start checks, reading no data (a dry run makes them too): data.slots within what the data
    allows and at least one global batch of samples. -> the fresh epoch's numbers (slots.plan_numbers)."""
    check_slots(slots, info.num_samples)
    return plan_numbers(info.num_samples, world_size, batch_size, grad_accum)


def make_loader(info: DatasetInfo, spec: LoaderSpec):
    """-> (stream, DataLoader) of this rank. ``stream.tracker()`` makes the rank's CursorTracker."""
    if spec.prefetch_factor < 1:
        raise DataError(f"data.prefetch_factor must be >= 1, got {spec.prefetch_factor}")
    if info.num_samples <= 0:
        raise DataError(f"the dataset in {info.root} holds no samples")
    ds = ShardStream(info, spec)
    kw = dict(batch_size=None, num_workers=spec.num_workers, pin_memory=spec.pin_memory)
    if spec.num_workers > 0:
        kw.update(prefetch_factor=spec.prefetch_factor, persistent_workers=False, multiprocessing_context="fork"
                  if os.name == "posix" else None)
    return ds, DataLoader(ds, **kw)

"""The training loader: per rank, an infinite stream of decoded batches that follows slots.py's plan.

Reader g = rank K + i (K = max(1, num_workers)) reads its share of each epoch: for each run (slot, lo, hi)
of the share it computes the slot's shuffled order, reads from the shards only the inputs that the run
needs (the others are seeked over), and emits them in order. The DataLoader pulls from its workers
round-robin, so worker w serves reader (w + rotation) mod K: after a same-layout resume the batches are
exactly those of an uninterrupted run. Every batch carries ``epoch`` and ``cursor`` (int64 (m, 3): the
slot, lo, hi runs it holds) for ``CursorTracker``.

Samples a damaged shard cannot deliver become holes: counted in ``bad``, replaced by the last good sample
of the batch (or zeros), so that batch size and batch count never change.
"""
from __future__ import annotations

import logging
import os

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ...errors import DataError
from ..format import CROP_SIZES, LOAD_SIZES
from .decode import BadSample, check_sample, decode, sample_format
from .index import DatasetInfo, Shard
from .samples import iter_samples
from .slots import CursorTracker, Order, auto_slots, cursor_after_batches, fresh_start, plan, resume

log = logging.getLogger("stackgan_dist.data")


def make_order(info: DatasetInfo, seed: int, shuffle_buffer: int, slots: int = 0, train: bool = True) -> Order:
    n = info.num_samples
    return Order(n, slots or auto_slots(n, shuffle_buffer), seed, shuffle_buffer if train else 1, train)


class ShardStream(IterableDataset):
    """Infinite stream of ready batches for one rank (see the module docstring and slots.py)."""

    def __init__(self, info: DatasetInfo, stage: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, shuffle_buffer: int = 512,
                 start_batches: int = 0, train: bool = True, cursor: dict | None = None, slots: int = 0):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or num_workers < 0 or slots < 0:
            raise ValueError(f"bad loader layout: batch {batch_size}, rank {rank} of {world_size}, "
                             f"{num_workers} workers, {slots} slots")
        self.info = info
        self.fmt = sample_format(info.manifest)  # None: stored embeddings; else captions embedded on the fly
        # captions embedded on the training device: batches carry them as "caption" and a zero "text"
        self.captions_out = self.fmt is not None and self.fmt.embed_on == "device"
        self.stage = stage
        self.load_size, self.crop = LOAD_SIZES[stage], CROP_SIZES[stage]
        self.batch_size = batch_size
        self.seed = seed
        self.rank, self.world = rank, world_size
        self.k = max(1, num_workers)
        self.train = train
        self.order = make_order(info, seed, shuffle_buffer, slots, train)
        self._fresh = plan(self.order, {}, world_size, self.k, batch_size)
        self.batches_per_slot = sum(hi - lo for _, lo, hi in self._fresh[0]) // batch_size  # per reader
        if self.batches_per_slot == 0:
            raise DataError(f"dataset of {info.num_samples} samples is too small for {world_size * self.k} "
                            f"readers (world size {world_size} x {self.k} workers) at batch size {batch_size}")
        if cursor is None and start_batches:
            cursor = cursor_after_batches(self.order, world_size, self.k, batch_size, start_batches)
        self.resume = (resume(self.order, cursor, world_size, self.k, batch_size) if cursor is not None
                       else fresh_start(self.order, world_size, self.k, batch_size))
        self._starts: dict[int, list[tuple[Shard, int]]] = {}

    @property
    def batches_per_epoch(self) -> int:
        """Per rank, in a fresh epoch; equal on every rank."""
        return self.batches_per_slot * self.k

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

    def _run_samples(self, epoch: int, slot: int, lo: int, hi: int, order_cache: dict):
        """(position, raw sample) for positions lo..hi-1 of the slot's order."""
        if slot not in order_cache:
            order_cache[slot] = self.order.slot_order(epoch, slot)
        outs = order_cache[slot][lo:hi]
        held: dict[int, dict] = {}
        k = 0
        for idx, sample in self._slot_inputs(epoch, slot, sorted(outs)):
            held[idx] = sample
            while k < len(outs) and outs[k] in held:
                yield lo + k, held.pop(outs[k])
                k += 1
        if k != len(outs):
            raise RuntimeError(f"slot {slot} of epoch {epoch}: {len(outs) - k} samples not delivered")

    def _epochs(self, g: int):
        for e, shares in self.resume.epochs:
            yield e, shares[g]
        e = self.resume.next_epoch
        while True:  # fresh epochs: every reader has batches_per_slot > 0 batches (checked in __init__)
            yield e, self._fresh[g]
            e += 1

    def reader_batches(self, g: int):
        """Infinite batches of reader g (= rank x workers + worker)."""
        B = self.batch_size
        zero = (np.zeros((3, self.crop, self.crop), np.uint8), np.zeros(self.info.text_dim, np.float32), -1, 0, "")
        for epoch, share in self._epochs(g):
            order_cache: dict = {}
            imgs, texts, classes, caps, runs, bad, last_good = [], [], [], [], [], 0, None
            for slot, lo, hi in share:
                for pos, sample in self._run_samples(epoch, slot, lo, hi, order_cache):
                    try:
                        if sample.get("__bad__"):
                            raise BadSample("sample missing from an unreadable shard")
                        rng = np.random.default_rng([self.seed, epoch, slot, pos]) if self.train else None
                        out = last_good = decode(sample, self.load_size, self.crop, rng, self.info.text_dim,
                                                 self.train, self.fmt)
                    except BadSample as e:
                        bad += 1
                        log.warning("bad sample %s in %s: %s", sample["__key__"], sample.get("__url__"), e)
                        out = zero if last_good is None else last_good  # batch size and count stay fixed
                    imgs.append(out[0])
                    texts.append(out[1])
                    classes.append(out[2])
                    caps.append(out[4])
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
            if imgs:
                raise RuntimeError(f"reader {g}: epoch {epoch} share is not a multiple of the batch size")

    def slot_batches(self, reader: int, skip_batches: int = 0):
        """Reader ``reader``'s batches after ``skip_batches`` of its own (kept for callers that predate
        data.reader; new code reads sequentially with data.reader.read_samples)."""
        it = self.reader_batches(reader)
        for _ in range(skip_batches):
            next(it)
        return it

    def __iter__(self):
        wi = get_worker_info()
        wid, nw = (wi.id, wi.num_workers) if wi is not None else (0, 1)
        if not (nw == self.k or (wi is None and self.k == 1)):
            raise RuntimeError(f"the stream was made for {self.k} workers, the DataLoader has {nw}")
        i = (wid + self.resume.rotation) % self.k  # after a resume, worker 0 serves the next batch's reader
        yield from self.reader_batches(self.rank * self.k + i)


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


def make_loader(info: DatasetInfo, stage: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                num_workers: int = 2, shuffle_buffer: int = 512, start_batches: int = 0, prefetch_factor: int = 4,
                pin_memory: bool = False, train: bool = True, cursor: dict | None = None, slots: int = 0):
    """-> (stream, DataLoader). ``cursor``: a merged cursor (slots.merge_cursors) to resume from, at any
    world size; ``start_batches``: batches per rank an uninterrupted run of this layout consumed (older
    checkpoints). ``stream.tracker()`` makes the rank's CursorTracker."""
    if prefetch_factor < 1:
        raise DataError(f"data.prefetch_factor must be >= 1, got {prefetch_factor}")
    if info.num_samples <= 0:
        raise DataError(f"the dataset in {info.root} holds no samples")
    ds = ShardStream(info, stage, batch_size, seed, rank, world_size, num_workers, shuffle_buffer, start_batches,
                     train, cursor, slots)
    kw = dict(batch_size=None, num_workers=num_workers, pin_memory=pin_memory)
    if num_workers > 0:
        kw.update(prefetch_factor=prefetch_factor, persistent_workers=False, multiprocessing_context="fork"
                  if os.name == "posix" else None)
    return ds, DataLoader(ds, **kw)

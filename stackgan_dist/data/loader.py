"""Streaming reader of WebDataset shards: exact rank/worker split, deterministic shuffle, resumable.

How an epoch is laid out (all a pure function of seed, epoch, world size, workers, batch size):

1. Shards are permuted with an RNG seeded by (seed, epoch); their samples, in file order, form the
   epoch's global sequence of N samples.
2. There are S = world_size x num_workers *slots*. Slot s reads the contiguous range
   [s * n, (s + 1) * n) of that sequence, n = N // S: it opens only the one to few shards that range
   covers. The last N mod S samples of an epoch are dropped (fewer than S).
3. Each slot shuffles its range with a buffer seeded by (seed, epoch, slot) and yields n // B batches.
   Every rank therefore yields exactly the same number of batches per epoch (no DDP hang at epoch
   end), and over an epoch every kept sample is seen exactly once.
4. The DataLoader pulls from its workers round-robin, so rank-level batch i comes from slot
   (i mod K) and is that slot's batch i // K. Resuming after b batches gives worker w the slot
   (w + b) mod K and lets each slot skip the batches it already produced by running the shuffle on
   raw bytes without decoding them.

Per-sample randomness (crop, flip, caption choice) comes from an RNG seeded by
(seed, epoch, slot, position), so it does not depend on which process decodes the sample.
"""
from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import DataError
from .writer import CROP_SIZES, LOAD_SIZES, MANIFEST

log = logging.getLogger("stackgan_dist.data")
REQUIRED = ("jpg", "emb.npy")


@dataclass
class Shard:
    url: str
    samples: int


@dataclass
class DatasetInfo:
    shards: list[Shard]
    num_samples: int
    text_dim: int
    manifest: dict
    root: str


def expand_braces(pattern: str) -> list[str]:
    """Brace patterns (``shard-{000000..000009}.tar``) and, for local paths, glob wildcards."""
    import glob

    import braceexpand  # installed with webdataset

    out = []
    for u in braceexpand.braceexpand(pattern):
        if not u.startswith("pipe:") and "://" not in u and any(c in u for c in "*?["):
            out += sorted(glob.glob(u))
        else:
            out.append(u)
    return out


def _count_samples(url: str) -> int:
    keys = set()
    try:
        for key, _suffix, _data in iter_tar_members(url):
            keys.add(key)
    except Exception as e:  # noqa: BLE001 - a damaged shard: keep what it delivers
        log.warning("shard %s unreadable after %d samples (%s: %s); using those", url, len(keys), type(e).__name__, e)
        return max(0, len(keys) - 1)  # the last key may be partial
    return len(keys)


def resolve_dataset(spec: str) -> DatasetInfo:
    """``spec``: a split directory holding dataset.json, a dataset.json path, or a shard pattern / URL
    (local, ``shard-{000000..000009}.tar``, ``pipe:CMD``). Raises DataError before any worker starts."""
    if not spec:
        raise DataError("no data path given (set data.train / data.test, or pass --data)")
    mpath = None
    if os.path.isdir(spec):
        mpath = os.path.join(spec, MANIFEST)
        if not os.path.isfile(mpath):
            raise DataError(f"data directory {spec} has no {MANIFEST} (prepare it with `stackgan prepare`)")
    elif spec.endswith(".json"):
        if not os.path.isfile(spec):
            raise DataError(f"data manifest not found: {spec}")
        mpath = spec
    if mpath:
        with open(mpath) as f:
            m = json.load(f)
        root = os.path.dirname(os.path.abspath(mpath))
        shards = []
        for s in m["shards"]:
            url = s["path"] if (s["path"].startswith("pipe:") or "://" in s["path"] or os.path.isabs(s["path"])) \
                else os.path.join(root, s["path"])
            if not url.startswith("pipe:") and "://" not in url and not os.path.isfile(url):
                raise DataError(f"shard listed in {mpath} is missing: {url}")
            shards.append(Shard(url, int(s["samples"])))
        if not shards:
            raise DataError(f"{mpath} lists no shards")
        return DatasetInfo(shards, sum(s.samples for s in shards), int(m["text_dim"]), m, root)
    # a pattern: expand, check, count (a neighbouring dataset.json avoids the count pass)
    urls = expand_braces(spec)
    if not urls:
        raise DataError(f"shard pattern {spec} matches nothing")
    for u in urls:
        if not u.startswith("pipe:") and "://" not in u and not os.path.isfile(u):
            raise DataError(f"shard not found: {u}")
    shards = [Shard(u, _count_samples(u)) for u in urls]
    first = next(iter_samples(shards[0].url), None)
    if first is None:
        raise DataError(f"shard {urls[0]} holds no samples")
    if any(k not in first for k in REQUIRED):  # not a KeyError: a DataError naming shard, key, expected, found
        check_sample(first, 0)
    try:
        text_dim = int(np.load(io.BytesIO(first["emb.npy"]), allow_pickle=False).shape[-1])
    except Exception as e:  # noqa: BLE001
        raise DataError(f"shard {urls[0]}: sample '{first['__key__']}' has an unreadable emb.npy ({e})") from None
    return DatasetInfo(shards, sum(s.samples for s in shards), text_dim, {}, os.path.dirname(urls[0]))


def open_url(url: str):
    import webdataset as wds

    return wds.gopen(url, "rb")


class TarDamaged(tarfile.ReadError):
    """A truncated or corrupt tar (raised mid-stream, as tarfile's ReadError, webdataset#142)."""


def _read_exact(f, n: int) -> bytes:
    b = f.read(n)
    if len(b) < n and b:  # pipes may return short reads
        parts, got = [b], len(b)
        while got < n:
            c = f.read(n - got)
            if not c:
                break
            parts.append(c)
            got += len(c)
        b = b"".join(parts)
    return b


def _tar_number(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256 (sizes past 8 GiB)
        return int.from_bytes(field[1:], "big")
    v = field.split(b"\0", 1)[0].strip()
    return int(v, 8) if v else 0


def _pax_records(data: bytes) -> dict:
    out, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        sp = data.index(b" ", pos)
        n = int(data[pos:sp])
        k, _, v = data[sp + 1:pos + n - 1].partition(b"=")
        out[k.decode()] = v.decode("utf-8", "surrogateescape")
        pos += n
    return out


def iter_tar_members(url: str):
    """Yields (key, suffix, bytes) in file order. Raises TarDamaged on a truncated or corrupt tar.

    A plain header parser (ustar, GNU long names, pax paths) instead of tarfile's stream mode: tarfile's
    per-member Python overhead was ~40% of the loader's time per sample (benchmarks/dataloader.py)."""
    stream = open_url(url)
    try:
        long_name = pax = None
        while True:
            hdr = _read_exact(stream, 512)
            if not hdr:
                return  # ends at a member boundary without the end marker: the caller counts what is missing
            if len(hdr) < 512:
                raise TarDamaged(f"unexpected end of data in a header ({len(hdr)} of 512 bytes)")
            if hdr.count(0) == 512:
                return  # end-of-archive marker
            try:
                ok = _tar_number(hdr[148:156]) == sum(hdr) - sum(hdr[148:156]) + 256
            except ValueError:
                ok = False
            if not ok:
                raise TarDamaged("bad header checksum")
            size = _tar_number(hdr[124:136])
            typ = hdr[156:157]
            if pax and "size" in pax:
                size = int(pax["size"])
            padded = (size + 511) & ~511
            data = _read_exact(stream, padded)
            if len(data) < padded:
                raise TarDamaged(f"unexpected end of data ({len(data)} of {padded} bytes of a member)")
            if size != padded:
                data = data[:size]
            if typ == b"L":  # GNU long name of the next member
                long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
                continue
            if typ in (b"x", b"X"):
                pax = _pax_records(data)
                continue
            if typ in (b"g", b"K"):
                continue
            name = hdr[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if hdr[257:263] == b"ustar\0":  # POSIX ustar: a name prefix
                prefix = hdr[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                if prefix:
                    name = prefix + "/" + name
            name = (pax or {}).get("path") or long_name or name
            long_name = pax = None
            if typ not in (b"0", b"\0", b"7"):  # regular files only
                continue
            base = os.path.basename(name)
            if "." not in base or base.startswith("."):
                continue
            key, suffix = base.split(".", 1)
            key = os.path.join(os.path.dirname(name), key)
            yield key, suffix, data
    finally:
        stream.close()


def iter_samples(url: str):
    """Groups contiguous members of one key into a sample dict. A key that reappears later in the tar
    (webdataset#140: non-contiguous members) is an error rather than a silent partial sample."""
    cur: dict | None = None
    seen: set[str] = set()
    for key, suffix, data in iter_tar_members(url):
        if cur is not None and key != cur["__key__"]:
            yield cur
            cur = None
        if cur is None:
            if key in seen:
                raise DataError(f"shard {url}: members of sample '{key}' are not contiguous")
            seen.add(key)
            cur = {"__key__": key, "__url__": url}
        cur[suffix] = data
    if cur is not None:
        yield cur


class BadSample(Exception):
    pass


def check_sample(sample: dict, text_dim: int) -> None:
    missing = [k for k in REQUIRED if k not in sample]
    if missing:
        raise DataError(f"shard {sample.get('__url__')}: sample '{sample['__key__']}' lacks {missing} "
                        f"(expected keys {list(REQUIRED)}, found {sorted(k for k in sample if not k.startswith('__'))})")
    emb = np.load(io.BytesIO(sample["emb.npy"]), allow_pickle=False)
    if emb.ndim not in (1, 2) or emb.shape[-1] != text_dim:
        raise DataError(f"shard {sample.get('__url__')}: sample '{sample['__key__']}' has an embedding of shape "
                        f"{tuple(emb.shape)}; expected (captions, {text_dim}) (model.text_dim)")


def decode(sample: dict, load_size: int, crop: int, rng: np.random.Generator, text_dim: int, train: bool = True):
    """-> image uint8 (3, crop, crop), text embedding float32 (text_dim,), class id, caption index."""
    try:
        img = Image.open(io.BytesIO(sample["jpg"]))
        if img.format == "JPEG":
            img.draft("RGB", (load_size, load_size))  # decode at 1/2, 1/4 ... scale: no full-size decode
        if img.mode != "RGB":  # convert() copies even when there is nothing to convert
            img = img.convert("RGB")
        if img.size != (load_size, load_size):
            img = img.resize((load_size, load_size), Image.BICUBIC)
        a = np.asarray(img, dtype=np.uint8)
        emb = np.load(io.BytesIO(sample["emb.npy"]), allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - any decode failure makes a bad sample
        raise BadSample(f"{type(e).__name__}: {e}") from None
    if emb.ndim == 1:
        emb = emb[None]
    if emb.shape[-1] != text_dim:
        raise DataError(f"shard {sample.get('__url__')}: sample '{sample['__key__']}' embedding dim "
                        f"{emb.shape[-1]}, expected {text_dim} (model.text_dim)")
    if train:
        x, y = (int(rng.integers(0, load_size - crop + 1)) for _ in range(2))
        flip = bool(rng.integers(0, 2))
        cap = int(rng.integers(0, emb.shape[0]))
    else:
        x = y = (load_size - crop) // 2
        flip, cap = False, 0
    a = a[y:y + crop, x:x + crop]
    if flip:
        a = a[:, ::-1]
    cls = int(sample["cls"]) if "cls" in sample else -1
    return np.ascontiguousarray(a.transpose(2, 0, 1)), emb[cap].astype(np.float32), cls, cap


class ShardStream(IterableDataset):
    """Infinite stream of ready batches for one rank (see the module docstring for the layout)."""

    def __init__(self, info: DatasetInfo, stage: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, shuffle_buffer: int = 512,
                 start_batches: int = 0, train: bool = True):
        self.info = info
        self.stage = stage
        self.load_size, self.crop = LOAD_SIZES[stage], CROP_SIZES[stage]
        self.batch_size = batch_size
        self.seed = seed
        self.rank, self.world = rank, world_size
        self.k = max(1, num_workers)
        self.shuffle_buffer = shuffle_buffer
        self.start_batches = start_batches
        self.train = train
        self.slots = self.world * self.k
        self.per_slot = info.num_samples // self.slots
        self.batches_per_slot = self.per_slot // batch_size
        if self.batches_per_slot == 0:
            raise DataError(f"dataset of {info.num_samples} samples is too small for {self.slots} reader slots "
                            f"(world size {self.world} x {self.k} workers) at batch size {batch_size}")

    @property
    def batches_per_epoch(self) -> int:
        """Per rank; equal on every rank."""
        return self.batches_per_slot * self.k

    def _epoch_order(self, epoch: int) -> list[Shard]:
        if not self.train:
            return list(self.info.shards)
        perm = np.random.default_rng([self.seed, epoch, 0x5AAD]).permutation(len(self.info.shards))
        return [self.info.shards[i] for i in perm]

    def _slot_raw(self, epoch: int, slot: int):
        """Raw samples of this slot's range, in file order (opens only the shards it covers)."""
        lo, hi = slot * self.per_slot, (slot + 1) * self.per_slot
        pos = 0
        for shard in self._epoch_order(epoch):
            s_lo, s_hi = pos, pos + shard.samples
            pos = s_hi
            if s_hi <= lo:
                continue
            if s_lo >= hi:
                break
            i = s_lo
            try:
                for sample in iter_samples(shard.url):
                    if i >= hi:
                        break
                    if i >= lo:
                        yield sample
                    i += 1
            except DataError:
                raise
            except Exception as e:  # noqa: BLE001 - truncated / corrupt tar: the rest of the range is lost
                log.warning("shard %s unreadable after %d samples (%s: %s); skipping its remaining samples",
                            shard.url, i - s_lo, type(e).__name__, e)
            else:
                if i < min(s_hi, hi):  # a tar cut at a member boundary ends without an error
                    log.warning("shard %s ended after %d of %d samples; skipping the rest", shard.url,
                                i - s_lo, shard.samples)
            # samples of the range that the shard could not deliver become holes, filled downstream
            while i < min(s_hi, hi):
                if i >= lo:
                    yield {"__key__": f"<missing {shard.url}#{i - s_lo}>", "__url__": shard.url, "__bad__": True}
                i += 1

    def _shuffled(self, epoch: int, slot: int):
        if not self.train or self.shuffle_buffer <= 1:
            yield from self._slot_raw(epoch, slot)
            return
        rng = np.random.default_rng([self.seed, epoch, slot, 0xB0F])
        buf: list = []
        for s in self._slot_raw(epoch, slot):
            if len(buf) < self.shuffle_buffer:
                buf.append(s)
                continue
            j = int(rng.integers(len(buf)))
            out, buf[j] = buf[j], s
            yield out
        rng.shuffle(buf)
        yield from buf

    def slot_batches(self, slot: int, skip_batches: int):
        """Infinite batches of one slot, starting after ``skip_batches`` of its own batches."""
        epoch = skip_batches // self.batches_per_slot
        skip = skip_batches % self.batches_per_slot
        B = self.batch_size
        while True:
            it = self._shuffled(epoch, slot)
            for _ in range(skip * B):  # consumed before the resume: read, not decoded
                next(it)
            last_good = None
            for b in range(skip, self.batches_per_slot):
                imgs, texts, classes, bad = [], [], [], 0
                for j in range(B):
                    pos = b * B + j
                    sample = next(it)
                    rng = np.random.default_rng([self.seed, epoch, slot, pos])
                    try:
                        if sample.get("__bad__"):
                            raise BadSample("sample missing from an unreadable shard")
                        out = decode(sample, self.load_size, self.crop, rng, self.info.text_dim, self.train)
                        last_good = out
                    except BadSample as e:
                        bad += 1
                        log.warning("bad sample %s in %s: %s", sample["__key__"], sample.get("__url__"), e)
                        if last_good is None:  # keep the batch size (and every rank's count) fixed
                            out = (np.zeros((3, self.crop, self.crop), np.uint8),
                                   np.zeros(self.info.text_dim, np.float32), -1, 0)
                        else:
                            out = last_good
                    imgs.append(out[0])
                    texts.append(out[1])
                    classes.append(out[2])
                yield {"image": torch.from_numpy(np.stack(imgs)), "text": torch.from_numpy(np.stack(texts)),
                       "cls": torch.tensor(classes, dtype=torch.int64), "bad": torch.tensor(bad),
                       "epoch": torch.tensor(epoch)}
            epoch += 1
            skip = 0

    def __iter__(self):
        wi = get_worker_info()
        wid, nw = (wi.id, wi.num_workers) if wi is not None else (0, 1)
        assert nw == self.k or (wi is None and self.k == 1), "num_workers must match the stream's"
        local = (wid + self.start_batches) % self.k  # rotate: resumed batch b comes from worker 0
        slot = self.rank * self.k + local
        done = self.start_batches // self.k + (1 if local < self.start_batches % self.k else 0)
        yield from self.slot_batches(slot, done)


def first_sample_check(info: DatasetInfo, text_dim: int) -> None:
    """Check the first sample against the config before training starts."""
    if info.text_dim != text_dim:
        raise DataError(f"data has text_dim {info.text_dim} but model.text_dim is {text_dim}")
    try:
        first = next(iter_samples(info.shards[0].url), None)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001
        raise DataError(f"cannot read shard {info.shards[0].url}: {e}") from None
    if first is None:
        raise DataError(f"shard {info.shards[0].url} holds no samples")
    check_sample(first, text_dim)


def make_loader(info: DatasetInfo, stage: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                num_workers: int = 2, shuffle_buffer: int = 512, start_batches: int = 0, prefetch_factor: int = 4,
                pin_memory: bool = False, train: bool = True):
    ds = ShardStream(info, stage, batch_size, seed, rank, world_size, num_workers, shuffle_buffer, start_batches, train)
    kw = dict(batch_size=None, num_workers=num_workers, pin_memory=pin_memory)
    if num_workers > 0:
        kw.update(prefetch_factor=prefetch_factor, persistent_workers=False, multiprocessing_context="fork"
                  if os.name == "posix" else None)
    return ds, DataLoader(ds, **kw)

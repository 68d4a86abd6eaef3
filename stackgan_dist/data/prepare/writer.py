"""WebDataset shard writer and the per-split ``dataset.json`` manifest (the format: data/format.py)."""
from __future__ import annotations

import io
import json
import os
import time

import numpy as np
from PIL import Image

from ..format import DATASET_FORMAT, DATASET_VERSION, LOAD_SIZES, MANIFEST, STORE_SIZE, sha256_file
from ..images import fit_square, to_rgb8


def encode_image(img: Image.Image, size: int = STORE_SIZE, quality: int = 92, fit: str = "stretch") -> bytes:
    img = fit_square(to_rgb8(img), size, fit)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


class ShardWriter:
    """Writes samples to ``DIR/PREFIX-NNNNNN.tar``; a new shard starts past ``max_count`` samples or
    ``max_bytes``. Members of one sample are written together (one key contiguous), each shard is
    fsynced and closed (webdataset's ShardWriter loses its last sample unless closed)."""

    def __init__(self, out_dir: str, prefix: str = "shard", max_count: int = 10000, max_bytes: int = 256 << 20,
                 start_index: int = 0):
        import webdataset as wds

        self._wds = wds
        self.out_dir = out_dir
        self.prefix = prefix
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.index = start_index
        self.shards: list[dict] = []
        self._tar = None
        self._stream = None
        self._count = 0
        self._bytes = 0
        os.makedirs(out_dir, exist_ok=True)

    def _open(self) -> None:
        name = f"{self.prefix}-{self.index:06d}.tar"
        self._path = os.path.join(self.out_dir, name)
        self._stream = open(self._path + ".part", "wb")
        self._tar = self._wds.TarWriter(self._stream)
        self._count = 0
        self._bytes = 0

    def _close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._stream.flush()
        os.fsync(self._stream.fileno())
        self._stream.close()
        os.replace(self._path + ".part", self._path)
        self.shards.append({"path": os.path.basename(self._path), "samples": self._count,
                            "size": os.path.getsize(self._path), "sha256": sha256_file(self._path)})
        self._tar = None
        self.index += 1

    def write(self, sample: dict) -> None:
        size = sum(len(v) for k, v in sample.items() if not k.startswith("__"))
        if self._tar is not None and (self._count >= self.max_count or self._bytes + size > self.max_bytes):
            self._close()
        if self._tar is None:
            self._open()
        self._tar.write(sample)
        self._count += 1
        self._bytes += size

    def close(self) -> list[dict]:
        self._close()
        return self.shards


def make_sample(key: str, image: Image.Image | bytes, emb: np.ndarray, captions: list[str],
                cls: int | None = None) -> dict:
    from ...errors import UserError
    from ...safety.budgets import MAX_CLASS_ID, OverBudget, check_embedding

    emb = np.asarray(emb, dtype=np.float32)
    if emb.ndim == 1:
        emb = emb[None]
    try:  # what the loader would skip as a bad sample is not written
        check_embedding(emb)
    except OverBudget as e:
        raise UserError(f"sample {key}: {e}") from None
    if cls is not None and not 0 <= int(cls) <= MAX_CLASS_ID:
        raise UserError(f"sample {key}: class {cls} is outside 0 to 2**63-1")
    s = {"__key__": key, "jpg": image if isinstance(image, bytes) else encode_image(image),
         "emb.npy": npy_bytes(emb), "txt.json": json.dumps(list(captions)).encode()}
    if cls is not None:
        s["cls"] = str(int(cls)).encode()
    return s


def write_manifest(out_dir: str, shards: list[dict], encoder: dict, source: str, extra: dict | None = None) -> dict:
    shards = sorted(shards, key=lambda s: s["path"])
    m = {
        "format": DATASET_FORMAT,
        "version": DATASET_VERSION,
        "source": source,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "num_samples": int(sum(s["samples"] for s in shards)),
        "text_encoder": encoder,
        "text_dim": int(encoder["dim"]),
        "image_size": STORE_SIZE,
        "image_format": "jpg",
        "load_sizes": LOAD_SIZES,
        "shards": shards,
    }
    if extra:
        m.update(extra)
    tmp = os.path.join(out_dir, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(m, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(out_dir, MANIFEST))
    return m


DEFAULT_SHARD_BYTES = 256 << 20
DEFAULT_SHARD_COUNT = 100_000  # the byte limit usually decides; --samples-per-shard lowers this


def _write_range(w: int, lo: int, hi: int, build, tmp_dir: str, max_count: int, max_bytes: int, tick) -> tuple:
    writer = ShardWriter(tmp_dir, prefix=f"w{w:04d}", max_count=max_count, max_bytes=max_bytes)
    skipped = []
    for i in range(lo, hi):
        s = build(i)
        if isinstance(s, str):  # a reason: this input is skipped (e.g. an image that does not decode)
            skipped.append(s)
        else:
            writer.write(s)
        tick()
    return writer.close(), skipped


def _worker_main(w, lo, hi, build, tmp_dir, max_count, max_bytes, counter, q) -> None:
    import traceback

    def tick():
        with counter.get_lock():
            counter.value += 1

    try:
        q.put((w, "ok", *_write_range(w, lo, hi, build, tmp_dir, max_count, max_bytes, tick)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        from ...errors import UserError

        q.put((w, "error", str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}",
               "" if isinstance(e, UserError) else traceback.format_exc()))


def _own_shards(out_dir: str, prefix: str) -> set[str]:
    """The shard files a previous prepare wrote here (those its dataset.json lists). A ``PREFIX-*.tar`` that no
    such file lists is someone else's: refused in one line, never deleted or overwritten."""
    from ...errors import DataError

    old: set[str] = set()
    mpath = os.path.join(out_dir, MANIFEST)
    if os.path.lexists(mpath):
        from ..read.index import read_manifest

        m = read_manifest(mpath)
        entries = m.get("shards") if isinstance(m, dict) else None
        for s in entries if isinstance(entries, list) else []:
            p = s.get("path") if isinstance(s, dict) else None
            if isinstance(p, str) and os.path.basename(p) == p and p.startswith(prefix + "-") and p.endswith(".tar"):
                old.add(p)
    foreign = sorted(n for n in os.listdir(out_dir) if n.startswith(prefix + "-") and n.endswith(".tar")
                     and n not in old)
    if foreign:
        raise DataError(f"{out_dir} holds {len(foreign)} {prefix}-*.tar file(s) that no dataset.json of a previous "
                        f"prepare lists (first: {foreign[0]}): move them or choose another --out")
    return old


def write_parallel(out_dir: str, n: int, build, workers: int = 1, max_count: int = DEFAULT_SHARD_COUNT,
                   max_bytes: int = DEFAULT_SHARD_BYTES, desc: str = "writing", prefix: str = "shard",
                   progress: bool = True) -> tuple[list[dict], list[str]]:
    """Write samples ``build(0) .. build(n-1)`` into ``out_dir/PREFIX-NNNNNN.tar`` with ``workers`` processes.

    ``build(i)`` returns a sample dict (see make_sample) or a string: the reason input i is skipped.
    Worker w writes the contiguous range i in [w n / W, (w+1) n / W) into its own shards; afterwards the
    shards are renamed in order, so shard order = input order whatever the number of workers (at most
    one part-filled shard per worker). Inputs are handed over by fork: ``build`` need not pickle, but
    should not hold a model with running threads (encode text in the parent first).
    Returns (shard entries for the manifest, skip reasons)."""
    import webdataset  # noqa: F401 - imported once here, not in every forked writer (a slow import)
    from tqdm import tqdm

    workers = max(1, min(workers, n)) if n > 0 else 1
    tmp_dir = os.path.join(out_dir, ".writing")
    os.makedirs(out_dir, exist_ok=True)
    old = _own_shards(out_dir, prefix)
    if os.path.isdir(tmp_dir):
        import shutil

        shutil.rmtree(tmp_dir)
    os.makedirs(tmp_dir)
    bounds = [(w * n // workers, (w + 1) * n // workers) for w in range(workers)]
    bar = tqdm(total=n, desc=desc, unit="img", disable=not progress, leave=False, dynamic_ncols=True)
    results: dict[int, tuple] = {}
    if workers == 1:
        results[0] = _write_range(0, 0, n, build, tmp_dir, max_count, max_bytes, lambda: bar.update(1))
    else:
        import multiprocessing as mp
        import queue

        ctx = mp.get_context("fork")
        counter, q = ctx.Value("q", 0), ctx.Queue()
        procs = [ctx.Process(target=_worker_main, args=(w, lo, hi, build, tmp_dir, max_count, max_bytes, counter, q),
                             daemon=True) for w, (lo, hi) in enumerate(bounds)]
        for p in procs:
            p.start()
        try:
            while len(results) < workers:
                try:
                    w, status, *rest = q.get(timeout=0.25)
                except queue.Empty:
                    if any(p.exitcode not in (None, 0) for p in procs):
                        dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                        raise RuntimeError(f"a writer process died (exit codes {dead})") from None
                else:
                    if status == "error":
                        if not rest[1]:  # a UserError: one clear line
                            from ...errors import DataError

                            raise DataError(rest[0])
                        raise RuntimeError(f"writer process {w} failed: {rest[0]}\n{rest[1]}")
                    results[w] = tuple(rest)
                if counter.value != bar.n:
                    bar.update(counter.value - bar.n)
        finally:
            for p in procs:
                if p.is_alive() and len(results) < workers:
                    p.terminate()
                p.join()
    bar.close()
    # drop shards an earlier prepare of this split wrote (and only those), then move the new ones in, in order
    for name in old:
        if os.path.isfile(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    shards, skipped = [], []
    k = 0
    for w in range(workers):
        part, sk = results[w]
        skipped += sk
        for s in part:
            name = f"{prefix}-{k:06d}.tar"
            os.replace(os.path.join(tmp_dir, s["path"]), os.path.join(out_dir, name))
            shards.append({**s, "path": name})
            k += 1
    os.rmdir(tmp_dir)
    return shards, skipped

"""Atomic, verified, multi-rank checkpoints.

Layout: ``RUN/checkpoints/step_XXXXXXXX/`` holding
- ``model.pt`` (rank 0): G, D (unwrapped state dicts), Stage-I G for Stage-II, optimizers, scalers,
  train state, the model-defining config and its hash;
- ``rank_XXXXX.pt`` (every rank): RNG states and the data position of that rank;
- ``engine/`` (DeepSpeed runs): the engines' own files;
- ``manifest.json``, written last: sha256 and size of every file, step, world size, versions.

Protocol: rank 0 makes ``.tmp-step_X/``; barrier; every rank writes and fsyncs its files; barrier;
rank 0 hashes them, writes the manifest, fsyncs, renames the folder into place, then repoints
``latest`` (a symlink replaced by an atomic rename) and only then prunes old checkpoints; barrier.
A crash at any moment leaves the previous checkpoint complete and ``latest`` pointing at one.

Every file of a checkpoint is untrusted when read. ``model.pt`` and ``rank_*.pt`` load through
``load_file`` (``torch.load(weights_only=True)``); DeepSpeed's ``engine/`` files load through
``engine_files.SafeLoadingEngine`` (``weights_only=True`` with exactly the DeepSpeed metadata classes its
ZeRO files pickle allowed), never through DeepSpeed's own ``weights_only=False`` loader. So a checkpoint
from elsewhere, even one whose manifest hashes were recomputed after tampering, cannot run code.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import CheckpointError
from .engine_files import first_line

log = logging.getLogger("stackgan_dist.checkpoint")
STEP_RE = re.compile(r"^step_(\d{8,})$")
MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def save_file(obj, path: str) -> dict:
    """Serialises in memory, then writes and fsyncs: a full disk surfaces as the OSError the kernel gave
    (ENOSPC, EFBIG), not as a zip-writer assertion from inside torch.save. Returns the manifest entry
    (size, sha256 of the bytes written)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    view = memoryview(buf.getbuffer())
    entry = {"size": len(view), "sha256": hashlib.sha256(view).hexdigest()}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)
    return entry


def load_file(path: str):
    """A checkpoint file of ours, loaded with ``weights_only=True`` (tensors and plain containers only: a
    file cannot run code). Anything it refuses, or a damaged file, is a CheckpointError naming the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file missing: {path}") from None
    except Exception as e:  # noqa: BLE001 -- a damaged or hostile file is one clear line
        raise CheckpointError(f"refused to load checkpoint file {path}: {first_line(e)}") from None


def to_cpu(obj):
    """Deep copy of a state tree onto the CPU (so that writing can overlap training)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        t = [to_cpu(v) for v in obj]
        return type(obj)(t) if isinstance(obj, list) else tuple(t)
    return obj


def numpy_state_to_safe(state) -> dict:
    name, keys, pos, has_gauss, gauss = state
    return {"name": name, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def numpy_state_from_safe(d: dict):
    return (d["name"], d["keys"].numpy().astype(np.uint32), d["pos"], d["has_gauss"], d["gauss"])


def params_digest(*modules) -> str:
    """sha256 over every parameter and buffer, in sorted-name order, of the given modules' state dicts."""
    h = hashlib.sha256()
    for i, m in enumerate(modules):
        sd = m if isinstance(m, dict) else m.state_dict()
        for name in sorted(sd):
            t = sd[name]
            if not isinstance(t, torch.Tensor):
                continue
            h.update(f"{i}:{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def all_finite(sd: dict) -> bool:
    return all(torch.isfinite(t).all() for t in sd.values() if isinstance(t, torch.Tensor) and t.is_floating_point())


def list_checkpoints(ckpt_root: str) -> list[tuple[int, str]]:
    if not os.path.isdir(ckpt_root):
        return []
    out = []
    for name in os.listdir(ckpt_root):
        m = STEP_RE.match(name)
        if m and os.path.isdir(os.path.join(ckpt_root, name)):
            out.append((int(m.group(1)), os.path.join(ckpt_root, name)))
    return sorted(out, reverse=True)


def verify(path: str) -> tuple[bool, str]:
    """-> (ok, reason). Checks the manifest exists and every file matches its size and sha256."""
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        return False, f"{mpath} missing (incomplete checkpoint)"
    try:
        with open(mpath) as f:
            man = json.load(f)
    except (OSError, ValueError) as e:
        return False, f"{mpath} corrupt ({e})"
    for rel, meta in man.get("files", {}).items():
        fp = os.path.join(path, rel)
        if not os.path.isfile(fp):
            return False, f"{fp} missing"
        size = os.path.getsize(fp)
        if size != meta["size"]:
            return False, f"{fp} size mismatch (manifest {meta['size']}, found {size}): corrupt"
        if sha256_file(fp) != meta["sha256"]:
            return False, f"{fp} sha256 mismatch: corrupt"
    return True, "ok"


def read_manifest(path: str) -> dict:
    with open(os.path.join(path, MANIFEST)) as f:
        return json.load(f)


def resolve_checkpoint(path: str) -> str:
    """A run directory, a checkpoints/ folder, ``latest`` or a step folder -> the newest *valid* step folder."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint or run directory not found: {path}")
    path = os.path.realpath(path)
    if os.path.isfile(os.path.join(path, MANIFEST)) or STEP_RE.match(os.path.basename(path)):
        ok, why = verify(path)
        if not ok:
            raise CheckpointError(f"checkpoint {path} is not usable: {why}")
        return path
    root = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
    found = newest_valid(root, report=True)
    if found is None:
        raise CheckpointError(f"no valid checkpoint under {path}")
    return found


def newest_valid(ckpt_root: str, report: bool = True) -> str | None:
    for _step, p in list_checkpoints(ckpt_root):
        ok, why = verify(p)
        if ok:
            return p
        if report:
            log.warning("skipping checkpoint %s: %s", p, why)
    return None


def _versions() -> dict:
    import platform

    v = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        from .. import __version__ as ours

        v["stackgan_dist"] = ours
    except ImportError:
        pass
    return v


@dataclass
class _WriteJob:
    step: int
    tmp: str
    prev: str
    t0: float
    extra_manifest: dict
    files: dict = field(default_factory=dict)
    err: Exception | None = None
    thread: threading.Thread | None = None


class CheckpointManager:
    def __init__(self, run_dir: str, env, keep_last: int = 3):
        self.root = os.path.join(run_dir, "checkpoints")
        self.env = env
        self.keep_last = keep_last
        self.last_saved: str | None = None
        self.last_save_s = 0.0
        self._pending: _WriteJob | None = None
        if env.is_main:
            os.makedirs(self.root, exist_ok=True)

    def _barrier(self):
        if self.env.distributed:
            import torch.distributed as dist

            dist.barrier()

    def save(self, step: int, model_state: dict | None, rank_state: dict, engine_save=None,
             extra_manifest: dict | None = None, background: bool = False) -> str | None:
        """Collective: every rank calls it. ``model_state`` is only needed on rank 0 and must already be
        a CPU copy (it is written while training goes on). ``engine_save(dir)`` (DeepSpeed) writes the
        engines' files into ``dir/engine``; it is collective, so DeepSpeed saves never go to the background.

        With ``background=True`` the files are written by a thread and the call returns None at once;
        ``commit_pending()``, which every rank calls at the same later step, waits for the writer and
        commits. Until then ``latest`` still names the previous checkpoint."""
        self.commit_pending()
        t0 = time.perf_counter()
        name = step_dir_name(step)
        tmp = os.path.join(self.root, f".tmp-{name}")
        prev = self.last_saved or "none"
        err: Exception | None = None
        # Every early failure is agreed on by all ranks: a rank that raised alone would leave the others
        # waiting in the next collective until the timeout.
        if model_state is not None:
            bad = [k for k in ("G", "D") if not all_finite(model_state[k])]
            if bad:
                err = CheckpointError(f"refusing to save step {step}: non-finite values in {' and '.join(bad)}'s "
                                      f"parameters; last good checkpoint: {prev}")
        if err is None and self.env.is_main:
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                os.makedirs(tmp)
            except OSError as e:
                err = e
        if self._agree_failure(err is not None):
            if isinstance(err, CheckpointError):
                raise err
            raise CheckpointError(f"checkpoint for step {step} not started ({err or 'failed on another rank'}); "
                                  f"previous checkpoint {prev} kept")
        # the agreement above is an all-reduce: rank 0 had made the folder before anyone writes into it
        job = _WriteJob(step, tmp, prev, t0, extra_manifest or {})
        if engine_save is not None:
            try:
                engine_save(os.path.join(tmp, "engine"))
            except Exception as e:  # noqa: BLE001 -- reaches the agreement in commit
                job.err = e
            background = False
        if background and job.err is None:
            job.thread = threading.Thread(target=self._write, args=(job, model_state, rank_state),
                                          name=f"ckpt-writer-{step}", daemon=True)
            job.thread.start()
            self._pending = job
            return None
        if job.err is None:
            self._write(job, model_state, rank_state)
        self._pending = job
        return self.commit_pending()

    @property
    def pending_step(self) -> int | None:
        return self._pending.step if self._pending is not None else None

    def _write(self, job: "_WriteJob", model_state: dict | None, rank_state: dict) -> None:
        try:
            if self.env.is_main and model_state is not None:
                job.files["model.pt"] = save_file(model_state, os.path.join(job.tmp, "model.pt"))
            rf = f"rank_{self.env.rank:05d}.pt"
            job.files[rf] = save_file(rank_state, os.path.join(job.tmp, rf))
        except Exception as e:  # noqa: BLE001 -- every failure must reach the agreement in commit, or
            job.err = e  # the other ranks wait in it forever
        delay = float(os.environ.get("STACKGAN_TEST_SAVE_DELAY_S", "0") or 0)
        if delay > 0:  # test hook: holds the files written but uncommitted, so a test can kill mid-save
            time.sleep(delay)

    def commit_pending(self) -> str | None:
        """Collective. Waits for this rank's writer, agrees with the others that every file is on disk,
        then rank 0 writes the manifest and renames the folder into place and moves ``latest``."""
        job, self._pending = self._pending, None
        if job is None:
            return None
        if job.thread is not None:
            job.thread.join()
        step, tmp, prev = job.step, job.tmp, job.prev
        name = step_dir_name(step)
        final = os.path.join(self.root, name)
        err = job.err
        failed = self._agree_failure(err is not None)
        if failed:
            if self.env.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            msg = f"checkpoint write for step {step} failed ({err or 'on another rank'}); previous checkpoint " \
                  f"{prev} kept"
            raise CheckpointError(msg)
        files = job.files
        if self.env.distributed:  # each rank hashed its own bytes while writing: gather instead of re-reading
            import torch.distributed as dist

            gathered: list = [None] * self.env.world_size
            dist.all_gather_object(gathered, files)
            files = {k: v for d in gathered for k, v in d.items()}
        if self.env.is_main:
            try:
                for dirpath, _dirs, fnames in os.walk(tmp):  # files written by others (DeepSpeed engines)
                    for fn in fnames:
                        fp = os.path.join(dirpath, fn)
                        rel = os.path.relpath(fp, tmp)
                        if rel not in files:  # DeepSpeed's own `latest` is recorded, never our commit marker
                            files[rel] = {"size": os.path.getsize(fp), "sha256": sha256_file(fp)}
                man = {"version": FORMAT_VERSION, "step": step, "world_size": self.env.world_size,
                       "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "versions": _versions(),
                       "files": dict(sorted(files.items()))}
                man.update(job.extra_manifest)
                with open(os.path.join(tmp, MANIFEST), "w") as f:
                    json.dump(man, f, indent=1)
                    f.flush()
                    os.fsync(f.fileno())
                fsync_dir(tmp)
                old = None
                if os.path.exists(final):  # e.g. a corrupt newer checkpoint left from before a fallback resume
                    old = os.path.join(self.root, f".old-{name}")
                    shutil.rmtree(old, ignore_errors=True)
                    os.replace(final, old)
                os.replace(tmp, final)
                fsync_dir(self.root)
                link_tmp = os.path.join(self.root, ".latest.tmp")
                if os.path.lexists(link_tmp):
                    os.remove(link_tmp)
                os.symlink(name, link_tmp)
                os.replace(link_tmp, os.path.join(self.root, "latest"))
                fsync_dir(self.root)
                if old:
                    shutil.rmtree(old, ignore_errors=True)
            except OSError as e:
                err = e
        failed = self._agree_failure(err is not None)
        if failed:
            if self.env.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"checkpoint commit for step {step} failed ({err or 'on rank 0'}); previous "
                                  f"checkpoint {prev} kept")
        if self.env.is_main:
            self._prune(keep=final)
        self._barrier()
        self.last_saved = final
        self.last_save_s = time.perf_counter() - job.t0
        return final

    def abandon_pending(self) -> None:
        """On an error path: lets a running writer finish without committing (its folder stays a temporary)."""
        job, self._pending = self._pending, None
        if job is not None and job.thread is not None:
            job.thread.join()

    def _agree_failure(self, failed: bool) -> bool:
        if not self.env.distributed:
            return failed
        import torch.distributed as dist

        t = torch.tensor([1.0 if failed else 0.0], device=self.env.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item() > 0

    def _prune(self, keep: str) -> None:
        cks = list_checkpoints(self.root)
        for _step, p in cks[self.keep_last:]:
            if os.path.realpath(p) != os.path.realpath(keep):
                shutil.rmtree(p, ignore_errors=True)
        for name in os.listdir(self.root):  # stale temporaries of crashed saves
            if name.startswith((".tmp-", ".old-")) and os.path.join(self.root, name) != keep:
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)

    def latest_valid(self) -> str | None:
        return newest_valid(self.root, report=True)

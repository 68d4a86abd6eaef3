"""Atomic, verified, multi-rank checkpoints.

Layout: ``RUN/checkpoints/step_XXXXXXXX/`` holding
- ``model.pt`` (rank 0): G, D (unwrapped state dicts), Stage-I G for Stage-II, optimizers, scalers,
  train state, the model-defining config and its hash;
- ``rank_XXXXX.pt`` (every rank): RNG states and the data position of that rank;
- ``engine/`` (DeepSpeed runs): the engines' own files;
- ``manifest.json``, written last: sha256 and size of every file, step, world size, versions.

Protocol: rank 0 makes ``.tmp-step_X/``; barrier; every rank writes and fsyncs its files; barrier;
rank 0 hashes them, writes the manifest, fsyncs, renames the folder into place, then repoints
``latest`` (a small file naming the step, replaced by an atomic rename; a symlink in older runs) and only
then prunes old checkpoints, keeping the ``keep_last`` newest valid ones; barrier.
A crash at any moment leaves the previous checkpoint complete and ``latest`` pointing at one.

Every file of a checkpoint is untrusted when read. ``model.pt`` and ``rank_*.pt`` load through
``load_file`` (``torch.load(weights_only=True)``); DeepSpeed's ``engine/`` files load through
``SafeLoadingEngine`` in ``distributed/deepspeed_files.py`` (``weights_only=True`` with exactly the DeepSpeed
metadata classes its ZeRO files pickle allowed), never through DeepSpeed's own ``weights_only=False`` loader. So a checkpoint
from elsewhere, even one whose manifest hashes were recomputed after tampering, cannot run code.

This file is the protocol (temporary folder, manifest last, rename, ``latest``, discovery, pruning); how a
run file is opened is ``files.py``'s, what a manifest holds and how it is checked ``manifest.py``'s.
Pruning never leaves the run's own ``checkpoints/`` (a real folder of the run, never a link).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import stat
import threading
import time
from dataclasses import dataclass, field

import torch

from ..distributed.collectives import all_gather_object, any_flags, barrier
from ..errors import CheckpointError, CheckpointWriteError, UserError, first_line
from .files import (check_entry_any, create_exclusive, inside, open_read, os_error, read_bounded,
                    run_subdir, write_atomic, write_fd)
# re-exported: callers and tests import these from here since before the split
from .manifest import (MANIFEST, MANIFEST_VERSION, MAX_MANIFEST_BYTES, STEP_RE, all_finite,  # noqa: F401
                       check_manifest, params_digest, read_manifest, sha256_file, step_dir_name, verify)
from .state import numpy_state_from_safe, numpy_state_to_safe, to_cpu  # noqa: F401

log = logging.getLogger("stackgan_dist.checkpoint")
LATEST = "latest"
MAX_MODEL_FILE_BYTES = 8 << 30  # a model.pt beyond this is not one of ours (the authors' Stage-II is ~0.1 GB)


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
    fd = create_exclusive(path, "checkpoint file")  # in a folder made fresh for this save: never an old entry
    try:
        write_fd(fd, view)
        os.fsync(fd)
    finally:
        os.close(fd)
    return entry


def load_file(path: str):
    """A checkpoint file of ours, loaded with ``weights_only=True`` (tensors and plain containers only: a
    file cannot run code). Anything it refuses, or a damaged file, is a CheckpointError naming the file."""
    try:
        f = open_read(path, "checkpoint file", MAX_MODEL_FILE_BYTES)  # regular, bounded: no FIFO, no link
        if f is None:
            raise FileNotFoundError(path)
        with f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file missing: {path}") from None
    except Exception as e:  # noqa: BLE001 -- a damaged or hostile file is one clear line
        raise CheckpointError(f"refused to load checkpoint file {path}: {first_line(e)}") from None


def list_checkpoints(ckpt_root: str) -> list[tuple[int, str]]:
    """(step, path) of the step folders directly under ``ckpt_root``, newest first; links are not folders."""
    if not os.path.isdir(ckpt_root):
        return []
    out = []
    try:
        names = os.listdir(ckpt_root)
    except OSError:
        return []
    for name in names:
        m = STEP_RE.match(name)
        st = check_entry_any(os.path.join(ckpt_root, name)) if m else None
        if st is not None and stat.S_ISDIR(st.st_mode):
            out.append((int(m.group(1)), os.path.join(ckpt_root, name)))
    return sorted(out, reverse=True)


def read_latest(ckpt_root: str) -> str | None:
    """The step folder name ``checkpoints/latest`` names: a small file holding it (current runs) or a symlink
    to it (runs written before); None when absent, a directory (a copy made with cp -rL or scp -r) or junk."""
    p = os.path.join(ckpt_root, LATEST)
    try:
        if os.path.islink(p):  # the link's text names a step: read, never followed
            name = os.path.basename(os.readlink(p).rstrip("/"))
        elif os.path.isfile(p):
            name = (read_bounded(p, 4096, "latest pointer") or b"").decode("ascii", "replace").strip()
        else:
            return None
    except (OSError, UserError):
        return None
    return name if STEP_RE.match(name) else None


def write_latest(ckpt_root: str, name: str) -> None:
    """Points ``latest`` at ``name``: a small file written and fsynced aside, then renamed into place (a file
    survives copies and filesystems without symlinks). A ``latest`` that is a directory (a run copied with
    cp -rL) is a stale copy of a checkpoint: it is removed first, or no rename could replace it."""
    dst = os.path.join(ckpt_root, LATEST)
    st = check_entry_any(dst)
    if st is not None and stat.S_ISDIR(st.st_mode):
        shutil.rmtree(dst)
    elif st is not None and not stat.S_ISREG(st.st_mode):
        os.unlink(dst)  # the symlink older runs kept (or anything planted): replaced, never written through
    write_atomic(dst, name + "\n", "latest pointer")
    fsync_dir(ckpt_root)


def resolve_checkpoint(path: str) -> str:
    """A run directory, a checkpoints/ folder, ``latest`` or a step folder -> the newest *valid* step folder."""
    if not os.path.lexists(path):
        raise CheckpointError(f"checkpoint or run directory not found: {path}")
    if os.path.basename(os.path.normpath(path)) == LATEST and not os.path.isdir(path):
        root = os.path.dirname(os.path.abspath(path))
        name = read_latest(root)
        if name is None:
            raise CheckpointError(f"{path} does not name a checkpoint (expected a line like step_00000042); pass "
                                  f"the run directory {os.path.dirname(root)} instead")
        path = os.path.join(root, name)
        if not os.path.isdir(path):
            raise CheckpointError(f"{os.path.join(root, LATEST)} names {name}, which is not there; pass the run "
                                  f"directory {os.path.dirname(root)} to use its newest valid checkpoint")
    path = os.path.realpath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is a file, not a checkpoint or run directory")
    if os.path.lexists(os.path.join(path, MANIFEST)) or STEP_RE.match(os.path.basename(path)):
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
        self._valid: set[tuple] = set()  # signatures of checkpoints verified or written here
        # called as after_write(step, rank) once this rank's files of a save are written, before the commit
        # (the trainer passes its test hook here; None in every other use)
        self.after_write = None
        # nothing is created here: checkpoints/ appears with the first save (a start that fails its checks
        # leaves the run directory as it was)

    def _barrier(self):
        barrier(self.env)

    def save(self, step: int, model_state: dict | None, rank_state: dict, engine_save=None,
             extra_manifest: dict | None = None, background: bool = False) -> str | None:
        """Collective: every rank calls it. ``model_state`` is only needed on rank 0 and must already be
        a CPU copy (it is written while training goes on). ``engine_save(dir)`` (the strategy's extra files)
        writes into ``dir/engine`` in the calling thread; it is collective. Whether the rest may be written
        in the background is the caller's decision (``background``).

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
                run_subdir(os.path.dirname(self.root), "checkpoints")  # a real folder of the run, writable
                _fresh_dir(tmp)
            except (OSError, UserError) as e:
                err = e
        if self._agree_failure(err is not None):
            if isinstance(err, OSError):
                err = os_error(err, f"checkpoint for step {step}")
            if isinstance(err, CheckpointError):
                raise err
            if isinstance(err, UserError):  # permanent (a read-only folder, a link): never requeued
                raise CheckpointError(f"{err}; previous checkpoint {prev} kept")
            raise CheckpointWriteError(f"checkpoint for step {step} not started ({err or 'failed on another rank'}); "
                                  f"previous checkpoint {prev} kept")
        # the agreement above is an all-reduce: rank 0 had made the folder before anyone writes into it
        job = _WriteJob(step, tmp, prev, t0, extra_manifest or {})
        if engine_save is not None:
            try:
                engine_save(os.path.join(tmp, "engine"))
            except Exception as e:  # noqa: BLE001 -- reaches the agreement in commit
                job.err = e
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
        if self.after_write is not None:
            self.after_write(job.step, self.env.rank)

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
            raise CheckpointWriteError(msg)
        files = job.files
        if self.env.distributed:  # each rank hashed its own bytes while writing: gather instead of re-reading
            files = {k: v for d in all_gather_object(files, self.env) for k, v in d.items()}
        if self.env.is_main:
            try:
                for dirpath, _dirs, fnames in os.walk(tmp):  # files written by others (DeepSpeed engines)
                    for fn in fnames:
                        fp = os.path.join(dirpath, fn)
                        rel = os.path.relpath(fp, tmp)
                        if rel not in files:  # DeepSpeed's own `latest` is recorded, never our commit marker
                            files[rel] = {"size": os.path.getsize(fp), "sha256": sha256_file(fp)}
                man = {"version": MANIFEST_VERSION, "step": step, "world_size": self.env.world_size,
                       "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "versions": _versions(),
                       "files": dict(sorted(files.items()))}
                man.update(job.extra_manifest)
                fd = create_exclusive(os.path.join(tmp, MANIFEST), "manifest")
                try:
                    write_fd(fd, json.dumps(man, indent=1).encode())
                    os.fsync(fd)
                finally:
                    os.close(fd)
                fsync_dir(tmp)
                old = None
                if os.path.exists(final):  # e.g. a corrupt newer checkpoint left from before a fallback resume
                    old = os.path.join(self.root, f".old-{name}")
                    shutil.rmtree(old, ignore_errors=True)
                    os.replace(final, old)
                os.replace(tmp, final)
                fsync_dir(self.root)
                write_latest(self.root, name)
                if old:
                    shutil.rmtree(old, ignore_errors=True)
            except (OSError, UserError) as e:
                err = e
        failed = self._agree_failure(err is not None)
        if failed:
            if self.env.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointWriteError(f"checkpoint commit for step {step} failed ({err or 'on rank 0'}); previous "
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
        return any_flags([failed], self.env)[0]

    @staticmethod
    def _signature(path: str) -> tuple | None:
        """(folder, (file, size, mtime) of every file): a checkpoint verified or written here is not re-hashed
        at every prune while none of its files changed."""
        try:
            sig = []
            for dirpath, _dirs, fnames in os.walk(path):
                for fn in fnames:
                    st = os.lstat(os.path.join(dirpath, fn))
                    sig.append((os.path.relpath(os.path.join(dirpath, fn), path), st.st_size, st.st_mtime_ns))
            return (os.path.realpath(path), tuple(sorted(sig)))
        except OSError:
            return None

    def _is_valid(self, path: str) -> bool:
        """verify(), remembered per signature (see ``_signature``)."""
        sig = self._signature(path)
        if sig is not None and sig in self._valid:
            return True
        ok, why = verify(path)
        if ok and sig is not None:
            self._valid.add(sig)
        elif not ok:
            log.warning("checkpoint %s is not valid (%s): it does not count towards checkpoint.keep_last", path, why)
        return ok

    def _prune(self, keep: str) -> None:
        """Keeps the ``keep_last`` newest *valid* checkpoints (``keep``, just committed, among them); removes
        everything older than the oldest of those. A corrupt checkpoint never pushes a valid one out."""
        sig = self._signature(keep)
        if sig is not None:
            self._valid.add(sig)  # just written and hashed while writing
        valid = 0
        try:  # nothing is ever removed outside this run's own checkpoints/ folder
            run_subdir(os.path.dirname(self.root), "checkpoints", create=False, writable=False)
        except UserError as e:
            log.warning("not pruning: %s", e)
            return
        for _step, p in list_checkpoints(self.root):
            if valid >= self.keep_last:
                if os.path.realpath(p) != os.path.realpath(keep) and inside(p, self.root):
                    shutil.rmtree(p, ignore_errors=True)
            elif self._is_valid(p):
                valid += 1
        for name in os.listdir(self.root):  # stale temporaries of crashed saves
            if name.startswith((".tmp-", ".old-")) and os.path.join(self.root, name) != keep:
                _remove_entry(os.path.join(self.root, name))

    def latest_valid(self) -> str | None:
        return newest_valid(self.root, report=True)


def _remove_entry(path: str) -> None:
    """Removes a file, link or folder entry of checkpoints/ itself; a link is unlinked, never followed."""
    st = check_entry_any(path)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except OSError:
            pass


def _fresh_dir(path: str) -> None:
    """An empty folder at ``path`` for one save; whatever was there (a crashed save, a planted link) goes."""
    _remove_entry(path)
    os.mkdir(path)

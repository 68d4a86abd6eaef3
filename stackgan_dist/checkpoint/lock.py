"""One run per run directory: an exclusive ``fcntl`` lock on ``RUN/.lock``, held by rank 0 for the run's life.

Two runs on one ``run.dir`` would prune and overwrite each other's checkpoints. The lock is a POSIX record
lock (``fcntl.lockf``), which NFS v4 honours and the kernel drops when the holding process dies, however it
dies: a requeued job, a restarted worker group or a crashed node (once its NFS lease expires) never blocks
the next start, and no stale-pid guessing is needed. The file also records who holds it (host, pid, start
time), for the one-line refusal a second run gets.

Two phases, so that a start that fails its checks changes nothing on disk:
- ``check()`` (before any check reads the run): if the lock file exists, take the lock or refuse now;
- ``acquire()`` (after every check passed, before the first write): create the directory and the file if
  needed, take the lock if not yet held, and write the holder line.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
import time

from ..errors import UserError
from ..errors import TransientError
from .files import check_run_entries, open_fd, os_error, read_bounded, run_subdir, write_atomic

LOCK_FILE = ".lock"


class RunLocked(UserError):
    """Another live process holds the run directory."""


class RunLock:
    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_FILE)
        self.fd: int | None = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def _holder(self) -> str:
        try:
            text = (read_bounded(self.path, 4096, "lock file") or b"")[:512].decode("utf-8", "replace").strip()
        except (OSError, UserError):
            text = ""
        fields = dict(kv.split("=", 1) for kv in text.split() if "=" in kv)
        if not fields.get("pid"):
            return "a process that has not written its name yet"
        return f"host {fields.get('host', '?')}, pid {fields['pid']}" + \
            (f", since {fields['since']}" if fields.get("since") else "")

    def _try_lock(self, create: bool) -> bool:
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        try:  # no link followed, no special file, no hard link: the holder line is written into this file
            fd = open_fd(self.path, flags, "lock file")
        except UserError as e:
            if not create and not os.path.lexists(self.path):
                return False
            raise e from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EACCES, errno.EAGAIN):
                raise RunLocked(f"run.dir {self.run_dir} is in use by another run ({self._holder()}); wait for it "
                                f"to end or stop it, or give this run another run.dir") from None
            raise UserError(f"cannot lock {self.path} ({e.strerror}); run.dir must be on a filesystem with "
                            "POSIX locks (local, or NFS v4)") from None
        self.fd = fd
        return True

    def _probe(self) -> None:
        """Refuses if another process holds the lock, without taking it (``F_GETLK``): a dry run, or a sweep
        asking whether a trial is done, must never hold the lock for a moment, or the run's own start (a
        requeued job) could be refused in that moment."""
        try:
            fd = open_fd(self.path, os.O_RDONLY, "lock file")
        except UserError:
            if not os.path.lexists(self.path):
                return
            raise
        try:  # struct flock: l_type, l_whence, l_start, l_len, l_pid (native layout, padded to 8 bytes)
            query = struct.pack("@hhqqi", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
            query += b"\0" * (-len(query) % 8)
            l_type = struct.unpack_from("@h", fcntl.fcntl(fd, fcntl.F_GETLK, query))[0]
        except OSError as e:
            raise UserError(f"cannot test the lock of {self.path} ({e.strerror}); run.dir must be on a filesystem "
                            "with POSIX locks (local, or NFS v4)") from None
        finally:
            os.close(fd)
        if l_type != fcntl.F_UNLCK:
            raise RunLocked(f"run.dir {self.run_dir} is in use by another run ({self._holder()}); wait for it "
                            f"to end or stop it, or give this run another run.dir")

    def check(self, take: bool = True) -> None:
        """Refuses a run.dir that cannot hold a run (``check_run_dir``), and refuses at once if another live
        process holds an existing lock file. Creates nothing. ``take``: keep the lock from here on (a start);
        else only test it (a dry run: the lock is never held, not even for a moment)."""
        check_run_dir(self.run_dir)
        check_run_entries(self.run_dir)  # links, special files, files where folders belong: refused now
        if self.held or not os.path.lexists(self.path):
            return
        if take:
            self._try_lock(create=False)
        else:
            self._probe()

    def acquire(self) -> None:
        """Takes the lock (creating run.dir and the lock file if needed) and records this process as holder."""
        if not self.held:
            try:
                os.makedirs(self.run_dir, exist_ok=True)
            except OSError as e:
                raise os_error(e, f"cannot create run.dir {self.run_dir}") from None
            self._try_lock(create=True)
        line = f"host={socket.gethostname()} pid={os.getpid()} since={time.strftime('%Y-%m-%dT%H:%M:%S')}\n"
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, line.encode(), 0)
            os.fsync(self.fd)
        except OSError as e:
            raise os_error(e, f"cannot write the lock file {self.path}") from None

    def release(self) -> None:
        """Drops the lock (the holder line stays: it names the last holder, and a live lock is what counts)."""
        if self.fd is not None:
            try:
                fcntl.lockf(self.fd, fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
                self.fd = None


def check_run_dir(run_dir: str) -> None:
    """Refuses a run.dir that cannot hold a run, before anything is read or written: a file, a directory
    this user cannot write, or a path under a file or a read-only directory."""
    if os.path.lexists(run_dir) and not os.path.isdir(run_dir):
        raise UserError(f"run.dir {run_dir} is a file, not a directory; give run.dir a directory path")
    probe = os.path.abspath(run_dir)
    while not os.path.lexists(probe):  # the nearest existing ancestor is where the directory would be made
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UserError(f"run.dir {run_dir} cannot be created: {probe} is a file; give run.dir another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "is read-only" if probe == os.path.abspath(run_dir) else f"cannot be created: {probe} is read-only"
        raise UserError(f"run.dir {run_dir} {what} for this user; give run.dir a writable path")


def on_main_agreed(env, fn) -> None:
    """Runs ``fn`` on rank 0 only, then every rank learns (one all-reduce) whether it failed: a refusal on rank
    0 stops the other ranks at once instead of leaving them in the next collective until its timeout. Rank 0
    raises its own error; the others raise a UserError pointing at it when rank 0's was one (exit 2), else a
    RuntimeError (a crash)."""
    from ..distributed.env import all_reduce_max

    err: BaseException | None = None
    if env.is_main:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 -- re-raised below, after the other ranks know
            err = e
    code = 0.0 if err is None else 1.0 if isinstance(err, UserError) else \
        2.0 if isinstance(err, TransientError) else 3.0
    agreed = all_reduce_max(code, env) if env.distributed else code
    if err is not None:
        raise err
    if agreed == 1.0:
        raise UserError("rank 0 refused to start this run (its message says why)")
    if agreed == 2.0:
        raise TransientError("rank 0 met a transient failure while claiming the run directory (its message "
                             "says which)")
    if agreed > 2.0:
        raise RuntimeError("rank 0 failed while claiming the run directory (see its traceback)")


def write_run_files(run_dir: str, cfg) -> None:
    """The files a claimed run writes at every start: ``samples/`` (a real folder of the run) and the resolved
    ``config.yaml`` (written whole, no link followed; a full disk is transient, exit 75)."""
    import yaml

    run_subdir(run_dir, "samples")
    write_atomic(os.path.join(run_dir, "config.yaml"), yaml.safe_dump(cfg.to_dict(), sort_keys=False),
                 "config dump")

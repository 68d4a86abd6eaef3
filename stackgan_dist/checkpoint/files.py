"""The one way to open run files: no links followed, no special files, exclusive temporaries, bounded reads.

A run directory is untrusted input: runs are copied between people and clusters with tar, ``cp -a`` or
``rsync -a``, which keep symlinks, hard links and FIFOs. So everything the program writes, appends to or
locks inside a run goes through this module:

- an existing entry is ``lstat``-ed first and refused in one line when it is a symlink, a special file (FIFO,
  socket, device) or a directory where a file belongs; a file we rewrite in place (lock, metrics.jsonl) is
  also refused when it has other hard links (writing it would change the other name's content too);
- files are opened with ``O_NOFOLLOW`` (and ``O_EXCL`` when new), and ``fstat``-ed after opening, so a link
  planted between the check and the open is refused as well;
- a whole-file write goes to ``NAME.tmp`` created exclusively (a planted ``.tmp`` is removed, never written
  through), then is renamed over NAME (a rename replaces the directory entry, never a link's target); a
  failed write removes its temporary: no 0-byte file is left behind;
- ``checkpoints/`` and ``samples/`` must be real directories of the run (``run_subdir``);
- reads check the type before opening (``O_NONBLOCK``: a FIFO cannot hang the open) and bound the size.

``os_error`` maps an OSError to the exit code its cause deserves: a full disk is transient (75, requeue), a
read-only or wrong-typed path is permanent (2, never requeued). Every writer here raises through it.
"""
from __future__ import annotations

import errno
import os
import stat

from ..errors import TransientError, UserError

# errors a later attempt may not meet (a full disk or quota, a flaky network filesystem): requeue
TRANSIENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG, errno.ESTALE, errno.ETIMEDOUT,
                              errno.EAGAIN, errno.EINTR, errno.ENOMEM, errno.EMFILE, errno.ENFILE})
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class RunFileError(UserError):
    """A run file of the wrong type (a link, a special file, a directory where a file belongs...)."""


class RunFileTooLarge(RunFileError):
    """A run file larger than any such file of ours (corrupt or hostile)."""


def os_error(e: OSError, what: str) -> Exception:
    """The UserError (exit 2) or TransientError (exit 75) an OSError met on ``what`` deserves, with one line.
    Permanent: EACCES, EPERM, EROFS, ENOTDIR, EISDIR, ELOOP, ENOENT... (relaunching fails the same way);
    transient: a full disk or quota, I/O and network-filesystem errors."""
    reason = e.strerror or str(e)
    if e.errno in TRANSIENT_ERRNOS:
        return TransientError(f"{what}: {reason} (transient: requeue once space or the filesystem is back)")
    hint = {errno.EROFS: "read-only filesystem", errno.EACCES: "no permission", errno.EPERM: "no permission",
            errno.ELOOP: "a symbolic link, refused", errno.ENOTDIR: "a file where a directory must be",
            errno.EISDIR: "a directory where a file must be"}.get(e.errno, "")
    return UserError(f"{what}: {reason}{f' ({hint})' if hint and hint != reason else ''}")


def kind_of(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device"), (stat.S_ISREG, "a regular file")):
        if test(mode):
            return name
    return "a special file"


def check_entry(path: str, want: str = "file", rewrite: bool = False) -> os.stat_result | None:
    """lstat ``path``: None when absent; the stat when it is a real ``want`` ("file" or "dir"); else a
    RunFileError naming what it is. ``rewrite``: a file written in place must have no other hard link."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise os_error(e, f"cannot read {path}") from None
    ok = stat.S_ISREG(st.st_mode) if want == "file" else stat.S_ISDIR(st.st_mode)
    if not ok:
        raise RunFileError(f"{path} is {kind_of(st.st_mode)}, not a {'regular file' if want == 'file' else 'directory'}"
                           f"; refusing to use it (remove or replace it)")
    if rewrite and want == "file" and st.st_nlink > 1:
        raise RunFileError(f"{path} has {st.st_nlink - 1} other hard link(s); refusing to write through it "
                           "(copy it to a file of its own)")
    return st


def _check_fd(fd: int, path: str, rewrite: bool) -> None:
    """The opened file is what the lstat said (closes ``fd`` and raises otherwise): no race with a swap."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or (rewrite and st.st_nlink > 1):
        os.close(fd)
        raise RunFileError(f"{path} is {kind_of(st.st_mode) if not stat.S_ISREG(st.st_mode) else 'hard-linked'}; "
                           "refusing to use it")


def open_fd(path: str, flags: int, what: str, rewrite: bool = True, mode: int = 0o644) -> int:
    """``os.open`` with O_NOFOLLOW (and O_NONBLOCK, so a FIFO cannot block the open), after ``check_entry``."""
    check_entry(path, "file", rewrite=rewrite)
    try:
        fd = os.open(path, flags | _NOFOLLOW | _CLOEXEC | os.O_NONBLOCK, mode)
    except OSError as e:
        raise os_error(e, f"cannot open {what} {path}") from None
    _check_fd(fd, path, rewrite)
    os.set_blocking(fd, True)
    return fd


def open_append(path: str, what: str = "run file"):
    """A text file opened for appending (line-buffered); created if absent. Refuses links and specials."""
    fd = open_fd(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, what)
    return os.fdopen(fd, "a", buffering=1, encoding="utf-8")


def open_read(path: str, what: str = "run file", max_bytes: int | None = None, binary: bool = True):
    """A regular file opened for reading, or a RunFileError (a FIFO, a link, too large). None when absent."""
    if check_entry(path, "file") is None:
        return None
    try:
        fd = open_fd(path, os.O_RDONLY, what, rewrite=False)
    except UserError:
        if not os.path.lexists(path):  # removed between the check and the open (a checkpoint pruned meanwhile)
            return None
        raise
    size = os.fstat(fd).st_size
    if max_bytes is not None and size > max_bytes:
        os.close(fd)
        raise RunFileTooLarge(f"{what} {path} is {size} bytes, more than the {max_bytes} such a file can hold")
    return os.fdopen(fd, "rb") if binary else os.fdopen(fd, "r", encoding="utf-8", errors="replace")


def read_bounded(path: str, max_bytes: int, what: str = "run file") -> bytes | None:
    """The bytes of a small regular run file, or None when absent; refuses links, specials, oversize."""
    f = open_read(path, what, max_bytes)
    if f is None:
        return None
    with f:
        return f.read(max_bytes + 1)


def create_exclusive(path: str, what: str = "run file", mode: int = 0o644) -> int:
    """A new file, created with O_EXCL | O_NOFOLLOW: an existing entry (a planted link) is never opened."""
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, mode)
    except OSError as e:
        raise os_error(e, f"cannot create {what} {path}") from None


def _remove_stale(path: str) -> None:
    """Removes a leftover (or planted) temporary: a file or link is unlinked, never followed."""
    st = check_entry_any(path)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        raise RunFileError(f"{path} is a directory; remove it (a temporary file name of this program)")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise os_error(e, f"cannot remove stale {path}") from None


def check_entry_any(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise os_error(e, f"cannot read {path}") from None


def write_fd(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def write_atomic(path: str, data: bytes | str, what: str = "run file", fsync: bool = True) -> None:
    """Writes ``path`` whole: ``path.tmp`` created exclusively, written, fsynced, renamed over ``path``. A link,
    special file or directory at ``path`` is refused; a failure removes the temporary and leaves ``path`` as it
    was (a full disk is a TransientError, exit 75)."""
    check_entry(path, "file")
    tmp = path + ".tmp"
    _remove_stale(tmp)
    fd = create_exclusive(tmp, what)
    try:
        try:
            write_fd(fd, data.encode("utf-8") if isinstance(data, str) else data)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        _unlink_quiet(tmp)
        raise os_error(e, f"cannot write {what} {path}") from None
    except BaseException:
        _unlink_quiet(tmp)
        raise


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def run_subdir(run_dir: str, name: str, create: bool = True, writable: bool = True) -> str | None:
    """``run_dir/name`` as a real directory inside the run (not a link, not a file, not elsewhere): made
    when absent and ``create``, None when absent otherwise. Refusals are permanent (exit 2)."""
    path = os.path.join(run_dir, name)
    if check_entry(path, "dir") is None:
        if not create:
            return None
        try:
            os.makedirs(run_dir, exist_ok=True)  # a manager used on its own (no claimed run) makes the run too
            os.mkdir(path)
        except FileExistsError:
            check_entry(path, "dir")
        except OSError as e:
            raise os_error(e, f"cannot create {path}") from None
    if os.path.dirname(os.path.realpath(path)) != os.path.realpath(run_dir):
        raise RunFileError(f"{path} resolves outside the run directory; refusing to use it")
    if writable and not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{path} is not writable for this user (read-only?); fix its permissions or use "
                        "another run.dir")
    return path


def inside(path: str, root: str) -> bool:
    """Whether ``path`` resolves to an entry directly or deeply under ``root`` (both resolved)."""
    p, r = os.path.realpath(path), os.path.realpath(root)
    return p != r and os.path.commonpath([p, r]) == r


# Every entry of a run directory this program writes: name -> (kind, rewritten in place?)
RUN_ENTRIES = {".lock": ("file", True), "metrics.jsonl": ("file", True), "restarts.json": ("file", False),
               "config.yaml": ("file", False), "eval.json": ("file", False), "report.png": ("file", False),
               "checkpoints": ("dir", False), "samples": ("dir", False)}


def check_run_entries(run_dir: str) -> None:
    """At start, before anything is read or written: every run file that exists has the right type (no link,
    special file, hard-linked rewrite target, file-for-directory) and the folders we write are writable.
    Every refusal is one line, exit 2 (permanent: a requeue would meet it again)."""
    if not os.path.isdir(run_dir):
        return
    for name, (kind, rewrite) in RUN_ENTRIES.items():
        check_entry(os.path.join(run_dir, name), kind, rewrite=rewrite)
        for tmp in (name + ".tmp",):
            st = check_entry_any(os.path.join(run_dir, tmp))
            if st is not None and stat.S_ISDIR(st.st_mode):
                raise RunFileError(f"{os.path.join(run_dir, tmp)} is a directory; remove it")
    for name in ("checkpoints", "samples"):
        run_subdir(run_dir, name, create=False)

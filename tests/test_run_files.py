"""Run-directory entries of every type at every run file: nothing is written through a link, nothing hangs.

A run directory is untrusted (copied with tar, ``cp -a``, ``rsync -a``, which keep links, hard links and
FIFOs). For each file the program writes or locks in a run, and each type of entry planted there (regular
file, directory, symlink to a file or a directory outside the run, dangling symlink, hard link to a file
outside, FIFO, socket), the real writer either works or refuses in one line (a UserError: exit 2), and the
file outside the run is never changed. The planted ``.tmp`` of every whole-file write is replaced, never
written through.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stackgan_dist.checkpoint.files import (RunFileError, check_entry, check_run_entries, os_error, read_bounded,
                                            write_atomic)
from stackgan_dist.checkpoint.lock import RunLock, write_run_files
from stackgan_dist.checkpoint.manager import CheckpointManager, read_latest
from stackgan_dist.checkpoint.restarts import RestartGuard
from stackgan_dist.config import Config
from stackgan_dist.distributed.env import DistEnv
from stackgan_dist.errors import TransientError, UserError
from stackgan_dist.evaluation.run_eval import eval_targets
from stackgan_dist.observability.metrics import MetricsWriter

KINDS = ("file", "dir", "symlink_file", "symlink_dir", "symlink_dangling", "hardlink", "fifo", "socket")
FILES = (".lock", "metrics.jsonl", "restarts.json", "config.yaml", "eval.json", "checkpoints", "samples")
TMPS = ("metrics.jsonl.tmp", "restarts.json.tmp", "config.yaml.tmp", "eval.json.tmp")
VICTIM_TEXT = b"precious bytes of someone else\n"


def _env() -> DistEnv:
    return DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _plant(path: str, kind: str, outside: str) -> None:
    victim, vdir = os.path.join(outside, "victim.txt"), os.path.join(outside, "victim_dir")
    if kind == "file":
        with open(path, "wb") as f:
            f.write(b"")
    elif kind == "dir":
        os.mkdir(path)
    elif kind == "symlink_file":
        os.symlink(victim, path)
    elif kind == "symlink_dir":
        os.symlink(vdir, path)
    elif kind == "symlink_dangling":
        os.symlink(os.path.join(outside, "nothing_here"), path)
    elif kind == "hardlink":
        os.link(victim, path)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(path)
        s.close()


def _write(name: str, run: str) -> None:
    """The real writer of ``name``, as a start or a command runs it."""
    if name == ".lock":
        lock = RunLock(run)
        lock.check()
        lock.acquire()
        lock.release()
    elif name == "metrics.jsonl":
        m = MetricsWriter(run, True, resume_step=3, tensorboard=False)
        m.log(4, {"d_loss": 1.0})
        m.close()
    elif name == "restarts.json":
        RestartGuard(run, 3, "h").record(2)
    elif name in ("config.yaml", "samples"):
        write_run_files(run, Config())
    elif name == "eval.json":
        for t in eval_targets(os.path.join(run, "checkpoints", "step_00000001"), ""):
            write_atomic(t, '{"ok": 1}', "evaluation result")
    elif name == "checkpoints":
        mgr = CheckpointManager(run, _env(), keep_last=1)
        for step in (1, 2):
            mgr.save(step, {"G": {"w": torch.ones(3)}, "D": {"w": torch.ones(2)}}, {"rank": 0})


def _snapshot(outside: str) -> dict:
    out = {}
    for dp, dirs, files in os.walk(outside):
        for n in dirs + files:
            p = os.path.join(dp, n)
            st = os.lstat(p)
            out[p] = (st.st_mode, st.st_size, open(p, "rb").read() if os.path.isfile(p) else None)
    return out


def _setup(tmp: str):
    outside, run = os.path.join(tmp, "outside"), os.path.join(tmp, "run")
    os.makedirs(os.path.join(outside, "victim_dir", "step_00000001"))
    with open(os.path.join(outside, "victim.txt"), "wb") as f:
        f.write(VICTIM_TEXT)
    os.makedirs(run)
    return outside, run


def _legit(name: str, kind: str) -> bool:
    """Entries the writer must accept: the right type of a run's own entry."""
    want_dir = name in ("checkpoints", "samples")
    return kind == ("dir" if want_dir else "file")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(FILES), kind=st.sampled_from(KINDS))
def test_every_entry_type_at_every_run_file(tmp_path_factory, name, kind):
    tmp = str(tmp_path_factory.mktemp("rf"))
    outside, run = _setup(tmp)
    _plant(os.path.join(run, name), kind, outside)
    before = _snapshot(outside)
    try:
        check_run_entries(run)  # what every start runs first (RunLock.check), dry run included
        _write(name, run)
        refused = None
    except UserError as e:
        refused = str(e)
    assert _snapshot(outside) == before, f"{name} as {kind} changed a file outside the run"
    if _legit(name, kind):
        assert refused is None, refused
    elif kind not in ("hardlink",) or name in (".lock", "metrics.jsonl"):
        assert refused is not None, f"{name} as {kind} was used"
    if refused is not None:
        assert "\n" not in refused and name.split(".")[0] in refused, refused
    if kind == "hardlink" and refused is None:  # a whole-file write replaced the entry, the victim kept its bytes
        assert os.stat(os.path.join(outside, "victim.txt")).st_nlink == 1


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tmp_name=st.sampled_from(TMPS), kind=st.sampled_from(("symlink_file", "symlink_dangling", "hardlink",
                                                             "fifo", "file")))
def test_a_planted_tmp_is_replaced_never_written_through(tmp_path_factory, tmp_name, kind):
    tmp = str(tmp_path_factory.mktemp("tmp"))
    outside, run = _setup(tmp)
    base = tmp_name[:-len(".tmp")]
    if base == "metrics.jsonl":  # the resume rewrite of metrics.jsonl goes through its .tmp
        with open(os.path.join(run, base), "w") as f:
            f.write('{"step": 1}\n{"step": 5}\n')
    _plant(os.path.join(run, tmp_name), kind, outside)
    before = _snapshot(outside)
    _write(base, run)
    assert _snapshot(outside) == before
    assert not os.path.lexists(os.path.join(run, tmp_name)), "the temporary is left behind"
    assert check_entry(os.path.join(run, base)) is not None


def test_checkpoints_linked_into_another_run_is_refused_and_nothing_there_is_pruned(tmp_path):
    other = tmp_path / "other"
    mgr = CheckpointManager(str(other), _env(), keep_last=5)
    for step in (1, 2, 3):
        mgr.save(step, {"G": {"w": torch.ones(3)}, "D": {"w": torch.ones(2)}}, {"rank": 0})
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(other / "checkpoints", run / "checkpoints")
    with pytest.raises(RunFileError, match="symbolic link"):
        RunLock(str(run)).check()
    with pytest.raises(UserError):  # the manager refuses too, before writing or pruning anything
        CheckpointManager(str(run), _env(), keep_last=1).save(9, {"G": {}, "D": {}}, {"rank": 0})
    assert sorted(os.listdir(other / "checkpoints")) == ["latest", "step_00000001", "step_00000002",
                                                         "step_00000003"]
    assert read_latest(str(other / "checkpoints")) == "step_00000003"


def test_reads_of_special_or_huge_run_files_are_bounded_and_never_block(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    os.mkfifo(run / "restarts.json")
    with pytest.raises(RunFileError, match="FIFO"):  # returns at once: a FIFO is never opened
        RestartGuard(str(run), 3).read()
    os.unlink(run / "restarts.json")
    (run / "restarts.json").write_bytes(b"[" * 65536)  # 64 KiB of '[': a line, not a RecursionError
    assert RestartGuard(str(run), 3).read() == {}
    (run / "restarts.json").write_bytes(b" " * (1 << 17))
    assert RestartGuard(str(run), 3).read() == {}  # over the bound: warned and counted afresh
    os.mkfifo(run / "metrics.jsonl")
    with pytest.raises(RunFileError, match="FIFO"):
        MetricsWriter(str(run), True, resume_step=2, tensorboard=False)
    with pytest.raises(RunFileError, match="more than"):
        read_bounded(str(run / "restarts.json"), 1024)


def test_os_errors_map_to_exit_codes_by_cause():
    import errno

    for code in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
        assert isinstance(os_error(OSError(code, os.strerror(code)), "x"), TransientError)
    for code in (errno.EACCES, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.ELOOP, errno.EPERM):
        e = os_error(OSError(code, os.strerror(code)), "x")
        assert isinstance(e, UserError) and e.exit_code == 2


def test_a_tensorboard_folder_linked_out_of_the_run_is_refused(tmp_path):
    """TensorBoard writes RUN/tb itself: the folder is checked first, so a link planted there (tar, cp -a and
    rsync -a keep links) sends no event file outside the run."""
    outside = tmp_path / "outside"
    outside.mkdir()
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(outside, run / "tb")
    with pytest.raises(RunFileError, match="symbolic link"):
        MetricsWriter(str(run), True)
    assert os.listdir(outside) == []


def test_a_file_removed_between_its_check_and_its_open_reads_as_absent(tmp_path, monkeypatch):
    """A live run prunes a checkpoint while a reader opens it: the lstat saw the file, the open finds it gone.
    That is absence (the reader takes the newest checkpoint again), not an error that ends the command."""
    from stackgan_dist.checkpoint import files

    path = tmp_path / "model.pt"
    path.write_bytes(b"x")
    real_open = os.open

    def pruned_first(p, flags, mode=0o777, **kw):
        if str(p) == str(path):
            os.unlink(path)
        return real_open(p, flags, mode, **kw)

    monkeypatch.setattr(files.os, "open", pruned_first)
    assert files.open_read(str(path), "checkpoint file") is None
    path.write_bytes(b"x")
    assert files.read_bounded(str(path), 10, "checkpoint file") is None
    path.mkdir()  # anything else that fails the open is still an error
    monkeypatch.setattr(files.os, "open", real_open)
    with pytest.raises(UserError):
        files.open_read(str(path), "checkpoint file")

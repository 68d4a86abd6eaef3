"""CheckpointManager: commit protocol, verification and fallback, failing writes, safe loading, refusals."""
from __future__ import annotations

import json
import os
import pickle
import resource
import signal
import subprocess

import pytest
import torch

from conftest import PY, REPO, Rendezvous, cli_main, digest, run_cli, snapshot, tiny_overrides, wait_for
from stackgan_dist.checkpoint.manager import (CheckpointManager, list_checkpoints, load_file, newest_valid,
                                              params_digest, read_latest, resolve_checkpoint, verify)
from stackgan_dist.checkpoint.restarts import RestartGuard
from stackgan_dist.distributed.env import DistEnv
from stackgan_dist.errors import (EXIT_INTERRUPTED, EXIT_REQUEUE, CheckpointError, CheckpointWriteError,
                                  UserError)


def env1() -> DistEnv:
    import inspect as _i

    params = _i.signature(DistEnv).parameters
    kw = dict(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    return DistEnv(**{k: v for k, v in kw.items() if k in params})


def model_state(seed=0, scale=1.0, n=50_000):
    g = torch.Generator().manual_seed(seed)
    return {"G": {"w": torch.randn(n, generator=g) * scale, "bn.num_batches_tracked": torch.tensor(3)},
            "D": {"w": torch.randn(100, generator=g)}, "step": 0}


def save(mgr, step, **kw):
    return mgr.save(step, model_state(step, **kw), {"rank": 0, "step": step, "noise": torch.arange(5)})


def test_commit_layout_latest_and_prune(tmp_path):
    mgr = CheckpointManager(str(tmp_path), env1(), keep_last=2)
    for s in (1, 2, 3):
        p = save(mgr, s)
        assert verify(p) == (True, "ok")
        assert read_latest(str(tmp_path / "checkpoints")) == f"step_{s:08d}"
        assert (tmp_path / "checkpoints" / "latest").read_text() == f"step_{s:08d}\n"  # a file, not a link
    assert [s for s, _ in list_checkpoints(str(tmp_path / "checkpoints"))] == [3, 2]
    man = json.load(open(tmp_path / "checkpoints" / "step_00000003" / "manifest.json"))
    assert man["step"] == 3 and man["world_size"] == 1 and "torch" in man["versions"]
    assert set(man["files"]) == {"model.pt", "rank_00000.pt"}
    assert not [n for n in os.listdir(tmp_path / "checkpoints") if n.startswith(".")]
    assert resolve_checkpoint(str(tmp_path)).endswith("step_00000003")
    # a resumed run re-saving a step whose folder exists replaces it whole
    p = save(mgr, 3)
    assert verify(p)[0] and load_file(os.path.join(p, "model.pt"))["G"]["w"].shape == (50_000,)
    assert params_digest(load_file(os.path.join(p, "model.pt"))["G"]) == params_digest(model_state(3)["G"])


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "no_manifest"])
def test_damaged_newest_falls_back_to_previous(tmp_path, caplog, damage):
    mgr = CheckpointManager(str(tmp_path), env1(), keep_last=3)
    save(mgr, 1)
    newest = save(mgr, 2)
    f = os.path.join(newest, "model.pt")
    if damage == "truncate":
        os.truncate(f, os.path.getsize(f) // 2)
    elif damage == "bitflip":
        with open(f, "r+b") as fh:
            fh.seek(os.path.getsize(f) // 2)
            b = fh.read(1)
            fh.seek(-1, 1)
            fh.write(bytes([b[0] ^ 0x10]))
    else:
        os.remove(os.path.join(newest, "manifest.json"))
    ok, why = verify(newest)
    assert not ok
    if damage != "no_manifest":
        assert f in why and ("mismatch" in why or "corrupt" in why)
    with caplog.at_level("WARNING", logger="stackgan_dist.checkpoint"):
        assert newest_valid(str(tmp_path / "checkpoints")).endswith("step_00000001")
    assert newest in caplog.text
    with pytest.raises(CheckpointError, match="not usable"):
        resolve_checkpoint(newest)


def test_non_finite_parameters_never_saved(tmp_path):
    mgr = CheckpointManager(str(tmp_path), env1())
    good = save(mgr, 1)
    st = model_state(2)
    st["G"]["w"][7] = float("nan")
    with pytest.raises(CheckpointError, match=r"non-finite values in G.*last good checkpoint: .*step_00000001"):
        mgr.save(2, st, {"rank": 0})
    st = model_state(3)
    st["D"]["w"][0] = float("inf")
    with pytest.raises(CheckpointError, match="non-finite values in D"):
        mgr.save(3, st, {"rank": 0})
    assert [p for _, p in list_checkpoints(str(tmp_path / "checkpoints"))] == [good]
    assert not [n for n in os.listdir(tmp_path / "checkpoints") if n.startswith(".tmp")]


def test_failing_write_keeps_previous_checkpoint(tmp_path):
    """A real write error: RLIMIT_FSIZE makes the kernel refuse to grow a file (EFBIG), as a full disk would."""
    mgr = CheckpointManager(str(tmp_path), env1())
    good = save(mgr, 1)
    old_sig = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, old[1]))
    try:
        with pytest.raises(CheckpointWriteError, match=r"write for step 2 failed.*File too large.*step_00000001 kept"):
            save(mgr, 2)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, old_sig)
    assert verify(good) == (True, "ok")
    assert read_latest(str(tmp_path / "checkpoints")) == "step_00000001"
    assert [p for _, p in list_checkpoints(str(tmp_path / "checkpoints"))] == [good]
    assert not os.path.exists(tmp_path / "checkpoints" / ".tmp-step_00000002")
    assert save(mgr, 3).endswith("step_00000003")  # the next save, with room again, commits


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/_stackgan_pwned_marker",))


def test_checkpoint_files_cannot_run_code(tmp_path):
    marker = "/tmp/_stackgan_pwned_marker"
    if os.path.exists(marker):
        os.remove(marker)
    f = tmp_path / "model.pt"
    torch.save({"G": _Boom()}, f, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(Exception, match="Weights only load failed|Unsupported"):
        load_file(str(f))
    assert not os.path.exists(marker)


def test_restart_guard_bounds_a_crash_loop(tmp_path):
    g = RestartGuard(str(tmp_path), max_restarts=2, config_hash="a")
    g.record(10)
    g.record(10)
    with pytest.raises(UserError, match=r"resumed 2 times from step 10.*max_restarts=2"):
        g.record(10)
    assert json.loads((tmp_path / "restarts.json").read_text())["count"] == 2  # the refusal wrote nothing
    RestartGuard(str(tmp_path), max_restarts=2, config_hash="b").record(10)  # a corrected command starts afresh
    g.record(20)  # progress resets the count
    g.record(20)


@pytest.mark.parametrize("content", [b"", b'{"step": 3, "co', b"\0" * 64, b"[]", b'{"step": "x", "count": 1}'])
def test_restart_record_torn_or_empty_is_ignored_with_a_warning(tmp_path, caplog, content):
    (tmp_path / "restarts.json").write_bytes(content)
    g = RestartGuard(str(tmp_path), max_restarts=1)
    with caplog.at_level("WARNING", logger="stackgan_dist.checkpoint"):
        g.record(5)
    assert "restarts.json" in caplog.text and "afresh" in caplog.text
    assert json.loads((tmp_path / "restarts.json").read_text())["count"] == 1


# -- through the CLI, real processes ----------------------------------------------------------------
def _train(data, run, steps=4, extra=(), **kw):
    return run_cli("train", "configs/demo/stage1.yaml",
                   *tiny_overrides(data, run, 1, steps=steps, extra=["checkpoint.every_steps=2", *extra]), **kw)


@pytest.fixture
def base_run(tiny_stage1_run):
    """The session's tiny Stage-I run (conftest.py; the same as ``_train(data, run, 4)``): tests copy it
    before writing."""
    return tiny_stage1_run


def _copy(src, dst):
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    return dst


def test_resume_refuses_changed_width_and_fresh_on_existing_run(synth_data, base_run, tmp_path):
    run = _copy(base_run, tmp_path / "run")
    before = sorted(os.listdir(run / "checkpoints"))
    p = _train(synth_data, run, 6, extra=["model.gf_dim=32"])
    assert p.returncode == 2, p.stderr[-2000:]
    assert "model.gf_dim changed (16 -> 32)" in p.stderr
    p = cli_main("train", "configs/demo/stage1.yaml", "--fresh", *tiny_overrides(synth_data, run, 1, steps=6))
    assert p.returncode == 2 and "--fresh needs an empty run directory" in p.stderr, p.stderr[-2000:]
    assert sorted(os.listdir(run / "checkpoints")) == before


@pytest.mark.slow
def test_bitflipped_newest_resume_uses_previous(synth_data, base_run, tmp_path):
    run = _copy(base_run, tmp_path / "run")
    f = run / "checkpoints" / "step_00000004" / "model.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    p = _train(synth_data, run, 4)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"{f} sha256 mismatch: corrupt" in p.stderr
    assert "resumed from" in p.stdout and p.stdout.strip().splitlines()[0].endswith("step_00000002 at step 2")
    assert verify(str(run / "checkpoints" / "step_00000004")) == (True, "ok")  # re-written, replacing the bad one
    assert digest(run) == digest(base_run)


@pytest.mark.slow
def test_disk_full_during_training_reports_and_keeps_previous(synth_data, base_run, tmp_path):
    """The run resumes, trains, and its next save hits a real EFBIG; it stops with the error and exit 75 (a
    transient failure: requeue me, not "the user must act"), the old checkpoint untouched."""
    run = _copy(base_run, tmp_path / "run")
    good = run / "checkpoints" / "step_00000004"

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, resource.RLIM_INFINITY))

    e = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([PY, "-m", "stackgan_dist", "train", "configs/demo/stage1.yaml",
                        *tiny_overrides(synth_data, run, 1, steps=6, extra=["checkpoint.every_steps=2"])],
                       cwd=REPO, env=e, capture_output=True, text=True, timeout=600, preexec_fn=limit)
    assert p.returncode == EXIT_REQUEUE, p.stderr[-3000:]
    assert "checkpoint write for step 6 failed" in p.stderr and "File too large" in p.stderr, p.stderr[-3000:]
    assert "transient error, exiting 75" in p.stderr and "Traceback" not in p.stderr
    assert f"{good} kept" in p.stderr
    assert verify(str(good)) == (True, "ok")
    assert read_latest(str(run / "checkpoints")) == "step_00000004"
    assert not os.path.exists(run / "checkpoints" / "step_00000006")


# -- manifests of the wrong shape fall back, never crash ------------------------------------------------
def _two_checkpoints(tmp_path):
    mgr = CheckpointManager(str(tmp_path), env1(), keep_last=5)
    old = save(mgr, 1, n=100)
    new = save(mgr, 2, n=100)
    return mgr, old, new


def _manifest(ck):
    return json.load(open(os.path.join(ck, "manifest.json")))


def _edit(man, **kw):
    man = json.loads(json.dumps(man))
    for k, v in kw.items():
        if v is _DROP:
            man.pop(k, None)
        else:
            man[k] = v
    return man


_DROP = object()


def _bad_manifests(valid):
    files = valid["files"]
    one = next(iter(files))
    yield "a list", []
    yield "null", None
    yield "a string", "step 2"
    yield "no files", _edit(valid, files={})
    yield "files a list", _edit(valid, files=[one])
    yield "entry without size", _edit(valid, files={**files, one: {"sha256": files[one]["sha256"]}})
    yield "size a string", _edit(valid, files={**files, one: {**files[one], "size": str(files[one]["size"])}})
    yield "sha256 not hex", _edit(valid, files={**files, one: {**files[one], "sha256": "z" * 64}})
    yield "entry a number", _edit(valid, files={**files, one: 7})
    yield "path outside", _edit(valid, files={**files, "../step_00000001/model.pt": files["model.pt"]})
    yield "absolute path", _edit(valid, files={**files, "/etc/hostname": files["model.pt"]})
    yield "no model.pt", _edit(valid, files={k: v for k, v in files.items() if k != "model.pt"})
    yield "no rank file", _edit(valid, files={k: v for k, v in files.items() if k != "rank_00000.pt"})
    yield "rank file of rank 1 missing", _edit(valid, world_size=2)
    yield "absurd world size", _edit(valid, world_size=10**12)
    yield "no step", _edit(valid, step=_DROP)
    yield "step of another folder", _edit(valid, step=7)
    yield "step a float", _edit(valid, step=2.0)


def test_manifest_of_the_wrong_shape_is_invalid_and_falls_back(tmp_path, caplog):
    _, old, new = _two_checkpoints(tmp_path)
    valid = _manifest(new)
    mpath = os.path.join(new, "manifest.json")
    for what, man in _bad_manifests(valid):
        with open(mpath, "w") as f:
            json.dump(man, f)
        ok, why = verify(new)
        assert not ok and "manifest" in why, (what, why)
        assert newest_valid(str(tmp_path / "checkpoints")) == old, what
        with pytest.raises(CheckpointError, match="not usable"):
            resolve_checkpoint(new)
    for what, raw in (("truncated", json.dumps(valid)[:40]), ("deeply nested", "[" * 100_000 + "]" * 100_000),
                      ("not UTF-8", b"\xff\xfe{}")):
        with open(mpath, "wb") as f:
            f.write(raw if isinstance(raw, bytes) else raw.encode())
        assert verify(new)[0] is False, what
    with open(mpath, "w") as f:
        json.dump(valid, f)
    os.truncate(mpath, 64 << 20)  # a manifest larger than any manifest is not read
    assert "larger than any manifest" in verify(new)[1]
    os.remove(mpath)
    os.symlink(os.path.join(old, "manifest.json"), mpath)
    assert "not a regular file" in verify(new)[1]
    os.remove(mpath)
    with open(mpath, "w") as f:
        json.dump(valid, f)
    assert verify(new) == (True, "ok")


@pytest.mark.parametrize("extra", ["rank_00001.pt", "engine/G/mp_rank_00_model_states.pt"])
def test_a_loadable_file_missing_from_the_manifest_makes_it_invalid(tmp_path, extra):
    _, old, new = _two_checkpoints(tmp_path)
    os.makedirs(os.path.dirname(os.path.join(new, extra)), exist_ok=True)
    torch.save({"x": torch.zeros(1)}, os.path.join(new, extra))
    ok, why = verify(new)
    assert not ok and extra in why and "not in the manifest" in why
    assert newest_valid(str(tmp_path / "checkpoints")) == old


def test_manifest_verifier_property(tmp_path):
    """Whatever JSON the manifest holds, verify() returns (bool, reason) and never raises; it accepts only
    manifests that list model.pt and every rank file with their true sizes and hashes."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from stackgan_dist.checkpoint.manager import check_manifest

    _, _old, new = _two_checkpoints(tmp_path)
    valid = _manifest(new)
    mpath = os.path.join(new, "manifest.json")
    json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) |
                               st.text(max_size=20),
                               lambda k: st.lists(k, max_size=4) | st.dictionaries(st.text(max_size=12), k, max_size=4),
                               max_leaves=15)
    names = st.sampled_from(["model.pt", "rank_00000.pt", "rank_00001.pt", "../x", "", "/abs", "a//b", "engine/G/x"])

    def check(man):
        with open(mpath, "w") as f:
            json.dump(man, f)
        ok, why = verify(new)
        assert isinstance(ok, bool) and isinstance(why, str) and why
        if ok:
            assert check_manifest(man, new) is None
            assert {"model.pt", "rank_00000.pt"} <= set(man["files"])

    @settings(max_examples=300, deadline=None)
    @given(json_values)
    def arbitrary(man):
        check(man)

    @settings(max_examples=300, deadline=None)
    @given(st.sampled_from(["version", "step", "world_size", "files", "time"]), json_values, names, json_values,
           st.booleans())
    def mutated(key, value, name, entry, drop):
        man = json.loads(json.dumps(valid))
        if drop:
            man.pop(key, None)
        else:
            man[key] = value
        if isinstance(man.get("files"), dict):
            man["files"][name] = entry
        check(man)

    arbitrary()
    mutated()
    check(valid)
    assert verify(new) == (True, "ok")


# -- `latest`: a small file; old symlinks still read; a copied directory does not break saves -------------
def test_latest_forms(tmp_path):
    root = tmp_path / "checkpoints"
    mgr = CheckpointManager(str(tmp_path), env1(), keep_last=5)
    one = save(mgr, 1, n=100)
    latest = root / "latest"
    assert resolve_checkpoint(str(latest)) == one
    # a run written before: `latest` a symlink
    os.remove(latest)
    os.symlink("step_00000001", latest)
    assert read_latest(str(root)) == "step_00000001" and resolve_checkpoint(str(latest)) == one
    two = save(mgr, 2, n=100)
    assert not os.path.islink(latest) and read_latest(str(root)) == "step_00000002"
    # a run copied with cp -rL / scp -r: `latest` became a directory holding a copy of a checkpoint
    os.remove(latest)
    subprocess.run(["cp", "-r", two, str(latest)], check=True)
    assert resolve_checkpoint(str(latest)) == str(latest) and read_latest(str(root)) is None
    three = save(mgr, 3, n=100)
    assert os.path.isfile(latest) and resolve_checkpoint(str(latest)) == three
    assert [s for s, _ in list_checkpoints(str(root))] == [3, 2, 1]
    # junk in `latest` is refused in one line, and the run directory still resolves
    latest.write_text("../../../etc\n")
    with pytest.raises(CheckpointError, match="does not name a checkpoint"):
        resolve_checkpoint(str(latest))
    latest.write_text("step_00000009\n")
    with pytest.raises(CheckpointError, match="names step_00000009, which is not there"):
        resolve_checkpoint(str(latest))
    assert resolve_checkpoint(str(tmp_path)) == three


def test_keep_last_keeps_the_last_valid_checkpoints(tmp_path):
    mgr = CheckpointManager(str(tmp_path), env1(), keep_last=2)
    one = save(mgr, 1, n=100)
    two = save(mgr, 2, n=100)
    with open(os.path.join(two, "model.pt"), "r+b") as f:  # corrupt after the commit (a bad disk block)
        f.seek(100)
        f.write(b"\x00\x01\x02")
    save(mgr, 3, n=100)
    steps = [s for s, _ in list_checkpoints(str(tmp_path / "checkpoints"))]
    assert steps == [3, 2, 1] and verify(one) == (True, "ok")  # the corrupt one did not push step 1 out
    save(mgr, 4, n=100)
    assert [s for s, _ in list_checkpoints(str(tmp_path / "checkpoints"))] == [4, 3]


def test_metrics_torn_tail_is_dropped_with_a_message(tmp_path, caplog):
    from stackgan_dist.observability.metrics import MetricsWriter

    recs = [{"step": 2, "d_loss": 1.0}, {"step": 4, "d_loss": 0.5}]
    (tmp_path / "metrics.jsonl").write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in recs) +
                                             b'{"step": 6, "d_lo' + b"\0" * 300)
    with caplog.at_level("WARNING", logger="stackgan_dist.metrics"):
        w = MetricsWriter(str(tmp_path), True, resume_step=4, tensorboard=False)
    w.log(5, {"d_loss": 0.25})
    w.close()
    assert "dropped 1 unreadable line" in caplog.text
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [2, 4, 5]


# -- one run per run directory; failed or finished starts change nothing ------------------------------------
HOLDER = r"""
import sys
from stackgan_dist.checkpoint.lock import RunLock
lock = RunLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
sys.stdin.read()  # holds the lock until the test closes our stdin (or kills us)
"""


def _holder(run):
    """A second real process holding the run's lock; returns once it holds it (it says so on its stdout)."""
    e = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    p = subprocess.Popen([PY, "-c", HOLDER, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         env=e, cwd=REPO)
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_run_on_a_run_dir_is_refused_and_a_dead_holder_does_not_block(synth_data, base_run, tmp_path):
    import socket

    run = _copy(base_run, tmp_path / "run")
    holder = _holder(run)
    try:
        before = snapshot(run)
        p = _train(synth_data, run, 6)
        assert p.returncode == 2, p.stderr[-2000:]
        line = [ln for ln in p.stderr.splitlines() if "error" in ln]
        assert len(line) == 1 and "is in use by another run" in line[0], p.stderr[-2000:]
        assert f"host {socket.gethostname()}, pid {holder.pid}" in line[0]
        assert snapshot(run) == before
    finally:
        holder.kill()  # SIGKILL: the holder dies without releasing anything
        holder.wait()
    # the dead holder's lock is gone with it; its line is still in the file, and does not block
    assert f"pid={holder.pid}" in (run / ".lock").read_text()
    p = _train(synth_data, run, 4)  # finished at 4: says so, exits 0, writes nothing
    assert p.returncode == 0, p.stderr[-2000:]


def test_a_dry_run_tests_the_lock_and_never_holds_it(synth_data, base_run, tmp_path, monkeypatch):
    """A dry run (``stackgan train --dry-run``, a sweep asking whether a trial is done, the Ray driver's check)
    refuses a live run by testing its lock (F_GETLK), and never takes the lock, not even for a moment: a
    sweep's check once held it just when Slurm restarted the trial's requeued job, which was refused."""
    import fcntl
    import socket

    from stackgan_dist.config import load_config
    from stackgan_dist.train import dry_run_checks

    run = _copy(base_run, tmp_path / "run")
    cfg = lambda: load_config("configs/demo/stage1.yaml",  # noqa: E731
                              tiny_overrides(synth_data, run, 1, steps=4, extra=["checkpoint.every_steps=2"]))
    taken = []
    real_lockf = fcntl.lockf
    monkeypatch.setattr(fcntl, "lockf", lambda fd, op, *a: (taken.append(op), real_lockf(fd, op, *a))[1])
    assert dry_run_checks(cfg())["finished"] is True
    holder = _holder(run)
    try:
        with pytest.raises(UserError, match="is in use by another run") as e:
            dry_run_checks(cfg())
        assert f"host {socket.gethostname()}, pid {holder.pid}" in str(e.value)
    finally:
        holder.kill()
        holder.wait()
    assert dry_run_checks(cfg())["finished"] is True  # the dead holder's lock went with it
    assert taken == []


def test_finished_run_says_so_and_writes_nothing(synth_data, base_run, tmp_path):
    run = _copy(base_run, tmp_path / "run")
    before = snapshot(run)
    p = _train(synth_data, run, 4)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "is finished" in p.stdout and "step 4" in p.stdout and "train.max_steps=4" in p.stdout
    assert snapshot(run) == before and not (run / "restarts.json").exists()


def test_failed_start_writes_nothing_and_does_not_count_as_a_restart(synth_data, base_run, tmp_path):
    """A batch size the data cannot fill is found late (by the loader), after the checkpoint was loaded: the
    start fails with one line, and config.yaml, tb/, metrics.jsonl and restarts.json are untouched."""
    run = _copy(base_run, tmp_path / "run")
    before = snapshot(run)
    for _ in range(3):  # more than checkpoint.max_restarts=1 failed starts
        p = _train(synth_data, run, 6, extra=["train.batch_size=200", "checkpoint.max_restarts=1"])
        assert p.returncode == 2 and "too small" in p.stderr, p.stderr[-2000:]
        assert snapshot(run) == before
    assert not (run / "restarts.json").exists()


@pytest.mark.slow
def test_resume_repairs_a_torn_metrics_tail_and_an_empty_restart_record(synth_data, base_run, tmp_path):
    run = _copy(base_run, tmp_path / "run")
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 5, "d_loss": 0.' + b"\0" * 100)
    (run / "restarts.json").write_bytes(b"")
    p = _train(synth_data, run, 6)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "dropped 1 unreadable line" in p.stderr and "restarts.json is unreadable" in p.stderr
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [2, 4, 6]
    assert json.loads((run / "restarts.json").read_text())["count"] == 1


# -- signals: Ctrl-C checkpoints like SIGTERM; a warning signal while starting is not fatal ----------------------
def _train_proc(data, run, steps, log, env=None):
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    cmd = [PY, "-m", "stackgan_dist", "train", "configs/demo/stage1.yaml",
           *tiny_overrides(data, run, 1, steps=steps, extra=["checkpoint.every_steps=2"])]
    return subprocess.Popen(cmd, cwd=REPO, env=e, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _catches(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has a handler installed for ``sig`` (the kernel's SigCgt mask)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            mask = next(int(ln.split()[1], 16) for ln in f if ln.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(mask >> (sig - 1) & 1)


def _torch_loaded(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return "/torch/lib/" in f.read()
    except OSError:
        return False



def test_warning_signal_while_starting_checkpoints_at_the_first_step_and_exits_75(synth_data, tmp_path):
    """USR1 lands as soon as the command catches it, seconds before training starts (torch is still being
    imported): the run is not killed (138); it checkpoints at its first step boundary and exits 75."""
    run, log = tmp_path / "run", tmp_path / "log"
    p = _train_proc(synth_data, run, 8, log)
    wait_for(lambda: _catches(p.pid, signal.SIGUSR1) or _torch_loaded(p.pid), p, what="the early signal handler",
             poll=0.005)
    assert not _torch_loaded(p.pid), "USR1 was first caught after torch had loaded: no early handler"
    p.send_signal(signal.SIGUSR1)
    rc = p.wait(timeout=600)
    text = log.read_text()
    assert rc == EXIT_REQUEUE, text[-3000:]
    assert "received SIGUSR1: checkpoint written at step 1; exiting with 75 (requeue)" in text, text[-3000:]
    assert read_latest(str(run / "checkpoints")) == "step_00000001"


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_exits_130_then_resumes(synth_data, tmp_path):
    run, log = tmp_path / "run", tmp_path / "log"
    rv = Rendezvous(tmp_path / "rv", 3)
    p = _train_proc(synth_data, run, 12, log, env=rv.env)
    rv.wait(p)  # paused after step 3: Ctrl-C lands mid-run, whatever the machine's speed
    p.send_signal(signal.SIGINT)
    rv.go()
    rc = p.wait(timeout=600)
    text = log.read_text()
    assert rc == EXIT_INTERRUPTED, text[-3000:]
    line = next(ln for ln in text.splitlines() if ln.startswith("received SIGINT"))
    stopped = int(line.split("checkpoint written at step ")[1].split(";")[0])
    assert 3 <= stopped < 12 and "exiting with 130 (interrupted)" in line
    assert verify(str(run / "checkpoints" / f"step_{stopped:08d}")) == (True, "ok")
    p = _train(synth_data, run, 12)
    assert p.returncode == 0 and f"step_{stopped:08d} at step {stopped}" in p.stdout, p.stderr[-2000:]


def test_save_rendezvous_holds_a_written_uncommitted_save(tmp_path):
    """The test hook inside a save (testing.Hooks.after_save_written, wired as the manager's after_write):
    the background writer pauses with this rank's files on disk and no manifest until the test says go."""
    from stackgan_dist.testing import Hooks

    rv = tmp_path / "rv"
    mgr = CheckpointManager(str(tmp_path / "run"), env1())
    mgr.after_write = Hooks({"STACKGAN_TEST_PAUSE_IN_SAVE": "2", "STACKGAN_TEST_RENDEZVOUS_DIR": str(rv),
                             "STACKGAN_TEST_RENDEZVOUS_TIMEOUT_S": "60"}).after_save_written
    save(mgr, 1)  # not the step: no pause
    assert not rv.exists()
    assert mgr.save(2, model_state(2), {"rank": 0}, background=True) is None
    from conftest import wait_until

    wait_until(lambda: (rv / "rank0.save2").exists(), "the save marker")
    tmp = tmp_path / "run" / "checkpoints" / ".tmp-step_00000002"
    assert (tmp / "model.pt").is_file() and (tmp / "rank_00000.pt").is_file()
    assert not (tmp / "manifest.json").exists() and read_latest(str(tmp_path / "run" / "checkpoints")) == "step_00000001"
    assert int((rv / "rank0.save2").read_text()) == os.getpid()
    (rv / "go").touch()
    assert mgr.commit_pending().endswith("step_00000002")
    assert read_latest(str(tmp_path / "run" / "checkpoints")) == "step_00000002"

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

from conftest import PY, REPO, run_cli, tiny_overrides
from stackgan_dist.checkpoint.manager import (CheckpointManager, list_checkpoints, load_file, newest_valid,
                                              params_digest, resolve_checkpoint, verify)
from stackgan_dist.distributed.env import DistEnv
from stackgan_dist.errors import CheckpointError, UserError
from stackgan_dist.trainer import RestartGuard


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
        assert os.readlink(tmp_path / "checkpoints" / "latest") == f"step_{s:08d}"
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
        with pytest.raises(CheckpointError, match=r"write for step 2 failed.*File too large.*step_00000001 kept"):
            save(mgr, 2)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, old_sig)
    assert verify(good) == (True, "ok")
    assert os.readlink(tmp_path / "checkpoints" / "latest") == "step_00000001"
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
    g = RestartGuard(str(tmp_path), max_restarts=2)
    g.record(10)
    g.record(10)
    with pytest.raises(UserError, match=r"restarted 2 times from step 10.*max_restarts=2"):
        g.record(10)
    g.record(20)  # progress resets the count
    g.record(20)


# -- through the CLI, real processes ----------------------------------------------------------------
def _train(data, run, steps=4, extra=(), **kw):
    return run_cli("train", "configs/demo/stage1.yaml",
                   *tiny_overrides(data, run, 1, steps=steps, extra=["checkpoint.every_steps=2", *extra]), **kw)


@pytest.fixture(scope="module")
def base_run(synth_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("ckbase") / "run"
    _train(synth_data, run, 4, check=True)
    return run


def _copy(src, dst):
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    return dst


def test_resume_refuses_changed_width_and_fresh_on_existing_run(synth_data, base_run, tmp_path):
    run = _copy(base_run, tmp_path / "run")
    before = sorted(os.listdir(run / "checkpoints"))
    p = _train(synth_data, run, 6, extra=["model.gf_dim=32"])
    assert p.returncode == 2, p.stderr[-2000:]
    assert "model.gf_dim changed (16 -> 32)" in p.stderr
    p = run_cli("train", "configs/demo/stage1.yaml", "--fresh", *tiny_overrides(synth_data, run, 1, steps=6))
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
    assert json.loads(run_cli("inspect", run, check=True).stdout)["params_sha256"] == \
        json.loads(run_cli("inspect", base_run, check=True).stdout)["params_sha256"]


@pytest.mark.slow
def test_disk_full_during_training_reports_and_keeps_previous(synth_data, base_run, tmp_path):
    """The run resumes, trains, and its next save hits a real EFBIG; it stops with the error, the old
    checkpoint untouched."""
    run = _copy(base_run, tmp_path / "run")
    good = run / "checkpoints" / "step_00000004"

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, resource.RLIM_INFINITY))

    e = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([PY, "-m", "stackgan_dist", "train", "configs/demo/stage1.yaml",
                        *tiny_overrides(synth_data, run, 1, steps=6, extra=["checkpoint.every_steps=2"])],
                       cwd=REPO, env=e, capture_output=True, text=True, timeout=600, preexec_fn=limit)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "checkpoint write for step 6 failed" in p.stderr and "File too large" in p.stderr, p.stderr[-3000:]
    assert f"{good} kept" in p.stderr
    assert verify(str(good)) == (True, "ok")
    assert os.readlink(run / "checkpoints" / "latest") == "step_00000004"
    assert not os.path.exists(run / "checkpoints" / "step_00000006")

"""launch/ray_job.py against a real Ray cluster on loopback (bash tests/cluster/start_ray.sh; `make test` starts it).

A 2-worker Ray job succeeds with its checkpoint in run.dir and the same params_sha256 as torchrun with 2 processes;
a Ray worker SIGKILLed mid-run makes Ray Train restart the group, which resumes from our checkpoint and ends with
the uninterrupted digest; an unreachable address and an unschedulable request fail fast with one clear line.
These tests fail (never skip) when the cluster is not running.
"""
from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import time
import urllib.request

import pytest

from conftest import PY, REPO, Rendezvous, committed, digest
from ray_helpers import ADDRESS, CONFIG, EVERY, STEPS, overrides, ray_job, show

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

@pytest.fixture(scope="module")
def ray_cluster():
    try:
        urllib.request.urlopen(f"{ADDRESS}/api/version", timeout=5).read()
    except OSError as e:
        pytest.fail(f"no Ray cluster at {ADDRESS} ({e}): start one with `bash tests/cluster/start_ray.sh`")
    return ADDRESS


@pytest.fixture(scope="module")
def ray_run(ray_cluster, synth_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("ray_ok")
    run = d / "run"
    p = ray_job("--num-workers", 2, "--max-failures", 0, CONFIG, *overrides(synth_data, run))
    return p, run


def test_ray_job_succeeds_with_checkpoint_in_run_dir(ray_run):
    p, run = ray_run
    assert p.returncode == 0, show(p)
    assert "submitted Ray job raysubmit_" in p.stdout and "SUCCEEDED" in p.stdout, show(p)
    assert committed(run, STEPS), os.listdir(run / "checkpoints")
    # also reported to Ray: a pointer checkpoint in Ray Train's storage under run.dir/ray
    ptr = json.loads((run / "ray" / f"step_{STEPS:08d}" / "stackgan_checkpoint.json").read_text())
    assert ptr == {"checkpoint": str(run / "checkpoints" / f"step_{STEPS:08d}"), "step": STEPS}
    assert json.loads((run / "checkpoints" / f"step_{STEPS:08d}" / "manifest.json").read_text())["world_size"] == 2


def test_ray_and_torchrun_give_equal_weights(ray_run, torchrun_digest):
    p, run = ray_run
    assert p.returncode == 0, show(p)
    assert digest(run) == torchrun_digest


def test_ray_worker_killed_restarts_group_and_resumes(ray_cluster, synth_data, tmp_path, torchrun_digest):
    run = tmp_path / "run"
    # both workers pause after step 7 (the trainer's test rendezvous; the step-4 save is committed by then), so
    # that the kill lands mid-run; the restarted group passes step 7 again without waiting (go exists then)
    rv = Rendezvous(tmp_path / "rv", STEPS - 1, ranks=(0, 1))
    env = [x for k, v in rv.env.items() for x in ("--env", f"{k}={v}")]
    job = subprocess.Popen([PY, os.path.join(REPO, "launch", "ray_job.py"), "--address", ray_cluster,
                            "--num-workers", "2", "--max-failures", "2", *env, CONFIG, *overrides(synth_data, run)],
                           cwd=REPO, stdout=open(tmp_path / "job.log", "w"), stderr=subprocess.STDOUT)
    try:
        rv.wait(job)
        assert committed(run, EVERY) and not committed(run, STEPS)
        victim = rv.pid(1)
        os.kill(victim, signal.SIGKILL)  # a real Ray Train worker process, mid-run
        rv.go()
        rc = job.wait(timeout=420)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    log = (tmp_path / "job.log").read_text()
    assert rc == 0, log[-6000:]
    # the group was restarted (another rank-1 worker passed step 7) and training resumed from our checkpoint
    assert rv.pid(1) != victim, log[-4000:]
    assert f"resumed from {run / 'checkpoints'}" in log, log[-4000:]
    assert json.loads((run / "restarts.json").read_text())["count"] == 1
    assert digest(run) == torchrun_digest


def test_unreachable_address_is_a_clear_error_within_seconds(synth_data, tmp_path):
    t0 = time.monotonic()
    e = dict(os.environ)
    p = subprocess.run([PY, os.path.join(REPO, "launch", "ray_job.py"), "--address", "http://127.0.0.1:1",
                        "--num-workers", "2", CONFIG, *overrides(synth_data, tmp_path / "run")],
                       capture_output=True, text=True, timeout=60, cwd=REPO, env=e)
    dt = time.monotonic() - t0
    assert p.returncode == 2, show(p)
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ray_job: error: cannot reach the Ray Jobs API at http://127.0.0.1:1"), \
        show(p)
    assert "Traceback" not in p.stderr and dt < 30, (dt, show(p))
    assert not (tmp_path / "run").exists()


def test_bad_config_fails_before_submitting(tmp_path):
    p = ray_job("--num-workers", 2, CONFIG, "train.max_stepz=3", f"run.dir={tmp_path}/run", timeout=60)
    assert p.returncode == 2, show(p)
    assert "max_stepz" in p.stderr and "submitted" not in p.stdout, show(p)


def test_unschedulable_workers_become_a_clear_error(ray_cluster, synth_data, tmp_path):
    """1 GPU per worker on this GPU-less cluster: the placement would stay pending forever; the watchdog stops it."""
    t0 = time.monotonic()
    p = ray_job("--num-workers", 2, "--gpus-per-worker", 1, "--pending-timeout", 10, CONFIG,
                *overrides(synth_data, tmp_path / "run"), timeout=300)
    dt = time.monotonic() - t0
    assert p.returncode == 1, show(p)
    last = p.stderr.strip().splitlines()[-1]
    assert "FAILED" in last and "could not be scheduled within 10s" in last and "GPU" in last, show(p)
    assert dt < 120, dt
    assert not glob.glob(str(tmp_path / "run" / "checkpoints" / "step_*"))


def test_job_stuck_pending_is_stopped_with_a_clear_error(ray_cluster, synth_data, tmp_path):
    """A driver that needs more CPUs than the cluster has stays PENDING; the watchdog stops it after its timeout."""
    t0 = time.monotonic()
    p = ray_job("--num-workers", 1, "--entrypoint-num-cpus", 512, "--pending-timeout", 6, CONFIG,
                *overrides(synth_data, tmp_path / "run"), timeout=120)
    dt = time.monotonic() - t0
    assert p.returncode == 2, show(p)
    err = p.stderr.strip().splitlines()[-1]
    assert err.startswith("ray_job: error: job raysubmit_") and "stayed PENDING for 6s and was stopped" in err, show(p)
    assert dt < 60, dt
    assert "resources" in err, show(p)  # Ray's own hint is passed on


def _wait_terminal(client, job_id, limit=300):
    t0 = time.monotonic()
    while not client.get_job_status(job_id).is_terminal():
        assert time.monotonic() - t0 < limit, f"job did not finish within {limit} s"
        time.sleep(1)
    return str(client.get_job_status(job_id).value), time.monotonic() - t0


def test_no_wait_returns_the_job_id_and_missing_data_fails_in_the_driver(ray_cluster, tmp_path):
    """A missing data directory is a user error: the driver's start checks refuse it before any worker starts,
    whatever --max-failures says (it was retried for about a minute before)."""
    from ray.job_submission import JobSubmissionClient

    t0 = time.monotonic()
    pids = tmp_path / "pids"
    p = ray_job("--no-wait", "--num-workers", 2, "--max-failures", 3, "--env", f"STACKGAN_TEST_PID_DIR={pids}",
                CONFIG, f"run.dir={tmp_path}/run", f"data.train={tmp_path}/no_such_split", "data.test=",
                "model.gf_dim=16", "model.df_dim=8", timeout=120)
    assert p.returncode == 0 and time.monotonic() - t0 < 60, show(p)
    job_id = json.loads(next(ln for ln in p.stdout.splitlines() if ln.startswith("{")))["job_id"]
    client = JobSubmissionClient(ray_cluster)
    status, _ = _wait_terminal(client, job_id)
    assert status == "FAILED"
    lines = [ln for ln in client.get_job_logs(job_id).splitlines() if ln.startswith("stackgan ray: error:")]
    assert len(lines) == 1, client.get_job_logs(job_id)[-3000:]
    assert "data.train" in lines[0] and "no_such_split" in lines[0] and "does not exist" in lines[0], lines[0]
    assert not pids.exists() and not (tmp_path / "run").exists()  # no worker started, nothing written


def test_a_user_error_in_a_worker_is_not_retried(ray_cluster, synth_data, tmp_path):
    """Shards damaged past their first sample pass the start checks; the workers then stop on
    data.max_bad_fraction (a UserError): the run ends at once with that line, one attempt, no restart."""
    import shutil

    data, pids = tmp_path / "data", tmp_path / "pids"
    shutil.copytree(synth_data, data)
    for name in sorted(os.listdir(data / "train")):
        if name.endswith(".tar"):
            path = data / "train" / name
            with open(path, "r+b") as f:  # cut mid-member: the first samples stay readable
                f.truncate(int(os.path.getsize(path) * 0.3) // 512 * 512 + 100)
    t0 = time.monotonic()
    p = ray_job("--num-workers", 2, "--max-failures", 3, "--env", f"STACKGAN_TEST_PID_DIR={pids}", CONFIG,
                *overrides(data, tmp_path / "run"), timeout=420)
    assert p.returncode == 1, show(p)
    last = p.stderr.strip().splitlines()[-1]
    assert "FAILED" in last and "not retried" in last and "max_bad_fraction" in last, show(p)
    assert re.search(r"rank \d+: (DataError|UserError)", last), last
    # one attempt: each rank's pid file has one line (a restarted group appends a second)
    for rank in (0, 1):
        assert len((pids / f"rank{rank}.pid").read_text().split()) == 1, show(p)
    assert "FailurePolicy] RETRY" not in p.stdout, show(p)
    assert time.monotonic() - t0 < 300


def test_job_runs_the_code_of_the_checkout_that_submitted_it(ray_cluster, synth_data, tmp_path):
    """Two checkouts that differ by a marker: the Ray head runs from this one (its venv's editable install
    points here), the job is submitted from the other, and every worker runs the other's code (the job's
    working_dir package), not the head's."""
    other = tmp_path / "other_checkout"
    subprocess.run(["git", "-C", REPO, "worktree", "add", "--detach", str(other), "HEAD"], check=True,
                   capture_output=True, timeout=120)
    try:
        src = other / "stackgan_dist" / "launch_ray.py"
        text = src.read_text()
        assert 'print(f"stackgan ray: rank' in text
        src.write_text(text.replace('print(f"stackgan ray: rank', 'print(f"OTHER-CHECKOUT stackgan ray: rank'))
        e = dict(os.environ, OMP_NUM_THREADS="1")
        p = subprocess.run([PY, str(other / "launch" / "ray_job.py"), "--address", ray_cluster, "--num-workers", "2",
                            "--max-failures", "0", CONFIG, *overrides(synth_data, tmp_path / "run")],
                           capture_output=True, text=True, timeout=420, cwd=str(other), env=e)
        assert p.returncode == 0, show(p)
        lines = [ln for ln in p.stdout.splitlines() if "stackgan ray: rank" in ln and ", code " in ln]
        assert {ln.split("rank ")[1][0] for ln in lines} == {"0", "1"}, show(p)
        for ln in lines:
            assert "OTHER-CHECKOUT" in ln, ln
            code = ln.split(", code ")[1].strip()
            # every stackgan_dist module (stackgan_dist.data included) from the job's own copy, none from the head's
            assert "working_dir_files" in code and " + " not in code and not code.startswith(REPO), ln
    finally:
        subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", str(other)], capture_output=True,
                       timeout=120)

"""One sweep file, three ways to run it, one result: a 4-trial sweep (the demo config, tiny widths, 4 seeds, a
few steps) run `--on local`, `--on slurm` (one job array on the local cluster, each task through
slurm/train.sbatch) and `--on ray` (Ray Tune trials on the local Ray cluster) ends with bitwise the same G and D
of every trial (params_sha256 of the final checkpoint, as tests/test_slurm.py and test_ray.py compare
launchers). A missing cluster is a failure, not a skip.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.request

import pytest
import yaml

from conftest import PY, REPO, TINY, digest

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

RAY_DASHBOARD = os.environ.get("STACKGAN_TEST_RAY_ADDRESS", "http://127.0.0.1:8265")
RAY_GCS = os.environ.get("STACKGAN_TEST_RAY_GCS", "127.0.0.1:6379")
TRIALS = ("t000", "t001", "t002", "t003")


def sweep_file(tmp_path, data, where: str):
    doc = {"name": f"launchers-{where}", "base": "configs/demo/stage1.yaml", "dir": str(tmp_path / where),
           "overrides": [f"data.train={data}/train", f"data.test={data}/test", *TINY, "train.max_steps=4",
                         "checkpoint.every_steps=2", "train.channels_last=false"],
           "seeds": [0, 1, 2, 3]}
    p = tmp_path / f"{where}.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def sweep(f, *args, env=None, timeout=900):
    # the local Ray cluster runs with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (tests/cluster/start_ray.sh): its
    # nodes are on loopback, and a driver must agree or Ray resolves 127.0.0.1 to the host's own address
    e = dict(os.environ, OMP_NUM_THREADS="1", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    e.update(env or {})
    p = subprocess.run([PY, "-m", "stackgan_dist", "sweep", str(f), "--parallel", "2", *args], capture_output=True,
                       text=True, timeout=timeout, cwd=REPO, env=e)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return p


def finished_digests(d) -> dict:
    out = {}
    for t in TRIALS:
        rec = json.loads((d / t / "trial.json").read_text())
        assert rec["status"] == "finished", rec
        out[t] = digest(d / t / "stage1")
    return out


@pytest.fixture(scope="module")
def local_digests(synth_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep_local")
    sweep(sweep_file(tmp, synth_data, "local"), "--on", "local")
    d = finished_digests(tmp / "local")
    assert len(set(d.values())) == 4  # four seeds, four different generators
    return d


def test_slurm_array_gives_the_local_weights(local_digests, synth_data, tmp_path):
    missing = [t for t in ("sbatch", "squeue", "sinfo") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"Slurm tools missing ({', '.join(missing)}): run `bash tests/cluster/start_slurm.sh` as root")
    p = sweep(sweep_file(tmp_path, synth_data, "slurm"), "--on", "slurm")
    arrays = re.findall(r"job array (\d+) \(4 tasks, at most 2 at once\)", p.stdout)
    assert len(arrays) == 1, p.stdout  # ONE array for a one-stage sweep
    assert sorted(os.listdir(tmp_path / "slurm" / "slurm" / "stage1")) == \
        ["0.args", "0.err", "0.out", "1.args", "1.err", "1.out", "2.args", "2.err", "2.out", "3.args", "3.err",
         "3.out", "tasks.txt"]
    assert "training exited with 0" in (tmp_path / "slurm" / "slurm" / "stage1" / "0.out").read_text()
    assert finished_digests(tmp_path / "slurm") == local_digests
    for t in TRIALS:  # each ran once; its time is the span train.sbatch logged
        rec = json.loads((tmp_path / "slurm" / t / "trial.json").read_text())
        assert rec["attempts"] == 1 and rec["wall_s"] > 0, rec


def test_ray_tune_gives_the_local_weights(local_digests, synth_data, tmp_path):
    try:
        urllib.request.urlopen(f"{RAY_DASHBOARD}/api/version", timeout=5).read()
    except OSError as e:
        pytest.fail(f"no Ray cluster at {RAY_DASHBOARD} ({e}): start one with `bash tests/cluster/start_ray.sh`")
    sweep(sweep_file(tmp_path, synth_data, "ray"), "--on", "ray", "--ray-address", RAY_GCS)
    assert os.path.isdir(tmp_path / "ray" / "ray")  # Tune's own records stay inside the sweep directory
    assert finished_digests(tmp_path / "ray") == local_digests


def _job_state(job: str) -> dict:
    p = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=60)
    return dict(re.findall(r"(\w+)=(\S*)", p.stdout)) if p.returncode == 0 else {}


def test_a_preempted_array_task_resumes_its_trial_exactly(local_digests, synth_data, tmp_path):
    """Trial t000's array task gets the warning signal (scancel --signal=USR1) while paused at a test rendezvous
    after step 1: train.sbatch checkpoints, exits 75 and requeues the task; the released task resumes the trial
    from its own run directory; the rerun of the sweep command waits for the array (it does not submit twice)
    and finds the weights of the uninterrupted local trial."""
    from conftest import Rendezvous, wait_until
    from slurm_helpers import release_requeued

    f = sweep_file(tmp_path, synth_data, "pre")
    doc = yaml.safe_load(f.read_text())
    doc["seeds"] = [0]
    f.write_text(yaml.safe_dump(doc))
    rz = Rendezvous(tmp_path / "rz", step=1)  # signalled at step 1 of 4: the checkpoint comes before the stop
    p = sweep(f, "--on", "slurm", "--no-wait", env=rz.env)
    array = re.search(r"job array (\d+)", p.stdout).group(1)
    task = f"{array}_0"
    wait_until(rz.arrived, "the array task at step 1", timeout=600,
               diagnose=lambda: str(_job_state(task)) + (tmp_path / "pre" / "slurm" / "stage1" / "0.err").read_text())
    subprocess.run(["scancel", "--signal=USR1", task], check=True, timeout=60)
    # scancel returns before slurmstepd has delivered the signal: go only once the task's handler has run
    wait_until(rz.signalled, "the USR1 at the paused task", timeout=120,
               diagnose=lambda: (tmp_path / "pre" / "slurm" / "stage1" / "0.out").read_text())
    rz.go()
    # requeued tasks wait for a begin time (~2 min): started as soon as the old incarnation's steps are gone
    release_requeued(_job_state(task)["JobId"], str(tmp_path / "pre" / "slurm" / "stage1" / "0.err"))
    p = sweep(f, "--on", "slurm")
    assert "still run; waiting for them" in p.stdout or "finished (left as it is)" in p.stdout, p.stdout
    out = (tmp_path / "pre" / "slurm" / "stage1" / "0.out").read_text()
    assert "requeueing job" in out and "restart 1:" in out, out[-3000:]
    err = (tmp_path / "pre" / "slurm" / "stage1" / "0.err").read_text()
    m = re.search(r"checkpoint written at step (\d+)", out)
    assert m and 1 <= int(m.group(1)) < 4, out[-3000:]  # checkpointed mid-run, then resumed from there
    assert f"stage1/checkpoints/step_{int(m.group(1)):08d} at step {m.group(1)}" in err + out, (err + out)[-3000:]
    rec = json.loads((tmp_path / "pre" / "t000" / "trial.json").read_text())
    assert rec["status"] == "finished" and rec["attempts"] == 2, rec  # the preempted incarnation and its requeue
    assert digest(tmp_path / "pre" / "t000" / "stage1") == local_digests["t000"]

"""Job-shape guards: one rank trains on one GPU, so every launcher refuses a shape that would leave GPUs idle
(or put two ranks on one GPU) in one line, before anything trains.

- slurm/train.sbatch on the local Slurm cluster, whose node declares 8 GPUs that are not there (a GRES on
  /dev/null aliases, tests/cluster/start_slurm.sh): Slurm grants them and sets SLURM_GPUS_ON_NODE as on a GPU
  node. CPU training ignores them, so the passing shape runs a real (failing-config) training step start.
- the same script as a real process with the variables other Slurm versions set instead (SLURM_JOB_GPUS,
  SLURM_GPUS_PER_NODE with a type, SLURM_TASKS_PER_NODE "N(xM)").
- launch/ray_job.py (GPUs per worker vs workers) and launch/submitit_job.py (gpus vs tasks per node).
"""
from __future__ import annotations

import os
import re
import subprocess

import pytest

from conftest import PY, REPO, wait_until

CFG = "configs/demo/stage1.yaml"
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")


def job_info(jid: str) -> dict:
    p = subprocess.run(["scontrol", "show", "job", "-o", jid], capture_output=True, text=True, timeout=60)
    return dict(re.findall(r"(\w+)=(\S*)", p.stdout)) if p.returncode == 0 else {}


def sbatch_and_wait(tmp_path, *opts, overrides=()) -> tuple[dict, str]:
    log = tmp_path / "job.out"
    p = subprocess.run(["sbatch", "--parsable", "--cpus-per-task=1", f"--output={log}", *opts, "slurm/train.sbatch",
                        CFG, f"run.dir={tmp_path / 'run'}", *overrides],
                       capture_output=True, text=True, timeout=60, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
    assert p.returncode == 0, p.stderr
    jid = p.stdout.strip().split(";")[0]
    info = wait_until(lambda: (i := job_info(jid)) and i.get("JobState") in ENDED and i, f"job {jid} to end",
                      timeout=420, poll=0.2,
                      diagnose=lambda: subprocess.run(["scontrol", "show", "job", jid], capture_output=True,
                                                      text=True).stdout)
    # the job's state is final before slurmstepd has flushed the last output: wait for a whole last line
    wait_until(lambda: log.is_file() and log.read_text().endswith("\n"), f"job {jid}'s log", timeout=60)
    return info, log.read_text()


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.parametrize("gpus,tasks,words", [
    (2, None, ["2 GPUs (SLURM_GPUS_ON_NODE)", "1 task(s) (SLURM_NTASKS_PER_NODE)", "1 would sit idle",
               "--ntasks-per-node=2 --gpus-per-node=2"]),
    (1, 2, ["1 GPU(s) (SLURM_GPUS_ON_NODE)", "2 tasks", "NCCL", "--ntasks-per-node=1 --gpus-per-node=1"]),
])
def test_sbatch_refuses_gpus_unequal_to_tasks_before_srun(tmp_path, gpus, tasks, words):
    """sbatch --gpus-per-node=2 without --ntasks-per-node (the script's default is 1 task) starts nothing."""
    opts = [f"--gpus-per-node={gpus}"] + ([f"--ntasks-per-node={tasks}"] if tasks else [])
    info, log = sbatch_and_wait(tmp_path, *opts)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", (info, log)
    lines = log.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train.sbatch: Slurm gave this node"), log
    assert all(w in lines[0] for w in words), lines[0]
    assert not (tmp_path / "run").exists()  # srun never ran: no training touched the run directory


@pytest.mark.cluster
@pytest.mark.slow
def test_sbatch_with_one_task_per_gpu_reaches_training(tmp_path):
    """2 GPUs and 2 tasks pass the guard: srun starts both ranks, which then refuse the bad key themselves."""
    info, log = sbatch_and_wait(tmp_path, "--gpus-per-node=2", "--ntasks-per-node=2", overrides=["train.bogus=1"])
    assert "Slurm gave this node" not in log, log
    assert "2 task(s) on" in log, log
    assert log.count("unknown config key 'train.bogus'") == 2, log  # both ranks started
    assert info["ExitCode"] == "2:0", (info, log)


def run_guard(tmp_path, env: dict) -> subprocess.CompletedProcess:
    """train.sbatch as the batch shell Slurm starts, with only the given SLURM_* variables; an srun on PATH that
    fails loudly proves whether the guard let the script get that far."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "srun").write_text("#!/bin/sh\necho SRUN-CALLED >&2\nexit 99\n")
    (fake / "srun").chmod(0o755)
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    base.update(PATH=f"{fake}:{os.environ['PATH']}", STACKGAN_SITE_ENV="/nonexistent", MASTER_PORT="29999", **env)
    return subprocess.run(["bash", "slurm/train.sbatch", CFG], capture_output=True, text=True, cwd=REPO, env=base,
                          timeout=60)


@pytest.mark.parametrize("env,words", [
    ({"SLURM_JOB_GPUS": "0,1,2,3", "SLURM_TASKS_PER_NODE": "1(x2)"},
     ["4 GPUs (SLURM_JOB_GPUS)", "1 task(s) (SLURM_TASKS_PER_NODE)", "3 would sit idle"]),
    ({"SLURM_GPUS_PER_NODE": "a100:8", "SLURM_NTASKS_PER_NODE": "1"},
     ["8 GPUs (SLURM_GPUS_PER_NODE)", "7 would sit idle", "--ntasks-per-node=8"]),
    ({"SLURM_STEP_GPUS": "0,1", "SLURM_TASKS_PER_NODE": "4,4"}, ["2 GPU(s) (SLURM_STEP_GPUS)", "4 tasks"]),
    # SLURM_GPUS_ON_NODE is the most precise and wins over the job-wide list
    ({"SLURM_GPUS_ON_NODE": "8", "SLURM_JOB_GPUS": "0", "SLURM_NTASKS_PER_NODE": "2"},
     ["8 GPUs (SLURM_GPUS_ON_NODE)", "6 would sit idle"]),
])
def test_guard_reads_the_variables_each_slurm_sets(tmp_path, env, words):
    p = run_guard(tmp_path, env)
    assert p.returncode == 2 and "SRUN-CALLED" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and all(w in lines[0] for w in words), p.stderr


@pytest.mark.parametrize("env", [
    {"SLURM_GPUS_ON_NODE": "8", "SLURM_NTASKS_PER_NODE": "8"},
    {"SLURM_JOB_GPUS": "0,1", "SLURM_TASKS_PER_NODE": "2(x3)"},
    {"SLURM_NTASKS_PER_NODE": "2"},  # a CPU job: no GPUs, nothing to match
])
def test_guard_lets_matching_and_cpu_shapes_reach_srun(tmp_path, env):
    p = run_guard(tmp_path, env)
    assert "Slurm gave this node" not in p.stderr and "SRUN-CALLED" in p.stderr, p.stderr


def one_line(p, rc=2) -> str:
    assert p.returncode == rc and "Traceback" not in p.stderr, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    return lines[0]


@pytest.mark.parametrize("gpus,words", [
    ("8", ["--num-workers 2 --gpus-per-worker 8", "7 of every worker's GPUs would sit idle", "--num-workers 16"]),
    ("0.5", ["--gpus-per-worker 0.5", "NCCL refuses", "--gpus-per-worker 1"]),
])
def test_ray_job_refuses_several_gpus_per_worker_before_contacting_ray(gpus, words):
    # an address nothing listens on: the guard must answer first, in a fraction of a second
    p = subprocess.run([PY, "launch/ray_job.py", "--address", "http://127.0.0.1:9", "--num-workers", "2",
                        "--gpus-per-worker", gpus, CFG], capture_output=True, text=True, cwd=REPO, timeout=60)
    line = one_line(p)
    assert line.startswith("ray_job: error:") and all(w in line for w in words), line


def test_ray_driver_applies_the_same_guard():
    from stackgan_dist.errors import UserError
    from stackgan_dist.launch_ray import check_worker_shape, main

    for ok in (0, 1):
        check_worker_shape(16, ok)
    with pytest.raises(UserError, match="--num-workers 32 --gpus-per-worker 1"):
        check_worker_shape(4, 8)
    assert main(["--num-workers", "2", "--gpus-per-worker", "4", CFG]) == 2  # before ray.init


@pytest.mark.parametrize("args,words", [
    (["--gpus-per-node", "8", "--tasks-per-node", "1"], ["7 GPU(s) per node would sit idle", "--tasks-per-node 8"]),
    (["--gpus-per-node", "2", "--tasks-per-node", "4"], ["two tasks would share a GPU", "--tasks-per-node 2"]),
])
def test_submitit_refuses_tasks_unequal_to_gpus_before_submitting(tmp_path, args, words):
    folder = tmp_path / "submitit"
    p = subprocess.run([PY, "launch/submitit_job.py", "--folder", str(folder), *args, CFG,
                        f"run.dir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=REPO, timeout=120)
    line = one_line(p)
    assert line.startswith("submitit_job: error:") and all(w in line for w in words), line
    assert not folder.exists() and not (tmp_path / "run").exists()  # nothing submitted, nothing created

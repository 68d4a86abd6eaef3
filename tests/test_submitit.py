"""launch/submitit_job.py with submitit's local executor and its Slurm executor (real local Slurm cluster).

The same tiny config, seed and world size (2) as tests/test_slurm.py, so every run ends with the digest of
the same uninterrupted torchrun reference, including a job that gets submitit's timeout signal (USR2, what
Slurm's --signal and the local controller send before the time limit) mid-run: it checkpoints, submitit
requeues it, and it resumes. A missing cluster is a failure, not a skip.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess

import pytest

from conftest import PY, REPO, committed, finish, inspect_run, start
from slurm_helpers import CFG1, STEPS, diagnose, job_info, overrides, release_requeued, sh, wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

LAUNCH = os.path.join(REPO, "launch", "submitit_job.py")


def launch_cmd(data, run, *opts):
    return [PY, LAUNCH, *opts, CFG1, *overrides(data, run)]


def submitted_id(log, p: subprocess.Popen, timeout=120) -> str:
    def find():
        m = re.search(r"^submitted job (\d+)", open(log).read(), re.M)
        if not m and p.poll() is not None:
            raise AssertionError(f"launcher exited {p.returncode} before submitting\n{open(log).read()}")
        return m and m.group(1)
    return wait_until(find, "the job id", "0", timeout=timeout)


def task_pids(job_id: str) -> list[int]:
    """The local executor's task processes of job_id (the controller's pid)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                env = open(f"/proc/{d}/environ", "rb").read().split(b"\0")
            except OSError:
                continue
            if f"SUBMITIT_LOCAL_JOB_ID={job_id}".encode() in env and any(
                    e.startswith(b"SUBMITIT_LOCAL_GLOBALID=") for e in env):
                out.append(int(d))
    return out


def test_local_executor_matches_torchrun(synth_data, reference, tmp_path):
    run, log = tmp_path / "run", str(tmp_path / "launch.log")
    text = finish(start(launch_cmd(synth_data, run, "--local", "--tasks-per-node", "2"), log_path=log), log)
    assert "finished: {'stopped': 'max_steps', 'step': %d}" % STEPS in text, text
    d = inspect_run(run)
    assert (d["step"], d["world_size"]) == (STEPS, 2)
    assert d["params_sha256"] == reference


def test_local_timeout_signal_requeues_and_resumes(synth_data, reference, tmp_path):
    run, log = tmp_path / "run", str(tmp_path / "launch.log")
    p = start(launch_cmd(synth_data, run, "--local", "--tasks-per-node", "2"), log_path=log)
    jid = submitted_id(log, p)
    wait_until(lambda: committed(run, 4) or p.poll() is not None, "the first checkpoint", jid, log)
    pids = task_pids(jid)
    assert len(pids) == 2 and p.poll() is None, (pids, open(log).read())
    for pid in pids:  # what the local controller sends signal_delay_s before its time limit
        os.kill(pid, signal.SIGUSR2)
    finish(p, log)
    out0 = open(run / "submitit" / f"{jid}_0_log.out").read()
    err0 = open(run / "submitit" / f"{jid}_0_log.err").read()
    for line in ("received SIGUSR2: checkpoint written at step", "checkpointed after SIGUSR2", "Requeued job",
                 "resumed from"):
        assert line in out0 + err0, f"{line!r} missing\n{out0[-3000:]}\n{err0[-3000:]}"
    assert inspect_run(run)["params_sha256"] == reference


def test_slurm_executor_matches_torchrun(slurm, synth_data, reference, tmp_path):
    run, log = tmp_path / "run", str(tmp_path / "launch.log")
    text = finish(start(launch_cmd(synth_data, run, "--tasks-per-node", "2", "--time", "10"), log_path=log), log)
    assert "finished: {'stopped': 'max_steps', 'step': %d}" % STEPS in text, text
    d = inspect_run(run)
    assert (d["step"], d["world_size"]) == (STEPS, 2)
    assert d["params_sha256"] == reference


def test_slurm_timeout_requeues_and_resumes(slurm, synth_data, reference, tmp_path):
    run, log = tmp_path / "run", str(tmp_path / "launch.log")
    # --time 5: Slurm's own USR2 (at ~3.5 min) stays out of the way; the test sends it early, as submitit's
    # SlurmJob._interrupt(timeout=True) does
    p = start(launch_cmd(synth_data, run, "--tasks-per-node", "2", "--time", "5"), log_path=log)
    jid = submitted_id(log, p)
    out0 = run / "submitit" / f"{jid}_0_log.out"
    wait_until(lambda: committed(run, 4) or p.poll() is not None, "the first checkpoint", jid, str(out0))
    assert job_info(jid).get("JobState") == "RUNNING", diagnose(jid, str(out0))
    sh("scancel", "--signal=USR2", jid)
    release_requeued(jid, str(out0))
    finish(p, log)
    text = out0.read_text() + (run / "submitit" / f"{jid}_0_log.err").read_text()
    for line in ("received SIGUSR2: checkpoint written at step", "checkpointed after SIGUSR2", "this job is timed-out",
                 "Requeued job", "resumed from"):
        assert line in text, f"{line!r} missing\n{text[-4000:]}"
    assert int(job_info(jid)["Restarts"]) == 1
    assert inspect_run(run)["params_sha256"] == reference


def test_bad_partition_is_one_line(slurm, synth_data, tmp_path):
    p = subprocess.run(launch_cmd(synth_data, tmp_path / "run", "--partition", "no_such_partition"), cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stderr.strip() == ("submitit_job: error: submission refused: invalid partition specified: "
                                "no_such_partition"), p.stderr


def test_the_rendezvous_port_is_fixed_per_job_and_below_the_ephemeral_range(tmp_path):
    """Every attempt of a job meets at the same port, and no outgoing connection of another process can hold it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("submitit_job", LAUNCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ports = [mod.master_port(str(j)) for j in range(200)]
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    assert all(20000 <= p < low for p in ports) and len(set(ports)) > 150
    assert [mod.master_port(str(j)) for j in range(200)] == ports  # a requeued job finds its port again
    f = tmp_path / "range"
    f.write_text("20500\t60999\n")
    assert mod.master_port("7", str(f)) is None  # no room below the range: submitit's own pick

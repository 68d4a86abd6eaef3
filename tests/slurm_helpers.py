"""Helpers of the Slurm tests (test_slurm.py, test_slurm_multinode.py, test_submitit.py): one tiny Stage-I
config, seed and world size (2) for every launcher, so every run must end with the digest of the one torchrun
reference (the `reference` fixture in conftest.py). Every wait is on our own job id, bounded, with `scontrol show
job` in the failure message: other people's jobs may share the node."""
from __future__ import annotations

import os
import re
import subprocess
import time

import conftest
from conftest import PY, REPO, tiny_overrides

CFG1, CFG2 = "configs/demo/stage1.yaml", "configs/demo/stage2.yaml"
STEPS = 60  # long enough to signal a running job after its step-4 checkpoint (~0.15 s/step on 2 cores)
EVERY = ["checkpoint.every_steps=4"]
JOB_TIMEOUT = 420  # s, per wait: other engineers' jobs may share the node


def overrides(data, run, steps=STEPS, stage=1, extra=()):
    return tiny_overrides(data, run, stage=stage, steps=steps, extra=[*EVERY, *extra])


def sh(*cmd, timeout=60, check=True) -> subprocess.CompletedProcess:
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))}: exit {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def job_info(jid: str) -> dict:
    p = sh("scontrol", "show", "job", "-o", jid, check=False)
    return dict(re.findall(r"(\w+)=(\S*)", p.stdout)) if p.returncode == 0 else {}


def diagnose(jid: str, log: str | None = None) -> str:
    text = sh("scontrol", "show", "job", jid, check=False).stdout + sh("squeue", check=False).stdout
    if log and os.path.isfile(log):
        text += f"\n--- {log} (tail)\n" + open(log, errors="replace").read()[-4000:]
    return text


def wait_until(pred, what: str, jid: str, log: str | None = None, timeout=JOB_TIMEOUT, poll=0.2):
    return conftest.wait_until(pred, what, timeout, poll, diagnose=lambda: diagnose(jid, log))


def wait_done(jid: str, log: str | None = None, want="COMPLETED", timeout=JOB_TIMEOUT) -> dict:
    ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")
    info = wait_until(lambda: (i := job_info(jid)) and i.get("JobState") in ended and i, f"job {jid} to end",
                      jid, log, timeout)
    assert info["JobState"] == want, f"job {jid} ended {info['JobState']}, expected {want}\n{diagnose(jid, log)}"
    return info


def stepd_alive(jid: str) -> bool:
    """A slurmstepd of this job still runs on this (the only) node."""
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if open(f"/proc/{d}/cmdline", "rb").read().startswith(f"slurmstepd: [{jid}.".encode()):
                    return True
            except OSError:
                pass
    return False


def release_requeued(jid: str, log: str | None = None) -> None:
    """A requeued job pends until its begin time (~2 min): start it now. Call only on a job that was running.

    Not before the last incarnation's slurmstepds are gone: released at once, Slurm 22.05 can refuse the new
    start ("Job credential revoked") or a late kill of the old step id can hit the new step."""
    def requeued():
        i = job_info(jid)
        return i.get("JobState") == "PENDING" or (int(i.get("Restarts", "0")) >= 1 and
                                                  i.get("JobState") in ("RUNNING", "COMPLETED"))
    wait_until(requeued, f"job {jid} to be requeued", jid, log)
    if job_info(jid).get("JobState") != "PENDING":
        return
    wait_until(lambda: not stepd_alive(jid), f"the old steps of job {jid} to end", jid, log)
    time.sleep(2)
    sh("scontrol", "update", f"JobId={jid}", "StartTime=now", check=False)


def torchrun_train(nproc: int, data, run) -> str:
    """The launchers' reference path: torchrun, ``nproc`` processes with one thread each, CFG1 on ``data``
    into ``run`` (a fresh run, or a resume of what is there). -> its stdout and stderr."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
                        "stackgan_dist", "train", CFG1, *overrides(data, run)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    return p.stdout + p.stderr

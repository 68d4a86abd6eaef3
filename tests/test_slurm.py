"""slurm/train.sbatch and slurm/pipeline.sh on a real one-node Slurm cluster (tests/cluster/start_slurm.sh).

Every run here is the same tiny Stage-I config, seed and world size (2), so every one of them must end with
the params_sha256 of one uninterrupted torchrun reference: plain sbatch, `scontrol requeue` mid-run and
`scancel --signal=USR1` mid-run (checkpoint -> requeue -> resume). Requeued jobs wait for a begin time
(about two minutes) unless released, so the tests release their own job. Other people's jobs may share the
node: every wait is on our own job id, bounded, with `scontrol show job` in the failure message.
A missing cluster is a failure, not a skip.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time

import pytest

import conftest
from conftest import PY, REPO, TINY, committed, inspect_run, tiny_overrides

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

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


def sbatch(data, run, log, ntasks=2, extra_sbatch=(), steps=STEPS) -> str:
    p = sh("sbatch", "--parsable", f"--chdir={REPO}", "--nodes=1", f"--ntasks-per-node={ntasks}", f"--output={log}",
           "--job-name=stackgan-test", "--cpus-per-task=1", *extra_sbatch, "slurm/train.sbatch", CFG1, *overrides(data, run, steps))
    return p.stdout.strip().split(";")[0]


@pytest.fixture(scope="module")
def slurm():
    """The local cluster must be up (bash tests/cluster/start_slurm.sh); a missing one fails the test."""
    missing = [t for t in ("sbatch", "scontrol", "squeue", "sinfo", "scancel") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"Slurm tools missing ({', '.join(missing)}): run `bash tests/cluster/start_slurm.sh` as root")
    p = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True, timeout=60)
    if p.returncode != 0 or not re.search(r"^(idle|mix|alloc)", p.stdout, re.M):
        pytest.fail(f"no usable Slurm node (sinfo: {p.stdout.strip() or p.stderr.strip()}): "
                    "run `bash tests/cluster/start_slurm.sh` as root")
    return True


def torchrun_train(nproc: int, data, run) -> str:
    """The launchers' reference path: torchrun, ``nproc`` processes with one thread each, CFG1 on ``data``
    into ``run`` (a fresh run, or a resume of what is there). -> its stdout and stderr."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
                        "stackgan_dist", "train", CFG1, *overrides(data, run)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    return p.stdout + p.stderr


@pytest.fixture(scope="module")
def reference(synth_data, tmp_path_factory):
    """The uninterrupted run: torchrun, 2 processes, the same config and seed (once per session: the
    submitit tests import this fixture and find the digest in the session's base temp dir)."""
    cache = tmp_path_factory.getbasetemp() / "launcher_reference.sha256"
    if cache.is_file():
        return cache.read_text()
    run = tmp_path_factory.mktemp("launcher_ref") / "run"
    torchrun_train(2, synth_data, run)
    d = inspect_run(run)
    assert d["step"] == STEPS and d["world_size"] == 2
    cache.write_text(d["params_sha256"])
    return d["params_sha256"]


def test_sbatch_two_tasks_trains_and_matches_torchrun(slurm, synth_data, reference, tmp_path):
    run, log = tmp_path / "run", str(tmp_path / "job.out")
    jid = sbatch(synth_data, run, log)
    info = wait_done(jid, log)
    text = open(log).read()
    assert "2 task(s)" in text and "training exited with 0" in text, text[-3000:]
    assert info["NumTasks"] == "2" and info["Restarts"] == "0"
    d = inspect_run(run)
    assert (d["step"], d["world_size"], d["valid"]) == (STEPS, 2, True)
    assert d["params_sha256"] == reference


def _interrupt_and_resume(data, tmp_path, interrupt, expect_lines) -> tuple[str, str]:
    run, log = tmp_path / "run", str(tmp_path / "job.out")
    jid = sbatch(data, run, log)
    wait_until(lambda: committed(run, 4) or job_info(jid).get("JobState") not in ("PENDING", "RUNNING"),
               "the first checkpoint", jid, log)
    assert job_info(jid).get("JobState") == "RUNNING", diagnose(jid, log)
    interrupt(jid)
    release_requeued(jid, log)
    info = wait_done(jid, log)
    text = open(log).read()
    for line in expect_lines:
        assert line in text, f"{line!r} not in the job log\n{text[-4000:]}"
    m = re.search(r"checkpoint written at step (\d+)", text)
    assert m and 4 <= int(m.group(1)) < STEPS, text[-3000:]
    assert f"resumed from {run}/checkpoints/step_{int(m.group(1)):08d}" in text, text[-3000:]
    assert int(info["Restarts"]) == 1, diagnose(jid, log)
    return inspect_run(run)["params_sha256"], text


def test_scontrol_requeue_checkpoints_and_resumes(slurm, synth_data, reference, tmp_path):
    got, _ = _interrupt_and_resume(synth_data, tmp_path, lambda jid: sh("scontrol", "requeue", jid),
                                   ["received SIGTERM", "exiting with 75", "restart 1:"])
    assert got == reference


def test_usr1_checkpoints_exits_75_and_requeues(slurm, synth_data, reference, tmp_path):
    # the warning signal (#SBATCH --signal=USR1@90) as scancel sends it to the tasks
    got, text = _interrupt_and_resume(synth_data, tmp_path, lambda jid: sh("scancel", "--signal=USR1", jid),
                                      ["received SIGUSR1", "training exited with 75", "requeueing job", "restart 1:"])
    assert got == reference


def test_pipeline_stage2_waits_for_stage1(slurm, synth_data, tmp_path):
    r1, r2 = tmp_path / "s1", tmp_path / "s2"
    common = [f"data.train={synth_data}/train", f"data.test={synth_data}/test", *TINY, *EVERY, "train.max_steps=4"]
    p = sh("bash", "slurm/pipeline.sh", CFG1, CFG2, *common, f"stage1.run.dir={r1}",
           f"stage2.run.dir={r2}", "stage2.train.max_steps=2",
           "--", "--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=1", f"--chdir={REPO}", f"--output={tmp_path}/%x-%j.out")
    m1 = re.search(r"^stage1 (\d+) run.dir=(\S+)$", p.stdout, re.M)
    m2 = re.search(r"^stage2 (\d+) \(afterok:(\d+)\)$", p.stdout, re.M)
    assert m1 and m2 and m2.group(2) == m1.group(1) and m1.group(2) == str(r1), p.stdout + p.stderr
    j1, j2 = m1.group(1), m2.group(1)
    dep = job_info(j2).get("Dependency", "")
    assert dep.startswith(f"afterok:{j1}") or job_info(j1).get("JobState") == "COMPLETED", dep
    i1 = wait_done(j1, f"{tmp_path}/stackgan-s1-{j1}.out")
    i2 = wait_done(j2, f"{tmp_path}/stackgan-s2-{j2}.out")
    assert i2["StartTime"] >= i1["EndTime"], (i1["EndTime"], i2["StartTime"])
    d1, d2 = inspect_run(r1), inspect_run(r2)
    assert (d1["stage"], d1["step"], d2["stage"], d2["step"]) == (1, 4, 2, 2)


def test_bad_partition_is_a_clear_error(slurm, synth_data, tmp_path):
    p = sh("sbatch", "--partition=no_such_partition", "slurm/train.sbatch", CFG1,
           *overrides(synth_data, tmp_path / "run"), check=False)
    assert p.returncode != 0
    assert p.stderr.splitlines()[0] == "sbatch: error: invalid partition specified: no_such_partition", p.stderr
    # the pipeline: one line, and nothing submitted
    before = sh("squeue", "-h", "-n", "stackgan-s1,stackgan-s2", "-o", "%i").stdout.split()
    common = [o for o in overrides(synth_data, tmp_path / "run") if not o.startswith("model.stage=")]  # per stage
    p = sh("bash", "slurm/pipeline.sh", CFG1, CFG2, *common, "--", "--partition=no_such_partition", check=False)
    assert p.returncode != 0 and p.stdout == "", p.stdout + p.stderr
    assert p.stderr.strip() == ("pipeline.sh: Stage-I refused by sbatch: invalid partition specified: "
                                "no_such_partition"), p.stderr
    after = sh("squeue", "-h", "-n", "stackgan-s1,stackgan-s2", "-o", "%i").stdout.split()
    assert not set(after) - set(before)

"""slurm/train.sbatch and slurm/pipeline.sh on a real one-node Slurm cluster (tests/cluster/start_slurm.sh).

Every run here is the same tiny Stage-I config, seed and world size (2), so every one of them must end with
the params_sha256 of one uninterrupted torchrun reference: plain sbatch, `scontrol requeue` mid-run and
`scancel --signal=USR1` mid-run (checkpoint -> requeue -> resume). Requeued jobs wait for a begin time
(about two minutes) unless released, so the tests release their own job. Other people's jobs may share the
node: every wait is on our own job id, bounded, with `scontrol show job` in the failure message.
A missing cluster is a failure, not a skip.
"""
from __future__ import annotations

import re

import pytest

from conftest import REPO, TINY, committed, inspect_run
from slurm_helpers import (CFG1, CFG2, EVERY, STEPS, diagnose, job_info, overrides, release_requeued, sh, wait_done,
                           wait_until)

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def sbatch(data, run, log, ntasks=2, extra_sbatch=(), steps=STEPS) -> str:
    p = sh("sbatch", "--parsable", f"--chdir={REPO}", "--nodes=1", f"--ntasks-per-node={ntasks}", f"--output={log}",
           "--job-name=stackgan-test", "--cpus-per-task=1", *extra_sbatch, "slurm/train.sbatch", CFG1, *overrides(data, run, steps))
    return p.stdout.strip().split(";")[0]


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

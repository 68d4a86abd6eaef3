"""slurm/pipeline.sh sets the job shape itself (--gpus-per-node G: G GPUs and G tasks per node) and dry-runs both
stages at that shape, data paths included, before it submits anything.

Refusals run without a cluster: an sbatch on PATH that fails loudly proves nothing was submitted. What was
submitted is read back from the local Slurm cluster (its node declares 8 GPUs, tests/cluster/start_slurm.sh),
with the jobs held and cancelled at once.
"""
from __future__ import annotations

import os
import re
import subprocess

import pytest

from conftest import REPO, TINY

CFG1, CFG2 = "configs/demo/stage1.yaml", "configs/demo/stage2.yaml"


def data_overrides(data, tmp_path):
    return [f"data.train={data}/train", f"data.test={data}/test", *TINY,
            f"stage1.run.dir={tmp_path / 's1'}", f"stage2.run.dir={tmp_path / 's2'}"]


def pipeline(tmp_path, *args, real_sbatch=False, env_extra=None):
    env = dict(os.environ, PYTHONPATH=REPO, **(env_extra or {}))
    if not real_sbatch:
        fake = tmp_path / "bin"
        fake.mkdir(exist_ok=True)
        (fake / "sbatch").write_text("#!/bin/sh\necho SBATCH-CALLED >&2\nexit 99\n")
        (fake / "sbatch").chmod(0o755)
        env["PATH"] = f"{fake}:{os.environ['PATH']}"
    return subprocess.run(["bash", "slurm/pipeline.sh", CFG1, CFG2, *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=300)


def refused(p, *words) -> str:
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert "SBATCH-CALLED" not in p.stderr and "Traceback" not in p.stderr and p.stdout == "", p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pipeline.sh: "), p.stderr
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


@pytest.mark.parametrize("args,words", [
    (["--gpus-per-node", "0"], ["--gpus-per-node must be a positive whole number, got '0'"]),
    (["--gpus-per-node", "eight"], ["--gpus-per-node must be a positive whole number, got 'eight'"]),
    (["--nodes"], ["--nodes needs a value"]),
    (["--gpus-per-node", "8", "--", "--ntasks-per-node=1"], ["sets sbatch's --ntasks-per-node itself"]),
    (["--nodes", "2", "--gpus-per-node", "8", "--", "-N", "2"], ["--nodes given twice"]),
    # the shape train.sbatch would refuse after the queue wait: refused before it
    (["--", "--nodes=2", "--gpus-per-node=8"], ["--gpus-per-node=8 with --ntasks-per-node=1", "--gpus-per-node 8"]),
    (["--tasks-per-node", "8"], ["unknown option --tasks-per-node", "sbatch options go after --"]),
])
def test_bad_shapes_are_refused_before_anything_runs(tmp_path, args, words):
    refused(pipeline(tmp_path, *args), *words)


def test_site_env_gpus_need_matching_tasks(tmp_path):
    """SBATCH_GPUS_PER_NODE in slurm/site.env is part of the shape: sbatch has no variable for tasks per node."""
    site = tmp_path / "site.env"
    site.write_text("export SBATCH_GPUS_PER_NODE=a100:4\n")
    p = pipeline(tmp_path, "--", "--ntasks-per-node=1", env_extra={"STACKGAN_SITE_ENV": str(site)})
    refused(p, "--gpus-per-node=a100:4 with --ntasks-per-node=1", "--gpus-per-node 4")


def test_stage2_data_is_checked_at_the_job_shape(synth_data, tmp_path):
    p = pipeline(tmp_path, *data_overrides(synth_data, tmp_path), f"stage2.data.train={tmp_path}/nothing",
                 "--", "--ntasks-per-node=2")
    refused(p, "Stage-II dry run at 1 node(s) x 2 task(s) refused:", "data.train", f"{tmp_path}/nothing")


def test_a_dataset_too_small_for_the_gpu_shape_is_refused(synth_data, tmp_path):
    """96 samples cannot feed 64 nodes x 8 GPUs: the CUDA dry run (run on this CPU host) says so, unsubmitted."""
    p = pipeline(tmp_path, *data_overrides(synth_data, tmp_path), "--nodes", "64", "--gpus-per-node", "8")
    line = refused(p, "Stage-I dry run at 64 node(s) x 8 task(s), cuda refused:")
    assert "unrecognized arguments" not in line and "CUDA" not in line, line  # the data, not the host


def submitted(p) -> tuple[str, str]:
    assert p.returncode == 0, (p.stdout, p.stderr)
    m1 = re.search(r"^stage1 (\d+) run.dir=", p.stdout, re.M)
    m2 = re.search(r"^stage2 (\d+) \(afterok:", p.stdout, re.M)
    assert m1 and m2, p.stdout
    return m1.group(1), m2.group(1)


def job(jid: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", jid], capture_output=True, text=True, timeout=60).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


@pytest.mark.cluster
@pytest.mark.slow
def test_gpus_per_node_sets_one_task_per_gpu(synth_data, tmp_path):
    """--gpus-per-node 2: both jobs ask Slurm for 2 GPUs and 2 tasks per node; the plan is printed."""
    p = pipeline(tmp_path, *data_overrides(synth_data, tmp_path), "--gpus-per-node", "2",
                 "--", "--hold", "--cpus-per-task=1", f"--output={tmp_path}/%x-%j.out", real_sbatch=True)
    ids = re.findall(r"^stage\d (\d+) ", p.stdout, re.M)
    try:
        j1, j2 = submitted(p)
        for jid in (j1, j2):
            info = job(jid)
            assert info["NumTasks"] == "2" and "gres:gpu:2" in info["TresPerNode"], info
        assert re.search(r"^stage1 plan \(1 node\(s\) x 2 task\(s\), cuda\): world_size=2 device=cuda", p.stdout,
                         re.M), p.stdout
        assert re.search(r"^stage2 plan \(1 node\(s\) x 2 task\(s\), cuda\): checked, all but the Stage-I checkpoint",
                         p.stdout, re.M), p.stdout
    finally:
        if ids:
            subprocess.run(["scancel", *ids], timeout=60)


@pytest.mark.cluster
@pytest.mark.slow
def test_cpu_shape_from_sbatch_options(synth_data, tmp_path):
    """No GPUs: the shape comes from sbatch's own options and the dry run keeps the config's device."""
    p = pipeline(tmp_path, *data_overrides(synth_data, tmp_path),
                 "--", "--nodes=1", "--ntasks-per-node=2", "--hold", "--cpus-per-task=1",
                 f"--output={tmp_path}/%x-%j.out", real_sbatch=True)
    ids = re.findall(r"^stage\d (\d+) ", p.stdout, re.M)
    try:
        j1, _ = submitted(p)
        assert job(j1)["NumTasks"] == "2"
        assert re.search(r"^stage1 plan \(1 node\(s\) x 2 task\(s\)\): world_size=2 device=cpu", p.stdout, re.M), \
            p.stdout
    finally:
        if ids:
            subprocess.run(["scancel", *ids], timeout=60)

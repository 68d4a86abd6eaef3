"""slurm/pipeline.sh checks both stages' configs before submitting anything (no cluster needed: it must fail
before its first sbatch), with one line each, and names the interpreter it lacks."""
import os
import subprocess

import pytest

from conftest import REPO

CFG1, CFG2 = "configs/demo/stage1.yaml", "configs/demo/stage2.yaml"


def pipeline(*args, env=None):
    e = dict(os.environ)
    e.update(env or {})
    # sbatch must never be reached: a PATH whose sbatch fails loudly proves it
    return subprocess.run(["bash", "slurm/pipeline.sh", *args], capture_output=True, text=True, cwd=REPO, env=e,
                          timeout=120)


@pytest.mark.parametrize("args,words", [
    (["train.max_stepz=3"], ["Stage-I config", "unknown config key 'train.max_stepz'", "train.max_steps"]),
    (["stage2.model.gf_dimm=3"], ["Stage-II config", "unknown config key 'model.gf_dimm'", "model.gf_dim"]),
])
def test_pipeline_checks_both_configs_before_submitting(tmp_path, args, words):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text("#!/bin/sh\necho SBATCH-CALLED >&2\nexit 99\n")
    (fake / "sbatch").chmod(0o755)
    p = pipeline(CFG1, CFG2, *args, env={"PATH": f"{fake}:{os.environ['PATH']}"})
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and "SBATCH-CALLED" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and all(w in lines[0] for w in words), p.stderr


def test_pipeline_without_the_venv_names_the_fix():
    p = pipeline(CFG1, CFG2, env={"STACKGAN_PYTHON": "/nonexistent/python"})
    assert p.returncode == 2 and p.stderr.strip() == (
        "pipeline.sh: python /nonexistent/python not found: create the venv (make venv) or set STACKGAN_PYTHON "
        "(slurm/site.env)")

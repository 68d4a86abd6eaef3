"""The cluster commands docs/clusters.md and README.md show are true: each `slurm/pipeline.sh` and `launch/ray_job.py` line
runs, as written, up to the point that needs the cluster (shared paths pointed at a small prepared dataset and
a temporary folder): a `stackgan train` line passes the `--dry-run` (its `train.device=cuda` planned on this
CPU host); the pipeline passes both dry runs at the shape it shows and only then calls sbatch (an
sbatch on PATH that fails loudly stands for the cluster); the Ray line passes its config and job-shape
checks and only then looks for the cluster (an address nothing listens on)."""
from __future__ import annotations

import os
import re
import shlex
import subprocess

import pytest

from conftest import PY, REPO, cli_main

DOCS = [os.path.join(REPO, "docs", "clusters.md"), os.path.join(REPO, "README.md")]


def commands(prefix: str) -> list[str]:
    text = "".join(open(d).read() for d in DOCS)
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        out += [ln.strip() for ln in joined.splitlines() if ln.strip().startswith(prefix)]
    return out


def localise(cmd: str, data, tmp_path) -> list[str]:
    cmd = cmd.replace("/shared/data/birds", str(data)).replace("/shared/runs", str(tmp_path / "runs"))
    return shlex.split(cmd.replace("HEAD_IP:8265", "127.0.0.1:9"))


PIPELINES = commands("slurm/pipeline.sh configs/")
RAY = commands(".venv/bin/python launch/ray_job.py")
TRAIN = [c for c in commands("stackgan train configs/") if "device=cuda" in c]


def test_the_docs_show_the_commands_checked_here():
    assert any("--nodes 2 --gpus-per-node 8" in c for c in PIPELINES), PIPELINES
    assert any("--num-workers 16 --gpus-per-worker 1" in c for c in RAY), RAY


@pytest.mark.parametrize("cmd", PIPELINES)
def test_pipeline_lines_pass_their_dry_runs(cmd, synth_data, tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text("#!/bin/sh\necho SBATCH-CALLED \"$@\" >&2\nexit 99\n")
    (fake / "sbatch").chmod(0o755)
    argv = localise(cmd, synth_data, tmp_path)
    p = subprocess.run(["bash", *argv], capture_output=True, text=True, cwd=REPO, timeout=300,
                       env=dict(os.environ, PYTHONPATH=REPO, PATH=f"{fake}:{os.environ['PATH']}"))
    assert p.returncode == 1 and "pipeline.sh: Stage-I refused by sbatch: SBATCH-CALLED" in p.stderr, p.stderr
    assert "--ntasks-per-node=8 --gpus-per-node=8" in p.stderr and "--nodes=2" in p.stderr, p.stderr


@pytest.mark.parametrize("cmd", RAY)
def test_ray_lines_pass_their_checks(cmd, synth_data, tmp_path):
    argv = localise(cmd, synth_data, tmp_path)
    assert argv[0] == ".venv/bin/python"
    p = subprocess.run([PY, *argv[1:]], capture_output=True, text=True, cwd=REPO, timeout=120,
                       env=dict(os.environ, PYTHONPATH=REPO))
    assert p.returncode == 2 and "cannot reach the Ray Jobs API at http://127.0.0.1:9" in p.stderr, p.stderr


@pytest.mark.parametrize("cmd", TRAIN)
def test_gpu_train_lines_pass_the_dry_run_here(cmd, synth_data, tmp_path):
    """The smoke test README shows plans on a host without a GPU and stops where it says."""
    argv = localise(cmd, synth_data, tmp_path)[1:] + ["--dry-run"]
    p = cli_main(*argv)
    assert p.returncode == 0, p.stderr
    assert '"max_steps": 200' in p.stdout or "stops at step 200" in p.stdout, p.stdout[-2000:]

"""Helpers of the Ray tests (test_ray.py, test_ray_multinode.py): one tiny Stage-I config, seed and world size
(2), so a Ray job must end with the digest of the torchrun reference (the `torchrun_digest` fixture in
conftest.py)."""
from __future__ import annotations

import os
import subprocess

from conftest import PY, REPO, tiny_overrides

ADDRESS = os.environ.get("STACKGAN_TEST_RAY_ADDRESS", "http://127.0.0.1:8265")
CONFIG = "configs/demo/stage1.yaml"
STEPS, EVERY = 8, 4


def overrides(data, run):
    return tiny_overrides(data, run, 1, steps=STEPS, extra=[f"checkpoint.every_steps={EVERY}"])


def ray_job(*args, timeout=420):
    e = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([PY, os.path.join(REPO, "launch", "ray_job.py"), "--address", ADDRESS, *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO, env=e)


def show(p) -> str:
    return f"exit {p.returncode}\nSTDOUT:\n{p.stdout[-5000:]}\nSTDERR:\n{p.stderr[-3000:]}"

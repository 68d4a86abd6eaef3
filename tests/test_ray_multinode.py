"""launch/ray_job.py on a two-node Ray cluster on this machine (tests/cluster/start_ray2.sh: a head on
127.0.0.2 and a second Ray node on 127.0.0.3). With STRICT_SPREAD placement each Ray Train worker runs on
its own node; the run ends bit-identical to torchrun with the same config, seed and world size.
A missing cluster fails the test.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import urllib.request

import pytest

from conftest import PY, REPO, digest
from test_ray import CONFIG, overrides, show, torchrun_digest  # noqa: F401 -- torchrun_digest: a fixture

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

ADDRESS = "http://127.0.0.2:8266"


def alive_nodes() -> list[str]:
    d = json.load(urllib.request.urlopen(f"{ADDRESS}/nodes?view=summary", timeout=10))
    return sorted(n["ip"] for n in d["data"]["summary"] if n["raylet"]["state"] == "ALIVE")


@pytest.fixture(scope="module")
def two_node_ray():
    try:
        nodes = alive_nodes()
    except OSError as e:
        pytest.fail(f"no two-node Ray cluster at {ADDRESS} ({e}): run `bash tests/cluster/start_ray2.sh`")
    if nodes != ["127.0.0.2", "127.0.0.3"]:
        pytest.fail(f"the two-node Ray cluster has nodes {nodes}: run `bash tests/cluster/start_ray2.sh`")
    return ADDRESS


def ray_job2(*args, timeout=480):
    e = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([PY, os.path.join(REPO, "launch", "ray_job.py"), "--address", ADDRESS, *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO, env=e)


def test_strict_spread_over_two_ray_nodes_equals_torchrun(two_node_ray, synth_data, tmp_path, torchrun_digest):
    run = tmp_path / "run"
    p = ray_job2("--num-workers", 2, "--placement-strategy", "STRICT_SPREAD", "--max-failures", 0, CONFIG,
                 *overrides(synth_data, run))
    assert p.returncode == 0, show(p)
    placed = dict(re.findall(r"stackgan ray: rank (\d) on node \w+ \((127\.0\.0\.\d)\)", p.stdout))
    assert placed == {"0": placed["0"], "1": placed["1"]} and set(placed.values()) == {"127.0.0.2", "127.0.0.3"}, \
        show(p)
    assert digest(run) == torchrun_digest

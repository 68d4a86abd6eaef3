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
from ray_helpers import CONFIG, EVERY, STEPS, overrides, show

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
    placed = dict(re.findall(r"stackgan ray: rank (\d) on node \w+ \((127\.0\.0\.\d)\), code ", p.stdout))
    assert placed == {"0": placed["0"], "1": placed["1"]} and set(placed.values()) == {"127.0.0.2", "127.0.0.3"}, \
        show(p)
    assert digest(run) == torchrun_digest


def _node2_pids() -> list[int]:
    """Every process of the second Ray node: its raylet and log monitor, and all they started (agents, the
    Ray Train workers, whose titles no longer name the node)."""
    out = subprocess.run(["ps", "-eww", "-o", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    procs = [ln.split(None, 2) for ln in out.splitlines() if len(ln.split(None, 2)) == 3]
    found = {int(p) for p, _, args in procs if re.search(r"node.ip.address=127\.0\.0\.3\b", args)}
    grew = True
    while grew:
        kids = {int(p) for p, pp, _ in procs if int(pp) in found} - found
        found |= kids
        grew = bool(kids)
    return sorted(found)


def test_second_ray_node_lost_mid_run_restarts_and_ends_equal(two_node_ray, synth_data, tmp_path, torchrun_digest):
    """The second node dies (every process of it SIGKILLed) after the step-4 checkpoint: Ray Train's
    FailureConfig restarts the group, which waits for a second node (STRICT_SPREAD), the node comes back,
    and the run resumes from run.dir and ends equal to the uninterrupted torchrun run."""
    import signal

    from conftest import Rendezvous, committed

    run = tmp_path / "run"
    # both workers pause after step 7 (the step-4 checkpoint is committed by then): the node dies mid-run
    rv = Rendezvous(tmp_path / "rv", STEPS - 1, ranks=(0, 1))
    env = [x for k, v in rv.env.items() for x in ("--env", f"{k}={v}")]
    job = subprocess.Popen([PY, os.path.join(REPO, "launch", "ray_job.py"), "--address", ADDRESS,
                            "--num-workers", "2", "--placement-strategy", "STRICT_SPREAD", "--max-failures", "2",
                            *env, CONFIG, *overrides(synth_data, run)],
                           cwd=REPO, stdout=open(tmp_path / "job.log", "w"), stderr=subprocess.STDOUT)
    try:
        rv.wait(job)
        assert committed(run, EVERY) and not committed(run, STEPS)
        victims = _node2_pids()
        assert victims, "no process of the second node found"
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        rv.go()  # the surviving worker goes on and fails in its next collective
        # the node comes back (as a replaced machine would); the restarted group waits for it
        subprocess.run(["bash", os.path.join(REPO, "tests", "cluster", "start_ray2.sh"), "--node2-only"],
                       check=True, timeout=180)
        rc = job.wait(timeout=600)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
        subprocess.run(["bash", os.path.join(REPO, "tests", "cluster", "start_ray2.sh")], timeout=180)
    log = (tmp_path / "job.log").read_text()
    assert rc == 0, log[-6000:]
    assert f"resumed from {run / 'checkpoints'}" in log, log[-4000:]
    assert digest(run) == torchrun_digest

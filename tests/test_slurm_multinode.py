"""slurm/train.sbatch across two Slurm nodes on this machine (tests/cluster/start_slurm2.sh: nodes n1 and n2,
two slurmd daemons, SLURM_CONF=/etc/slurm-two/slurm.conf).

The node names do not resolve here, as on many real clusters: the job must take its rendezvous address from
Slurm's NodeAddr, not from `scontrol show hostnames`. One task on each node ends bit-identical to the
torchrun reference of test_slurm (2 processes, same config and seed). A missing cluster fails the test.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess

import pytest

from conftest import REPO, inspect_run
from test_slurm import CFG1, STEPS, overrides, reference, sh, wait_done  # noqa: F401 -- reference: a fixture

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

TWO_NODE_CONF = "/etc/slurm-two/slurm.conf"


@pytest.fixture
def two_nodes(monkeypatch):
    if not os.path.isfile(TWO_NODE_CONF):
        pytest.fail(f"{TWO_NODE_CONF} missing: run `bash tests/cluster/start_slurm2.sh` as root")
    monkeypatch.setenv("SLURM_CONF", TWO_NODE_CONF)  # every sbatch/scontrol of this test talks to that cluster
    import time

    t0 = time.monotonic()
    while True:  # nodes still completing an earlier test's job come back within seconds
        p = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=60)
        up = re.findall(r"^(n[12]) (idle|mix|alloc)", p.stdout, re.M)
        if (p.returncode == 0 and len(up) >= 2) or time.monotonic() - t0 > 90:
            break
        time.sleep(1)
    if p.returncode != 0 or len(up) < 2:
        pytest.fail(f"two-node Slurm cluster not ready (sinfo: {p.stdout.strip() or p.stderr.strip()}): "
                    "run `bash tests/cluster/start_slurm2.sh` as root")
    return True


def test_node_names_do_not_resolve(two_nodes):
    """The trap this cluster reproduces: a rendezvous address taken from the node name would fail."""
    with pytest.raises(OSError):
        socket.getaddrinfo("n1", 29500)


def test_sbatch_two_nodes_matches_torchrun(two_nodes, synth_data, reference, tmp_path):
    run, log = tmp_path / "run", str(tmp_path / "job.out")
    p = sh("sbatch", "--parsable", f"--chdir={REPO}", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1",
           f"--output={log}",
           "--job-name=stackgan-2node", "slurm/train.sbatch", CFG1, *overrides(synth_data, run, STEPS))
    jid = p.stdout.strip().split(";")[0]
    info = wait_done(jid, log)
    assert info["NodeList"] == "n[1-2]" and info["NumNodes"] == "2", info
    text = open(log).read()
    assert "2 task(s) on n[1-2], master 127.0.0.1:" in text, text[-2000:]
    d = inspect_run(run)
    assert d["step"] == STEPS and d["world_size"] == 2
    assert d["params_sha256"] == reference


"""slurm/train.sbatch across two Slurm nodes on this machine (tests/cluster/start_slurm2.sh: nodes n1 and n2,
two slurmd daemons, SLURM_CONF=/etc/slurm-two/slurm.conf).

The node names do not resolve here, as on many real clusters: the job must take its rendezvous address from
Slurm's NodeAddr, not from `scontrol show hostnames`. One task on each node ends bit-identical to the
torchrun reference of test_slurm (2 processes, same config and seed). A missing cluster fails the test.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess

import pytest

from conftest import REPO, committed, inspect_run
from slurm_helpers import (CFG1, STEPS, job_info, overrides, release_requeued, sh, stepd_alive, torchrun_train,
                           wait_done, wait_until)

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



def test_requeue_moves_the_job_from_two_nodes_to_one(two_nodes, synth_data, tmp_path):
    """A requeue that lands on fewer nodes: the job (two nodes, one task each) is requeued and held mid-run
    (`scontrol requeuehold`: SIGTERM, checkpoint, exit 75), shrunk while it pends to one node, one task, one CPU
    (`scontrol update`), released, and starts again on one node. The run resumes its two-rank checkpoint at
    world size 1 (train.grad_accum 1 -> 2 keeps the global batch) and ends equal to torchrun resuming a copy of
    that same checkpoint with one process.

    Why shrink by hand: this Slurm 22.05 starts a `--nodes=1-2` job on one node even with two idle (also with
    --spread-job or --exclusive), so a range cannot first place the job on two; a pending job's node range is
    updatable, and the update is what a requeue onto fewer nodes amounts to for the job script."""
    run, log = tmp_path / "run", str(tmp_path / "job.out")
    p = sh("sbatch", "--parsable", f"--chdir={REPO}", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1",
           f"--output={log}", "--job-name=stackgan-2to1", "slurm/train.sbatch", CFG1,
           *overrides(synth_data, run, STEPS))
    jid = p.stdout.strip().split(";")[0]
    try:
        wait_until(lambda: committed(run, 4) or job_info(jid).get("JobState") not in ("PENDING", "RUNNING"),
                   "the first checkpoint", jid, log)
        assert job_info(jid).get("JobState") == "RUNNING" and job_info(jid).get("NumNodes") == "2", job_info(jid)
        sh("scontrol", "requeuehold", jid)  # SIGTERM to the tasks: checkpoint, exit 75; the job pends, held
        wait_until(lambda: job_info(jid).get("JobState") == "PENDING" and not stepd_alive(jid),
                   f"job {jid} to be requeued and its steps to end", jid, log)
        text = open(log).read()
        m = re.search(r"checkpoint written at step (\d+)", text)
        assert m and 4 <= int(m.group(1)) < STEPS, text[-3000:]
        k = int(m.group(1))
        ref = tmp_path / "ref"
        shutil.copytree(run, ref)  # the two-rank checkpoint, before the job touches it again
        # min_nodes, tasks and CPUs all: Slurm keeps the job's CPU count, which two one-CPU nodes cannot give
        sh("scontrol", "update", f"JobId={jid}", "NumNodes=1", "NumTasks=1", "NumCPUs=1")
        sh("scontrol", "release", jid)
        release_requeued(jid, log)
        info = wait_done(jid, log)
    finally:
        subprocess.run(["scancel", jid], capture_output=True, timeout=60)  # a no-op once it has ended
    assert info["NumNodes"] == "1" and int(info["Restarts"]) == 1, info
    text = open(log).read()
    assert re.search(r"restart 1: 1 task\(s\) on n[12],", text), text[-3000:]
    assert f"resumed from {run}/checkpoints/step_{k:08d}" in text, text[-3000:]
    assert "train.grad_accum 1 -> 2 keeps the global batch" in text, text[-3000:]
    d = inspect_run(run)
    assert (d["step"], d["world_size"]) == (STEPS, 1), d
    # the same resume under torchrun, one process, from the copy of the checkpoint the job resumed
    assert f"step_{k:08d}" in torchrun_train(1, synth_data, ref)
    assert inspect_run(ref)["params_sha256"] == d["params_sha256"]

"""Many nodes on one machine: two torchrun agents (one per "node") with a c10d rendezvous on 127.0.0.1.

The run with two agents of one process each must end bit-identical to one agent of two processes: the
same global ranks see the same data and noise, whichever agent (node) a rank lands on.
"""
import os
import socket
import uuid

import pytest

from conftest import CFG1, PY, check, digest, finish, start, tiny_overrides, torchrun


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agent(node_rank: int, nnodes: str, nproc: int, port: int, rdzv_id: str, args, log):
    cmd = [PY, "-m", "torch.distributed.run", "--nnodes", nnodes, "--node-rank", str(node_rank),
           "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
           "--rdzv-id", rdzv_id, "--max-restarts", "0", "-m", "stackgan_dist", *map(str, args)]
    return start(cmd, env={"OMP_NUM_THREADS": "1"}, log_path=log)


@pytest.mark.slow
def test_two_torchrun_agents_equal_one_agent_two_processes(synth_data, tmp_path):
    steps = 4
    ref = tmp_path / "ref"
    check(torchrun(2, "train", CFG1, *tiny_overrides(synth_data, ref, 1, steps)))
    run = tmp_path / "two_nodes"
    port, rid = _free_port(), uuid.uuid4().hex[:8]
    args = ["train", CFG1, *tiny_overrides(synth_data, run, 1, steps)]
    agents = [_agent(r, "2", 1, port, rid, args, tmp_path / f"agent{r}.log") for r in (0, 1)]
    for r, a in enumerate(agents):
        finish(a, tmp_path / f"agent{r}.log", timeout=600)
    assert digest(run) == digest(ref)

"""Many nodes on one machine: two torchrun agents (one per "node") with a c10d rendezvous on 127.0.0.1.

The run with two agents of one process each must end bit-identical to one agent of two processes: the
same global ranks see the same data and noise, whichever agent (node) a rank lands on. A node lost mid-run
(its agent and worker SIGKILLed) and started again lets the run continue from its last checkpoint and end
equal.
"""
import os
import signal
import uuid

import pytest

from conftest import (CFG1, PY, Rendezvous, check, committed, digest, finish, free_port, start, tiny_overrides,
                      torchrun)

def _agent(node_rank: int, nnodes: str, nproc: int, port: int, rdzv_id: str, args, log, max_restarts=0, env=None):
    cmd = [PY, "-m", "torch.distributed.run", "--nnodes", nnodes, "--node-rank", str(node_rank),
           "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
           "--rdzv-id", rdzv_id, "--max-restarts", str(max_restarts), "--monitor-interval", "0.5",
           # both agents run on this machine, so both would match the endpoint's host: say which one hosts the
           # rendezvous store (on a real cluster only the endpoint's node matches)
           "--local-addr", "127.0.0.1", "--rdzv-conf", f"is_host={int(node_rank == 0)}",
           "-m", "stackgan_dist", *map(str, args)]
    return start(cmd, env={"OMP_NUM_THREADS": "1", **(env or {})}, log_path=log)


@pytest.mark.slow
def test_two_torchrun_agents_equal_one_agent_two_processes(synth_data, tmp_path):
    steps = 4
    ref = tmp_path / "ref"
    check(torchrun(2, "train", CFG1, *tiny_overrides(synth_data, ref, 1, steps)))
    run = tmp_path / "two_nodes"
    port, rid = free_port(), uuid.uuid4().hex[:8]
    args = ["train", CFG1, *tiny_overrides(synth_data, run, 1, steps)]
    agents = [_agent(r, "2", 1, port, rid, args, tmp_path / f"agent{r}.log") for r in (0, 1)]
    for r, a in enumerate(agents):
        finish(a, tmp_path / f"agent{r}.log", timeout=600)
    assert digest(run) == digest(ref)


@pytest.mark.slow
def test_node_lost_mid_run_and_relaunched_continues_and_ends_equal(synth_data, tmp_path):
    """Node 1 (its torchrun agent and worker) is SIGKILLed mid-run, after the step-4 checkpoint. Node 0's
    worker fails in its next collective; its agent (--max-restarts) restarts it into a new rendezvous
    round, which waits for a second node. Node 1 is started again with the same command, as a replaced
    machine would be: the group re-forms, resumes from the step-4 checkpoint and ends equal to an
    uninterrupted run."""
    steps, every = 8, 4
    extra = [f"checkpoint.every_steps={every}"]
    ref = tmp_path / "ref"
    check(torchrun(2, "train", CFG1, *tiny_overrides(synth_data, ref, 1, steps, extra)))
    run = tmp_path / "run"
    port, rid = free_port(), uuid.uuid4().hex[:8]
    args = ["train", CFG1, *tiny_overrides(synth_data, run, 1, steps, extra)]
    rv = Rendezvous(tmp_path / "rv", steps - 1, ranks=(0, 1))  # the step-4 save is committed by step 7
    # A node that joins a later rendezvous round needs the agents not to share the rendezvous TCPStore with
    # the workers: torch 2.13's shared store keeps round 0's master address, so the new node waits for a
    # MASTER_ADDR key nobody writes (both agents time out after 60 s). With sharing off, each round publishes
    # its own master address and port (README "Many nodes").
    env = {**rv.env, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "LOGLEVEL": "INFO"}
    # --max-restarts 3: one restart is the node loss; the others absorb the port race that sharing off brings
    # (README "Many nodes": the master port is picked by the agent and bound by the worker seconds later)
    agents = [_agent(r, "2", 1, port, rid, args, tmp_path / f"agent{r}.log", 3, env) for r in (0, 1)]
    try:
        rv.wait(agents[0])
        assert committed(run, every) and not committed(run, steps)
        # the whole node: its agent and its worker (torchrun starts workers in sessions of their own)
        os.killpg(agents[1].pid, signal.SIGKILL)
        os.kill(rv.pid(1), signal.SIGKILL)
        agents[1].wait()
        rv.go()  # node 0's worker goes on into a collective without its peer and fails
        agents[1] = _agent(1, "2", 1, port, rid, args, tmp_path / "agent1b.log", 3, env)
        texts = [finish(a, tmp_path / f"agent{r}{'b' if r else ''}.log", timeout=600) for r, a in enumerate(agents)]
    finally:
        for a in agents:
            if a.poll() is None:
                os.killpg(a.pid, signal.SIGKILL)
                a.wait()
    assert any("step_00000004 at step 4" in t for t in texts), texts[0][-3000:]
    assert digest(run) == digest(ref)

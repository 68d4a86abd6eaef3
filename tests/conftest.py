import json
import os
import signal
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
CFG1 = os.path.join(REPO, "configs", "demo", "stage1.yaml")
CFG2 = os.path.join(REPO, "configs", "demo", "stage2.yaml")
KEYS = ("G_params", "D_params", "G_buffers", "D_buffers")  # the per-rank digests the trainer's test hook writes


def run_cli(*args, timeout=600, env=None, check=False, cwd=REPO):
    """Runs `python -m stackgan_dist ARGS` in a real process; returns CompletedProcess."""
    e = dict(os.environ)
    e.setdefault("OMP_NUM_THREADS", "1")
    e.update(env or {})
    p = subprocess.run([PY, "-m", "stackgan_dist", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env=e, cwd=cwd)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nSTDOUT:\n{p.stdout[-3000:]}\nSTDERR:\n{p.stderr[-3000:]}")
    return p


def torchrun(nproc, *args, env=None, timeout=600):
    """``torchrun --standalone --nproc_per_node N -m stackgan_dist ARGS`` as a real process tree."""
    e = dict(os.environ, OMP_NUM_THREADS="1")
    e.update(env or {})
    return subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                           "-m", "stackgan_dist", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=e, cwd=REPO)


def check(p):
    """Asserts a CompletedProcess exited 0, showing the tails of its output where it did not."""
    assert p.returncode == 0, f"exit {p.returncode}\nSTDOUT:\n{p.stdout[-3000:]}\nSTDERR:\n{p.stderr[-6000:]}"
    return p


def digests(d, rank):
    """The per-step digests rank ``rank`` wrote under STACKGAN_TEST_DIGEST_DIR ``d``."""
    with open(os.path.join(d, f"rank{rank}.jsonl")) as f:
        return [json.loads(line) for line in f]


def inspect_run(run) -> dict:
    """``stackgan inspect RUN`` as a dict (step, stage, valid, params_sha256, ...)."""
    return json.loads(run_cli("inspect", run, check=True).stdout)


def digest(run) -> str:
    """One digest of every parameter and buffer of G and D: two runs are the same exactly when these match."""
    return inspect_run(run)["params_sha256"]


def committed(run, step) -> bool:
    """Whether checkpoint ``step`` of ``run`` is committed (its manifest is written last)."""
    return os.path.isfile(os.path.join(run, "checkpoints", f"step_{step:08d}", "manifest.json"))


def start(cmd, env=None, log_path=None) -> subprocess.Popen:
    """A real process in its own session (so a test can signal its whole tree), output to ``log_path``."""
    e = dict(os.environ, OMP_NUM_THREADS="1")
    e.update(env or {})
    out = open(log_path, "w") if log_path else subprocess.DEVNULL
    return subprocess.Popen(cmd, cwd=REPO, env=e, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def finish(p: subprocess.Popen, log_path=None, timeout=420, expect=0) -> str:
    """Waits for ``p`` (killing its tree after ``timeout``), asserts its exit code, returns its log."""
    try:
        rc = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        rc = "timeout"
    text = open(log_path).read() if log_path else ""
    assert rc == expect, f"exit {rc}, expected {expect}\n{text[-4000:]}"
    return text


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    """A small synthetic dataset (train 96 / test 24 samples, 3 train shards)."""
    out = tmp_path_factory.mktemp("synth")
    from stackgan_dist.data.synthetic import prepare_synthetic

    prepare_synthetic(str(out), n_train=96, n_test=24, seed=0, text_dim=64, samples_per_shard=32)
    return out


TINY = ["model.gf_dim=16", "model.df_dim=8", "model.condition_dim=16", "model.z_dim=16", "model.text_dim=64",
        "model.res_blocks=1", "train.batch_size=4", "data.num_workers=0", "log.progress=false",
        "log.every_steps=2", "log.sample_every=1000", "checkpoint.every_steps=1000"]


def tiny_overrides(data, run_dir, stage=1, steps=4, extra=()):
    o = [f"run.dir={run_dir}", f"data.train={data}/train", f"data.test={data}/test", f"model.stage={stage}",
         f"train.max_steps={steps}", *TINY]
    return o + list(extra)

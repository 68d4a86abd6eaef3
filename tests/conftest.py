import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

# property tests draw the same examples on every run (a suite that passes only on a retry is red); the
# examples are still many and varied, and a failure names the one to reproduce
try:
    from hypothesis import settings as _hyp_settings

    _hyp_settings.register_profile("stackgan", derandomize=True, database=None, print_blob=True)
    _hyp_settings.load_profile("stackgan")
except ImportError:  # the dev extra is not installed: no property tests to configure
    pass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PY = sys.executable
CFG1 = os.path.join(REPO, "configs", "demo", "stage1.yaml")
CFG2 = os.path.join(REPO, "configs", "demo", "stage2.yaml")
KEYS = ("G_params", "D_params", "G_buffers", "D_buffers")  # the per-rank digests the trainer's test hook writes


# -- scheduling under pytest-xdist (`-n 2 --dist loadgroup`, the Makefile's test targets) -------------------
# Each module runs whole on one worker, so its module-scoped fixtures (a DeepSpeed or DDP training, a Ray
# job) are built once. The launcher modules that share a cluster and a reference run form one group and run
# one test at a time, as before; the two-node clusters are clusters of their own (start_slurm2.sh,
# start_ray2.sh), so their modules may overlap the one-node ones. Most tests wait on process start-up,
# Slurm or Ray rather than on the CPU, so two workers overlap those waits on two cores.
GROUPS = {"test_slurm": "slurm", "test_submitit": "slurm", "test_ray": "ray"}
# the groups expected to take longest start first, so neither worker is left a long tail (re-order them
# from the --durations=30 table that make test prints)
FIRST = ("slurm", "ray", "test_slurm_multinode", "test_ray_multinode", "test_resume", "test_deepspeed",
         "test_signals", "test_checkpoint", "test_distributed", "test_multinode", "test_comm_options",
         "test_security", "test_prepare", "test_eval_metrics", "test_index")


def _group(nodeid: str) -> str:
    mod = nodeid.split("::", 1)[0].rpartition("/")[2].removesuffix(".py")
    return GROUPS.get(mod, mod)


def pytest_collection_modifyitems(config, items):
    rank = {g: i for i, g in enumerate(FIRST)}
    items.sort(key=lambda it: rank.get(_group(it.nodeid), len(FIRST)))  # stable: a module keeps its order


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: no error where xdist is not installed
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadgroup`` with the groups above. Not xdist's own loadgroup: it marks a group by appending
    "@group" to each test id, which pytest 9.2's structured ids ignore, so every test was scheduled alone
    (pytest-dev/pytest-xdist#1386)."""
    if config.getoption("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group(nodeid)

    config.option.loadscopereorder = False  # keep FIRST's order, not "most tests first"
    return ModuleGroups(config, log)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a rendezvous or master port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_script(name: str) -> str:
    """The path of tests/workers/NAME.py: a script a test starts in real processes (under torchrun or alone);
    workers live apart from test modules so that no test module is run as a script or imported."""
    return os.path.join(REPO, "tests", "workers", f"{name}.py")


def worker_pythonpath() -> str:
    """PYTHONPATH for a worker script: this checkout first, so the code under test is what the worker imports
    (a script's own folder, not the repository root, starts its sys.path)."""
    return os.pathsep.join(x for x in (REPO, os.environ.get("PYTHONPATH", "")) if x)


def one_line_error(p, *words, rc=2) -> str:
    """A command refused bad input: exit ``rc`` (2 unless told: the user must act; None: any non-zero), no
    traceback, exactly one non-empty line on stderr, naming every one of ``words``. Returns that line."""
    assert p.returncode != 0 if rc is None else p.returncode == rc, \
        f"exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    assert "Traceback" not in p.stderr, p.stderr
    lines = [x for x in p.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1, p.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def loader_view(img, crop: int = 64):
    """A PIL image as the test loader shows it: resized to 76/64 of the crop, centre crop (uint8 HWC array)."""
    import numpy as np
    from PIL import Image

    load = crop * 76 // 64
    a = np.asarray(img.resize((load, load), Image.BICUBIC))
    o = (load - crop) // 2
    return a[o:o + crop, o:o + crop]


def snapshot(d) -> dict:
    """Every file under ``d`` with its size and mtime: equal snapshots mean nothing on disk changed."""
    out = {}
    for root, _dirs, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            out[p] = (os.path.getsize(p), os.path.getmtime(p))
    return out


def run_cli(*args, timeout=600, env=None, check=False, cwd=REPO):
    """Runs `python -m stackgan_dist ARGS` in a real process; returns CompletedProcess. The process is forked
    from this worker's fork server (tests/zygote.py: the imports paid once) where its environment allows,
    else a fresh interpreter."""
    from zygote import zygote

    e = dict(os.environ)
    e.setdefault("OMP_NUM_THREADS", "1")
    e.update(env or {})
    z = zygote(PY, REPO)
    if z is not None and z.accepts(e, cwd):
        p = z.run([str(a) for a in args], e, str(cwd), timeout)
    else:
        p = subprocess.run([PY, "-m", "stackgan_dist", *map(str, args)], capture_output=True, text=True,
                           timeout=timeout, env=e, cwd=cwd)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nSTDOUT:\n{p.stdout[-3000:]}\nSTDERR:\n{p.stderr[-3000:]}")
    return p


def cli_main(*args, env=None, check=False, cwd=REPO):
    """``stackgan ARGS`` in this process (``stackgan_dist.cli.main``), for tests of what a command decides
    (config rules, argument checks, dry runs) rather than of how a process behaves: no torch import per call.
    -> CompletedProcess(returncode, stdout, stderr). Logging goes to the captured stderr as in a real process;
    environment, cwd, signal handlers, the package's logger, the RNGs and torch's global flags are restored
    afterwards (a refusal that regressed into a training must not change the tests after it). Signals, exit
    codes of real processes, launchers and trainings stay in ``run_cli``."""
    import contextlib
    import io
    import logging
    import random

    import numpy as np
    import torch

    from stackgan_dist.cli import main

    rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    flags = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_num_threads())

    out, err = io.StringIO(), io.StringIO()
    sigs = [getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1", "SIGUSR2")]
    handlers = {s: signal.getsignal(s) for s in sigs}
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    root, pkg = logging.getLogger(), logging.getLogger("stackgan_dist")
    saved_log = (root.handlers[:], root.level, pkg.handlers[:], pkg.level, pkg.propagate)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.update(env or {})
    os.chdir(cwd)
    # main()'s logging.basicConfig is a no-op under pytest (its capture handler is on the root logger): give
    # the root logger what basicConfig gives a real process, so stray warnings break the one-line rule here too
    h = logging.StreamHandler(err)
    h.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    root.handlers, root.level = [h], logging.WARNING
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main([str(a) for a in args])
            except SystemExit as e:  # argparse's usage errors and --help/--version
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        for s, hd in handlers.items():
            signal.signal(s, hd)
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
        root.handlers, root.level, pkg.handlers, pkg.level, pkg.propagate = saved_log
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])
        torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
        (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) = \
            flags[2:5]
        torch.set_num_threads(flags[5])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    p = subprocess.CompletedProcess(["stackgan", *map(str, args)], rc, out.getvalue(), err.getvalue())
    if check and rc != 0:
        raise AssertionError(f"exit {rc}\nSTDOUT:\n{p.stdout[-3000:]}\nSTDERR:\n{p.stderr[-3000:]}")
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
    """``stackgan inspect RUN`` as a dict (step, stage, valid, params_sha256, ...), run in this process (a read:
    no process behaviour to check, and a torch import saved per call; test_cli checks the command itself)."""
    return json.loads(cli_main("inspect", run, check=True).stdout)


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


def wait_until(pred, what: str = "condition", timeout=300, poll=0.02, alive=None, diagnose=None):
    """Polls ``pred`` until it returns a truthy value (returned). ``alive()`` false -> fail at once (the
    process we wait on died); ``diagnose()`` adds context to a timeout. A poll loop on an observable
    state, never a sleep standing in for an event."""
    t0 = time.monotonic()
    while True:
        v = pred()
        if v:
            return v
        if alive is not None and not alive():
            raise AssertionError(f"the process exited before {what}")
        if time.monotonic() - t0 > timeout:
            extra = f"\n{diagnose()}" if diagnose is not None else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{extra}")
        time.sleep(poll)


def wait_for(pred, p: subprocess.Popen, timeout=300, what="condition", poll=0.02):
    """``wait_until`` while process ``p`` is alive."""
    return wait_until(pred, what, timeout, poll, alive=lambda: p.poll() is None)


def kill_tree(p: subprocess.Popen, sig=signal.SIGKILL, timeout=120) -> int:
    """Waits up to ``timeout`` for ``p`` to exit by itself, then kills its whole session; reaps it."""
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    finally:
        if p.poll() is None:
            os.killpg(p.pid, sig)
            p.wait()
    return p.returncode


def finish_all(procs, limit) -> tuple[list, float]:
    """Waits for all ``procs`` (stdout/stderr pipes) within ``limit`` seconds in total; kills them all and fails
    if one hangs. -> ([(returncode, stderr)], seconds)."""
    t0 = time.monotonic()
    res = []
    for p in procs:
        try:
            _out, err = p.communicate(timeout=max(1.0, limit - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
                q.wait()
            raise AssertionError("a worker hung past the limit instead of failing")
        res.append((p.returncode, err))
    return res, time.monotonic() - t0


def children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return out


def worker_pid(launcher_pid: int, rank: int, timeout=120) -> int:
    """The pid of the torchrun worker with RANK=rank (a child of the launcher)."""
    def find():
        for c in children(launcher_pid):
            try:
                env = open(f"/proc/{c}/environ", "rb").read().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env and b"LOCAL_RANK=" + str(rank).encode() in env:
                return c
        return None

    return wait_until(find, f"the worker with RANK={rank} under {launcher_pid}", timeout, poll=0.1)


class Rendezvous:
    """The trainer's test rendezvous (stackgan_dist/testing.py): the run pauses after step ``step`` (or, with
    ``at="save"``, inside the step-``step`` save once its files are written, before its commit) on every rank
    until ``go()``; ``wait(p)`` returns once all ``ranks`` are there. No sleeps, no races."""

    def __init__(self, d, step: int, ranks=(0,), at: str = "step"):
        assert at in ("step", "save")
        self.dir, self.step, self.ranks, self.at = str(d), step, tuple(ranks), at

    @property
    def env(self) -> dict:
        key = "STACKGAN_TEST_PAUSE_AT_STEP" if self.at == "step" else "STACKGAN_TEST_PAUSE_IN_SAVE"
        return {key: str(self.step), "STACKGAN_TEST_RENDEZVOUS_DIR": self.dir}

    def marker(self, rank: int) -> str:
        return os.path.join(self.dir, f"rank{rank}.{self.at}{self.step}")

    def pid(self, rank: int) -> int:
        """The pid of the process that wrote rank ``rank``'s marker (the last one to arrive there)."""
        with open(self.marker(rank)) as f:
            return int(f.read())

    def arrived(self) -> bool:
        return all(os.path.isfile(self.marker(r)) for r in self.ranks)

    def signalled(self) -> bool:
        """Every rank's signal handler has run while it waits (stackgan_dist/testing.py)."""
        return all(os.path.isfile(self.marker(r) + ".signalled") for r in self.ranks)

    def wait(self, p: subprocess.Popen, timeout=300) -> None:
        wait_for(self.arrived, p, timeout, what=f"ranks {self.ranks} paused at {self.at} {self.step}")

    def go(self) -> None:
        os.makedirs(self.dir, exist_ok=True)
        open(os.path.join(self.dir, "go"), "w").close()


def single_cmd(args):
    return [PY, "-m", "stackgan_dist", *map(str, args)]


def torchrun_cmd(args, nproc=2, max_restarts=0):
    return [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            f"--max-restarts={max_restarts}", "--monitor-interval=0.5", "-m", "stackgan_dist", *map(str, args)]


def resume_line(text: str) -> str:
    return next((ln for ln in text.splitlines() if ln.startswith("resumed from")), "")


def metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    """A small synthetic dataset (train 96 / test 24 samples, 3 train shards)."""
    out = tmp_path_factory.mktemp("synth")
    from stackgan_dist.data.prepare.synthetic import prepare_synthetic

    prepare_synthetic(str(out), n_train=96, n_test=24, seed=0, text_dim=64, samples_per_shard=32)
    return out


@pytest.fixture(scope="session")
def tiny_stage1_run(synth_data, tmp_path_factory):
    """One tiny Stage-I run for the whole session (4 steps on ``synth_data``, checkpoints at steps 2 and 4),
    shared by every module that needs a trained run: read it, or copy it before writing (eval writes
    RUN/eval.json, training resumes into it)."""
    run = tmp_path_factory.mktemp("tiny_stage1_run") / "run"
    run_cli("train", "configs/demo/stage1.yaml",
            *tiny_overrides(synth_data, run, 1, steps=4, extra=["checkpoint.every_steps=2"]), check=True)
    return run


TINY = ["model.gf_dim=16", "model.df_dim=8", "model.condition_dim=16", "model.z_dim=16", "model.text_dim=64",
        "model.res_blocks=1", "train.batch_size=4", "data.num_workers=0", "log.progress=false",
        "log.every_steps=2", "log.sample_every=1000", "checkpoint.every_steps=1000"]


def tiny_overrides(data, run_dir, stage=1, steps=4, extra=()):
    o = [f"run.dir={run_dir}", f"data.train={data}/train", f"data.test={data}/test", f"model.stage={stage}",
         f"train.max_steps={steps}", *TINY]
    return o + list(extra)


# -- the launcher references: one uninterrupted torchrun run per session, shared by every launcher's tests ---

@pytest.fixture(scope="session")
def slurm():
    """The local cluster must be up (bash tests/cluster/start_slurm.sh); a missing one fails the test."""
    import re
    import shutil

    missing = [t for t in ("sbatch", "scontrol", "squeue", "sinfo", "scancel") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"Slurm tools missing ({', '.join(missing)}): run `bash tests/cluster/start_slurm.sh` as root")
    p = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True, timeout=60)
    if p.returncode != 0 or not re.search(r"^(idle|mix|alloc)", p.stdout, re.M):
        pytest.fail(f"no usable Slurm node (sinfo: {p.stdout.strip() or p.stderr.strip()}): "
                    "run `bash tests/cluster/start_slurm.sh` as root")
    return True


@pytest.fixture(scope="session")
def reference(synth_data, tmp_path_factory):
    """The Slurm and submitit tests' uninterrupted run: torchrun, 2 processes, the same config and seed as every
    launcher run there (tests/slurm_helpers.py). -> its params_sha256."""
    from slurm_helpers import STEPS, torchrun_train  # imported here: slurm_helpers imports this module

    run = tmp_path_factory.mktemp("launcher_ref") / "run"
    torchrun_train(2, synth_data, run)
    d = inspect_run(run)
    assert d["step"] == STEPS and d["world_size"] == 2
    return d["params_sha256"]


@pytest.fixture(scope="session")
def torchrun_digest(synth_data, tmp_path_factory):
    """The Ray tests' reference: the same config, seed and world size (2) through torchrun
    (tests/ray_helpers.py). -> its params_sha256."""
    from ray_helpers import CONFIG, overrides, show  # imported here: ray_helpers imports this module

    d = tmp_path_factory.mktemp("torchrun")
    e = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "stackgan_dist",
                        "train", CONFIG, *overrides(synth_data, d / "run")], capture_output=True, text=True,
                       timeout=420, cwd=REPO, env=e)
    assert p.returncode == 0, show(p)
    return digest(d / "run")

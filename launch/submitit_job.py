#!/usr/bin/env python
"""Submit one StackGAN training stage from Python with submitit (Slurm, or ``--local``).

    python launch/submitit_job.py [--local] [--nodes N] [--tasks-per-node T] [--gpus-per-node G]
        [--cpus-per-task C] [--partition P] [--account A] [--time MIN] [--folder DIR] [--no-wait]
        CONFIG [key=value ...]

The job runs the same ``run_training`` as ``stackgan train`` under torchrun or srun, so the same config,
seed and world size give the same weights. Every task exports RANK/WORLD_SIZE/MASTER_* from submitit's
job environment (one task per GPU, or per CPU slot); the process group forms from those.

Timeout and preemption. submitit asks Slurm for ``--signal=USR2@<signal_delay_s>`` and ``--requeue``.
The trainer catches USR2 (and TERM, USR1) itself, and at the next step boundary every rank writes the
checkpoint and leaves the training loop. Then rank 0 re-raises USR2 to submitit's own handler, which calls
``TrainJob.checkpoint`` (a fresh submission of the same config; the state lives in the run directory),
counts the timeout against ``--max-timeouts`` and requeues the job (``scontrol requeue``; ``--local``: the
local controller restarts the tasks). Only rank 0 requeues in submitit; the others exit with 75 and wait
to be restarted. After a TERM (``scontrol requeue`` by an admin, preemption, ``scancel``) Slurm decides
whether the job comes back, so no rank requeues. The requeued job resumes from RUN/checkpoints; submitit
requeues preempted jobs without bound, so the trainer's ``checkpoint.max_restarts`` (restarts without
progress) is the bound.

Site settings (partition, account, environment set-up) come from slurm/site.env (or $STACKGAN_SITE_ENV):
its SBATCH_PARTITION / SBATCH_ACCOUNT / SBATCH_QOS / SBATCH_TIMELIMIT exports are the defaults here, and
``--setup`` lines (default: the file itself, sourced) run in the job before srun.
"""
from __future__ import annotations

import argparse
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time

import submitit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python launch/submitit_job.py` from anywhere: the repo's package first
    sys.path.insert(0, ROOT)

from stackgan_dist.checkpoint.signals import EXIT_REQUEUE, last_received  # noqa: E402
from stackgan_dist.safety.unpickle import safe_load  # noqa: E402
from stackgan_dist.errors import DataError, UserError  # noqa: E402

TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED", "SPECIAL_EXIT")  # PREEMPTED: preempt mode CANCEL (with REQUEUE the job pends again)


class TrainJob(submitit.helpers.Checkpointable):
    """The submitted callable. Its state is two strings; the training state lives in the run directory.

    A ``Checkpointable`` subclass (not a bare ``__submitit_checkpoint__``): submitit 1.5.4's signal handler
    checks ``hasattr(function, "checkpoint")`` and treats anything else as not checkpointable.
    """

    def __init__(self, config: str, overrides: list[str]):
        self.config = config
        self.overrides = list(overrides)

    def __call__(self) -> dict:
        from stackgan_dist.config import load_config
        from stackgan_dist.train import run_training
        from stackgan_dist.trainer import Preempted

        # RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT from SLURM_* or SUBMITIT_LOCAL_*; the port is derived
        # from the job id, so a requeued job uses the same one. Devices are picked from LOCAL_RANK.
        port = master_port(submitit.JobEnvironment().job_id)
        if "MASTER_PORT" not in os.environ and port:
            os.environ["MASTER_PORT"] = str(port)
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        os.environ.setdefault("STACKGAN_LAUNCHER", "submitit")
        # one intra-op pool per task sized to its CPUs, as train.sbatch and torchrun runs do: the thread count
        # changes CPU reduction order, so equal weights across launchers need equal counts (torch may be loaded)
        import torch

        threads = int(os.environ.get("SLURM_CPUS_PER_TASK") or os.environ.get("OMP_NUM_THREADS") or 1)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
        cfg = load_config(self.config, self.overrides)
        try:
            return run_training(cfg)
        except Preempted:
            got = last_received()  # the signal that stopped training in this process
            rank = int(os.environ.get("RANK", "0"))
            print(f"submitit_job: rank {rank}: checkpointed after {got or 'a signal'}", flush=True)
            if rank == 0 and got != "SIGTERM":
                # submitit's handler (restored when training returned): checkpoint() -> requeue -> exit. Its
                # `scontrol requeue` child must outlive the SIGTERM that the requeue itself sends to the job's
                # processes (under load it died of it first: the job was requeued but reported failed); an
                # ignored signal stays ignored across exec, and this process exits right after anyway.
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                sig = submitit.JobEnvironment._usr_sig()
                os.kill(os.getpid(), sig)
                time.sleep(5)  # the handler runs at the next bytecode; never fall through to a "success"
            # no result file for a preempted attempt: leave without pickling a result
            os._exit(EXIT_REQUEUE)

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        # our checkpoint is already on disk (written by every rank at the step boundary); requeue the same job
        return submitit.helpers.DelayedSubmission(TrainJob(self.config, self.overrides))


def master_port(job_id: str, ports_file: str = "/proc/sys/net/ipv4/ip_local_port_range") -> int | None:
    """The job's rendezvous port: the same for every attempt of the job (a requeued job finds it again), and
    below the kernel's ephemeral range, from which any process on the node takes ports for its outgoing
    connections. submitit's own pick (20000-60000, mostly inside that range) met such a port: EADDRINUSE.
    None (submitit picks) where the range leaves fewer than 1,000 ports above 20000."""
    try:
        low = int(open(ports_file).read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default range starts here
    if low - 20000 < 1000:
        return None
    return 20000 + random.Random(job_id).randrange(low - 20000)


def read_site_env(path: str) -> dict:
    """The SBATCH_* values in effect after sourcing slurm/site.env (bash sources it, so the file stays the
    one place for site settings; values already in the environment win, as they do for sbatch)."""
    if not os.path.isfile(path):
        return {k: v for k, v in os.environ.items() if k.startswith("SBATCH_")}
    out = subprocess.run(["bash", "-c", 'source "$1" >/dev/null 2>&1; env -0', "_", path],
                         capture_output=True, timeout=30)
    env = dict(kv.split("=", 1) for kv in out.stdout.decode(errors="replace").split("\0") if "=" in kv)
    env.update({k: v for k, v in os.environ.items() if k.startswith("SBATCH_")})
    return {k: v for k, v in env.items() if k.startswith("SBATCH_")}


def parse_minutes(text: str) -> int:
    """Slurm time formats (MIN, MIN:SEC, H:MM:SS, D-H[:MM[:SS]]) -> whole minutes (at least 1)."""
    if not re.fullmatch(r"(\d+-)?\d+(:\d+){0,2}", text.strip()) or ("-" not in text and text.count(":") > 2):
        raise UserError(f"--time {text!r} is not a Slurm time limit; use MIN, MIN:SEC, H:MM:SS or D-H[:MM[:SS]] "
                        "(e.g. --time 90 or --time 1:30:00)")
    text = text.strip()
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
    parts = [int(p) for p in text.split(":")]
    if days:
        parts += [0] * (3 - len(parts))
        h, m, s = parts[:3]
    elif len(parts) == 1:
        h, m, s = 0, parts[0], 0
    elif len(parts) == 2:
        h, m, s = 0, parts[0], parts[1]
    else:
        h, m, s = parts[:3]
    return max(1, days * 1440 + h * 60 + m + (1 if s else 0))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch/submitit_job.py", description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value, as for `stackgan train`")
    p.add_argument("--local", action="store_true", help="submitit's local executor (no Slurm)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--tasks-per-node", type=int, default=0, help="default: GPUs per node, else 1")
    p.add_argument("--gpus-per-node", type=int, default=0)
    p.add_argument("--cpus-per-task", type=int, default=1)
    p.add_argument("--partition", default=None, help="default: $SBATCH_PARTITION (slurm/site.env)")
    p.add_argument("--account", default=None, help="default: $SBATCH_ACCOUNT (slurm/site.env)")
    p.add_argument("--time", default=None, help="minutes or Slurm time (default: $SBATCH_TIMELIMIT, else 60)")
    p.add_argument("--signal-delay-s", type=int, default=90, help="USR2 this long before the time limit")
    p.add_argument("--max-timeouts", type=int, default=3, help="requeues after a time limit (preemption: unbounded)")
    p.add_argument("--folder", default="", help="submitit logs and pickles (default: RUN_DIR/submitit)")
    p.add_argument("--setup", action="append", default=None, help="shell lines run in the job before srun")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    p.add_argument("--wait-timeout-s", type=float, default=0, help="give up waiting after this long (0: never)")
    return p


def make_executor(a, folder: str, site: dict):
    cluster = "local" if a.local else "slurm"
    try:
        ex = submitit.AutoExecutor(folder=folder, cluster=cluster, **{f"{cluster}_max_num_timeout": a.max_timeouts})
    except RuntimeError as e:  # SlurmExecutor: 'Could not detect "srun"'
        raise UserError(f"no Slurm here ({e}); use --local to run on this machine") from None
    tasks = a.tasks_per_node or max(1, a.gpus_per_node)
    time_min = parse_minutes(a.time or site.get("SBATCH_TIMELIMIT") or "60")
    params = dict(nodes=a.nodes, tasks_per_node=tasks, cpus_per_task=a.cpus_per_task, timeout_min=time_min,
                  name="stackgan")
    if a.gpus_per_node:  # not even --gpus-per-node=0 on CPU partitions: clusters without GPU gres may refuse it
        params["gpus_per_node"] = a.gpus_per_node
    delay = a.signal_delay_s
    if delay * 2 > time_min * 60:  # Slurm would signal at once (and up to 60 s early anyway)
        delay = time_min * 30
        print(f"submitit_job: --signal-delay-s {a.signal_delay_s} does not fit --time {time_min} min; using {delay}",
              file=sys.stderr, flush=True)
    if not a.local:
        extra = {"requeue": True, "open-mode": "append"}  # requeued attempts append to the same logs
        account = a.account or site.get("SBATCH_ACCOUNT")
        if account:
            extra["account"] = account
        if site.get("SBATCH_QOS"):
            extra["qos"] = site["SBATCH_QOS"]
        params.update(slurm_signal_delay_s=delay, slurm_additional_parameters=extra,
                      slurm_setup=a.setup if a.setup is not None else _default_setup())
        partition = a.partition or site.get("SBATCH_PARTITION")
        if partition:
            params["slurm_partition"] = partition
    ex.update_parameters(**params)
    if a.local:  # the local controller reads it, AutoExecutor does not expose it
        ex._executor.parameters["signal_delay_s"] = delay
    return ex


def _default_setup() -> list[str]:
    site = os.environ.get("STACKGAN_SITE_ENV", os.path.join(ROOT, "slurm", "site.env"))
    lines = [f"cd {shlex.quote(ROOT)}", "export PYTHONUNBUFFERED=1"]
    if os.path.isfile(site):
        lines.append(f"source {shlex.quote(site)}")
    return lines


def submit_error(e: Exception, stderr: str) -> str:
    """sbatch's first complaint (e.g. 'invalid partition specified: gpux'), on one line."""
    m = re.findall(r"sbatch: error: ([^\n\\]+)", stderr + "\n" + str(e))
    if m:
        return m[0].strip().rstrip("'\"")
    return " ".join(str(e).split())[:300]


def submit_quietly(ex, fn):
    """ex.submit(fn) with the child's stderr (sbatch's) captured: a refusal becomes one line, not three."""
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            job = ex.submit(fn)
        except Exception as e:  # noqa: BLE001 - submitit wraps sbatch's error in its own types
            os.dup2(saved, 2)
            tmp.seek(0)
            raise UserError(f"submission refused: {submit_error(e, tmp.read())}") from None
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        sys.stderr.write(tmp.read())  # warnings of a successful submission still show
    return job


def slurm_state(job_id: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    m = re.search(r"JobState=(\S+)", out)
    return m.group(1) if m else ""


def read_result(path: str) -> tuple[str, object]:
    """submitit's result file, ``(state, value)``, read as plain data only: it lies in the job folder on shared
    storage, and a pickle from there must not run code in the launcher (training returns a dict of str and
    numbers; a failed job's value is a traceback string). -> (state, value); DataError on anything else."""
    got = safe_load(path)
    if not (isinstance(got, tuple) and len(got) == 2 and got[0] in ("success", "error")):
        raise DataError(f"{path}: not a submitit result (expected ('success' | 'error', value))")
    return got


def wait(job, local: bool, timeout_s: float = 0) -> int:
    """Wait for the job's result. submitit reads Slurm state through sacct, which clusters without
    accounting lack, so a job that ended without a result is detected through scontrol here."""
    t0, ended_since = time.monotonic(), 0.0
    while True:
        if job.paths.result_pickle.exists():
            try:
                state, value = read_result(str(job.paths.result_pickle))
            except DataError as e:
                print(f"job {job.job_id}: {e}", file=sys.stderr, flush=True)
                return 1
            if state == "success":
                print(f"job {job.job_id} finished: {value}", flush=True)
                return 0
            last = [ln for ln in str(value).strip().splitlines() if ln.strip()]
            print(f"job {job.job_id} failed: {last[-1] if last else value}", file=sys.stderr, flush=True)
            return 1
        if local:
            if job._process.poll() is not None and not job.paths.result_pickle.exists():
                time.sleep(1)
                if not job.paths.result_pickle.exists():
                    print(f"job {job.job_id} ended without a result (exit {job._process.returncode}); "
                          f"logs: {job.paths.stdout.parent}", file=sys.stderr, flush=True)
                    return 1
        else:
            # ended (or unknown to scontrol) for 10 s in a row with no result file: a transient scontrol
            # failure or a state seen while Slurm requeues the job does not end the wait
            st = slurm_state(job.job_id)
            if st in TERMINAL or st == "":
                ended_since = ended_since or time.monotonic()
                if time.monotonic() - ended_since > 10 and not job.paths.result_pickle.exists():
                    print(f"job {job.job_id} ended ({st or 'unknown to scontrol'}) without a result; "
                          f"logs: {job.paths.stdout}", file=sys.stderr, flush=True)
                    return 1
            else:
                ended_since = 0.0
        if timeout_s and time.monotonic() - t0 > timeout_s:
            print(f"job {job.job_id}: gave up waiting after {timeout_s:.0f}s", file=sys.stderr, flush=True)
            return 1
        time.sleep(1)


def check_args(a) -> None:
    """The command line, checked before anything is submitted or created (submitit makes its folder at once)."""
    if a.time is not None:
        parse_minutes(a.time)
    for name, low in (("nodes", 1), ("tasks_per_node", 0), ("gpus_per_node", 0), ("cpus_per_task", 1),
                      ("signal_delay_s", 0), ("max_timeouts", 0)):
        if getattr(a, name) < low:
            raise UserError(f"--{name.replace('_', '-')} {getattr(a, name)}: must be >= {low}")
    if a.wait_timeout_s < 0:
        raise UserError(f"--wait-timeout-s {a.wait_timeout_s}: must be >= 0 (0: wait without a limit)")
    # one task trains on one GPU: more GPUs than tasks leave GPUs idle, fewer put two ranks on one (NCCL refuses)
    if a.gpus_per_node and a.tasks_per_node and a.tasks_per_node != a.gpus_per_node:
        idle = (f"{a.gpus_per_node - a.tasks_per_node} GPU(s) per node would sit idle" if a.gpus_per_node > a.tasks_per_node
                else "two tasks would share a GPU, which NCCL refuses")
        raise UserError(f"--gpus-per-node {a.gpus_per_node} with --tasks-per-node {a.tasks_per_node}: each task trains "
                        f"on one GPU, so {idle}; use --tasks-per-node {a.gpus_per_node} (or leave it out: it defaults "
                        "to the GPUs per node)")


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        check_args(a)
        from stackgan_dist.config import load_config

        cfg = load_config(a.config, a.overrides)  # bad configs fail here, before anything is submitted
        site = read_site_env(os.environ.get("STACKGAN_SITE_ENV", os.path.join(ROOT, "slurm", "site.env")))
        run_dir = os.path.abspath(cfg.run.dir)
        folder = a.folder or os.path.join(run_dir, "submitit")
        # the job may start elsewhere (its own cwd): pin the config and relative paths to absolute ones
        overrides = [o if not o.startswith("run.dir=") else f"run.dir={run_dir}" for o in a.overrides]
        if not any(o.startswith("run.dir=") for o in overrides):
            overrides.append(f"run.dir={run_dir}")
        ex = make_executor(a, folder, site)
        fn = TrainJob(os.path.abspath(a.config), overrides)
        # local: the controller process inherits our stderr, so it must stay the terminal
        job = ex.submit(fn) if a.local else submit_quietly(ex, fn)
    except UserError as e:
        print(f"submitit_job: error: {e}", file=sys.stderr, flush=True)
        return 2
    print(f"submitted job {job.job_id} ({'local' if a.local else 'slurm'}); run.dir={run_dir}; logs: {folder}",
          flush=True)
    if a.no_wait:
        return 0
    try:
        return wait(job, a.local, a.wait_timeout_s)
    except KeyboardInterrupt:
        print(f"stopped waiting; job {job.job_id} keeps running", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

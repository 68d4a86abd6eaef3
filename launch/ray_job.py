#!/usr/bin/env python
"""Submit a training run to a Ray cluster through the Ray Jobs API.

    python launch/ray_job.py --address http://127.0.0.1:8265 --num-workers N [--gpus-per-worker G] [--no-wait] \
        CONFIG [key=value ...]

The repository is the job's working directory (runtime env), so every node runs this checkout's code; the job's
``python`` must be the project's environment on every node (start Ray from the venv: tests/cluster/start_ray.sh).
Inside the job, ``stackgan_dist.launch_ray`` runs a Ray Train ``TorchTrainer`` whose workers call the same
``run_training`` as torchrun and srun. Checkpoints go to ``run.dir`` (shared storage on a multi-node cluster);
relative paths in the config are made absolute here, against the current directory, because the job runs in a copy
of the repository.

Prints the job id, follows the job's logs unless ``--no-wait``, and exits with the job's status:
0 SUCCEEDED, 1 FAILED or STOPPED, 2 a problem found before or while waiting (bad config, unreachable address,
a job stuck PENDING past ``--pending-timeout``), 130 interrupted by Ctrl-C (one line saying whether the job was
submitted and how to check or stop it).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import sys
import time
import urllib.error
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from stackgan_dist.errors import UserError  # noqa: E402

# not shipped with the job: environments, outputs, data, VCS (Ray also honours .gitignore). Ray reads these as
# gitignore patterns: an unanchored "data" also dropped the package stackgan_dist/data, which the job then
# imported from the head's editable install; the repository's own folders are anchored with "/"
EXCLUDES = [".venv", "/runs", "/data", ".git", "__pycache__", "*.egg-info", ".pytest_cache", "/.whl", "/build"]
# config keys holding local paths: made absolute, since the job's working directory is a copy of the repo
PATH_KEYS = ("run.dir", "data.train", "data.test", "model.stage1_checkpoint", "train.deepspeed_config")
EXIT_OK, EXIT_FAILED, EXIT_USER, EXIT_INTERRUPTED = 0, 1, 2, 130


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:8265"),
                   help="Ray Jobs API (dashboard) address (default: $RAY_API_SERVER_ADDRESS or http://127.0.0.1:8265)")
    p.add_argument("--num-workers", type=int, required=True, help="training workers (= world size)")
    p.add_argument("--gpus-per-worker", type=float, default=0,
                   help="0: CPU training with gloo; 1: one GPU per worker (N nodes x G GPUs: --num-workers N*G)")
    p.add_argument("--cpus-per-worker", type=float, default=1)
    p.add_argument("--placement-strategy", default="PACK", choices=("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
                   help="how Ray places the workers: STRICT_SPREAD puts each on its own node")
    p.add_argument("--max-failures", type=int, default=3,
                   help="worker-group restarts Ray Train makes after a failure; each resumes from run.dir")
    p.add_argument("--pending-timeout", type=float, default=600,
                   help="seconds a job may stay PENDING, or its workers unscheduled, before it is stopped with an error")
    p.add_argument("--entrypoint-num-cpus", type=float, default=0,
                   help="CPUs reserved for the job's driver process (default 0: it only coordinates)")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment for the job")
    p.add_argument("--python", default="python", help="the job's interpreter on the cluster (default: python)")
    p.add_argument("--submission-id", default=None, help="job id to use (default: Ray picks one)")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    a = p.parse_args(argv)
    if a.num_workers < 1:
        p.error("--num-workers must be >= 1")
    for e in a.env:
        if "=" not in e:
            p.error(f"--env wants KEY=VALUE, got {e!r}")
    return a


def _is_local_path(v: str) -> bool:
    return bool(v) and "://" not in v and not v.startswith("pipe:")


def resolve_config(config: str, overrides: list[str]) -> tuple[str, list[str], str]:
    """Validates the config here (errors surface before submitting) and returns (config path relative to the repo,
    overrides with absolute local paths, run dir)."""
    from stackgan_dist.config import load_config
    from stackgan_dist.config_parse import flatten as _flatten

    cfg = load_config(config, overrides)
    flat = _flatten(cfg.to_dict())
    extra = [f"{k}={os.path.abspath(flat[k])}" for k in PATH_KEYS if _is_local_path(str(flat[k]))
             and not os.path.isabs(str(flat[k]))]
    cpath = os.path.abspath(config)
    rel = os.path.relpath(cpath, REPO)
    # a config inside the repo travels with the working dir; one outside it must be readable on the cluster
    return (rel if not rel.startswith("..") else cpath), list(overrides) + extra, os.path.abspath(cfg.run.dir)


def check_reachable(address: str, timeout: float = 5.0) -> None:
    url = address.rstrip("/") + "/api/version"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            r.read()
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(f"cannot reach the Ray Jobs API at {address} ({reason}); is the cluster up "
                        "(`ray start --head`, or bash tests/cluster/start_ray.sh) and is this its dashboard "
                        "address?") from None


def submit(a) -> tuple[object, str, str]:
    from stackgan_dist.launch_ray import check_worker_shape

    check_worker_shape(a.num_workers, a.gpus_per_worker)  # before the config, the address and Ray
    from ray.job_submission import JobSubmissionClient

    config, overrides, run_dir = resolve_config(a.config, a.overrides)
    check_reachable(a.address)
    client = JobSubmissionClient(a.address)
    cmd = [a.python, "-m", "stackgan_dist.launch_ray", "--num-workers", str(a.num_workers),
           "--gpus-per-worker", str(a.gpus_per_worker), "--cpus-per-worker", str(a.cpus_per_worker),
           "--placement-strategy", a.placement_strategy, "--max-failures", str(a.max_failures),
           "--pending-timeout", str(a.pending_timeout), config, *overrides]
    env_vars = dict(e.split("=", 1) for e in a.env)
    env_vars.setdefault("PYTHONUNBUFFERED", "1")
    job_id = client.submit_job(
        entrypoint=" ".join(shlex.quote(c) for c in cmd),
        submission_id=a.submission_id,
        entrypoint_num_cpus=a.entrypoint_num_cpus,
        runtime_env={"working_dir": REPO, "excludes": EXCLUDES, "env_vars": env_vars},
        metadata={"stackgan_run_dir": run_dir, "stackgan_config": a.config},
    )
    return client, job_id, run_dir


async def follow(client, job_id: str, pending_timeout: float) -> str:
    """Streams the job's logs while a watchdog polls its status; returns the terminal status."""
    from ray.job_submission import JobStatus

    shown = 0  # characters of the job's log written so far: the stream gives a prefix of the whole log

    async def tail():
        nonlocal shown
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()
            shown += len(chunk)

    tail_task = asyncio.create_task(tail())
    t0 = time.monotonic()
    try:
        while True:
            status = await asyncio.to_thread(client.get_job_status, job_id)
            if status.is_terminal():
                break
            if status == JobStatus.PENDING and time.monotonic() - t0 > pending_timeout:
                info = await asyncio.to_thread(client.get_job_info, job_id)
                # A job whose supervisor cannot be placed takes the stop request only once it starts, so it may
                # stay PENDING until Ray fails it (RAY_JOB_START_TIMEOUT_SECONDS on the head, 15 min by default).
                await asyncio.to_thread(client.stop_job, job_id)
                raise UserError(f"job {job_id} stayed PENDING for {pending_timeout:.0f}s and was stopped "
                                f"({info.message or 'no message from Ray'}); check `ray status` for free resources "
                                "and the runtime env set-up")
            await asyncio.sleep(1.0)
        # The log stream closes some seconds after the job ends (the dashboard's own polling): instead of
        # waiting for it, stop it and write what it has not yet delivered from the whole log.
        tail_task.cancel()
        try:
            await tail_task
        except (asyncio.CancelledError, Exception):  # noqa: BLE001 -- a stream that broke: the whole log follows
            pass
        try:
            rest = (await asyncio.to_thread(client.get_job_logs, job_id))[shown:]
        except Exception:  # noqa: BLE001 -- logs of a finished job gone: the status is what matters
            rest = ""
        sys.stdout.write(rest)
        sys.stdout.flush()
        return str(status.value if hasattr(status, "value") else status)
    finally:
        tail_task.cancel()


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _last_error_line(client, job_id: str) -> str:
    """The driver's own one-line error (``stackgan ray: error: ...``) from the job's logs, if it wrote one."""
    try:
        logs = ANSI.sub("", client.get_job_logs(job_id))
    except Exception:  # noqa: BLE001
        return ""
    lines = [ln.strip() for ln in logs.splitlines() if ln.startswith("stackgan ray: error:")]
    return lines[-1][len("stackgan ray: error:"):].strip() if lines else ""


def main(argv=None) -> int:
    a = parse_args(argv)
    job_id = None
    try:
        client, job_id, run_dir = submit(a)
        print(f"submitted Ray job {job_id} (run dir {run_dir}); logs: ray job logs {job_id} --address {a.address}",
              flush=True)
        print(json.dumps({"job_id": job_id, "run_dir": run_dir}), flush=True)
        if a.no_wait:
            return EXIT_OK
        status = asyncio.run(follow(client, job_id, a.pending_timeout))
    except UserError as e:
        print(f"ray_job: error: {e}", file=sys.stderr, flush=True)
        return EXIT_USER
    except KeyboardInterrupt:
        if job_id is None:  # interrupted while validating or submitting: the request may or may not have landed
            which = f"ray job status {a.submission_id}" if a.submission_id else "ray job list"
            print(f"ray_job: interrupted before the submission was confirmed; check with `{which} --address "
                  f"{a.address}` whether the job exists, then run this command again", file=sys.stderr, flush=True)
        else:
            print(f"ray_job: interrupted; the job keeps running (stop it with: ray job stop {job_id} "
                  f"--address {a.address})", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    if status == "SUCCEEDED":
        print(f"ray_job: job {job_id} SUCCEEDED; checkpoints in {run_dir}/checkpoints", flush=True)
        return EXIT_OK
    info = client.get_job_info(job_id)
    why = _last_error_line(client, job_id) or (info.message or "").strip().splitlines()[0:1]
    why = why if isinstance(why, str) else (why[0] if why else "no message")
    print(f"ray_job: error: job {job_id} {status}: {why}", file=sys.stderr, flush=True)
    return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())

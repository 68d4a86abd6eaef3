"""Ray side of ``launch/ray_job.py``: the job driver (a Ray Train V2 ``TorchTrainer``) and the per-worker function.

``launch/ray_job.py`` submits ``python -m stackgan_dist.launch_ray ...`` through the Ray Jobs API; this module then
runs inside the job. Ray is imported lazily (only here, never by the trainer or the models), so the package works
without Ray installed.

Division of labour:
- Ray Train forms the torch process group (gloo on CPU, NCCL on GPU); ``distributed/env.py`` detects and reuses it.
- Checkpoints stay in our run directory (``run.dir/checkpoints``, shared storage on a multi-node cluster). Each
  checkpoint is also reported to Ray with ``ray.train.report`` as a small pointer checkpoint (a JSON naming our
  step directory) under ``run.dir/ray/``: Ray then lists it, without a second copy of the weights.
  ``ray.train.report`` is a barrier, so every worker calls it once per checkpoint (only rank 0 attaches the pointer).
- A failed worker makes Ray restart the whole group (``FailureConfig(max_failures)``); Ray restores neither model
  nor data state itself: the restarted workers resume from the newest valid checkpoint in ``run.dir``, exactly as a
  requeued Slurm job does. Rerunning the same job (same run.dir) also resumes.
- A user error is not a worker failure: the driver runs every start check (``train.dry_run_checks``, as
  ``stackgan train --dry-run`` does, without a process group) before it starts any worker, and a UserError that a
  worker raises later (bad data past the first sample, a non-finite loss) ends the run at once with its one line:
  ``StopOnUserError`` raises it in Ray Train's controller, whose failure policy does not retry its own errors.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from .errors import UserError

POINTER_FILE = "stackgan_checkpoint.json"
RAY_SUBDIR = "ray"  # Ray Train's own run storage inside our run directory: RunConfig(storage_path=run.dir, name=ray)


def _report_checkpoint(path: str | None, step: int, env) -> None:
    """Trainer checkpoint hook: every rank calls it after each (collective) save, so the barrier lines up."""
    import ray.train

    metrics = {"step": step, "checkpoint": path or ""}
    name = f"step_{step:08d}"
    if env.rank == 0 and path:
        with tempfile.TemporaryDirectory(prefix="stackgan-ray-ptr-") as tmp:
            with open(os.path.join(tmp, POINTER_FILE), "w") as f:
                json.dump({"checkpoint": os.path.abspath(path), "step": step}, f)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
    else:
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)


class WorkerUserError(UserError):
    """A worker's UserError, raised again in Ray Train's controller so that the run ends without a retry."""


def _user_error(exc: BaseException) -> UserError | None:
    """``exc`` or what it wraps (Ray's wrappers keep the worker's exception as ``cause`` / ``__cause__``)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, UserError):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__
        seen += 1
    return None


def stop_on_user_error_callback():
    """A Ray Train ``UserCallback`` (run in the controller) that ends the run when a worker raised a UserError:
    relaunching fails the same way, so ``FailureConfig(max_failures)`` must not retry it."""
    from ray.train import UserCallback

    class StopOnUserError(UserCallback):
        def after_exception(self, run_context, worker_exceptions):
            for rank in sorted(worker_exceptions):
                err = _user_error(worker_exceptions[rank])
                if err is not None:
                    line = (str(err).strip().splitlines() or [type(err).__name__])[0]
                    raise WorkerUserError(f"rank {rank}: {type(err).__name__}: {line}")

    return StopOnUserError()


def train_func(loop_config: dict) -> None:
    """Runs on every Ray Train worker: the same ``run_training`` that torchrun and srun call."""
    import ray.train

    from .config import config_from_dict
    from .train import run_training

    os.environ["STACKGAN_LAUNCHER"] = "ray"  # distributed/env.py: the group exists and belongs to Ray Train
    ctx = ray.train.get_context()
    cfg = config_from_dict(loop_config["config"])
    import ray

    # where each rank landed (a multi-node placement is visible in the job log)
    import stackgan_dist

    # every loaded stackgan_dist module's checkout (more than one: part of the code came from elsewhere)
    roots = sorted({os.path.dirname(os.path.abspath(m.__file__)).split(os.sep + "stackgan_dist")[0]
                    for name, m in list(sys.modules.items())
                    if name.split(".")[0] == "stackgan_dist" and getattr(m, "__file__", None)})
    code = " + ".join(os.path.join(r, "stackgan_dist") for r in roots) or os.path.dirname(stackgan_dist.__file__)
    print(f"stackgan ray: rank {ctx.get_world_rank()} on node {ray.get_runtime_context().get_node_id()[:12]} "
          f"({ray.util.get_node_ip_address()}), code {code}", flush=True)
    if ctx.get_world_rank() == 0:
        print(f"stackgan ray: worker group of {ctx.get_world_size()} started; run dir {cfg.run.dir}", flush=True)
    run_training(cfg, on_checkpoint=_report_checkpoint)


def check_worker_shape(num_workers: int, gpus_per_worker: float) -> None:
    """A Ray worker is one rank and a rank trains on one GPU: refuse the shapes that would leave GPUs idle
    (``--gpus-per-worker 8`` read as "8 GPUs per node") or put two ranks on one GPU (NCCL refuses those), in
    one line that names the shape that works, before anything is submitted or placed."""
    if num_workers < 1:
        raise UserError(f"--num-workers {num_workers}: must be >= 1")
    if gpus_per_worker < 0:
        raise UserError(f"--gpus-per-worker {gpus_per_worker:g}: must be 0 (CPU) or 1")
    if gpus_per_worker > 1:
        raise UserError(f"--num-workers {num_workers} --gpus-per-worker {gpus_per_worker:g}: each worker is one rank "
                        f"that trains on one GPU, so {gpus_per_worker - 1:g} of every worker's GPUs would sit idle; "
                        f"use --num-workers {num_workers * gpus_per_worker:g} --gpus-per-worker 1 (one worker per GPU)")
    if 0 < gpus_per_worker < 1:
        raise UserError(f"--gpus-per-worker {gpus_per_worker:g}: a fraction of a GPU puts several ranks on one GPU, "
                        "which NCCL refuses; use --gpus-per-worker 1 (or 0 for CPU training)")


def _probe_resources(num_workers: int, bundle: dict, timeout_s: float, strategy: str = "PACK") -> None:
    """A job whose workers cannot be placed waits forever (a known Ray failure mode). Reserve the same bundles
    first with a deadline, so that an impossible request becomes a clear error. On an autoscaling cluster the
    reservation is what asks for the nodes."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group([dict(bundle) for _ in range(num_workers)], strategy=strategy)
    try:
        ready = pg.wait(timeout_seconds=timeout_s)
    finally:
        remove_placement_group(pg)
    if not ready:
        have = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU") or k in bundle}
        raise UserError(f"{num_workers} workers x {bundle} could not be scheduled within {timeout_s:.0f}s "
                        f"(cluster resources: {have}, placement {strategy}); lower --num-workers / --gpus-per-worker / "
                        "--cpus-per-worker, relax --placement-strategy or add nodes")


def root_cause(e: BaseException) -> str:
    """One line for a failed fit(): the first worker's own exception (Ray wraps it), else the last message line."""
    failures = getattr(e, "worker_failures", None) or {}
    for rank in sorted(failures):
        exc = failures[rank]
        exc = getattr(exc, "cause", None) or exc
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
        return f"rank {rank}: {type(exc).__name__}: {lines[-1] if lines else ''}".rstrip(": ")
    cause = getattr(e, "controller_failure", None) or e
    lines = [ln for ln in str(cause).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(cause).__name__


def _start_checks(cfg, num_workers: int, use_gpu: bool) -> None:
    """What every worker would check at its start (data, text_dim, run dir and lock, resume, Stage-I checkpoint,
    precision on the workers' device), here, once, before Ray starts a worker: a user error is not retried."""
    import copy

    import torch

    from .distributed.env import DistEnv
    from .train import dry_run_checks

    env = DistEnv(0, num_workers, 0, torch.device("cuda" if use_gpu else "cpu"), "ray")
    dry_run_checks(copy.deepcopy(cfg), env=env)  # the workers resolve the config again themselves


def drive(argv: list[str] | None = None) -> int:
    """The job driver: validate the config, check the workers can be placed, run the TorchTrainer."""
    p = argparse.ArgumentParser(prog="python -m stackgan_dist.launch_ray")
    p.add_argument("--num-workers", type=int, required=True)
    p.add_argument("--gpus-per-worker", type=float, default=0)
    p.add_argument("--cpus-per-worker", type=float, default=1)
    p.add_argument("--placement-strategy", default="PACK", choices=("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))
    p.add_argument("--max-failures", type=int, default=3)
    p.add_argument("--pending-timeout", type=float, default=600)
    p.add_argument("--name", default=RAY_SUBDIR)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)

    from .config import load_config

    check_worker_shape(a.num_workers, a.gpus_per_worker)
    cfg = load_config(a.config, a.overrides)
    if not os.path.isabs(cfg.run.dir):
        raise UserError(f"run.dir must be an absolute path on shared storage inside a Ray job, got {cfg.run.dir}")
    _start_checks(cfg, a.num_workers, a.gpus_per_worker > 0)

    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), log_to_driver=True)
    bundle = {"CPU": a.cpus_per_worker} | ({"GPU": a.gpus_per_worker} if a.gpus_per_worker else {})
    _probe_resources(a.num_workers, bundle, a.pending_timeout, a.placement_strategy)
    use_gpu = a.gpus_per_worker > 0
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"config": cfg.to_dict()},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=int(max(cfg.train.dist_timeout_s, 60))),
        scaling_config=ScalingConfig(num_workers=a.num_workers, use_gpu=use_gpu, resources_per_worker=bundle,
                                     placement_strategy=a.placement_strategy),
        run_config=RunConfig(name=a.name, storage_path=cfg.run.dir,
                             failure_config=FailureConfig(max_failures=a.max_failures),
                             callbacks=[stop_on_user_error_callback()],
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep_last)),
    )
    print(f"stackgan ray: {a.num_workers} workers x {bundle} ({a.placement_strategy}), run dir {cfg.run.dir}, "
          f"max_failures {a.max_failures}", flush=True)
    try:
        result = trainer.fit()
    except Exception as e:  # noqa: BLE001 -- TrainingFailedError and friends: one line naming the root cause
        user = _user_error(getattr(e, "controller_failure", None) or e)
        if user is not None:  # a worker's user error: ended at once, not retried
            raise UserError(f"training stopped (a user error is not retried): {user}") from None
        raise UserError(f"training failed (Ray Train gave up after max_failures={a.max_failures} restarts): "
                        f"{root_cause(e)}") from None
    ck = result.checkpoint.path if result.checkpoint else "none"
    print(f"stackgan ray: finished; metrics {result.metrics}; last Ray checkpoint pointer {ck}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return drive(argv)
    except UserError as e:
        print(f"stackgan ray: error: {e}", file=sys.stderr, flush=True)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())

"""The start plan: how a run is laid out, computed before anything is built, printed by ``--dry-run`` (JSON)
and by every real start (the banner on rank 0). Pure: numbers in, a frozen StartPlan out; the trainer does
the reading (dataset size, checkpoint) and hands the facts in.

The global batch is the recipe. ``train.global_batch`` (images per optimizer step) is split over world size
x grad_accum, so a run on 1, 8 or 16 GPUs takes the same steps on the same batches' worth of images;
``train.batch_size`` (per worker) is the explicit weak-scaling mode, where the global batch grows with the
world size and ``train.lr_scaling`` says what the learning rates do about it.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .config import validate
from .errors import UserError
from .train_state import Schedule, TrainState

# The smallest per-worker batch a stage trains with: G's first layer is an FC followed by BatchNorm1d, whose
# training-mode statistics need 2 samples (torch refuses 1), and the matching-aware D's wrong pairs need a
# second sample to pair each image with; SyncBatchNorm would pool the statistics, not the wrong pairs.
MIN_BATCH_PER_WORKER = 2
# Below this per-worker batch a GPU spends its step waiting on communication and launches: more GPUs on one
# global batch gain little, and the banner says so (a sweep of several runs uses them better).
THIN_BATCH_PER_WORKER = 8


class PlanError(UserError):
    """A job shape or batch split that cannot run as asked; the line says what would."""


def _divisors_note(global_batch: int, grad_accum: int) -> str:
    per_step = global_batch // grad_accum if global_batch % grad_accum == 0 else 0
    ok = [w for w in range(1, per_step // MIN_BATCH_PER_WORKER + 1) if per_step % w == 0] if per_step else []
    return f"world sizes that split it: {ok}" if ok else f"train.grad_accum must divide {global_batch}"


def split_global_batch(global_batch: int, world_size: int, grad_accum: int) -> int:
    """-> the per-worker batch of ``global_batch`` images per step over ``world_size`` x ``grad_accum``;
    refused in one line naming what would work."""
    parts = world_size * grad_accum
    if global_batch % parts:
        raise PlanError(f"train.global_batch {global_batch} does not split over world size {world_size} x "
                        f"train.grad_accum {grad_accum}; {_divisors_note(global_batch, grad_accum)} (or set "
                        f"train.global_batch to a multiple of {parts})")
    per_worker = global_batch // parts
    if per_worker < MIN_BATCH_PER_WORKER:
        raise PlanError(f"train.global_batch {global_batch} over world size {world_size} x train.grad_accum "
                        f"{grad_accum} leaves {per_worker} image per worker; the minimum is "
                        f"{MIN_BATCH_PER_WORKER} (G's BatchNorm1d and D's wrong pairs need 2 samples per worker): "
                        f"use at most {global_batch // (grad_accum * MIN_BATCH_PER_WORKER)} workers, or raise "
                        "train.global_batch")
    return per_worker


def check_per_worker_batch(batch_size: int) -> None:
    if batch_size < MIN_BATCH_PER_WORKER:
        raise PlanError(f"train.batch_size {batch_size} is below the minimum of {MIN_BATCH_PER_WORKER} images per "
                        "worker (G's BatchNorm1d and D's wrong pairs need 2 samples per worker)")


def images_used_per_pass(num_samples: int, batch_per_worker: int, world_size: int) -> int:
    """The loader's rule (data/slots.py follows it): a pass over the data uses whole global micro-batches,
    each rank taking contiguous runs of whole batches that its loader workers share, so at most
    ``batch_per_worker x world_size - 1`` images are dropped per pass."""
    per_micro_step = batch_per_worker * world_size
    return per_micro_step * (num_samples // per_micro_step)


def lr_scale(rule: str, global_batch: int, reference_batch: int) -> float:
    """The learning-rate multiplier for a global batch: none, sqrt or linear in global / reference."""
    ratio = global_batch / reference_batch
    return {"none": 1.0, "sqrt": math.sqrt(ratio), "linear": ratio}[rule]


def resume_grad_accum(batch_size: int, grad_accum: int, world_size: int, elastic: str, saved_batch: int,
                      saved_accum: int, saved_world: int) -> tuple[int, str]:
    """Per-worker mode at a resume: the grad_accum that keeps the checkpoint's global batch at another world
    size (``elastic`` "keep"), or refused naming the fix; "free" keeps the configured batch. -> (grad_accum,
    a note for the banner or "")."""
    old, new = saved_batch * saved_accum * saved_world, batch_size * grad_accum * world_size
    if old == new:
        return grad_accum, ""
    if saved_world == world_size:  # the same layout: a batch changed in the config is the user's choice
        return grad_accum, f"the global batch changed in the config: {old} -> {new}"
    if elastic == "free":
        return grad_accum, f"world size {saved_world} -> {world_size}: the global batch is {new} (was {old})"
    per_step = batch_size * world_size
    if old % per_step == 0 and batch_size == saved_batch:
        accum = old // per_step
        return accum, (f"world size {saved_world} -> {world_size}: train.grad_accum {grad_accum} -> {accum} keeps "
                       f"the global batch of {old}")
    raise PlanError(f"cannot resume with a global batch of {new} (train.batch_size {batch_size} x grad_accum "
                    f"{grad_accum} x world size {world_size}); it was trained with {old}: choose train.batch_size "
                    f"and train.grad_accum so that the product with the world size is {old}, set "
                    f"train.global_batch={old} train.batch_size=0, or set train.elastic_batch=free to change it")


@dataclass(frozen=True)
class StartPlan:
    stage: int
    launcher: str
    world_size: int
    device: str
    precision: str
    run_dir: str
    resume_from: str | None
    resume_step: int
    resume_images: int
    batch_mode: str  # "global" (train.global_batch split) or "per_worker" (train.batch_size)
    global_batch: int
    batch_per_worker: int
    grad_accum: int
    num_workers: int
    train_samples: int
    steps_per_epoch: int
    images_used_per_epoch: int
    images_dropped_per_epoch: int
    total_steps: int
    stop_rule: str  # "steps", "epochs"
    stops: str  # when the run stops, in words
    lr_g: float  # effective (scaled) peak learning rates
    lr_d: float
    lr_scale: float
    lr_warmup_steps: int
    finished: bool
    notes: tuple = ()  # decisions the user should see (a stop rule chosen, a batch kept at resume)
    warnings: tuple = ()  # shapes that run but waste something

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"notes": list(self.notes), "warnings": list(self.warnings)}

    def banner(self) -> list[str]:
        """The lines that open a run (rank 0, logged at info; the warnings follow at warning level)."""
        where = f"resumes {self.resume_from} at step {self.resume_step}" if self.resume_from else "starts fresh"
        mode = "split over the workers" if self.batch_mode == "global" else "per-worker batch x workers"
        out = [f"stage {self.stage}: {self.launcher}, world size {self.world_size}, {self.device}, {self.precision}, "
               f"{self.num_workers} loader workers per rank; run {self.run_dir} {where}",
               f"global batch {self.global_batch} ({mode}: {self.batch_per_worker} per worker x {self.world_size} "
               f"workers x grad_accum {self.grad_accum}); {self.steps_per_epoch} steps per epoch of "
               f"{self.train_samples} samples, {self.images_used_per_epoch} used and "
               f"{self.images_dropped_per_epoch} dropped per pass",
               f"lr_g {self.lr_g:.3g}, lr_d {self.lr_d:.3g} (x{self.lr_scale:.3g} for the global batch"
               + (f", warmup {self.lr_warmup_steps} steps" if self.lr_warmup_steps else "") + ")",
               self.stops]
        return out + list(self.notes)


def stop_words(max_steps: int, max_epochs: float, max_images: int, total_steps: int, global_batch: int,
               num_samples: int) -> tuple[str, str]:
    """-> (rule, sentence): when the run stops, in steps, epochs and images."""
    if max_epochs > 0:
        return "epochs", (f"stops after {max_epochs:g} epochs: {max_images} images seen, about step "
                          f"{total_steps}")
    images = max_steps * global_batch
    return "steps", (f"stops at step {max_steps}: {images} images seen, {images / max(1, num_samples):.2f} epochs")


def make_plan(cfg, *, launcher: str, world_size: int, device: str, num_samples: int, num_workers: int,
              resume_from: str | None = None, resume_step: int = 0, resume_images: int = 0,
              saved_batch: tuple[int, int, int] | None = None, finished: bool = False,
              unused_devices: int = 0) -> StartPlan:
    """The plan of a start from the config and the facts the trainer read (dataset size, the checkpoint's
    step and images seen, and ``saved_batch``: its (per-worker batch, grad_accum, world size); GPUs this
    node's ranks see beyond one each: ``unused_devices``). Raises PlanError where the shape cannot run."""
    t = cfg.train
    notes = list(cfg.notes)
    warnings = []
    if cfg.data.slots > num_samples:
        raise PlanError(f"data.slots {cfg.data.slots} exceeds the {num_samples} samples of data.train; use at most "
                        f"{num_samples} (or 0: automatic)")
    grad_accum = t.grad_accum
    if t.global_batch > 0:
        mode, global_batch = "global", t.global_batch
        per_worker = split_global_batch(global_batch, world_size, grad_accum)
        if saved_batch and math.prod(saved_batch) != global_batch:
            notes.append(f"the global batch changed in the config: {math.prod(saved_batch)} -> {global_batch}")
    else:
        mode, per_worker = "per_worker", t.batch_size
        check_per_worker_batch(per_worker)
        if saved_batch:
            grad_accum, note = resume_grad_accum(per_worker, grad_accum, world_size, t.elastic_batch, *saved_batch)
            notes += [note] if note else []
        global_batch = per_worker * grad_accum * world_size
    if mode == "global" and world_size > 1 and per_worker < THIN_BATCH_PER_WORKER:
        warnings.append(f"{per_worker} images per worker (global batch {global_batch} over {world_size} workers): "
                        "each GPU mostly waits, fewer GPUs would train about as fast; to use "
                        f"{world_size} GPUs run a sweep (several runs side by side) instead")
    if unused_devices:
        warnings.append(f"{unused_devices} CUDA device(s) on this node are used by no rank: start one task per GPU "
                        "(--ntasks-per-node equal to the GPUs per node)")
    used = images_used_per_pass(num_samples, per_worker, world_size)
    sched = Schedule.from_config(cfg, num_samples)
    state = TrainState(step=resume_step, images_seen=resume_images)
    total = sched.total_steps(state, global_batch)
    rule, stops = stop_words(sched.max_steps, t.max_epochs, sched.max_images, total, global_batch, num_samples)
    why = [n for n in notes if n.startswith("train.max_steps from the command line")]
    if why:  # the stop rule and why it is this one, in one line
        stops, notes = f"{stops} ({why[0]})", [n for n in notes if n not in why]
    scale = lr_scale(t.lr_scaling, global_batch, t.lr_reference_batch)
    return StartPlan(stage=cfg.model.stage, launcher=launcher, world_size=world_size, device=device,
                     precision=t.precision, run_dir=cfg.run.dir, resume_from=resume_from, resume_step=resume_step,
                     resume_images=resume_images, batch_mode=mode, global_batch=global_batch,
                     batch_per_worker=per_worker, grad_accum=grad_accum, num_workers=num_workers,
                     train_samples=num_samples, steps_per_epoch=used // global_batch, images_used_per_epoch=used,
                     images_dropped_per_epoch=num_samples - used, total_steps=total, stop_rule=rule, stops=stops,
                     lr_g=t.lr_g * scale, lr_d=t.lr_d * scale, lr_scale=scale,
                     lr_warmup_steps=sched.warmup_steps(global_batch), finished=finished, notes=tuple(notes),
                     warnings=tuple(warnings))


def resolved_config(cfg, plan: StartPlan):
    """The config the run trains with: the batch as the plan split it, in per-worker terms (what the
    strategies, the loader and a checkpoint's record read), data.num_workers resolved. Validated again."""
    out = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=plan.batch_per_worker,
                                                             grad_accum=plan.grad_accum, global_batch=0),
                              data=dataclasses.replace(cfg.data, num_workers=plan.num_workers),
                              model=dataclasses.replace(cfg.model), notes=list(cfg.notes))
    validate(out)
    return out

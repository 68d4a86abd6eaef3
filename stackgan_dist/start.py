"""Every check a start makes, in order, before anything is written: config against device, the run
directory's lock, data and its text_dim, the checkpoint to resume (format, model shape, crash loop), the
plan (batch split, stop rule, learning rates), the Stage-I generator, the loader's share of the data. A dry
run (``--dry-run``, the Ray driver before it starts workers) runs exactly this, so it passes if and only if
the real start passes these checks. Reads, never writes.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from .checkpoint.lock import RunLock, on_main_agreed
from .checkpoint.manager import list_checkpoints, load_file, newest_valid
from .checkpoint.restarts import RestartGuard
from .config import Config
from .data.read.cursor import cursor_after_batches
from .data.read.index import resolve_dataset
from .data.read.loader import (LoaderSpec, check_loader_plan, dataset_text_dim, first_sample_check, make_loader,
                               make_order)
from .data.text.device_text import caption_embedder
from .distributed.env import DistEnv, resolve_num_workers, unused_cuda_devices
from .distributed import refuse_cpu_amp
from .errors import CheckpointError, UserError
from .models.frozen import FrozenStage1, load_frozen_stage1
from .plan import StartPlan, make_plan, resolved_config
from .train_state import Schedule, TrainState, check_resume_compatible, read_checkpoint, saved_batch_layout

log = logging.getLogger("stackgan_dist.train")


@dataclass
class Start:
    """What the checks found, for ``Trainer.build``; ``saved`` (the checkpoint's model.pt) is dropped there
    once loaded."""
    plan: StartPlan
    cfg: Config  # resolved: the batch as planned, text_dim from the data (plan.resolved_config)
    data: object
    test_data: object
    embed_text: object
    embed_test_text: object
    state: TrainState
    schedule: Schedule
    stage1: FrozenStage1 | None = None
    stream: object = None
    loader: object = None
    saved: dict | None = None


def find_resume(run_dir: str, fresh: bool, report: bool) -> str | None:
    """The checkpoint to resume from, or None; refuses --fresh on a non-empty run directory."""
    if fresh and os.path.isdir(run_dir) and os.listdir(run_dir):
        raise UserError(f"--fresh needs an empty run directory; {run_dir} is not empty "
                        "(an existing run is never overwritten: pick another run.dir)")
    root = os.path.join(run_dir, "checkpoints")
    if not list_checkpoints(root):
        return None
    ck = newest_valid(root, report=report)
    if ck is None:
        raise CheckpointError(f"{root} holds checkpoints but none is valid (all corrupt)")
    return ck


def loader_start(cursor: dict, data, cfg: Config, world_size: int) -> tuple[dict | None, int]:
    """-> (cursor, start_batches) for make_loader. A cursor resumes at any world size or worker count; an
    older checkpoint's per-rank batches replay exactly at its layout, and become a cursor at another."""
    if not cursor:
        return None, 0
    if cursor.get("kind") != "rank_batches":
        return cursor, 0
    layout = (int(cursor.get("world_size", 1)), int(cursor.get("num_workers", 0)))
    if layout == (world_size, cfg.data.num_workers):
        return None, int(cursor.get("batches", 0))
    order = make_order(data, cfg.train.seed, cfg.data.shuffle_buffer, cfg.data.slots)
    return cursor_after_batches(order, layout[0], int(cursor.get("batch_size") or cfg.train.batch_size),
                                int(cursor.get("batches", 0))), 0


def check_start(cfg: Config, env: DistEnv, fresh: bool, dry_run: bool, lock: RunLock) -> Start:
    """``cfg`` gets its text_dim resolved from data.train's dataset.json when unset."""
    def agreed(fn) -> None:  # fn on rank 0, its outcome agreed by every rank; a dry run has no group
        if not dry_run:
            on_main_agreed(env, fn)
        elif env.is_main:
            fn()

    refuse_cpu_amp(cfg.train.precision, env.device)  # what the strategy refuses later, before reading data
    # another live run on this run.dir: refused before reading it (a dry run tests the lock, never holds it)
    agreed(lambda: lock.check(take=not dry_run))
    data = resolve_dataset(cfg.data.train, shard_url=cfg.data.shard_url, key="data.train")
    cfg.model.text_dim = dataset_text_dim(data, cfg.model.text_dim, "data.train")
    first_sample_check(data, cfg.model.text_dim, "data.train")
    test = resolve_dataset(cfg.data.test, shard_url=cfg.data.shard_url, key="data.test") if cfg.data.test else None
    if test is not None and test.num_samples == 0:
        log.info("data.test %s holds no samples: sample grids use training captions", cfg.data.test)
        test = None
    if test is not None:
        dataset_text_dim(test, cfg.model.text_dim, "data.test")
    # captions embedded on the device (sentence encoder, indexed shards); a dry run planning a device this
    # host lacks (a CUDA run planned on a login node) loads the encoder on the CPU
    edev = torch.device("cpu") if dry_run and env.device.type == "cuda" and not torch.cuda.is_available() \
        else env.device
    embed = caption_embedder(data.manifest, edev)
    same = test is not None and test.manifest.get("text_encoder") == data.manifest.get("text_encoder")
    embed_test = None if test is None else embed if same else caption_embedder(test.manifest, edev)
    resume_from = find_resume(cfg.run.dir, fresh, env.is_main)
    saved, state = None, TrainState()
    if resume_from:
        saved = load_file(os.path.join(resume_from, "model.pt"))
        state = read_checkpoint(saved, resume_from)  # its version, and contents that fit the model it declares
        check_resume_compatible(saved["model_config"], cfg, resume_from)
    schedule = Schedule.from_config(cfg, data.num_samples)
    finished = saved is not None and schedule.done(state)
    plan = make_plan(cfg, launcher=env.launcher, world_size=env.world_size, device=str(env.device),
                     num_samples=data.num_samples, num_workers=resolve_num_workers(cfg.data.num_workers),
                     resume_from=resume_from, resume_step=state.step, resume_images=state.images_seen,
                     saved_batch=saved_batch_layout(saved) if saved else None, finished=finished,
                     unused_devices=unused_cuda_devices(env.device))
    cfg = resolved_config(cfg, plan)
    # the loader's plan over the data (too small for one global batch, data.slots beyond the samples)
    check_loader_plan(data, env.world_size, cfg.train.batch_size, cfg.train.grad_accum, cfg.data.slots)
    if cfg.train.backend == "deepspeed":  # the package and a user JSON, before any process group forms
        from .distributed.deepspeed import validate_settings  # imports deepspeed only when asked for

        validate_settings(cfg)
    if resume_from:  # a crash loop is refused (read only; checked again when the run directory is claimed)
        agreed(lambda: RestartGuard(cfg.run.dir, cfg.checkpoint.max_restarts, cfg.full_hash()).check(state.step))
    start = Start(plan, cfg, data, test, embed, embed_test, state, schedule)
    if finished:  # nothing to do, and nothing is written
        return start
    if cfg.model.stage == 2:
        start.stage1 = load_frozen_stage1(saved, cfg.model.stage1_checkpoint, cfg.model.text_dim, cfg.model.z_dim)
    # this rank's share of the data, as the loader plans it (refuses a dataset too small for the readers)
    cursor, start_batches = loader_start(state.cursor, data, cfg, env.world_size)
    start.stream, start.loader = make_loader(data, LoaderSpec(
        cfg.model.stage, cfg.train.batch_size, cfg.train.seed, env.rank, env.world_size,
        resolve_num_workers(cfg.data.num_workers), cfg.data.shuffle_buffer, cfg.data.slots, cfg.train.grad_accum,
        cfg.data.prefetch_factor, pin_memory=env.device.type == "cuda", start_batches=start_batches, cursor=cursor,
        max_image_pixels=cfg.data.max_image_pixels))
    start.saved = saved
    return start

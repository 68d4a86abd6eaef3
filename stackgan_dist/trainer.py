"""The trainer: one visible build order, then the step loop with its ticks.

Build order: (process group: train.py) -> seeds -> data -> models -> wrapping, optimizers, scalers ->
checkpoint manager -> load latest -> loop. Ticks count images seen (or steps): log, samples, checkpoints,
lr decay; the stop flag and the every_minutes clock are agreed every ``train.stop_check_every`` steps in
one collective. What a checkpoint holds is ``train_state.py``'s; the sample grids are
``observability/samples.py``'s; log statistics ``observability/stats.py``'s.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from . import testing
from .checkpoint.manager import CheckpointManager, list_checkpoints, load_file, newest_valid
from .checkpoint.readers import load_newest
from .checkpoint.lock import RunLock, on_main_agreed, write_run_files
from .checkpoint.restarts import RestartGuard
from .checkpoint.signals import EXIT_REQUEUE, SignalFlag
from .config import MODEL_DEFINING_KEYS, Config, ModelConfig, kl_weight, model_defining
from .data.text.device_text import caption_embedder
from .data.read.index import resolve_dataset
from .data.read.loader import (LoaderSpec, check_loader_plan, dataset_text_dim, first_sample_check, make_loader,
                               make_order)
from .data.read.cursor import cursor_after_batches, merge_cursors
from .distributed import make_strategy, refuse_cpu_amp, unwrap
from .distributed.collectives import all_gather_object, any_flags
from .distributed.env import DistEnv, set_collective_timeout
from .distributed.seeding import rank_seed, seed_all
from .errors import CheckpointError, UserError
from .models.build import build_models, build_stage1_generator
from .losses import LossOptions
from .observability.metrics import MetricsWriter
from .observability.samples import SampleWriter
from .observability.stats import StepStats, finite_losses
from .train_state import Schedule, TrainState, model_state, rank_rng, rank_state, read_checkpoint, set_rng_state
from .train_step import GANStep

log = logging.getLogger("stackgan_dist.train")

STARTUP_STEPS = 3  # collectives of the first steps run under train.dist_startup_timeout_s


class Preempted(Exception):
    """Raised after the checkpoint a signal asked for is written; the CLI exits with ``exit_code`` (75 requeue
    me; 130 after Ctrl-C)."""

    def __init__(self, exit_code: int = EXIT_REQUEUE):
        super().__init__(exit_code)
        self.exit_code = exit_code


def load_stage1_generator(path: str, text_dim: int, z_dim: int | None = None):
    """Stage-II's frozen Stage-I generator from a Stage-I run or checkpoint. Fails early and clearly.
    Its widths and condition_dim may differ from Stage-II's; its text_dim and z_dim (Stage-II draws the
    noise Stage-I consumes) may not."""
    if not path:
        raise CheckpointError("Stage-II needs model.stage1_checkpoint (a Stage-I run or checkpoint directory)")
    try:  # the newest valid one (retried if pruned while read); version and contents checked
        ck, state, _ = load_newest(path, read_checkpoint)
    except CheckpointError as e:
        raise CheckpointError(f"model.stage1_checkpoint: {e}; set model.stage1_checkpoint to a Stage-I run "
                              "directory or checkpoint") from None
    mcfg = ModelConfig(**state["model_config"])
    if mcfg.stage != 1:
        raise CheckpointError(f"model.stage1_checkpoint {ck} is a Stage-{mcfg.stage} checkpoint, not Stage-I")
    if mcfg.text_dim != text_dim:
        raise CheckpointError(f"Stage-I checkpoint {ck} has text_dim {mcfg.text_dim}, model.text_dim is {text_dim}")
    if z_dim is not None and mcfg.z_dim != z_dim:
        raise CheckpointError(f"Stage-I checkpoint {ck} draws z of {mcfg.z_dim} dims, model.z_dim is {z_dim}: "
                              f"set model.z_dim={mcfg.z_dim} (Stage-II feeds its noise to the Stage-I generator)")
    G1 = build_stage1_generator(mcfg)
    G1.load_state_dict(state["G"])
    G1.eval().requires_grad_(False)  # frozen: eval-mode BatchNorm, out of every optimizer
    return G1, ck, mcfg


def check_resume_compatible(saved: dict, cfg: Config, ck: str) -> None:
    """The model-defining keys must match; a key the checkpoint predates counts as its default then (e.g.
    model.d_condition, added after version-1 checkpoints were written, was "text" for all of them)."""
    cur, default = model_defining(cfg), ModelConfig()
    for k in MODEL_DEFINING_KEYS:
        was = saved.get(k, getattr(default, k))
        if was != cur[k]:
            raise CheckpointError(f"cannot resume from {ck}: model.{k} changed ({was!r} -> {cur[k]!r}); "
                                  "this changes the model's shape. Use a new run.dir")


def set_backend_flags(deterministic: bool, device: torch.device) -> None:
    """TF32 for fp32 matmuls and convolutions and cuDNN autotuning on CUDA, unless runs must be bitwise."""
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def keep_global_batch(cfg: Config, saved: dict, world_size: int, ck: str) -> None:
    """A resume at another world size keeps the global batch (``train.elastic_batch=keep``, the default) by
    adjusting ``train.grad_accum`` (the per-worker batch stays), or refuses with a line naming the fix;
    ``train.elastic_batch=free`` takes the configured batch as it is. Mutates ``cfg``."""
    t = (saved.get("config") or {}).get("train") or {}
    old_ws = int(saved.get("world_size") or world_size)
    try:
        old_global = int(t["batch_size"]) * int(t.get("grad_accum", 1)) * old_ws
    except (KeyError, TypeError, ValueError):
        return
    new_global = cfg.train.batch_size * cfg.train.grad_accum * world_size
    if old_ws == world_size:  # the same layout: a batch changed in the config is the user's explicit choice
        if old_global != new_global:
            log.warning("the global batch changed in the config: %d -> %d", old_global, new_global)
        return
    if old_global == new_global or cfg.train.elastic_batch == "free":
        if old_ws != world_size:
            log.warning("world size %d -> %d: the global batch is %d (was %d)", old_ws, world_size, new_global,
                        old_global)
        return
    per_step = cfg.train.batch_size * world_size
    if old_global % per_step == 0 and cfg.train.batch_size == int(t["batch_size"]):
        accum = old_global // per_step
        log.warning("world size %d -> %d: train.grad_accum %d -> %d keeps the global batch of %d", old_ws,
                    world_size, cfg.train.grad_accum, accum, old_global)
        cfg.train.grad_accum = accum
        return
    raise UserError(f"cannot resume {ck} with a global batch of {new_global} (train.batch_size "
                    f"{cfg.train.batch_size} x grad_accum {cfg.train.grad_accum} x world size {world_size}); it was "
                    f"trained with {old_global}: choose train.batch_size and train.grad_accum so that the product "
                    f"with the world size is {old_global}, or set train.elastic_batch=free to change it")


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv, fresh: bool = False, on_checkpoint=None, dry_run: bool = False):
        self.cfg, self.env, self.fresh = cfg, env, fresh
        self.dry_run = dry_run  # check_start only: no process group, nothing written (see dry_run_checks)
        # called as on_checkpoint(path, step, env) on every rank after each committed checkpoint (the Ray
        # launcher reports it with ray.train.report, a barrier: all ranks must call it equally often)
        self.on_checkpoint = on_checkpoint
        self.run_dir = cfg.run.dir
        self.ckpt_root = os.path.join(self.run_dir, "checkpoints")
        self.hooks = testing.Hooks()
        if not dry_run:
            self.hooks.started(env.rank)

    @property
    def step(self) -> int:
        """Optimizer steps taken (``state.step``)."""
        return self.state.step

    @step.setter
    def step(self, value: int) -> None:
        self.state.step = value

    # -- build ------------------------------------------------------------------------------------
    def _check_run_dir(self) -> str | None:
        """Before anything is written: find the checkpoint to resume from, or refuse."""
        existing = list_checkpoints(self.ckpt_root)
        if self.fresh and os.path.isdir(self.run_dir) and os.listdir(self.run_dir):
            raise UserError(f"--fresh needs an empty run directory; {self.run_dir} is not empty "
                            "(an existing run is never overwritten: pick another run.dir)")
        if not existing:
            return None
        ck = newest_valid(self.ckpt_root, report=self.env.is_main)
        if ck is None:
            raise CheckpointError(f"{self.ckpt_root} holds checkpoints but none is valid (all corrupt)")
        return ck

    def _agreed(self, fn) -> None:
        """``fn`` on rank 0, its outcome agreed by every rank (lock.on_main_agreed); in a dry run (no process
        group) rank 0 runs it alone."""
        if self.dry_run:
            if self.env.is_main:
                fn()
        else:
            on_main_agreed(self.env, fn)

    def check_start(self) -> None:
        """Every check a start makes, in order, before anything is written; a dry run (``--dry-run``, the Ray
        driver before it starts workers) runs exactly this and nothing else. Resolves ``model.text_dim`` from
        data.train's dataset.json when it is unset. Reads (never writes) the run directory."""
        cfg, env = self.cfg, self.env
        refuse_cpu_amp(cfg.train.precision, env.device)  # what the strategy refuses later, before reading data
        self.lock = RunLock(self.run_dir)
        self._agreed(self.lock.check)  # another live run on this run.dir: refused before reading it
        self.finished_at = None
        # data (checked before any file is written); model.text_dim comes from it when unset
        self.data = resolve_dataset(cfg.data.train, shard_url=cfg.data.shard_url, key="data.train")
        cfg.model.text_dim = dataset_text_dim(self.data, cfg.model.text_dim, "data.train")
        first_sample_check(self.data, cfg.model.text_dim, "data.train")
        self.test_data = resolve_dataset(cfg.data.test, shard_url=cfg.data.shard_url, key="data.test") \
            if cfg.data.test else None
        if self.test_data is not None and self.test_data.num_samples == 0:
            log.info("data.test %s holds no samples: sample grids use training captions", cfg.data.test)
            self.test_data = None
        if self.test_data is not None:
            dataset_text_dim(self.test_data, cfg.model.text_dim, "data.test")
        # captions the loader passes as text, embedded here on the device (sentence encoder, indexed shards)
        self.embed_text = caption_embedder(self.data.manifest, env.device)
        self.embed_test_text = None if self.test_data is None else \
            self.embed_text if self.test_data.manifest.get("text_encoder") == self.data.manifest.get("text_encoder") \
            else caption_embedder(self.test_data.manifest, env.device)
        self.resume_from = self._check_run_dir()
        saved = self.saved = None
        self.state = TrainState()
        if self.resume_from:
            saved = self.saved = load_file(os.path.join(self.resume_from, "model.pt"))
            self.state = read_checkpoint(saved, self.resume_from)  # version, contents fit the model
            check_resume_compatible(saved["model_config"], cfg, self.resume_from)
            # a crash loop is refused (read only; checked again when the run directory is claimed)
            self._agreed(lambda: RestartGuard(self.run_dir, cfg.checkpoint.max_restarts,
                                              cfg.full_hash()).check(self.state.step))
            keep_global_batch(cfg, saved, env.world_size, self.resume_from)
        self.global_batch = cfg.train.batch_size * cfg.train.grad_accum * env.world_size
        check_loader_plan(self.data, env.world_size, cfg.train.batch_size, cfg.train.grad_accum, cfg.data.slots)
        self.schedule = Schedule.from_config(cfg, self.data.num_samples)
        if saved is not None and self.schedule.done(self.state):  # nothing to do, and nothing is written
            self.finished_at = self.state.step
            return
        self.G1, self.stage1_ref, self.stage1_cfg = None, "", None
        if cfg.model.stage == 2:
            if saved is not None and "stage1_G" in saved:
                mc = ModelConfig(**saved["stage1_model_config"])
                self.G1 = build_stage1_generator(mc)
                self.G1.load_state_dict(saved["stage1_G"])
                self.G1.eval().requires_grad_(False)
                self.stage1_ref, self.stage1_cfg = saved.get("stage1_ref", ""), mc
            else:
                self.G1, self.stage1_ref, self.stage1_cfg = load_stage1_generator(cfg.model.stage1_checkpoint,
                                                                                  cfg.model.text_dim,
                                                                                  cfg.model.z_dim)

    def build(self) -> None:
        cfg, env = self.cfg, self.env
        self.check_start()
        if self.finished_at is not None:
            return
        saved = self.saved
        # models: same initial weights on every rank
        seed_all(cfg.train.seed)
        models = build_models(cfg.model)
        if self.G1 is not None:
            self.G1 = self.G1.to(env.device)
        set_backend_flags(cfg.train.deterministic, env.device)
        # wrapping, optimizers, scalers
        self.strategy = make_strategy(cfg, env)
        self.strategy.setup(models.G, models.D)
        gen_dev = env.device if env.device.type == "cuda" else torch.device("cpu")
        self.gen = torch.Generator(device=gen_dev)
        self.gen.manual_seed(rank_seed(cfg.train.seed, env.rank))
        self.ckpt = CheckpointManager(self.run_dir, env, cfg.checkpoint.keep_last)
        self.ckpt.after_write = self.hooks.after_save_written
        if self.resume_from:
            self._load(saved)
        cursor, start_batches = self._loader_start()
        self.stream, self.loader = make_loader(self.data, LoaderSpec(
            cfg.model.stage, cfg.train.batch_size, cfg.train.seed, env.rank, env.world_size, cfg.data.num_workers,
            cfg.data.shuffle_buffer, cfg.data.slots, cfg.train.grad_accum, cfg.data.prefetch_factor,
            pin_memory=env.device.type == "cuda", start_batches=start_batches, cursor=cursor,
            max_image_pixels=cfg.data.max_image_pixels))
        self.tracker = self.stream.tracker()  # this rank's share of the loader cursor
        self.gan_step = GANStep(self.strategy, cfg.model.stage, cfg.model.z_dim, cfg.model.condition_dim,
                                kl_weight(cfg), self.G1, self.gen, cfg.train.grad_accum, cfg.train.channels_last,
                                cfg.train.color_coeff, LossOptions.from_config(cfg))
        self._start_step, self._last_sample, self._skipped_seen = self.state.step, -1, 0
        # every check passed: now, and only now, the run directory is written (lock first)
        on_main_agreed(env, self._claim_run_dir)
        self.metrics = MetricsWriter(self.run_dir, env.is_main, resume_step=self.state.step)
        self.samples = SampleWriter(self.run_dir, self.test_data or self.data, cfg.model.stage, cfg.model.text_dim,
                                    cfg.model.z_dim, cfg.model.condition_dim,
                                    self.stage1_cfg.condition_dim if self.stage1_cfg else None, cfg.train.seed,
                                    env.device, self.metrics,
                                    embed=self.embed_test_text if self.test_data else self.embed_text) \
            if env.is_main else None

    def _claim_run_dir(self) -> None:
        guard = RestartGuard(self.run_dir, self.cfg.checkpoint.max_restarts, self.cfg.full_hash()) \
            if self.resume_from else None
        if guard is not None:
            guard.check(self.step)  # a crash loop is refused before anything is written
        self.lock.acquire()
        write_run_files(self.run_dir, self.cfg)  # samples/ and config.yaml, through checkpoint/files.py
        if guard is not None:
            guard.record(self.step)

    # -- checkpoint state -------------------------------------------------------------------------
    def _loader_start(self) -> tuple[dict | None, int]:
        """-> (cursor, start_batches) for make_loader from the checkpoint's cursor.

        A cursor (samples of each slot of the epoch consumed) resumes at any world size or worker count. An
        older checkpoint kept per-rank batches at the layout that wrote it: at that layout the loader replays
        it exactly; at another, it is turned into a cursor first."""
        c, cfg = self.state.cursor, self.cfg
        if not c:
            return None, 0
        if c.get("kind") != "rank_batches":
            return c, 0
        layout = (int(c.get("world_size", 1)), int(c.get("num_workers", 0)))
        if layout == (self.env.world_size, cfg.data.num_workers):
            return None, int(c.get("batches", 0))
        order = make_order(self.data, cfg.train.seed, cfg.data.shuffle_buffer, cfg.data.slots)
        return cursor_after_batches(order, layout[0], int(c.get("batch_size") or cfg.train.batch_size),
                                    int(c.get("batches", 0))), 0

    def _cursor(self) -> dict:
        """Collective: the global cursor, every rank's consumed samples merged."""
        return merge_cursors(all_gather_object(self.tracker.state(), self.env))

    def _load(self, saved: dict) -> None:
        s = self.strategy
        unwrap(s.g.net).load_state_dict(saved["G"])
        unwrap(s.d.net).load_state_dict(saved["D"])
        s.load_state_dict(saved["strategy"])  # refuses another backend's state
        s.load_extra(os.path.join(self.resume_from, "engine"))
        if self.state.schedule and self.state.schedule != self.schedule.__dict__:
            log.info("the schedule changed since the checkpoint: %s -> %s", self.state.schedule, self.schedule.__dict__)
        rpath = os.path.join(self.resume_from, f"rank_{self.env.rank:05d}.pt")
        if saved.get("world_size") == self.env.world_size and os.path.isfile(rpath):
            set_rng_state(rank_rng(load_file(rpath)), self.gen, self.env.device)
        else:
            log.warning("world size changed (%s -> %d): model and optimizer resume, noise streams restart",
                        saved.get("world_size"), self.env.world_size)
        self.ckpt.last_saved = self.resume_from  # so a run that is already complete does not rewrite it
        if self.env.is_main:
            print(f"resumed from {self.resume_from} at step {self.state.step}", flush=True)

    def save_checkpoint(self, background: bool = False) -> str | None:
        """Collective. In the background the state is copied to CPU here and written by a thread while
        training goes on; ``commit_checkpoint`` makes it the new ``latest`` a few steps later."""
        self.commit_checkpoint()  # an earlier background save first, with its callback
        st, s = self.state, self.strategy
        st.cursor, st.schedule = self._cursor(), dict(self.schedule.__dict__)
        enc = self.data.manifest.get("text_encoder", {"name": "precomputed", "dim": self.data.text_dim})
        stage1 = (self.G1, self.stage1_cfg, self.stage1_ref) if self.G1 is not None else None
        ms = model_state(s, self.cfg, st, self.env.world_size, enc, stage1) if self.env.is_main else None
        path = self.ckpt.save(st.step, ms, rank_state(self.env.rank, self.env.world_size, self.gen, self.env.device),
                              engine_save=s.save_extra,
                              extra_manifest={"stage": self.cfg.model.stage, "config_hash": self.cfg.model_hash()},
                              background=background and s.supports_background_save)
        if path:
            log.info("checkpoint %s (%.2fs)", path, self.ckpt.last_save_s)
            if self.on_checkpoint is not None:
                self.on_checkpoint(path, st.step, self.env)
        return path

    def commit_checkpoint(self) -> None:
        path = self.ckpt.commit_pending()
        if path:
            log.info("checkpoint %s (%.2fs, written in the background)", path, self.ckpt.last_save_s)
            if self.on_checkpoint is not None:
                self.on_checkpoint(path, int(os.path.basename(path).split("_")[-1]), self.env)

    # -- ticks ------------------------------------------------------------------------------------
    def set_lrs(self) -> None:
        f = self.cfg.train.lr_decay_factor ** self.schedule.lr_factor_exponent(self.state)
        self.strategy.g.set_lr(self.cfg.train.lr_g * f)
        self.strategy.d.set_lr(self.cfg.train.lr_d * f)

    def write_samples(self) -> None:
        self._last_sample = self.state.step
        self.samples.write(self.state.step, unwrap(self.strategy.g.net), self.G1, self.strategy.autocast())

    # -- loop -------------------------------------------------------------------------------------
    def train(self) -> dict:
        if self.finished_at is not None:
            self.lock.release()
            if self.env.is_main:
                print(f"run {self.run_dir} is finished: its checkpoint {self.resume_from} is at step "
                      f"{self.finished_at} ({self.state.images_seen} images seen; train.max_steps={self.cfg.train.max_steps}, "
                      f"train.max_epochs={self.cfg.train.max_epochs}); nothing to do. Raise train.max_steps or "
                      "train.max_epochs to train further", flush=True)
            return {"stopped": "finished", "step": self.finished_at}
        cfg, env, st, sched = self.cfg, self.env, self.state, self.schedule
        flag = SignalFlag(cfg.checkpoint.signal).install()
        it = iter(self.loader)
        total = sched.total_steps(st, self.global_batch)
        self._total_steps = total
        show_bar = env.is_main and cfg.log.progress
        bar = tqdm(total=total, initial=st.step, disable=not show_bar, unit="step", dynamic_ncols=True,
                   desc=f"stage{cfg.model.stage}")
        # with the bar drawn, log lines go through tqdm.write (they would otherwise glue onto the bar)
        redirect = logging_redirect_tqdm(loggers=[logging.root, logging.getLogger("stackgan_dist")]) \
            if show_bar else contextlib.nullcontext()
        stats = StepStats()
        self._start_step = st.step
        self.bad_total = 0
        last_ckpt_time = time.monotonic()
        result = {"stopped": "max_steps"}
        # a background save is committed this many steps after it began (or at the next save, signal or end)
        commit_lag = max(1, min(10, cfg.checkpoint.every_steps // 2))
        timeout_lowered = False
        redirect.__enter__()  # left in the finally below
        try:
            while not sched.done(st):
                self.set_lrs()
                batches = [next(it) for _ in range(cfg.train.grad_accum)]
                if self.embed_text is not None:  # all micro-batches' captions in one pass, on the device
                    self.embed_text.embed_batches(batches)
                for b in batches:
                    self.tracker.update(b)
                out = self.gan_step(batches)
                before = st.images_seen
                st.advance(self.global_batch, sched.epoch_images)
                self.hooks.after_step(st.step, self.strategy, env.rank)
                self.bad_total += out.pop("bad")
                stats.add(out)
                bar.update(1)
                steps_run = st.step - self._start_step
                if not timeout_lowered and steps_run >= STARTUP_STEPS:
                    set_collective_timeout(env, cfg.train.dist_timeout_s)
                    timeout_lowered = True
                last = sched.done(st)
                if st.step % cfg.log.every_steps == 0 or last:
                    self._log(stats, bar)
                if env.is_main and sched.sample_due(st, before):
                    self.write_samples()
                due = sched.checkpoint_due(st, before)
                stop = False
                # also after the first step: a warning signal that came while the run started stops it there
                if steps_run % cfg.train.stop_check_every == 0 or steps_run == 1 or last:
                    # the one collective outside the step and the ticks: signal flag and clock together
                    late = cfg.checkpoint.every_minutes > 0 and \
                        time.monotonic() - last_ckpt_time > 60 * cfg.checkpoint.every_minutes
                    stop, late = any_flags([flag.received is not None, late], env)
                    due = due or late
                pending = self.ckpt.pending_step
                if pending is not None and not (due or stop) and st.step >= pending + commit_lag:
                    self.commit_checkpoint()  # every rank reaches this at the same step: a collective is safe
                if due or stop:
                    self.save_checkpoint(background=cfg.checkpoint.background and not stop)
                    last_ckpt_time = time.monotonic()
                if stop:
                    result = {"stopped": "signal"}
                    if env.is_main:
                        print(f"received {flag.name or 'a signal on another rank'}: checkpoint written at step "
                              f"{st.step}; exiting with {flag.exit_code} "
                              f"({'requeue' if flag.exit_code == EXIT_REQUEUE else 'interrupted'})", flush=True)
                    raise Preempted(flag.exit_code)
            self.commit_checkpoint()
            if self.ckpt.last_saved is None or not self.ckpt.last_saved.endswith(f"step_{st.step:08d}"):
                self.save_checkpoint()
            if env.is_main and self._last_sample != st.step:
                self.write_samples()  # the final grid, unless just written
        finally:
            self.ckpt.abandon_pending()  # only on an error path is anything still pending here
            bar.close()
            redirect.__exit__(None, None, None)
            flag.restore()
            self.metrics.close()
            self.lock.release()
            del it
        result["step"] = st.step
        return result

    def _log(self, stats: StepStats, bar) -> None:
        env, cfg, st = self.env, self.cfg, self.state
        steps = stats.n
        dt = time.perf_counter() - stats.t0
        s = self.strategy
        extra = {"data_skipped": float(self.bad_total), "d_skipped": s.d.skipped, "g_skipped": s.g.skipped}
        rec = stats.reduce(env, extra)
        loss_keys = sorted(stats.sums)
        for k in ("d_skipped", "g_skipped"):
            rec[k] = int(rec[k] / env.world_size)  # every rank skips the same steps
        rec["data_skipped"] = int(rec["data_skipped"])
        seen_all = (st.step - self._start_step) * self.global_batch
        rec.update({"img_per_s": steps * self.global_batch / max(dt, 1e-9), "lr_g": s.g.lr, "lr_d": s.d.lr,
                    "epoch": st.epoch, "images_seen": st.images_seen})
        sc = s.scaler_scale()
        if sc is not None:
            rec["grad_scale"] = sc
        if not finite_losses(rec, loss_keys):
            last = self.ckpt.last_saved or self.ckpt.latest_valid() or "none"
            raise UserError(f"non-finite loss at step {st.step} "
                            f"({', '.join(f'{k}={rec[k]}' for k in loss_keys)}); last good checkpoint: {last}")
        if rec["data_skipped"] > 0 and rec["data_skipped"] / max(seen_all, 1) > cfg.data.max_bad_fraction:
            raise UserError(f"{rec['data_skipped']} of {seen_all} samples failed to decode "
                            f"(> data.max_bad_fraction={cfg.data.max_bad_fraction}); stopping")
        if rec["d_skipped"] + rec["g_skipped"] > self._skipped_seen:
            self._skipped_seen = rec["d_skipped"] + rec["g_skipped"]
            log.warning("non-finite gradients: %d D and %d G steps skipped so far", rec["d_skipped"], rec["g_skipped"])
        self.metrics.log(st.step, rec)
        stats.reset()
        if env.is_main and not cfg.log.progress:  # no bar: a plain line per log tick
            log.info("step %d/%d images %d epoch %.2f d_loss %.4f g_loss %.4f kl %.4f %.1f img/s", st.step,
                     getattr(self, "_total_steps", 0), st.images_seen, st.epoch, rec["d_loss"], rec["g_loss"],
                     rec.get("kl", float("nan")), rec["img_per_s"])
        bar.set_postfix({"D": f"{rec['d_loss']:.3f}", "G": f"{rec['g_loss']:.3f}", "img/s": f"{rec['img_per_s']:.0f}"})

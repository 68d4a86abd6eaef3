"""The trainer: start checks that yield a plan, one visible build order, then the step loop and its ticks.

``check_start()`` runs every check a start makes, reading (never writing) data and run directory, and
returns the frozen StartPlan (plan.py) that ``--dry-run`` prints. ``build()`` consumes it: seeds -> models ->
wrapping, optimizers, scalers -> checkpoint manager -> load (the checkpoint dict dropped after) -> loader ->
claim the run directory. ``train()`` is the loop; what is due after a step is ``ticks.py``'s, what a
checkpoint holds ``train_state.py``'s, log statistics ``observability/stats.py``'s.
"""
from __future__ import annotations

import contextlib
import logging
import os

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from . import testing
from .checkpoint.lock import RunLock, on_main_agreed, write_run_files
from .checkpoint.manager import CheckpointManager, load_file
from .checkpoint.restarts import RestartGuard
from .checkpoint.signals import EXIT_REQUEUE, SignalFlag
from .config import Config, kl_weight
from .data.read.cursor import merge_cursors
from .distributed.collectives import all_gather_object
from .distributed.env import DistEnv, set_backend_flags, set_collective_timeout, under_batch_system
from .distributed.seeding import rank_seed, seed_all
from .distributed import make_strategy, unwrap
from .errors import Preempted
from .losses import LossOptions
from .models.build import build_models
from .observability.logging import resume_hint, show_progress, user_log
from .observability.metrics import MetricsWriter
from .observability.samples import SampleWriter
from .observability.stats import LogTick, StepStats
from .plan import StartPlan
from .start import check_start
from .ticks import Ticks
from .train_state import TrainState, model_state, rank_rng, rank_state, set_rng_state
from .train_step import GANStep

log = logging.getLogger("stackgan_dist.train")


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
        self.lock = RunLock(self.run_dir)
        self.plan: StartPlan | None = None
        self.state, self.schedule = TrainState(), None
        self.data = self.test_data = self.embed_text = self.embed_test_text = None
        self.stage1 = None  # Stage-II: models.frozen.FrozenStage1
        self._resume: dict | None = None  # the checkpoint's model.pt, from check_start until build() loads it
        self.stream = self.loader = self.tracker = None
        self.strategy = self.gen = self.ckpt = self.gan_step = self.metrics = self.samples = None
        self.last_sample_step, self.last_checkpoint_step, self.bad_total = -1, None, 0
        if not dry_run:
            self.hooks.started(env.rank)

    @property
    def step(self) -> int:
        """Optimizer steps taken (``state.step``)."""
        return self.state.step

    @step.setter
    def step(self, value: int) -> None:
        self.state.step = value

    def check_start(self) -> StartPlan:
        """Every check a start makes (start.py), nothing written; after it ``self.cfg`` is the resolved
        config the run trains with. -> the plan a dry run prints."""
        s = check_start(self.cfg, self.env, self.fresh, self.dry_run, self.lock)
        self.cfg, self.plan, self.state, self.schedule, self.stage1 = s.cfg, s.plan, s.state, s.schedule, s.stage1
        self.data, self.test_data, self.embed_text, self.embed_test_text = s.data, s.test_data, s.embed_text, \
            s.embed_test_text
        self.stream, self.loader, self._resume = s.stream, s.loader, s.saved
        return s.plan

    # -- build ------------------------------------------------------------------------------------
    def build(self) -> None:
        plan = self.check_start()
        cfg, env = self.cfg, self.env
        for line in plan.banner() if env.is_main else ():
            log.info("%s", line)
        for w in plan.warnings if env.is_main else ():  # once, on rank 0
            log.warning("%s", w)
        if plan.finished:
            return
        seed_all(cfg.train.seed)  # the same initial weights on every rank
        models = build_models(cfg.model)
        if self.stage1 is not None:
            self.stage1.G1.to(env.device)
        set_backend_flags(cfg.train.deterministic, env.device)
        self.strategy = make_strategy(cfg, env)
        self.strategy.setup(models.G, models.D)
        self.gen = torch.Generator(device=env.device if env.device.type == "cuda" else torch.device("cpu"))
        self.gen.manual_seed(rank_seed(cfg.train.seed, env.rank))
        self.ckpt = CheckpointManager(self.run_dir, env, cfg.checkpoint.keep_last)
        self.ckpt.after_write = self.hooks.after_save_written
        if plan.resume_from:
            self._load(self._resume, plan.resume_from)
        self._resume = None  # G, D and both Adam states live in the strategy now, not twice in host memory
        self.tracker = self.stream.tracker()  # this rank's share of the loader cursor
        G1 = self.stage1.G1 if self.stage1 else None
        self.gan_step = GANStep(self.strategy, cfg.model.stage, cfg.model.z_dim, cfg.model.condition_dim,
                                kl_weight(cfg), G1, self.gen, cfg.train.grad_accum, cfg.train.channels_last,
                                cfg.train.color_coeff, LossOptions.from_config(cfg))
        on_main_agreed(env, self._claim_run_dir)  # every check passed: now, and only now, the run dir is written
        self.metrics = MetricsWriter(self.run_dir, env.is_main, resume_step=self.state.step)
        s1 = self.stage1.model_config.condition_dim if self.stage1 else None
        self.samples = SampleWriter(self.run_dir, self.test_data or self.data, cfg.model.stage, cfg.model.text_dim,
                                    cfg.model.z_dim, cfg.model.condition_dim, s1, cfg.train.seed, env.device,
                                    self.metrics, embed=self.embed_test_text if self.test_data else self.embed_text) \
            if env.is_main else None

    def _claim_run_dir(self) -> None:
        resumed = self.plan.resume_from is not None
        guard = RestartGuard(self.run_dir, self.cfg.checkpoint.max_restarts, self.cfg.full_hash()) if resumed else None
        if guard is not None:
            guard.check(self.step)  # a crash loop is refused before anything is written
        self.lock.acquire()
        write_run_files(self.run_dir, self.cfg)  # samples/ and config.yaml, never through a link
        if guard is not None:
            guard.record(self.step)

    # -- checkpoint state -------------------------------------------------------------------------
    def _load(self, saved: dict, ck: str) -> None:
        s = self.strategy
        unwrap(s.g.net).load_state_dict(saved["G"])
        unwrap(s.d.net).load_state_dict(saved["D"])
        s.load_state_dict(saved["strategy"])  # refuses another backend's state
        s.load_extra(os.path.join(ck, "engine"))
        if self.state.schedule and self.state.schedule != self.schedule.__dict__:
            log.info("the schedule changed since the checkpoint: %s -> %s", self.state.schedule, self.schedule.__dict__)
        rpath = os.path.join(ck, f"rank_{self.env.rank:05d}.pt")
        if saved.get("world_size") == self.env.world_size and os.path.isfile(rpath):
            set_rng_state(rank_rng(load_file(rpath)), self.gen, self.env.device)
        else:
            log.warning("world size changed (%s -> %d): model and optimizer resume, noise streams restart",
                        saved.get("world_size"), self.env.world_size)
        self.ckpt.last_saved, self.last_checkpoint_step = ck, self.state.step  # a finished run is not rewritten
        user_log.info("resumed from %s at step %d", ck, self.state.step)

    def save_checkpoint(self, background: bool = False) -> str | None:
        """Collective. In the background the state is copied to CPU here and written by a thread while
        training goes on; ``commit_pending`` makes it the new ``latest`` a few steps later."""
        self.commit_pending()  # an earlier background save first, with its callback
        st, s, env = self.state, self.strategy, self.env
        st.cursor = merge_cursors(all_gather_object(self.tracker.state(), env))  # collective
        st.schedule = dict(self.schedule.__dict__)
        enc = self.data.manifest.get("text_encoder", {"name": "precomputed", "dim": self.data.text_dim})
        stage1 = (self.stage1.G1, self.stage1.model_config, self.stage1.ref) if self.stage1 else None
        ms = model_state(s, self.cfg, st, env.world_size, enc, stage1) if env.is_main else None
        path = self.ckpt.save(st.step, ms, rank_state(env.rank, env.world_size, self.gen, env.device),
                              engine_save=s.save_extra,
                              extra_manifest={"stage": self.cfg.model.stage, "config_hash": self.cfg.model_hash()},
                              background=background and s.supports_background_save)
        if path:
            self.last_checkpoint_step = st.step
            log.info("checkpoint %s (%.2fs)", path, self.ckpt.last_save_s)
            if self.on_checkpoint is not None:
                self.on_checkpoint(path, st.step, env)
        return path

    def commit_pending(self) -> int | None:
        """Collective: commits a background save still pending. -> its step, or None if none was pending."""
        step = self.ckpt.pending_step
        path = self.ckpt.commit_pending()
        if not path:
            return None
        self.last_checkpoint_step = step
        log.info("checkpoint %s (%.2fs, written in the background)", path, self.ckpt.last_save_s)
        if self.on_checkpoint is not None:
            self.on_checkpoint(path, step, self.env)
        return step

    def write_samples(self) -> None:
        self.last_sample_step = self.state.step
        G1 = self.stage1.G1 if self.stage1 else None
        self.samples.write(self.state.step, unwrap(self.strategy.g.net), G1, self.strategy.autocast())

    # -- loop -------------------------------------------------------------------------------------
    def _finished(self) -> dict:
        t = self.cfg.train
        user_log.info("run %s is finished: its checkpoint %s is at step %d (%d images seen; train.max_steps=%d, "
                      "train.max_epochs=%g); nothing to do. Raise train.max_steps or train.max_epochs to train "
                      "further", self.run_dir, self.plan.resume_from, self.state.step, self.state.images_seen,
                      t.max_steps, t.max_epochs)
        self.lock.release()
        return {"stopped": "finished", "step": self.state.step}

    def train(self) -> dict:
        if self.plan.finished:
            return self._finished()
        cfg, env, st, sched, plan = self.cfg, self.env, self.state, self.schedule, self.plan
        gb, start = plan.global_batch, st.step
        bar_on = show_progress(cfg.log.progress, env.is_main, under_batch_system())
        tick_log = LogTick(env, self.metrics, gb, plan.total_steps, cfg.data.max_bad_fraction, plain=not bar_on)
        with contextlib.ExitStack() as stack:
            stack.callback(self.lock.release)
            stack.callback(self.metrics.close)
            flag = SignalFlag(cfg.checkpoint.signal).install()
            stack.callback(flag.restore)
            bar = stack.enter_context(tqdm(total=plan.total_steps, initial=st.step, disable=not bar_on, unit="step",
                                           dynamic_ncols=True, desc=f"stage{cfg.model.stage}"))
            if bar_on:  # log lines through tqdm.write (they would otherwise glue onto the bar)
                stack.enter_context(logging_redirect_tqdm(loggers=[logging.root, logging.getLogger("stackgan_dist")]))
            stack.callback(self.ckpt.abandon_pending)  # first on the way out: only an error leaves one pending
            ticks, stats, it = Ticks(cfg, sched, env, flag, start), StepStats(), [iter(self.loader)]
            stack.callback(it.clear)  # the loader's workers end with their iterator
            while not sched.done(st):
                f = sched.lr_factor(st, cfg.train.lr_decay_factor, gb)
                self.strategy.g.set_lr(plan.lr_g * f)
                self.strategy.d.set_lr(plan.lr_d * f)
                batches = [next(it[0]) for _ in range(cfg.train.grad_accum)]
                if self.embed_text is not None:  # all micro-batches' captions in one pass, on the device
                    self.embed_text.embed_batches(batches)
                for b in batches:
                    self.tracker.update(b)
                out = self.gan_step(batches)
                before = st.images_seen
                st.advance(gb, sched.epoch_images)
                self.hooks.after_step(st.step, self.strategy, env.rank)
                self.bad_total += out.pop("bad")
                stats.add(out)
                bar.update(1)
                due = ticks.after_step(st, before, self.ckpt.pending_step)
                if due.lower_timeout:
                    set_collective_timeout(env, cfg.train.dist_timeout_s)
                if due.log:
                    rec = tick_log(stats, self.strategy, self.bad_total, st, st.step - start,
                                   lambda: self.ckpt.last_saved or self.ckpt.latest_valid() or "none")
                    bar.set_postfix({"D": f"{rec['d_loss']:.3f}", "G": f"{rec['g_loss']:.3f}",
                                     "img/s": f"{rec['img_per_s']:.0f}"})
                if env.is_main and due.sample:
                    self.write_samples()
                if due.commit:
                    self.commit_pending()  # every rank reaches this at the same step: a collective is safe
                if due.checkpoint or due.stop:
                    self.save_checkpoint(background=cfg.checkpoint.background and not due.stop)
                    ticks.checkpointed()
                if due.stop:
                    self._stop(flag)
            self.commit_pending()
            if self.last_checkpoint_step != st.step:
                self.save_checkpoint()
            if env.is_main and self.last_sample_step != st.step:
                self.write_samples()  # the final grid, unless just written
        self._summary()
        return {"stopped": "max_steps", "step": st.step}

    def _stop(self, flag) -> None:
        how = "the scheduler requeues the job, or run " if flag.exit_code == EXIT_REQUEUE else "resume with: "
        user_log.info("received %s: checkpoint written at step %d; exiting with %d (%s); %s%s",
                      flag.name or "a signal on another rank", self.state.step, flag.exit_code,
                      "requeue" if flag.exit_code == EXIT_REQUEUE else "interrupted", how,
                      resume_hint(self.run_dir))
        raise Preempted(flag.exit_code)

    def _summary(self) -> None:
        last = self.ckpt.last_saved or "none"
        user_log.info("done: step %d, %d images seen (epoch %d); final checkpoint %s; sample grid %s; plots: "
                      "stackgan report %s", self.state.step, self.state.images_seen, self.state.epoch, last,
                      os.path.join(self.run_dir, "samples", f"step_{self.last_sample_step:08d}.png"), self.run_dir)

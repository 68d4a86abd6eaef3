"""The trainer: one visible build order, then the step loop with its ticks.

Build order: process group -> seeds -> data -> models -> wrapping, optimizers, scalers ->
checkpoint manager -> load latest -> loop. Ticks (log, samples, checkpoints, lr decay) count steps.
"""
from __future__ import annotations

import logging
import math
import os
import time

import torch
from tqdm import tqdm

from .checkpoint.manager import (CheckpointManager, load_file, numpy_state_from_safe, numpy_state_to_safe,
                                 resolve_checkpoint, to_cpu)
from .checkpoint.lock import RunLock, on_main_agreed
from .checkpoint.restarts import RestartGuard
from .checkpoint.signals import EXIT_REQUEUE, SignalFlag
from .config import MODEL_DEFINING_KEYS, Config, ModelConfig, kl_weight, model_defining
from .data.loader import first_sample_check, make_loader, resolve_dataset
from .distributed.env import DistEnv, all_reduce_max
from .distributed.seeding import rank_seed, seed_all
from .distributed.wrap import make_strategy, unwrap
from .errors import CheckpointError, UserError
from .models.build import build_models, build_stage1_generator
from .observability.images import make_grid, save_png, to_uint8
from .observability.metrics import MetricsWriter
from .train_step import GANStep

log = logging.getLogger("stackgan_dist.train")


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
    try:
        ck = resolve_checkpoint(path)
    except CheckpointError as e:
        raise CheckpointError(f"model.stage1_checkpoint: {e}; set model.stage1_checkpoint to a Stage-I run "
                              "directory or checkpoint") from None
    state = load_file(os.path.join(ck, "model.pt"))
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
    cur = model_defining(cfg)
    for k in MODEL_DEFINING_KEYS:
        if saved.get(k) != cur[k]:
            raise CheckpointError(f"cannot resume from {ck}: model.{k} changed ({saved.get(k)!r} -> {cur[k]!r}); "
                                  "this changes the model's shape. Use a new run.dir")


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv, fresh: bool = False, on_checkpoint=None):
        self.cfg, self.env, self.fresh = cfg, env, fresh
        # called as on_checkpoint(path, step, env) on every rank after each committed checkpoint (the Ray
        # launcher reports it with ray.train.report, a barrier: all ranks must call it equally often)
        self.on_checkpoint = on_checkpoint
        self.run_dir = cfg.run.dir
        self.ckpt_root = os.path.join(self.run_dir, "checkpoints")

    # -- build ------------------------------------------------------------------------------------
    def _check_run_dir(self) -> str | None:
        """Before anything is written: find the checkpoint to resume from, or refuse."""
        from .checkpoint.manager import list_checkpoints, newest_valid

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

    def build(self) -> None:
        cfg, env = self.cfg, self.env
        self.lock = RunLock(self.run_dir)
        on_main_agreed(env, self.lock.check)  # another live run on this run.dir: refused before reading it
        self.finished_at = None
        self.resume_from = self._check_run_dir()
        saved_model = None
        if self.resume_from:
            saved_model = load_file(os.path.join(self.resume_from, "model.pt"))
            check_resume_compatible(saved_model["model_config"], cfg, self.resume_from)
            if int(saved_model["step"]) >= cfg.train.max_steps:  # nothing to do, and nothing is written
                self.finished_at = int(saved_model["step"])
                return
        # data (checked before any file is written)
        self.data = resolve_dataset(cfg.data.train)
        first_sample_check(self.data, cfg.model.text_dim)
        self.test_data = resolve_dataset(cfg.data.test) if cfg.data.test else None
        # models: same initial weights on every rank
        seed_all(cfg.train.seed)
        models = build_models(cfg.model)
        self.G1 = None
        self.stage1_ref = ""
        if cfg.model.stage == 2:
            if saved_model is not None and "stage1_G" in saved_model:
                mc = ModelConfig(**saved_model["stage1_model_config"])
                self.G1 = build_stage1_generator(mc)
                self.G1.load_state_dict(saved_model["stage1_G"])
                self.G1.eval().requires_grad_(False)
                self.stage1_ref, self.stage1_cfg = saved_model.get("stage1_ref", ""), mc
            else:
                self.G1, self.stage1_ref, self.stage1_cfg = load_stage1_generator(cfg.model.stage1_checkpoint,
                                                                                  cfg.model.text_dim,
                                                                                  cfg.model.z_dim)
            self.G1 = self.G1.to(env.device)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif env.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        # wrapping, optimizers, scalers
        self.strategy = make_strategy(cfg, env)
        self.strategy.setup(models.G, models.D)
        gen_dev = env.device if env.device.type == "cuda" else torch.device("cpu")
        self.gen = torch.Generator(device=gen_dev)
        self.gen.manual_seed(rank_seed(cfg.train.seed, env.rank))
        self.step = 0
        self.rank_state_loaded = None
        self.ckpt = CheckpointManager(self.run_dir, env, cfg.checkpoint.keep_last)
        if self.resume_from:
            self._load(saved_model)
        self.stream, self.loader = make_loader(
            self.data, cfg.model.stage, cfg.train.batch_size, cfg.train.seed, env.rank, env.world_size,
            cfg.data.num_workers, cfg.data.shuffle_buffer, start_batches=self.step * cfg.train.grad_accum,
            prefetch_factor=cfg.data.prefetch_factor, pin_memory=env.device.type == "cuda")
        self.gan_step = GANStep(self.strategy, cfg.model.stage, cfg.model.z_dim, cfg.model.condition_dim,
                                kl_weight(cfg), self.G1, self.gen, cfg.train.grad_accum, cfg.train.channels_last,
                                cfg.train.color_coeff)
        self._fixed = None
        # every check passed: now, and only now, the run directory is written (lock first)
        on_main_agreed(env, self._claim_run_dir)
        self.metrics = MetricsWriter(self.run_dir, env.is_main, resume_step=self.step)

    def _claim_run_dir(self) -> None:
        guard = RestartGuard(self.run_dir, self.cfg.checkpoint.max_restarts, self.cfg.full_hash()) \
            if self.resume_from else None
        if guard is not None:
            guard.check(self.step)  # a crash loop is refused before anything is written
        self.lock.acquire()
        os.makedirs(os.path.join(self.run_dir, "samples"), exist_ok=True)
        self.cfg.dump(os.path.join(self.run_dir, "config.yaml"))
        if guard is not None:
            guard.record(self.step)

    # -- checkpoint state -------------------------------------------------------------------------
    def model_state(self) -> dict:
        s = self.strategy
        st = {"G": unwrap(s.G_module).state_dict(), "D": unwrap(s.D_module).state_dict(), "step": self.step,
              "epoch": self.step * self.cfg.train.grad_accum // self.stream.batches_per_epoch,
              "strategy": s.state_dict(), "model_config": model_defining(self.cfg) | {
                  "stage1_checkpoint": self.cfg.model.stage1_checkpoint},
              "config": self.cfg.to_dict(), "config_hash": self.cfg.model_hash(),
              "text_encoder": self.data.manifest.get("text_encoder", {"name": "precomputed",
                                                                       "dim": self.data.text_dim}),
              "world_size": self.env.world_size}
        if self.G1 is not None:
            st["stage1_G"] = self.G1.state_dict()
            st["stage1_model_config"] = {k: getattr(self.stage1_cfg, k) for k in MODEL_DEFINING_KEYS}
            st["stage1_ref"] = self.stage1_ref
        return to_cpu(st)

    def rank_state(self) -> dict:
        import random

        import numpy as np

        st = {"rank": self.env.rank, "world_size": self.env.world_size, "step": self.step,
              "batches_consumed": self.step * self.cfg.train.grad_accum, "num_workers": self.cfg.data.num_workers,
              "noise_gen": self.gen.get_state().cpu(), "torch_cpu": torch.get_rng_state(),
              "python": list(random.getstate()[1]), "python_version": random.getstate()[0],
              "numpy": numpy_state_to_safe(np.random.get_state())}
        if torch.cuda.is_available():
            st["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
        return st

    def _load(self, saved: dict) -> None:
        import random

        import numpy as np

        s = self.strategy
        unwrap(s.G_module).load_state_dict(saved["G"])
        unwrap(s.D_module).load_state_dict(saved["D"])
        s.load_state_dict(saved["strategy"])
        if hasattr(s, "load_engines"):  # DeepSpeed: optimizer partitions and fp32 masters live in engine/
            s.load_engines(os.path.join(self.resume_from, "engine"))
        self.step = int(saved["step"])
        rpath = os.path.join(self.resume_from, f"rank_{self.env.rank:05d}.pt")
        if saved.get("world_size") == self.env.world_size and os.path.isfile(rpath):
            r = load_file(rpath)
            if r["num_workers"] != self.cfg.data.num_workers:
                log.warning("data.num_workers changed (%d -> %d): the data order after resume differs from an "
                            "uninterrupted run", r["num_workers"], self.cfg.data.num_workers)
            self.gen.set_state(r["noise_gen"].to(self.gen.get_state().device))
            torch.set_rng_state(r["torch_cpu"])
            random.setstate((r["python_version"], tuple(r["python"]), None))
            np.random.set_state(numpy_state_from_safe(r["numpy"]))
            if "cuda" in r and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(r["cuda"])
        else:
            log.warning("world size changed (%s -> %d): model and optimizer resume, noise streams restart",
                        saved.get("world_size"), self.env.world_size)
        self.ckpt.last_saved = self.resume_from  # so a run that is already complete does not rewrite it
        if self.env.is_main:
            print(f"resumed from {self.resume_from} at step {self.step}", flush=True)

    def save_checkpoint(self, background: bool = False) -> str | None:
        """Collective. In the background the state is copied to CPU here and written by a thread while
        training goes on; ``commit_checkpoint`` makes it the new ``latest`` a few steps later."""
        self.commit_checkpoint()  # an earlier background save first, with its callback
        path = self.ckpt.save(self.step, self.model_state() if self.env.is_main else None, self.rank_state(),
                              engine_save=getattr(self.strategy, "save_engines", None),
                              extra_manifest={"stage": self.cfg.model.stage, "config_hash": self.cfg.model_hash()},
                              background=background)
        if path:
            log.info("checkpoint %s (%.2fs)", path, self.ckpt.last_save_s)
            if self.on_checkpoint is not None:
                self.on_checkpoint(path, self.step, self.env)
        return path

    def commit_checkpoint(self) -> None:
        path = self.ckpt.commit_pending()
        if path:
            log.info("checkpoint %s (%.2fs, written in the background)", path, self.ckpt.last_save_s)
            if self.on_checkpoint is not None:
                self.on_checkpoint(path, int(os.path.basename(path).split("_")[-1]), self.env)

    # -- ticks ------------------------------------------------------------------------------------
    def lr_at(self, step: int, base: float) -> float:
        d = self.cfg.train.lr_decay_steps
        return base * (self.cfg.train.lr_decay_factor ** (step // d)) if d else base

    def _fixed_inputs(self):
        """Fixed captions (from the test split when given) and fixed noise for the sample grids."""
        if self._fixed is None:
            info = self.test_data or self.data
            ds, _ = make_loader(info, self.cfg.model.stage, 8, 0, num_workers=0, shuffle_buffer=1, train=False) \
                if info.num_samples >= 8 else (None, None)
            text = next(ds.slot_batches(0, 0))["text"] if ds else torch.zeros(8, self.cfg.model.text_dim)
            g = torch.Generator().manual_seed(self.cfg.train.seed + 12345)
            n = text.shape[0]
            noise = {"z": torch.randn(n, self.cfg.model.z_dim, generator=g),
                     "eps": torch.zeros(n, self.cfg.model.condition_dim),
                     "eps1": torch.zeros(n, getattr(getattr(self, "stage1_cfg", None), "condition_dim",
                                                    self.cfg.model.condition_dim))}
            self._fixed = (text.to(self.env.device), {k: v.to(self.env.device) for k, v in noise.items()})
        return self._fixed

    @torch.no_grad()
    def write_samples(self) -> None:
        text, noise = self._fixed_inputs()
        G = unwrap(self.strategy.G_module)
        was = G.training
        G.eval()
        with self.strategy.autocast():
            if self.cfg.model.stage == 1:
                img, _, _ = G(text, noise["z"], noise["eps"])
                rows = [to_uint8(img)]
            else:
                s0, _, _ = self.G1(text, noise["z"], noise["eps1"])
                img, _, _ = G(text, s0, noise["eps"])
                rows = [to_uint8(s0), to_uint8(img)]
        G.train(was)
        grid = make_grid(rows, size=rows[-1].shape[1])
        save_png(grid, os.path.join(self.run_dir, "samples", f"step_{self.step:08d}.png"))
        self.metrics.image(self.step, "samples", grid)

    # -- loop -------------------------------------------------------------------------------------
    def train(self) -> dict:
        if self.finished_at is not None:
            self.lock.release()
            if self.env.is_main:
                print(f"run {self.run_dir} is finished: its checkpoint {self.resume_from} is at step "
                      f"{self.finished_at} (train.max_steps={self.cfg.train.max_steps}); nothing to do. Raise "
                      "train.max_steps to train further", flush=True)
            return {"stopped": "finished", "step": self.finished_at}
        cfg, env, s = self.cfg, self.env, self.strategy
        flag = SignalFlag(cfg.checkpoint.signal).install()
        it = iter(self.loader)
        bar = tqdm(total=cfg.train.max_steps, initial=self.step, disable=not (env.is_main and cfg.log.progress),
                   unit="step", dynamic_ncols=True, desc=f"stage{cfg.model.stage}")
        acc: dict = {}
        n_acc, bad_total, seen_total = 0, 0, 0
        t_log, last_ckpt_time = time.perf_counter(), time.monotonic()
        steps_since_log = 0
        global_batch = cfg.train.batch_size * cfg.train.grad_accum * env.world_size
        result = {"stopped": "max_steps"}
        # test hook: slows every step so that a test can land a kill or a signal between two given steps
        step_delay = float(os.environ.get("STACKGAN_TEST_STEP_DELAY_S", "0") or 0)
        # a background save is committed this many steps after it began (or at the next save, signal or end)
        commit_lag = max(1, min(10, cfg.checkpoint.every_steps // 2))
        try:
            while self.step < cfg.train.max_steps:
                for k in ("g", "d"):
                    s.set_lr(k, self.lr_at(self.step, cfg.train.lr_g if k == "g" else cfg.train.lr_d))
                batches = [next(it) for _ in range(cfg.train.grad_accum)]
                out = self.gan_step(batches)
                self.step += 1
                s.write_digest(self.step)  # test hook; a no-op unless STACKGAN_TEST_DIGEST_DIR is set
                steps_since_log += 1
                bad_total += out.pop("bad")
                seen_total += cfg.train.batch_size * cfg.train.grad_accum
                for k, v in out.items():
                    acc[k] = acc[k] + v if k in acc else v
                n_acc += 1
                bar.update(1)
                if step_delay > 0:
                    time.sleep(step_delay)
                if self.step % cfg.log.every_steps == 0 or self.step == cfg.train.max_steps:
                    self._log(acc, n_acc, steps_since_log, t_log, global_batch, bad_total, seen_total, bar)
                    acc, n_acc, steps_since_log, t_log = {}, 0, 0, time.perf_counter()
                if env.is_main and self.step % cfg.log.sample_every == 0:
                    self.write_samples()
                due = self.step % cfg.checkpoint.every_steps == 0
                if cfg.checkpoint.every_minutes > 0:
                    due = due or all_reduce_max(
                        float(time.monotonic() - last_ckpt_time > 60 * cfg.checkpoint.every_minutes), env) > 0
                stop = all_reduce_max(float(flag.received is not None), env) > 0
                pending = self.ckpt.pending_step
                if pending is not None and not (due or stop) and self.step >= pending + commit_lag:
                    self.commit_checkpoint()  # every rank reaches this at the same step: a collective is safe
                if due or stop:
                    self.save_checkpoint(background=cfg.checkpoint.background and not stop)
                    last_ckpt_time = time.monotonic()
                if stop:
                    result = {"stopped": "signal"}
                    if env.is_main:
                        print(f"received {flag.name or 'a signal on another rank'}: checkpoint written at step "
                              f"{self.step}; exiting with {flag.exit_code} "
                              f"({'requeue' if flag.exit_code == EXIT_REQUEUE else 'interrupted'})", flush=True)
                    raise Preempted(flag.exit_code)
            self.commit_checkpoint()
            if self.ckpt.last_saved is None or not self.ckpt.last_saved.endswith(f"step_{self.step:08d}"):
                self.save_checkpoint()
            if env.is_main and self.step % cfg.log.sample_every != 0:  # the final grid, unless just written
                self.write_samples()
        finally:
            self.ckpt.abandon_pending()  # only on an error path is anything still pending here
            bar.close()
            flag.restore()
            self.metrics.close()
            self.lock.release()
            del it
        result["step"] = self.step
        return result

    def _log(self, acc, n_acc, steps, t0, global_batch, bad_total, seen_total, bar) -> None:
        env, cfg = self.env, self.cfg
        keys = sorted(acc)
        vec = torch.stack([acc[k].float() / n_acc for k in keys] + [torch.tensor(float(bad_total), device=acc[keys[0]].device)])
        if env.distributed:
            import torch.distributed as dist

            dist.all_reduce(vec)
            vec[:-1] /= env.world_size
        vals = vec.tolist()
        rec = {k: v for k, v in zip(keys, vals[:-1])}
        bad_all = vals[-1]
        seen_all = seen_total * env.world_size
        dt = time.perf_counter() - t0
        rec.update({"img_per_s": steps * global_batch / max(dt, 1e-9), "lr_g": self.strategy.lrs()["g"],
                    "lr_d": self.strategy.lrs()["d"], "data_skipped": int(bad_all),
                    "epoch": self.step * cfg.train.grad_accum // self.stream.batches_per_epoch})
        sc = self.strategy.scaler_scale()
        if sc is not None:
            rec["grad_scale"] = sc
        if not all(math.isfinite(v) for v in vals[:-1]):
            last = self.ckpt.last_saved or self.ckpt.latest_valid() or "none"
            raise UserError(f"non-finite loss at step {self.step} ({', '.join(f'{k}={v}' for k, v in rec.items() if isinstance(v, float))}); "
                            f"last good checkpoint: {last}")
        if bad_all > 0 and bad_all / max(seen_all, 1) > cfg.data.max_bad_fraction:
            raise UserError(f"{int(bad_all)} of {seen_all} samples failed to decode "
                            f"(> data.max_bad_fraction={cfg.data.max_bad_fraction}); stopping")
        self.metrics.log(self.step, rec)
        bar.set_postfix({"D": f"{rec['d_loss']:.3f}", "G": f"{rec['g_loss']:.3f}", "img/s": f"{rec['img_per_s']:.0f}"})

"""DeepSpeed strategy: one engine for G, one for D; ZeRO stage 0/1/2; bf16/fp16 on CUDA.

Why the GAN needs care here:
- DeepSpeed #4923: with ZeRO-2 and two engines where one loss runs through the other model (G's
  loss through D), D's gradient hooks fire during G's backward and corrupt D's partitioned
  gradient buffers ("gradient computed twice" / wrong reductions). Workaround: in G's phase D's
  parameters have ``requires_grad=False`` and the *unwrapped* D (``engine.module``) is called, so no
  D hook ever fires outside D's own backward; D's engine only ever sees D's loss. (``GANStep``
  already does this for DDP; ``D_eval`` below points at the engine's module.)
- DeepSpeed PR #8035: under ZeRO-2 a non-finite gradient can reach Adam unchecked (bf16 by default
  skips the check in older releases, fp32 never checks), turning Adam's moments into NaN for good.
  Guard: ``check_grad_overflow`` is switched on for every ZeRO optimizer (fp32 included), so DeepSpeed
  all-reduces an overflow flag and skips the step on every rank; at ZeRO-0 we check the (already
  all-reduced) gradients ourselves and drop them so Adam skips every parameter. Skips are counted.
- Gradient accumulation: ``GANStep`` divides each micro-batch loss by ``grad_accum`` itself, so
  ``backward(scale_wrt_gas=False)``; the boundary is set explicitly per micro-batch.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint.engine_files import SafeLoadingEngine
from ..errors import CheckpointError, UserError
from .wrap import BufferSync, Strategy, convert_sync_batchnorm, make_adam, refuse_cpu_amp

log = logging.getLogger("stackgan_dist.distributed")

# keys of a user's DeepSpeed JSON that our YAML owns: a conflicting value is an error, not a silent override
OWNED = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_ds_config(cfg, world_size: int) -> dict:
    """The DeepSpeed JSON config, generated from our YAML or read from ``train.deepspeed_config``."""
    t = cfg.train
    ours = {"train_micro_batch_size_per_gpu": t.batch_size, "gradient_accumulation_steps": t.grad_accum,
            "train_batch_size": t.batch_size * t.grad_accum * world_size}
    if t.deepspeed_config:
        try:
            with open(t.deepspeed_config) as f:
                ds = json.load(f)
        except OSError as e:
            raise UserError(f"train.deepspeed_config: cannot read {t.deepspeed_config} ({e.strerror})") from None
        except ValueError as e:
            raise UserError(f"train.deepspeed_config: {t.deepspeed_config} is not valid JSON ({e})") from None
        if not isinstance(ds, dict):
            raise UserError(f"train.deepspeed_config: {t.deepspeed_config} must hold a JSON object")
        for k in ("optimizer", "scheduler"):
            if k in ds:
                raise UserError(f"train.deepspeed_config: remove '{k}' from {t.deepspeed_config}; the optimizers "
                                "and the learning-rate schedule come from train.* (one Adam per engine)")
        for k, v in ours.items():
            if k in ds and ds[k] != v:
                raise UserError(f"train.deepspeed_config: {k}={ds[k]} in {t.deepspeed_config} disagrees with "
                                f"train.* ({v}; global batch = batch_size x grad_accum x world size)")
        zs = ds.get("zero_optimization", {}).get("stage", t.zero_stage)
        if zs != t.zero_stage:
            raise UserError(f"train.deepspeed_config: zero_optimization.stage={zs} disagrees with "
                            f"train.zero_stage={t.zero_stage}")
        for key, name in (("bf16", "bf16"), ("fp16", "fp16")):
            en = bool(ds.get(key, {}).get("enabled", False))
            if en != (t.precision == name):
                raise UserError(f"train.deepspeed_config: {key}.enabled={en} disagrees with "
                                f"train.precision={t.precision}")
    else:
        ds = {"zero_optimization": {"stage": t.zero_stage, "overlap_comm": False, "contiguous_gradients": True,
                                    "reduce_bucket_size": 5e7, "allgather_bucket_size": 5e7},
              "gradient_clipping": 0.0, "steps_per_print": 10**9, "wall_clock_breakdown": False}
        if t.precision == "bf16":
            ds["bf16"] = {"enabled": True}
        elif t.precision == "fp16":
            ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                          "hysteresis": 2, "min_loss_scale": 1}
    ds = dict(ds)
    ds.update(ours)
    ds.setdefault("zero_optimization", {})["stage"] = t.zero_stage
    if t.precision == "bf16":
        ds["bf16"] = dict(ds.get("bf16", {}), enabled=True, check_grad_overflow=True)  # PR #8035
    ds["zero_allow_untested_optimizer"] = True
    return ds


class DeepSpeedStrategy(Strategy):
    name = "deepspeed"

    def setup(self, G: nn.Module, D: nn.Module) -> None:
        cfg, env = self.cfg, self.env
        refuse_cpu_amp(self.precision, self.device)
        if cfg.train.compile:
            raise UserError("train.compile is not supported with train.backend=deepspeed; use the ddp backend")
        try:
            import deepspeed
        except ImportError:
            raise UserError("train.backend=deepspeed needs the deepspeed package (pip install deepspeed)") from None
        if not dist.is_initialized():
            # DeepSpeed needs a process group even for one process; ours is private and torn down with the run
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo", rank=0, world_size=1,
                                    init_method=f"tcp://127.0.0.1:{_free_port()}")
            env.owns_group = True
        # DeepSpeed's sanity check wants LOCAL_RANK in the environment (a plain process, Ray, srun: not set)
        os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
        G, D = G.to(self.device), D.to(self.device)
        if cfg.train.channels_last:
            # DeepSpeed broadcasts and flattens parameters as contiguous byte views ("self.stride(-1) must
            # be 1 to view Float as Byte" on NHWC weights): the models stay NCHW, the images go in NHWC
            log.info("train.channels_last with DeepSpeed: parameters stay contiguous (NCHW), inputs are NHWC")
        if cfg.model.sync_bn and env.distributed:
            G, D = convert_sync_batchnorm(G, self.device), convert_sync_batchnorm(D, self.device)
        self.ds_config = build_ds_config(cfg, env.world_size)
        betas = (cfg.train.beta1, cfg.train.beta2)
        self.engine = {}
        for k, m, lr in (("g", G, cfg.train.lr_g), ("d", D, cfg.train.lr_d)):
            opt = make_adam(m.parameters(), lr, betas, self.device, cfg.train.optimizer)
            eng, _opt, _, _ = deepspeed.initialize(model=m, optimizer=opt, config=dict(self.ds_config),
                                                   dist_init_required=False)
            zopt = eng.optimizer
            if hasattr(zopt, "check_grad_overflow"):
                zopt.check_grad_overflow = True  # PR #8035: skip (on every rank) instead of poisoning Adam
            self.engine[k] = eng
        self.G, self.D = self.engine["g"], self.engine["d"]
        self.G_module, self.D_module = self.engine["g"].module, self.engine["d"].module
        self.D_eval = self.D_module  # #4923: G's loss never goes through D's engine
        self._sync_buffers = BufferSync((self.G_module, self.D_module), env)
        self._boundary = {"g": True, "d": True}

    # -- step hooks --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def no_sync(self, which: str):
        """Marks a micro-batch that is not the last one of the accumulation window."""
        eng = self.engine[which]
        eng.set_gradient_accumulation_boundary(False)
        self._boundary[which] = False
        try:
            yield
        finally:
            eng.set_gradient_accumulation_boundary(True)

    def backward(self, which: str, loss: torch.Tensor) -> None:
        eng = self.engine[which]
        eng.backward(loss, scale_wrt_gas=False)  # GANStep already divided by grad_accum
        if not self._boundary[which]:
            eng.step()  # not a boundary: only advances DeepSpeed's micro-step counter
            self._boundary[which] = True

    def _zero0_grads_finite(self, eng) -> bool:
        grads = [p.grad for p in eng.module.parameters() if p.grad is not None]
        bad = torch.zeros(1, device=self.device)
        if grads:
            bad += (~torch.stack([torch.isfinite(g).all() for g in grads]).all()).float()
        if self.env.distributed:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bad.item() == 0

    def step(self, which: str) -> None:
        eng = self.engine[which]
        zero0_fp32 = eng.zero_optimization_stage() == 0 and self.precision == "fp32"
        if zero0_fp32 and not self._zero0_grads_finite(eng):
            for p in eng.module.parameters():
                p.grad = None  # Adam skips parameters without gradients: a clean skip, state untouched
            skipped = True
        else:
            skipped = False
        eng.step()
        skipped = skipped or bool(getattr(eng.optimizer, "overflow", False))
        if skipped:
            self.skipped_steps[which] += 1
            log.warning("rank %d: non-finite %s gradients, step skipped", self.env.rank, which.upper())
        eng.zero_grad()

    def after_step(self) -> None:
        if not self.cfg.model.sync_bn:
            self._sync_buffers()  # DeepSpeed does not touch BN buffers: keep them identical like DDP

    # -- learning rate -----------------------------------------------------------------------------
    def lrs(self) -> dict:
        return {k: e.optimizer.param_groups[0]["lr"] for k, e in self.engine.items()}

    def set_lr(self, which: str, lr: float) -> None:
        for g in self.engine[which].optimizer.param_groups:
            g["lr"] = lr

    def scaler_scale(self) -> float | None:
        if self.precision != "fp16":
            return None
        return float(getattr(self.engine["g"].optimizer, "loss_scale", 0.0) or 0.0)

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Small, in model.pt; the optimizer shards live in the checkpoint's ``engine/`` folder."""
        return {"backend": "deepspeed", "zero_stage": self.cfg.train.zero_stage, "world_size": self.env.world_size,
                "precision": self.precision, "skipped": dict(self.skipped_steps)}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("backend") != "deepspeed":
            raise CheckpointError("cannot resume a train.backend=ddp checkpoint with train.backend=deepspeed "
                                  "(optimizer state formats differ); use the backend it was saved with")
        for key, cur in (("zero_stage", self.cfg.train.zero_stage), ("world_size", self.env.world_size)):
            if sd.get(key) != cur:
                raise CheckpointError(f"cannot resume this DeepSpeed checkpoint: {key} changed ({sd.get(key)} -> "
                                      f"{cur}); its optimizer state is partitioned for the old value")
        self.skipped_steps.update(sd.get("skipped", {}))

    def save_engines(self, path: str) -> None:
        """Collective: every rank writes its optimizer partition. Called by CheckpointManager.save."""
        for k, eng in self.engine.items():
            eng.save_checkpoint(path, tag=k.upper(), save_latest=False)

    def load_engines(self, path: str) -> None:
        for k, eng in self.engine.items():
            if not os.path.isdir(os.path.join(path, k.upper())):
                raise CheckpointError(f"DeepSpeed engine state {os.path.join(path, k.upper())} missing")
            SafeLoadingEngine.wrap(eng)  # DeepSpeed's own engine loads with weights_only=False
            load_path, _ = eng.load_checkpoint(path, tag=k.upper(), load_optimizer_states=True,
                                               load_lr_scheduler_states=False, load_module_strict=True)
            if load_path is None:
                raise CheckpointError(f"DeepSpeed could not load engine state from {path}/{k.upper()}")

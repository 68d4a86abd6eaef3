"""DeepSpeed strategy: one engine for G, one for D; ZeRO stage 0/1/2; bf16/fp16 on CUDA.

Why the GAN needs care here:
- DeepSpeed #4923: with ZeRO-2 and two engines where one loss runs through the other model (G's
  loss through D), D's gradient hooks fire during G's backward and corrupt D's partitioned
  gradient buffers ("gradient computed twice" / wrong reductions). Workaround: in G's phase D's
  parameters have ``requires_grad=False`` and D's ``unsynced`` module (``engine.module``) is called, so no
  D hook ever fires outside D's own backward; D's engine only ever sees D's loss. (``GANStep``'s
  ``g_step`` does this for every backend.)
- DeepSpeed PR #8035: under ZeRO-2 a non-finite gradient can reach Adam unchecked (bf16 by default
  skips the check in older releases, fp32 never checks), turning Adam's moments into NaN for good.
  Guard: ``check_grad_overflow`` is switched on for every ZeRO optimizer (fp32 included), so DeepSpeed
  all-reduces an overflow flag and skips the step on every rank; at ZeRO-0 fp32 we check the (already
  all-reduced) gradients ourselves and hand the flag to fused Adam's ``found_inf`` (decided on the
  device). Skips are counted per phase.
- The process group comes from ``env.init_distributed(need_group=True)``, also for one process;
  ``validate_settings`` runs in config validation, before any group forms.
- Gradient accumulation: ``GANStep`` divides each micro-batch loss by ``grad_accum`` itself, so
  ``backward(scale_wrt_gas=False)``; the boundary is set explicitly per micro-batch.
- Mixed precision (``fp32_module_contract`` below): DeepSpeed's own ``bf16``/``fp16`` modes are never
  switched on. Since 0.19.2 they cast parameters but not buffers (``data_types.buffer_dtype`` unset), so
  every BatchNorm would get bf16 weights next to fp32 running statistics, which batch norm refuses
  ("expected scalar type BFloat16 but found Float", on CPU and in the CUDA NCHW kernels; DeepSpeed keeps
  weights NCHW, so step 1 fails). Casting the buffers too (``buffer_dtype``) would keep running statistics
  in bf16 (8 bits of mantissa for a 0.1-momentum average that eval-mode sampling reads) and change what a
  checkpoint holds. Instead the engine keeps fp32 weights, buffers, gradients and reductions, and computes
  under ``torch.autocast`` through DeepSpeed's ``torch_autocast`` section (>= 0.17.2; the engine's own
  forward runs under it, and an outer autocast alone would be switched off inside the engine). This is the
  DDP path's contract: batch norm and SyncBatchNorm see the AMP mixed case (bf16/fp16 input, fp32
  weight/bias/running statistics) that their kernels dispatch as "mixed type". Gradients are reduced in
  fp32 (``lower_precision_safe_modules: []``), as DDP does. fp16 needs a loss scale: DeepSpeed gives the
  ``torch_autocast`` path a GradScaler at ZeRO-0 (>= 0.18.0), but at ZeRO-1/2 its optimizer skips an
  overflowing step before that scaler sees it, so the scale never falls: fp16 with ZeRO-1/2 is refused.
- ``distributed.*``: ``comm_hook=fp16|bf16`` is DeepSpeed's ``communication_data_type`` (the one exception to
  fp32 reductions above, asked for explicitly), ``bucket_cap_mb`` its ZeRO ``reduce_bucket_size``; PowerSGD
  and ``static_graph`` are DDP's and refused here by config validation (``_comm_options``).
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os

import torch
import torch.distributed as dist
from torch import nn

from ..errors import CheckpointError, UserError
from .amp import nonfinite_flag
from .deepspeed_files import SafeLoadingEngine
from .strategy import Phase, Strategy

log = logging.getLogger("stackgan_dist.distributed")

# keys of a user's DeepSpeed JSON that our YAML owns: a conflicting value is an error, not a silent override
OWNED = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")


def validate_settings(cfg) -> None:
    """The DeepSpeed settings, checked by config validation before any process group forms: the package
    is importable, the options we do not support with it are off, and a user JSON agrees with train.*
    (everything except the world size, which only the launcher knows)."""
    t = cfg.train
    if t.compile:
        raise UserError("train.compile is not supported with train.backend=deepspeed; use the ddp backend")
    if importlib.util.find_spec("deepspeed") is None:
        raise UserError("train.backend=deepspeed needs the deepspeed package (pip install deepspeed)")
    build_ds_config(cfg, None)


def build_ds_config(cfg, world_size: int | None) -> dict:
    """The DeepSpeed JSON config, generated from our YAML or read from ``train.deepspeed_config``.
    ``world_size=None``: validation only (the global batch is left out)."""
    t = cfg.train
    ours = {"train_micro_batch_size_per_gpu": t.batch_size, "gradient_accumulation_steps": t.grad_accum}
    if world_size is not None:
        ours["train_batch_size"] = t.batch_size * t.grad_accum * world_size
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
        for key in ("bf16", "fp16"):
            sec = ds.get(key, {})
            if not isinstance(sec, dict) or sec.get("enabled", False) not in (False, "false"):
                raise UserError(f"train.deepspeed_config: remove '{key}' from {t.deepspeed_config}; precision "
                                f"comes from train.precision (torch autocast over fp32 weights: DeepSpeed's {key} "
                                "mode casts BatchNorm weights but not their running statistics)")
        if "torch_autocast" in ds and ds["torch_autocast"] != autocast_section(t.precision):
            raise UserError(f"train.deepspeed_config: remove 'torch_autocast' from {t.deepspeed_config}; it is "
                            f"generated from train.precision={t.precision}")
        for k, v in (ds.get("data_types") or {}).items():
            if k in ("param_dtype", "buffer_dtype", "grad_accum_dtype") and v not in (None, "fp32", "float32"):
                raise UserError(f"train.deepspeed_config: data_types.{k}={v} in {t.deepspeed_config}: weights, "
                                "buffers and gradients stay fp32 (train.precision sets the compute dtype)")
    else:
        ds = {"zero_optimization": {"stage": t.zero_stage, "overlap_comm": False, "contiguous_gradients": True,
                                    "reduce_bucket_size": 5e7, "allgather_bucket_size": 5e7},
              "gradient_clipping": 0.0, "steps_per_print": 10**9, "wall_clock_breakdown": False}
    if t.precision == "fp16" and t.zero_stage > 0:
        raise UserError("train.precision=fp16 with train.backend=deepspeed needs train.zero_stage=0 (at ZeRO-1/2 "
                        "DeepSpeed skips an overflowing fp16 step before its loss scaler can lower the scale); "
                        "use train.precision=bf16, or train.backend=ddp for fp16")
    ds = dict(ds)
    ds.update(ours)
    ds.setdefault("zero_optimization", {})["stage"] = t.zero_stage
    # the dtype contract (module docstring): DeepSpeed's casting modes off, fp32 everywhere it stores
    # anything, bf16/fp16 only as autocast compute
    ds["bf16"], ds["fp16"] = {"enabled": False}, {"enabled": False}
    ds["data_types"] = dict(ds.get("data_types") or {}, grad_accum_dtype="fp32")
    ds.pop("torch_autocast", None)
    if t.precision != "fp32":
        ds["torch_autocast"] = autocast_section(t.precision)
    ds["zero_allow_untested_optimizer"] = True
    _comm_options(cfg, ds)
    return ds


def _comm_options(cfg, ds: dict) -> None:
    """``distributed.*`` in DeepSpeed's terms (config validation refused powersgd and static_graph already):
    comm_hook fp16/bf16 -> ``communication_data_type`` (gradients cast for the reduction only, like DDP's
    compress hooks; weights, buffers and the optimizer stay fp32); bucket_cap_mb -> ZeRO-1/2's
    ``reduce_bucket_size`` in elements of fp32 (ZeRO-0 reduces in DeepSpeed's own fixed 5e8-element buffers).
    A value that a user JSON sets differently is an error, not a silent override."""
    t, d = cfg.train, cfg.distributed
    src = t.deepspeed_config
    if d.comm_hook in ("fp16", "bf16"):
        if src and ds.get("communication_data_type") not in (None, d.comm_hook):
            raise UserError(f"train.deepspeed_config: communication_data_type={ds['communication_data_type']} in "
                            f"{src} disagrees with distributed.comm_hook={d.comm_hook}")
        ds["communication_data_type"] = d.comm_hook
    if d.bucket_cap_mb > 0:
        n = int(d.bucket_cap_mb * 2**20 / 4)
        zo = ds.setdefault("zero_optimization", {})
        if src and zo.get("reduce_bucket_size") not in (None, n):
            raise UserError(f"train.deepspeed_config: zero_optimization.reduce_bucket_size={zo['reduce_bucket_size']}"
                            f" in {src} disagrees with distributed.bucket_cap_mb={d.bucket_cap_mb:g} ({n} elements)")
        zo["reduce_bucket_size"] = n


def autocast_section(precision: str) -> dict:
    """DeepSpeed's ``torch_autocast`` config for bf16/fp16 compute over fp32 weights. No module's gradients
    are marked lower-precision-safe: DeepSpeed then reduces every gradient in fp32, as DDP does."""
    return {"enabled": True, "dtype": {"bf16": "bfloat16", "fp16": "float16"}[precision],
            "lower_precision_safe_modules": []}


def fp32_module_contract(module: nn.Module) -> list[str]:
    """Names of parameters and floating buffers that are not fp32 (the contract: none). A BatchNorm with
    bf16 weights and fp32 running statistics (DeepSpeed's bf16 mode) fails in forward and backward."""
    bad = [n for n, p in module.named_parameters() if p.dtype != torch.float32]
    bad += [n for n, b in module.named_buffers() if b.is_floating_point() and b.dtype != torch.float32]
    return bad


class DSPhase(Phase):
    """A phase over one DeepSpeed engine: the engine owns backward, gradient reduction and the step."""

    def __init__(self, name, engine, device, precision: str, env):
        super().__init__(name, engine, engine.module, engine.optimizer, device)  # unsynced: engine.module too
        self.engine = engine
        self.precision = precision
        self.env = env
        self._boundary = True

    @contextlib.contextmanager
    def no_sync(self):
        """Marks a micro-batch that is not the last one of the accumulation window."""
        self.engine.set_gradient_accumulation_boundary(False)
        self._boundary = False
        try:
            yield
        finally:
            self.engine.set_gradient_accumulation_boundary(True)

    def backward(self, loss: torch.Tensor) -> None:
        eng = self.engine
        eng.backward(loss, scale_wrt_gas=False)  # GANStep already divided by grad_accum
        if not self._boundary:
            eng.step()  # not a boundary: only advances DeepSpeed's micro-step counter
            self._boundary = True

    def step(self) -> None:
        eng = self.engine
        scaler = getattr(eng, "torch_autocast_z0_gradscaler", None)  # fp16 (ZeRO-0): GradScaler.step skips on inf
        if eng.zero_optimization_stage() == 0 and self.precision != "fp16":
            # ZeRO-0 without a loss scaler (fp32, bf16 autocast): DeepSpeed checks nothing. The gradients are
            # already all-reduced; the flag is all-reduced too (a NaN on one rank only must skip on all) and the
            # skip decided on the device
            params = list(eng.module.parameters())
            found = nonfinite_flag(params)
            if self.env.distributed:
                dist.all_reduce(found, op=dist.ReduceOp.MAX)
            inner = eng.optimizer  # at ZeRO-0 fp32 the engine steps our torch Adam itself
            if getattr(inner, "_step_supports_amp_scaling", False):
                inner.grad_scale, inner.found_inf = None, found  # fused Adam skips on the device
                try:
                    eng.step()
                finally:
                    del inner.grad_scale, inner.found_inf
            else:  # e.g. apex FusedAdam: decided on the host (this backend and optimizer only)
                if bool(found):
                    for p in params:
                        p.grad = None  # Adam skips parameters without gradients: state untouched
                eng.step()
            self.skipped += found
        else:
            scale = scaler.get_scale() if scaler is not None else None
            eng.step()
            # DeepSpeed's own (host) overflow flag; with fp16 the scale falls exactly when a step was skipped
            if bool(getattr(eng.optimizer, "overflow", False)) or (scaler is not None and scaler.get_scale() < scale):
                self.skipped += 1
                log.warning("rank %d: non-finite %s gradients, step skipped", self.env.rank, self.name.upper())
        eng.zero_grad()

    @property
    def lr(self) -> float:
        return self.engine.optimizer.param_groups[0]["lr"]

    def set_lr(self, lr: float) -> None:
        for g in self.engine.optimizer.param_groups:
            g["lr"] = lr


class DeepSpeedStrategy(Strategy):
    name = "deepspeed"
    # the engines write their files with collectives of their own, in the calling thread
    supports_background_save = False
    # DeepSpeed broadcasts and flattens parameters as contiguous byte views ("self.stride(-1) must be 1 to view
    # Float as Byte" on NHWC weights): the networks stay NCHW, the images go in NHWC
    channels_last_weights = False

    def _wrap(self, G: nn.Module, D: nn.Module) -> tuple[Phase, Phase]:
        cfg, env = self.cfg, self.env
        import deepspeed  # validate_settings checked it is installed

        if not dist.is_initialized():
            raise RuntimeError("DeepSpeed needs a process group: init_distributed(need_group=True) forms it")
        if cfg.train.channels_last:
            log.info("train.channels_last with DeepSpeed: parameters stay contiguous (NCHW), inputs are NHWC")
        self.ds_config = build_ds_config(cfg, env.world_size)
        phases = {}
        for k, m, lr in (("g", G, cfg.train.lr_g), ("d", D, cfg.train.lr_d)):
            eng, _opt, _, _ = deepspeed.initialize(model=m, optimizer=self._adam(m, lr), config=dict(self.ds_config),
                                                   dist_init_required=False)
            bad = fp32_module_contract(eng.module)
            if bad:
                raise UserError(f"DeepSpeed left {k.upper()}'s {', '.join(bad[:4])} in a dtype other than fp32; "
                                "weights and BatchNorm buffers must stay fp32 (remove bf16/fp16/data_types "
                                "settings from train.deepspeed_config)")
            zopt = eng.optimizer
            if hasattr(zopt, "check_grad_overflow") and self.precision != "fp16":
                # PR #8035: skip (on every rank) instead of poisoning Adam. Not with fp16 (ZeRO-0 only): there
                # the engine's GradScaler finds the inf, skips and lowers the scale
                zopt.check_grad_overflow = True
            phases[k] = DSPhase(k, eng, self.device, self.precision, env)
        return phases["g"], phases["d"]

    def scaler_scale(self) -> float | None:
        if self.precision != "fp16":
            return None
        scaler = getattr(self.g.engine, "torch_autocast_z0_gradscaler", None)  # fp16 runs at ZeRO-0 only
        return float(scaler.get_scale()) if scaler is not None else None

    # -- state -------------------------------------------------------------------------------------
    def _state(self) -> dict:
        """Small, in model.pt; the optimizer shards live in the checkpoint's ``engine/`` folder."""
        return {"zero_stage": self.cfg.train.zero_stage, "world_size": self.env.world_size,
                "precision": self.precision}

    def _load(self, sd: dict) -> None:
        for key, cur in (("zero_stage", self.cfg.train.zero_stage), ("world_size", self.env.world_size)):
            if sd.get(key) != cur:
                raise CheckpointError(f"cannot resume this DeepSpeed checkpoint: {key} changed ({sd.get(key)} -> "
                                      f"{cur}); its optimizer state is partitioned for the old value")

    def save_extra(self, path: str) -> None:
        """Collective: every rank writes its optimizer partition into ``path`` (the checkpoint's engine/)."""
        for p in self.phases:
            p.engine.save_checkpoint(path, tag=p.name.upper(), save_latest=False)

    def load_extra(self, path: str) -> None:
        for p in self.phases:
            sub = os.path.join(path, p.name.upper())
            if not os.path.isdir(sub):
                raise CheckpointError(f"DeepSpeed engine state {sub} missing")
            SafeLoadingEngine.wrap(p.engine)  # DeepSpeed's own engine loads with weights_only=False
            load_path, _ = p.engine.load_checkpoint(path, tag=p.name.upper(), load_optimizer_states=True,
                                                    load_lr_scheduler_states=False, load_module_strict=True)
            if load_path is None:
                raise CheckpointError(f"DeepSpeed could not load engine state from {sub}")

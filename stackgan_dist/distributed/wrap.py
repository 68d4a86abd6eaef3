"""How models are wrapped, how each phase's backward and optimizer step run, how optimizer state is saved.

The backend boundary: the trainer and the GAN step talk to a ``Strategy`` and its two ``Phase`` objects
(``strategy.d`` and ``strategy.g``); every strategy has the same complete interface (state, extra files,
background saving, backend tag), so nothing outside this package asks which backend runs.

DDP policy for a GAN (pytorch#175024: two forwards through a DDP module with BatchNorm before one
backward fail with ``broadcast_buffers=True`` since PyTorch 2.6):
- G and D are wrapped separately with ``broadcast_buffers=False``; D is called twice in its phase
  (real with right and wrong text in one call, then fake), and its gradients are reduced once, at
  the one backward of the summed loss.
- In G's phase, D's parameters are frozen and the *unwrapped* D is called, so D's reducer never
  fires and G's loss through D reduces only G's gradients.
- BatchNorm running statistics: see ``batchnorm.py`` (averaged after every step, or global-batch BN).
- The frozen Stage-I generator is never wrapped.

Gradient communication (``distributed.*``, ``comm_hook_for``): a compression hook (fp16/bf16 casts, PowerSGD),
the bucket size and DDP's static graph, on each of the two DDP modules (each its own hook state). Hooks run
only when a module's reducer fires: never under ``no_sync`` (accumulation micro-batches keep their local
gradients; the hook sees the accumulated sum once) and never in G's phase for D (unwrapped D). PowerSGD's
error feedback and warm-start memory are per-rank state that is not checkpointed: a resumed (or resized) run
starts with plain all-reduce for ``powersgd_start_step`` steps again, then fresh error feedback; a step the
guard skips clears that state too (it would carry the NaN into every later step), and with fp16 loss scaling a
change of the scale rescales the error it keeps (``rescale_powersgd_error``). On CPU (gloo) PowerSGD
runs one bucket at a time (``_one_bucket_at_a_time``: torch's hook deadlocks gloo with two in flight).

The non-finite guard decides on the device: the optimizer step is skipped through fused Adam's
``found_inf`` input (the path GradScaler uses), so a step never waits for the host to read a flag.
"""
from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from ..errors import CheckpointError, UserError
from .batchnorm import BufferSync, convert_sync_batchnorm
from .env import DistEnv

log = logging.getLogger("stackgan_dist.distributed")


def unwrap(m: nn.Module) -> nn.Module:
    while True:
        if hasattr(m, "module") and isinstance(m.module, nn.Module):
            m = m.module
        elif hasattr(m, "_orig_mod"):
            m = m._orig_mod
        else:
            return m


def refuse_cpu_amp(precision: str, device: torch.device) -> None:
    if precision != "fp32" and device.type != "cuda":
        raise UserError(f"train.precision={precision} needs CUDA: on CPU bf16/fp16 autocast is ~30x slower than "
                        "fp32 here, so it is refused rather than silently slow; use train.precision=fp32")


def set_requires_grad(m: nn.Module, flag: bool) -> None:
    for p in m.parameters():
        p.requires_grad_(flag)


def amp_dtype(precision: str):
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def make_adam(params, lr: float, betas: tuple, device: torch.device, kind: str = "adam", foreach: bool = True):
    """``foreach=False`` (train.adam_foreach): torch.optim.Adam with torch's defaults, as the authors call it."""
    if kind == "apex_fused_adam":
        try:
            from apex.optimizers import FusedAdam  # optional: apex is not on PyPI
        except ImportError:
            raise UserError("train.optimizer=apex_fused_adam needs NVIDIA apex, which is not importable here; "
                            "use train.optimizer=adam (fused on CUDA)") from None
        return FusedAdam(params, lr=lr, betas=betas)
    if not foreach:  # torch.optim.Adam with its defaults, as the authors call it (the "authors" preset)
        return torch.optim.Adam(params, lr=lr, betas=betas)
    # fused on CPU too: its found_inf input lets the non-finite guard skip a step without a host sync
    return torch.optim.Adam(params, lr=lr, betas=betas, fused=True)


def _no_forward_buffer_sync() -> dict:
    """DDP must not broadcast buffers in forward (pytorch#175024). torch >= 2.13 names it
    ``forward_sync_buffers`` (buffers are still broadcast once at construction: harmless, they are equal)."""
    import inspect

    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def nonfinite_flag(params) -> torch.Tensor:
    """1.0 on the device when any gradient holds inf/nan (or its L2 norm overflows), else 0.0. One fused read
    of all gradients (isfinite per tensor took ~40 ms a check at the paper's Stage-I widths on CPU)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=params[0].device if params else "cpu")
    return (~torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()).float()


def guarded_step(opt: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """``opt.step()`` unless ``found_inf`` (a device tensor) is 1, decided on the device.

    Fused optimizers take ``found_inf`` themselves (parameters, moments and step counters untouched when
    set). Any other optimizer steps, then its parameters and state are put back where ``found_inf`` is set
    (``torch.where``: no host read either, at the cost of one copy of the state)."""
    if getattr(opt, "_step_supports_amp_scaling", False):
        opt.grad_scale, opt.found_inf = None, found_inf
        try:
            opt.step()
        finally:
            del opt.grad_scale, opt.found_inf
        return
    tensors = [p for g in opt.param_groups for p in g["params"]]
    tensors += [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    before = [t.detach().clone() for t in tensors]
    opt.step()
    # state created by this step (a first step) has no "before": zero is the fresh state
    tensors2 = [p for g in opt.param_groups for p in g["params"]]
    tensors2 += [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    before += [torch.zeros_like(t) for t in tensors2[len(before):]]
    with torch.no_grad():
        for t, b in zip(tensors2, before):
            t.copy_(torch.where(found_inf.bool(), b.to(t.dtype), t))


def _one_bucket_at_a_time(hook):
    """``hook`` run to completion inside the call (the returned future is already done). gloo runs a future's
    continuations on its few worker threads, and torch's PowerSGD issues its second and third all-reduce from
    continuations that block on them: with two buckets in flight the ranks issued those collectives in
    different orders, or ran out of threads, and deadlocked (seen here at two buckets per module). CUDA
    futures run continuations in stream order, so only CPU runs pay this: PowerSGD's communication does not
    overlap the backward on CPU."""

    def one_bucket_hook(state, bucket):
        done = torch.futures.Future()
        done.set_result(hook(state, bucket).wait())
        return done

    return one_bucket_hook


def comm_hook_for(dcfg, process_group=None, serialize: bool = False):
    """-> (hook, state) for ``DistributedDataParallel.register_comm_hook``, or None for the built-in fp32
    all-reduce. fp16/bf16: torch's compress hooks (the bucket cast down, all-reduced, cast back to fp32; the
    optimizer sees fp32 gradients). powersgd: torch's PowerSGD with error feedback and warm start, a new state
    per module (its buckets and error memory are the module's own)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    if dcfg.comm_hook == "none":
        return None
    if dcfg.comm_hook == "fp16":
        return default_hooks.fp16_compress_hook, process_group
    if dcfg.comm_hook == "bf16":
        return _bf16_compress, process_group
    if dcfg.comm_hook == "powersgd":
        state = powerSGD_hook.PowerSGDState(process_group=process_group,
                                            matrix_approximation_rank=dcfg.powersgd_rank,
                                            start_powerSGD_iter=dcfg.powersgd_start_step,
                                            use_error_feedback=True, warm_start=True)
        return (_one_bucket_at_a_time(powerSGD_hook.powerSGD_hook) if serialize else powerSGD_hook.powerSGD_hook), state
    raise UserError(f"distributed.comm_hook={dcfg.comm_hook!r} is not one of none, fp16, bf16, powersgd")


def _bf16_compress(process_group, bucket):  # no annotations: DDP compares them with its own objects
    """torch's ``bf16_compress_hook`` under another name: DDP refuses that name unless CUDA with NCCL >= 2.10
    (a check written for old NCCL); gloo reduces bf16 as well, so CPU runs and the tests run the same hook."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    return default_hooks.bf16_compress_hook(process_group, bucket)


def ddp_comm_kwargs(dcfg) -> dict:
    """DistributedDataParallel keyword arguments from ``distributed.*`` (only those set: torch's defaults stay)."""
    kw = {}
    if dcfg.bucket_cap_mb > 0:
        kw["bucket_cap_mb"] = dcfg.bucket_cap_mb
    if dcfg.static_graph:
        kw["static_graph"] = True
    return kw


def reset_powersgd(state) -> None:
    """Forget PowerSGD's error feedback and warm-start memory (rebuilt at the next synced backward: zero error,
    fresh random Q drawn from the state's own seeded stream, equal on every rank since every rank skips)."""
    state.error_dict.clear()
    state.p_memory_dict.clear()
    state.q_memory_dict.clear()


def rescale_powersgd_error(state, factor: float) -> None:
    """After the loss scale changed by ``factor``: the next step's gradients are scaled by the new scale, so the
    error PowerSGD kept (the part of the last scaled gradients its approximation left out) is rescaled with them;
    without this a scale growth halves, a backoff doubles, what error feedback adds back."""
    if factor != 1.0:
        for e in state.error_dict.values():
            e.mul_(factor)


class Phase:
    """One side of the GAN update: the module the step calls (maybe wrapped), the unwrapped module, its
    optimizer and scaler, and how backward, gradient sync and the optimizer step run on this backend.

    ``skipped`` counts steps dropped for non-finite gradients, on the device (read at log time)."""

    def __init__(self, name: str, module: nn.Module, raw: nn.Module, optimizer, device: torch.device):
        self.name = name
        self.module = module
        self.raw = raw
        self.optimizer = optimizer
        self.scaler = None
        self.skipped = torch.zeros((), device=device)

    def no_sync(self):
        """Around a micro-batch that is not the last of the accumulation window."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr


class DDPPhase(Phase):
    def __init__(self, name, module, raw, optimizer, device, scaler=None, powersgd=None):
        super().__init__(name, module, raw, optimizer, device)
        self.scaler = scaler
        self.powersgd = powersgd  # PowerSGDState of this module's hook, or None
        inner = getattr(module, "_orig_mod", module)  # torch.compile keeps the DDP wrapper inside
        self._ddp = inner if isinstance(inner, nn.parallel.DistributedDataParallel) else None

    def no_sync(self):
        # DDP decides in forward whether the next backward all-reduces: no_sync covers both
        return self._ddp.no_sync() if self._ddp is not None else contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def step(self) -> None:
        opt = self.optimizer
        if self.scaler is not None:
            # PowerSGD's error feedback is kept in units of the loss scale it was computed at: read the scale
            # before and after the update (host reads, only with PowerSGD, whose hook already synchronises)
            before = self.scaler.get_scale() if self.powersgd is not None else None
            self.scaler.step(opt)  # unscales and skips on inf/nan (sync-free with a fused optimizer)
            found = sum(v.float() for v in self.scaler._found_inf_per_device(opt).values())
            self.skipped += found
            self.scaler.update()
            if before is not None:
                rescale_powersgd_error(self.powersgd, self.scaler.get_scale() / before)
        else:
            # DDP already all-reduced the gradients: a NaN on any rank is a NaN on all, so all skip
            found = nonfinite_flag([p for g in opt.param_groups for p in g["params"]])
            guarded_step(opt, found)
            self.skipped += found
        # a host read, only with PowerSGD (whose hook already synchronizes the device for every bucket): its
        # error feedback now holds the non-finite gradient and would poison every later step
        if self.powersgd is not None and bool(found):
            reset_powersgd(self.powersgd)
        opt.zero_grad(set_to_none=True)


class Strategy:
    """The backend interface. ``d``/``g``: the two phases. ``G``/``D`` are what the step calls (maybe
    wrapped); ``G_module``/``D_module`` unwrapped; ``D_eval`` is D for G's loss (its reducer never fires).

    ``name`` is the backend tag saved with the state; ``supports_background_save`` tells the trainer
    whether a checkpoint's files may be written by a thread while training goes on."""

    name = "base"
    supports_background_save = True

    def __init__(self, cfg, env: DistEnv):
        self.cfg = cfg
        self.env = env
        self.device = env.device
        self.precision = cfg.train.precision
        self.d: Phase
        self.g: Phase

    def setup(self, G: nn.Module, D: nn.Module) -> None:
        raise NotImplementedError

    @property
    def phases(self) -> tuple:
        return self.d, self.g

    @property
    def G(self):
        return self.g.module

    @property
    def D(self):
        return self.d.module

    @property
    def G_module(self) -> nn.Module:
        return self.g.raw

    @property
    def D_module(self) -> nn.Module:
        return self.d.raw

    # -- precision -----------------------------------------------------------------------------
    def autocast(self):
        dt = amp_dtype(self.precision)
        if dt is None or self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=dt)

    def after_step(self) -> None:
        """After both phases of a step (BN buffer averaging)."""

    def scaler_scale(self) -> float | None:
        return None

    def skipped_steps(self) -> dict:
        """Non-finite steps skipped so far per phase (a host read: log and checkpoint time only)."""
        return {p.name: int(p.skipped.item()) for p in self.phases}

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Small state for model.pt, tagged with the backend; big backend files go through ``save_extra``."""
        return {"backend": self.name, "skipped": self.skipped_steps(), **self._state()}

    def load_state_dict(self, sd: dict) -> None:
        saved = sd.get("backend", "ddp")  # version-1 DDP states carry no tag
        if saved != self.name:
            raise CheckpointError(f"cannot resume a train.backend={saved} checkpoint with train.backend={self.name} "
                                  "(optimizer state formats differ); use the backend it was saved with")
        self._load(sd)
        for p in self.phases:
            p.skipped.fill_(float(sd.get("skipped", {}).get(p.name, 0)))

    def save_extra(self, path: str) -> None:
        """Collective: writes backend files that do not fit model.pt into ``path`` (none for DDP)."""

    def load_extra(self, path: str) -> None:
        """Reads what ``save_extra`` wrote into ``path``."""

    def _state(self) -> dict:
        raise NotImplementedError

    def _load(self, sd: dict) -> None:
        raise NotImplementedError


class DDPStrategy(Strategy):
    name = "ddp"
    supports_background_save = True

    def setup(self, G: nn.Module, D: nn.Module) -> None:
        cfg, env = self.cfg, self.env
        refuse_cpu_amp(self.precision, self.device)
        G, D = G.to(self.device), D.to(self.device)
        if cfg.train.channels_last:
            G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
        if cfg.model.sync_bn and env.distributed:
            G, D = convert_sync_batchnorm(G, self.device), convert_sync_batchnorm(D, self.device)
        betas = (cfg.train.beta1, cfg.train.beta2)
        opt_g = make_adam(G.parameters(), cfg.train.lr_g, betas, self.device, cfg.train.optimizer,
                          cfg.train.adam_foreach)
        opt_d = make_adam(D.parameters(), cfg.train.lr_d, betas, self.device, cfg.train.optimizer,
                          cfg.train.adam_foreach)
        fp16 = self.precision == "fp16"
        scalers = [torch.amp.GradScaler(self.device.type) if fp16 else None for _ in range(2)]
        hook_states = [None, None]
        if cfg.distributed.static_graph and cfg.train.grad_accum > 1:  # an elastic resume may have raised it
            from ..config import STATIC_GRAPH_ACCUM

            raise UserError(STATIC_GRAPH_ACCUM.format(accum=cfg.train.grad_accum))
        if env.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            kw = _no_forward_buffer_sync() | ddp_comm_kwargs(cfg.distributed)
            # gradients live in the communication buckets: no copy between them and .grad
            Gw = nn.parallel.DistributedDataParallel(G, device_ids=ids, gradient_as_bucket_view=True, **kw)
            Dw = nn.parallel.DistributedDataParallel(D, device_ids=ids, gradient_as_bucket_view=True, **kw)
            for i, w in enumerate((Gw, Dw)):  # one hook state per module: G's and D's buckets are separate
                hook = comm_hook_for(cfg.distributed, serialize=self.device.type != "cuda")
                if hook is not None:
                    w.register_comm_hook(hook[1], hook[0])
                    hook_states[i] = hook[1]
        else:
            Gw, Dw = G, D  # world size 1: no wrapper overhead, nothing to communicate
        if cfg.train.compile:
            Gw, Dw = torch.compile(Gw), torch.compile(Dw)
            self.D_eval = torch.compile(D)
        else:
            self.D_eval = D
        psgd = hook_states if cfg.distributed.comm_hook == "powersgd" else [None, None]
        self.g = DDPPhase("g", Gw, G, opt_g, self.device, scalers[0], psgd[0])
        self.d = DDPPhase("d", Dw, D, opt_d, self.device, scalers[1], psgd[1])
        self._sync_buffers = BufferSync((G, D), env)

    def after_step(self) -> None:
        if not self.cfg.model.sync_bn:  # with global-batch BN every rank already holds the same statistics
            self._sync_buffers()

    def scaler_scale(self) -> float | None:
        return None if self.g.scaler is None else float(self.g.scaler.get_scale())

    def _state(self) -> dict:
        sd = {"opt_g": self.g.optimizer.state_dict(), "opt_d": self.d.optimizer.state_dict()}
        if self.g.scaler is not None:
            sd["scaler_g"], sd["scaler_d"] = self.g.scaler.state_dict(), self.d.scaler.state_dict()
        return sd

    def _load(self, sd: dict) -> None:
        self.g.optimizer.load_state_dict(sd["opt_g"])
        self.d.optimizer.load_state_dict(sd["opt_d"])
        if self.g.scaler is not None and "scaler_g" in sd:
            self.g.scaler.load_state_dict(sd["scaler_g"])
            self.d.scaler.load_state_dict(sd["scaler_d"])


def make_strategy(cfg, env: DistEnv) -> Strategy:
    if cfg.train.backend == "ddp":
        return DDPStrategy(cfg, env)
    from .deepspeed_strategy import DeepSpeedStrategy  # imports deepspeed only when asked for

    return DeepSpeedStrategy(cfg, env)

"""How models are wrapped, how backward and optimizer steps run, how optimizer state is saved.

The one backend-aware file: the trainer and the GAN step talk to a ``Strategy``.

DDP policy for a GAN (pytorch#175024: two forwards through a DDP module with BatchNorm before one
backward fail with ``broadcast_buffers=True`` since PyTorch 2.6):
- G and D are wrapped separately with ``broadcast_buffers=False``; D is called twice in its phase
  (real with right and wrong text in one call, then fake), and its gradients are reduced once, at
  the one backward of the summed loss.
- In G's phase, D's parameters are frozen and the *unwrapped* D is called, so D's reducer never
  fires and G's loss through D reduces only G's gradients.
- BatchNorm buffers (running statistics) are averaged across ranks after every step in one
  coalesced all-reduce, so they stay identical on all ranks; ``model.sync_bn`` computes batch
  statistics over the global batch instead (``nn.SyncBatchNorm`` on CUDA; on CPU, where
  ``nn.SyncBatchNorm`` refuses to run, ``GlobalBatchNorm`` below does the same with one
  differentiable all-reduce of per-channel sum, sum of squares and count).
- The frozen Stage-I generator is never wrapped.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os

import torch
import torch.distributed as dist
from torch import nn

from ..errors import UserError
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


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training-mode statistics cover the batches of all ranks (CPU/gloo SyncBatchNorm).

    Forward: all-reduce (sum, sum of squares, count) per channel through the autograd-aware
    ``torch.distributed.nn.functional.all_reduce``, so backward sums the statistics' gradients over
    ranks exactly as ``nn.SyncBatchNorm`` does. Eval mode and world size 1 use plain batch norm.
    """

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        dims = [0] + list(range(2, x.dim()))
        xf = x.float()
        count = torch.full((1,), float(xf.numel() // xf.shape[1]), device=x.device)
        stats = all_reduce(torch.cat([xf.sum(dims), (xf * xf).sum(dims), count]))
        c = x.shape[1]
        n = stats[2 * c]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0.0)  # biased, as BatchNorm normalises with
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach() * m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1).clamp_min(1)) * m)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm -> SyncBatchNorm (CUDA) or GlobalBatchNorm (CPU), keeping weights and buffers."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        out = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        out.load_state_dict(module.state_dict())
        out.train(module.training)
        out.to(next(iter(module.state_dict().values())).device)
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, device))
    return out


class BufferSync:
    """Averages floating-point buffers (BN running statistics) across ranks in one coalesced all-reduce."""

    def __init__(self, modules, env: DistEnv):
        self.env = env
        self.buffers = [b for m in modules for _n, b in m.named_buffers() if b.dtype.is_floating_point]

    def __call__(self) -> None:
        if not (self.env.distributed and self.buffers):
            return
        flat = torch._utils._flatten_dense_tensors(self.buffers)
        dist.all_reduce(flat)
        flat /= self.env.world_size
        for b, v in zip(self.buffers, torch._utils._unflatten_dense_tensors(flat, self.buffers)):
            b.copy_(v)


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
    if not foreach:
        return torch.optim.Adam(params, lr=lr, betas=betas)
    if device.type == "cuda":
        return torch.optim.Adam(params, lr=lr, betas=betas, fused=True)
    return torch.optim.Adam(params, lr=lr, betas=betas, foreach=True)


def _no_forward_buffer_sync() -> dict:
    """DDP must not broadcast buffers in forward (pytorch#175024). torch >= 2.13 names it
    ``forward_sync_buffers`` (buffers are still broadcast once at construction: harmless, they are equal)."""
    import inspect

    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


class Strategy:
    """Interface. ``G``/``D`` are what the step calls (maybe wrapped); ``G_module``/``D_module`` unwrapped."""

    name = "base"

    def __init__(self, cfg, env: DistEnv):
        self.cfg = cfg
        self.env = env
        self.device = env.device
        self.precision = cfg.train.precision
        self.skipped_steps = {"g": 0, "d": 0}

    # -- precision -----------------------------------------------------------------------------
    def autocast(self):
        dt = amp_dtype(self.precision)
        if dt is None or self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=dt)

    # -- hooks for the step ----------------------------------------------------------------------
    def no_sync(self, which: str):
        return contextlib.nullcontext()

    def backward(self, which: str, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self, which: str) -> None:
        raise NotImplementedError

    def after_step(self) -> None:
        pass

    def write_digest(self, step: int) -> None:
        """Test hook (``STACKGAN_TEST_DIGEST_DIR``): each rank writes digests of its own G and D
        parameters and buffers, so a test can check that ranks stay identical."""
        out = os.environ.get("STACKGAN_TEST_DIGEST_DIR")
        if not out:
            return
        from ..checkpoint.manager import params_digest

        G, D = unwrap(self.G_module), unwrap(self.D_module)
        rec = {"step": step, "rank": self.env.rank,
               "G_params": params_digest(dict(G.named_parameters())),
               "D_params": params_digest(dict(D.named_parameters())),
               "G_buffers": params_digest(dict(G.named_buffers())), "D_buffers": params_digest(dict(D.named_buffers())),
               "G_sum": float(sum(p.detach().double().sum() for p in G.parameters())),
               "D_sum": float(sum(p.detach().double().sum() for p in D.parameters()))}
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f"rank{self.env.rank}.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\n")

    def lrs(self) -> dict:
        raise NotImplementedError

    def set_lr(self, which: str, lr: float) -> None:
        raise NotImplementedError

    def scaler_scale(self) -> float | None:
        return None

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, sd: dict) -> None:
        raise NotImplementedError


class DDPStrategy(Strategy):
    name = "ddp"

    def setup(self, G: nn.Module, D: nn.Module) -> None:
        cfg, env = self.cfg, self.env
        refuse_cpu_amp(self.precision, self.device)
        G, D = G.to(self.device), D.to(self.device)
        if cfg.train.channels_last:
            G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
        if cfg.model.sync_bn and env.distributed:
            G, D = convert_sync_batchnorm(G, self.device), convert_sync_batchnorm(D, self.device)
        self.G_module, self.D_module = G, D
        betas = (cfg.train.beta1, cfg.train.beta2)
        self.opt = {"g": make_adam(G.parameters(), cfg.train.lr_g, betas, self.device, cfg.train.optimizer,
                                   cfg.train.adam_foreach),
                    "d": make_adam(D.parameters(), cfg.train.lr_d, betas, self.device, cfg.train.optimizer,
                                   cfg.train.adam_foreach)}
        fp16 = self.precision == "fp16"
        self.scaler = {k: torch.amp.GradScaler(self.device.type) for k in ("g", "d")} if fp16 else None
        if env.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            kw = _no_forward_buffer_sync()
            Gw = nn.parallel.DistributedDataParallel(G, device_ids=ids, **kw)
            Dw = nn.parallel.DistributedDataParallel(D, device_ids=ids, **kw)
        else:
            Gw, Dw = G, D  # world size 1: no wrapper overhead
        if cfg.train.compile:
            Gw, Dw = torch.compile(Gw), torch.compile(Dw)
            self.D_eval = torch.compile(D)
        else:
            self.D_eval = D
        self.G, self.D = Gw, Dw
        self._sync_buffers = BufferSync((G, D), env)

    def no_sync(self, which: str):
        m = self.G if which == "g" else self.D
        m = getattr(m, "_orig_mod", m)
        return m.no_sync() if isinstance(m, nn.parallel.DistributedDataParallel) else contextlib.nullcontext()

    def backward(self, which: str, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            self.scaler[which].scale(loss).backward()
        else:
            loss.backward()

    def step(self, which: str) -> None:
        opt = self.opt[which]
        if self.scaler is not None:
            self.scaler[which].step(opt)  # skips the step on inf/nan gradients
            self.scaler[which].update()
        else:
            grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
            # one fused read of all gradients: isfinite per tensor took ~40 ms a check at the paper's Stage-I
            # widths on CPU (benchmarks/throughput.py); an L2 norm that overflows counts as non-finite too
            finite = torch.isfinite(torch.stack(torch._foreach_norm(grads))).all() if grads else torch.tensor(True)
            if bool(finite):
                opt.step()
            else:
                self.skipped_steps[which] += 1
                log.warning("rank %d: non-finite %s gradients, step skipped", self.env.rank, which.upper())
        opt.zero_grad(set_to_none=True)

    def after_step(self) -> None:
        if not self.cfg.model.sync_bn:  # with global-batch BN every rank already holds the same statistics
            self._sync_buffers()

    def lrs(self) -> dict:
        return {k: o.param_groups[0]["lr"] for k, o in self.opt.items()}

    def set_lr(self, which: str, lr: float) -> None:
        for g in self.opt[which].param_groups:
            g["lr"] = lr

    def scaler_scale(self) -> float | None:
        return None if self.scaler is None else float(self.scaler["g"].get_scale())

    def state_dict(self) -> dict:
        sd = {"opt_g": self.opt["g"].state_dict(), "opt_d": self.opt["d"].state_dict(),
              "skipped": dict(self.skipped_steps)}
        if self.scaler is not None:
            sd["scaler_g"], sd["scaler_d"] = self.scaler["g"].state_dict(), self.scaler["d"].state_dict()
        return sd

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("backend") == "deepspeed":
            from ..errors import CheckpointError

            raise CheckpointError("cannot resume a train.backend=deepspeed checkpoint with train.backend=ddp "
                                  "(optimizer state formats differ); use the backend it was saved with")
        self.opt["g"].load_state_dict(sd["opt_g"])
        self.opt["d"].load_state_dict(sd["opt_d"])
        self.skipped_steps.update(sd.get("skipped", {}))
        if self.scaler is not None and "scaler_g" in sd:
            self.scaler["g"].load_state_dict(sd["scaler_g"])
            self.scaler["d"].load_state_dict(sd["scaler_d"])


def make_strategy(cfg, env: DistEnv) -> Strategy:
    if cfg.train.backend == "ddp":
        return DDPStrategy(cfg, env)
    from .deepspeed_strategy import DeepSpeedStrategy  # imports deepspeed only when asked for

    return DeepSpeedStrategy(cfg, env)

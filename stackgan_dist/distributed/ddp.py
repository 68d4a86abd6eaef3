"""The DDP strategy: G and D each in their own DistributedDataParallel module.

DDP policy for a GAN (pytorch#175024: two forwards through a DDP module with BatchNorm before one
backward fail with ``broadcast_buffers=True`` since PyTorch 2.6):
- G and D are wrapped separately with ``broadcast_buffers=False``; D is called twice in its phase
  (real with right and wrong text in one call, then fake), and its gradients are reduced once, at
  the one backward of the summed loss.
- In G's phase, D's parameters are frozen and ``d.unsynced`` (never DDP-wrapped) is called, so D's
  reducer never fires and G's loss through D reduces only G's gradients.
- BatchNorm running statistics: see ``batchnorm.py`` (averaged after every step, or global-batch BN).
- The frozen Stage-I generator is never wrapped.
- Gradient communication options: ``comm_hooks.py``.
"""
from __future__ import annotations

import contextlib
import inspect

import torch
from torch import nn

from ..errors import UserError
from .amp import guarded_step, nonfinite_flag
from .comm_hooks import comm_hook_for, ddp_comm_kwargs, rescale_powersgd_error, reset_powersgd
from .optim import check_adam_state
from .strategy import Phase, Strategy

# config validation's rule, checked again here without importing config (no import cycle): an elastic resume
# (the global batch kept at another world size) may raise train.grad_accum after validation.
# pytorch#143580: DDP's static graph with no_sync fails an internal assert, then stops reducing silently
STATIC_GRAPH_ACCUM = ("config key 'distributed.static_graph' cannot be used with train.grad_accum={accum} > 1 "
                      "(torch's static graph breaks under no_sync, pytorch#143580); set distributed.static_graph=false")


def _no_forward_buffer_sync() -> dict:
    """DDP must not broadcast buffers in forward (pytorch#175024). torch >= 2.13 names it
    ``forward_sync_buffers`` (buffers are still broadcast once at construction: harmless, they are equal)."""
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


class DDPPhase(Phase):
    def __init__(self, name, wrapped, net, optimizer, device, scaler=None, powersgd=None, unsynced=None):
        super().__init__(name, wrapped, net, optimizer, device, unsynced)
        self.scaler = scaler
        self.powersgd = powersgd  # PowerSGDState of this module's hook, or None
        inner = getattr(wrapped, "_orig_mod", wrapped)  # torch.compile keeps the DDP wrapper inside
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


class DDPStrategy(Strategy):
    name = "ddp"
    supports_background_save = True

    def _wrap(self, G: nn.Module, D: nn.Module) -> tuple[Phase, Phase]:
        cfg, env = self.cfg, self.env
        opt_g, opt_d = self._adam(G, cfg.train.lr_g), self._adam(D, cfg.train.lr_d)
        fp16 = self.precision == "fp16"
        scalers = [torch.amp.GradScaler(self.device.type) if fp16 else None for _ in range(2)]
        hook_states = [None, None]
        if cfg.distributed.static_graph and cfg.train.grad_accum > 1:  # an elastic resume may have raised it
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
            d_unsynced = torch.compile(D)
        else:
            d_unsynced = D
        psgd = hook_states if cfg.distributed.comm_hook == "powersgd" else [None, None]
        return (DDPPhase("g", Gw, G, opt_g, self.device, scalers[0], psgd[0]),
                DDPPhase("d", Dw, D, opt_d, self.device, scalers[1], psgd[1], unsynced=d_unsynced))

    def scaler_scale(self) -> float | None:
        return None if self.g.scaler is None else float(self.g.scaler.get_scale())

    def _state(self) -> dict:
        sd = {"opt_g": self.g.optimizer.state_dict(), "opt_d": self.d.optimizer.state_dict()}
        if self.g.scaler is not None:
            sd["scaler_g"], sd["scaler_d"] = self.g.scaler.state_dict(), self.d.scaler.state_dict()
        return sd

    def _load(self, sd: dict) -> None:
        check_adam_state(self.g.optimizer, sd.get("opt_g"), "G")
        check_adam_state(self.d.optimizer, sd.get("opt_d"), "D")
        self.g.optimizer.load_state_dict(sd["opt_g"])
        self.d.optimizer.load_state_dict(sd["opt_d"])
        if self.g.scaler is not None and "scaler_g" in sd:
            self.g.scaler.load_state_dict(sd["scaler_g"])
            self.d.scaler.load_state_dict(sd["scaler_d"])

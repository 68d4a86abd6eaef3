"""The backend boundary: the trainer and the GAN step talk to a ``Strategy`` and its two ``Phase`` objects
(``strategy.d`` and ``strategy.g``); every strategy has the same complete interface (state, extra files,
background saving, backend tag), so nothing outside this package asks which backend runs.

Names, the same everywhere: ``phase.wrapped`` is what the step calls in the phase's own update (a DDP module,
a compiled module, a DeepSpeed engine, or the plain network at world size 1); ``phase.net`` is the plain
``nn.Module`` (parameters, state dict, BatchNorm buffers); ``phase.unsynced`` is the network called outside
its own update, without gradient sync: G's loss runs through ``strategy.d.unsynced``, so D's reducer (or
engine hooks) never fire in G's phase.

``Strategy.setup`` is the prologue both backends share (AMP refused on CPU, networks moved to the device,
global-batch BatchNorm) followed by the backend's ``_wrap``; ``after_step`` (BatchNorm buffer averaging) is
the same for both too.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..errors import CheckpointError
from .amp import amp_dtype, refuse_cpu_amp
from .batchnorm import BufferSync, convert_sync_batchnorm
from .env import DistEnv
from .optim import make_adam


def unwrap(m: nn.Module) -> nn.Module:
    """The plain network inside DDP/DeepSpeed (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        if hasattr(m, "module") and isinstance(m.module, nn.Module):
            m = m.module
        elif hasattr(m, "_orig_mod"):
            m = m._orig_mod
        else:
            return m


def set_requires_grad(m: nn.Module, flag: bool) -> None:
    for p in m.parameters():
        p.requires_grad_(flag)


class Phase:
    """One side of the GAN update: ``wrapped``, ``net`` and ``unsynced`` (module docstring), the optimizer and
    scaler, and how backward, gradient sync and the optimizer step run on this backend.

    ``skipped`` counts steps dropped for non-finite gradients, on the device (read at log time)."""

    def __init__(self, name: str, wrapped, net: nn.Module, optimizer, device: torch.device, unsynced=None):
        self.name = name
        self.wrapped = wrapped
        self.net = net
        self.unsynced = net if unsynced is None else unsynced
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


class Strategy:
    """The backend interface. ``d``/``g``: the two phases.

    ``name`` is the backend tag saved with the state; ``supports_background_save`` tells the trainer
    whether a checkpoint's files may be written by a thread while training goes on;
    ``channels_last_weights``: whether ``train.channels_last`` also converts the weights."""

    name = "base"
    supports_background_save = True
    channels_last_weights = True

    def __init__(self, cfg, env: DistEnv):
        self.cfg = cfg
        self.env = env
        self.device = env.device
        self.precision = cfg.train.precision
        self.d: Phase
        self.g: Phase

    def setup(self, G: nn.Module, D: nn.Module) -> None:
        """The shared prologue, then the backend's wrapping of the two networks."""
        refuse_cpu_amp(self.precision, self.device)
        self.g, self.d = self._wrap(self._place(G), self._place(D))
        self._sync_buffers = BufferSync((self.g.net, self.d.net), self.env)

    def _place(self, m: nn.Module) -> nn.Module:
        m = m.to(self.device)
        if self.cfg.train.channels_last and self.channels_last_weights:
            m = m.to(memory_format=torch.channels_last)
        if self.cfg.model.sync_bn and self.env.distributed:
            m = convert_sync_batchnorm(m, self.device)
        return m

    def _adam(self, m: nn.Module, lr: float):
        t = self.cfg.train
        return make_adam(m.parameters(), lr, (t.beta1, t.beta2), self.device, t.optimizer, t.adam_foreach)

    def _wrap(self, G: nn.Module, D: nn.Module) -> tuple[Phase, Phase]:
        """-> (G's phase, D's phase) over the placed networks."""
        raise NotImplementedError

    @property
    def phases(self) -> tuple:
        return self.d, self.g

    # -- precision -----------------------------------------------------------------------------
    def autocast(self):
        dt = amp_dtype(self.precision)
        if dt is None or self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=dt)

    def after_step(self) -> None:
        """After both phases of a step: BatchNorm running statistics averaged over ranks (neither DDP nor
        DeepSpeed touches them); with global-batch BN every rank already holds the same statistics."""
        if not self.cfg.model.sync_bn:
            self._sync_buffers()

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

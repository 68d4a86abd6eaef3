"""One GAN iteration: ``d_step()`` then ``g_step()`` over the strategy's two phases. No I/O, no host sync.

Each phase (``strategy.d``, ``strategy.g``) owns its module, optimizer, scaler and gradient-sync switch;
D's phase turns D's ``requires_grad`` on, G's phase turns it off and calls ``strategy.d.unsynced`` (D without
its gradient sync), so G's loss through D reduces only G's gradients.

BatchNorm running statistics under gradient accumulation: a step over ``grad_accum`` micro-batches moves
every running statistic exactly as one step over the same samples split across ``grad_accum`` ranks does
(each rank updates from its own micro-batch, then the ranks average): each micro-batch updates from the
statistics at the start of the phase and the updates are averaged. G's second forward of a micro-batch
(in G's phase, to get gradients) does not move them at all: the first one (in D's phase) already did.
"""
from __future__ import annotations

import contextlib

import torch

from .distributed import Strategy, set_requires_grad, unwrap
from .losses import (LossOptions, color_consistency, d_condition, discriminator_loss, generator_loss,
                     mismatched_conditions)
from .models.stage1 import frozen_stage1_forward


def to_model_input(batch: dict, device: torch.device, channels_last: bool = False) -> tuple:
    """uint8 (B, 3, H, W) -> float in [-1, 1] on the device (the cast happens after the copy: 4x less traffic)."""
    nb = device.type == "cuda"
    img = batch["image"].to(device, non_blocking=nb).float().div_(127.5).sub_(1.0)
    if channels_last:
        img = img.contiguous(memory_format=torch.channels_last)
    return img, batch["text"].to(device, non_blocking=nb), batch["cls"].to(device, non_blocking=nb)


class RunningStats:
    """The BatchNorm buffers of some modules: snapshot, restore, and the average of per-micro-batch updates."""

    def __init__(self, *modules: torch.nn.Module):
        self.buffers = [b for m in modules for mod in m.modules()
                        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) for b in mod.buffers()]

    def snapshot(self) -> list:
        return [b.detach().clone() for b in self.buffers]

    def restore(self, snap: list) -> None:
        with torch.no_grad():
            for b, s in zip(self.buffers, snap):
                b.copy_(s)

    def averaged(self, n: int):
        """-> (begin_micro, end) callables: each micro-batch starts from the phase's starting statistics; at
        the end the floating buffers hold the start plus the mean update (counters: one micro-batch's)."""
        start = self.snapshot()
        acc = [torch.zeros_like(s) if s.is_floating_point() else None for s in start]

        def begin_micro(i: int) -> None:
            if i > 0:
                with torch.no_grad():
                    for j, (b, s) in enumerate(zip(self.buffers, start)):
                        if acc[j] is not None:
                            acc[j] += b - s
                        b.copy_(s)

        def end() -> None:
            with torch.no_grad():
                for j, (b, s) in enumerate(zip(self.buffers, start)):
                    if acc[j] is not None:
                        b.copy_(s + (acc[j] + (b - s)) / n)

        return begin_micro, end


class GANStep:
    def __init__(self, strategy: Strategy, stage: int, z_dim: int, cond_dim: int, kl_coeff: float,
                 G1: torch.nn.Module | None, generator: torch.Generator, grad_accum: int = 1,
                 channels_last: bool = False, color_coeff: float = 0.0, options: LossOptions = LossOptions()):
        self.s = strategy
        self.stage = stage
        self.z_dim, self.cond_dim = z_dim, cond_dim
        self.kl_coeff = kl_coeff
        self.G1 = G1
        self.gen = generator  # this rank's noise: z and the CA epsilons
        self.accum = grad_accum
        self.channels_last = channels_last
        self.color_coeff = color_coeff  # Stage-II only: the StackGAN++ colour term against the Stage-I image
        self.loss_options = options  # the faithfulness switches (losses.LossOptions)
        self.g_stats = RunningStats(strategy.g.net)
        self.d_stats = RunningStats(strategy.d.net)

    def _noise(self, b: int, device) -> dict:
        n = {"z": torch.randn(b, self.z_dim, generator=self.gen, device=self.gen.device).to(device),
             "eps": torch.randn(b, self.cond_dim, generator=self.gen, device=self.gen.device).to(device)}
        if self.stage == 2:
            n["eps1"] = torch.randn(b, unwrap(self.G1).ca.cond_dim, generator=self.gen,
                                    device=self.gen.device).to(device)
        return n

    def generate(self, G, text: torch.Tensor, noise: dict):
        """-> (fake, mu, logvar, the Stage-I image it refines or None)."""
        if self.stage == 1:
            return (*G(text, noise["z"], noise["eps"]), None)
        s0 = frozen_stage1_forward(self.G1, text, noise["z"], noise["eps1"], self.loss_options.stage1_bn)
        return (*G(text, s0, noise["eps"]), s0)

    def d_losses(self, real, text, wrong, fake) -> dict:
        r = self.s.d.wrapped(real, text, wrong)
        f = self.s.d.wrapped(fake.detach(), text)
        return discriminator_loss(r["cond"], r["wrong"], f["cond"], r.get("uncond"), f.get("uncond"),
                                  self.loss_options.d_loss_weights, self.loss_options.d_output)

    def g_losses(self, fake, text, mu, logvar, s0=None) -> dict:
        cond = d_condition(text, mu, self.loss_options.d_condition)
        f = self.s.d.unsynced(fake, cond)  # D without its reducer: never fires for G's loss
        color = color_consistency(fake, s0) if self.color_coeff and s0 is not None else None
        return generator_loss(f["cond"], mu, logvar, self.kl_coeff, f.get("uncond"), color, self.color_coeff,
                              self.loss_options.d_output)

    def d_step(self, inputs: list, noises: list, out: dict) -> list:
        """D's optimizer step over the micro-batches. -> G's outputs when one forward serves both phases."""
        s, phase, n = self.s, self.s.d, len(inputs)
        set_requires_grad(phase.net, True)
        fakes = []
        if n > 1:
            g_begin, g_end = self.g_stats.averaged(n)
            d_begin, d_end = self.d_stats.averaged(n)
        for i, ((real, text, cls), noise) in enumerate(zip(inputs, noises)):
            if n > 1:
                g_begin(i)
                d_begin(i)
            with phase.no_sync() if i < n - 1 else contextlib.nullcontext():
                with s.autocast():
                    if n == 1:  # one G forward serves both phases (the authors' schedule)
                        fakes.append(self.generate(s.g.wrapped, text, noise))
                        fake, mu = fakes[0][0], fakes[0][1]
                    else:
                        with torch.no_grad():
                            fake, mu = self.generate(s.g.wrapped, text, noise)[:2]
                    cond = d_condition(text, mu, self.loss_options.d_condition)
                    wrong = mismatched_conditions(cond, cls, self.loss_options.wrong_pairs)
                    dl = self.d_losses(real, cond, wrong, fake)
                phase.backward(dl["d_loss"] / n)
            _accumulate(out, dl, n)
        if n > 1:
            g_end()
            d_end()
        phase.step()
        return fakes

    def g_step(self, inputs: list, noises: list, fakes: list, out: dict) -> None:
        """G's optimizer step; with accumulation G runs again per micro-batch (statistics frozen: see top)."""
        s, phase, n = self.s, self.s.g, len(inputs)
        set_requires_grad(s.d.net, False)
        if n > 1:
            d_begin, d_end = self.d_stats.averaged(n)
            g_snap = self.g_stats.snapshot()
        try:
            for i, ((real, text, cls), noise) in enumerate(zip(inputs, noises)):
                if n > 1:
                    d_begin(i)
                with phase.no_sync() if i < n - 1 else contextlib.nullcontext():
                    with s.autocast():
                        if n == 1:
                            fake, mu, logvar, s0 = fakes[0]
                        else:
                            fake, mu, logvar, s0 = self.generate(s.g.wrapped, text, noise)
                        gl = self.g_losses(fake, text, mu, logvar, s0)
                    phase.backward(gl["g_loss"] / n)
                if n > 1:  # after backward: BatchNorm's backward checks its buffers were not touched
                    self.g_stats.restore(g_snap)
                _accumulate(out, gl, n)
            if n > 1:
                d_end()
            phase.step()
        finally:
            set_requires_grad(s.d.net, True)

    def __call__(self, micro_batches: list[dict]) -> dict:
        """One optimizer step of D then of G over ``grad_accum`` micro-batches. Returns detached losses
        (device tensors) and ``bad``, the count of samples the loader had to replace (a host int)."""
        dev = self.s.device
        inputs = [to_model_input(b, dev, self.channels_last) for b in micro_batches]
        noises = [self._noise(x[0].shape[0], dev) for x in inputs]
        out: dict = {}
        fakes = self.d_step(inputs, noises, out)
        self.g_step(inputs, noises, fakes, out)
        self.s.after_step()
        out["bad"] = sum(int(b["bad"]) for b in micro_batches) if "bad" in micro_batches[0] else 0
        return out


def _accumulate(out: dict, losses: dict, n: int) -> None:
    for k, v in losses.items():
        v = v.detach() / n
        out[k] = out[k] + v if k in out else v

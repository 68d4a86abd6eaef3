"""One GAN iteration: d_step() then g_step(). No I/O; backend details go through the Strategy."""
from __future__ import annotations

import torch

from .distributed.wrap import Strategy, set_requires_grad, unwrap
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
        self.opt = options  # the faithfulness switches (losses.LossOptions)

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
        s0 = frozen_stage1_forward(self.G1, text, noise["z"], noise["eps1"], self.opt.stage1_bn)
        return (*G(text, s0, noise["eps"]), s0)

    def d_losses(self, real, text, wrong, fake) -> dict:
        r = self.s.D(real, text, wrong)
        f = self.s.D(fake.detach(), text)
        return discriminator_loss(r["cond"], r["wrong"], f["cond"], r.get("uncond"), f.get("uncond"),
                                  self.opt.d_loss_weights, self.opt.d_output)

    def g_losses(self, fake, text, mu, logvar, s0=None) -> dict:
        cond = d_condition(text, mu, self.opt.d_condition)
        f = self.s.D_eval(fake, cond)  # unwrapped D: its reducer never fires for G's loss
        color = color_consistency(fake, s0) if self.color_coeff and s0 is not None else None
        return generator_loss(f["cond"], mu, logvar, self.kl_coeff, f.get("uncond"), color, self.color_coeff,
                              self.opt.d_output)

    def __call__(self, micro_batches: list[dict]) -> dict:
        """Runs one optimizer step of D then of G over ``grad_accum`` micro-batches. Returns detached losses."""
        s, dev = self.s, self.s.device
        inputs = [to_model_input(b, dev, self.channels_last) for b in micro_batches]
        noises = [self._noise(x[0].shape[0], dev) for x in inputs]
        n = len(inputs)
        out: dict = {}

        # -- D phase ------------------------------------------------------------------------------
        set_requires_grad(s.D_module, True)
        fakes = []
        for i, ((real, text, cls), noise) in enumerate(zip(inputs, noises)):
            # DDP decides in forward whether the next backward all-reduces: no_sync covers both
            with s.no_sync("d") if i < n - 1 else _null():
                with s.autocast():
                    if n == 1:  # one G forward serves both phases (the authors' schedule)
                        fake, mu, logvar, s0 = self.generate(s.G, text, noise)
                        fakes.append((fake, mu, logvar, s0))
                    else:
                        with torch.no_grad():
                            fake, mu = self.generate(s.G, text, noise)[:2]
                    cond = d_condition(text, mu, self.opt.d_condition)
                    wrong = mismatched_conditions(cond, cls, self.opt.wrong_pairs)
                    dl = self.d_losses(real, cond, wrong, fake)
                s.backward("d", dl["d_loss"] / n)
            _accumulate(out, dl, n)
        s.step("d")

        # -- G phase ------------------------------------------------------------------------------
        set_requires_grad(s.D_module, False)
        for i, ((real, text, cls), noise) in enumerate(zip(inputs, noises)):
            with s.no_sync("g") if i < n - 1 else _null():
                with s.autocast():
                    if n == 1:
                        fake, mu, logvar, s0 = fakes[0]
                    else:
                        fake, mu, logvar, s0 = self.generate(s.G, text, noise)
                    gl = self.g_losses(fake, text, mu, logvar, s0)
                s.backward("g", gl["g_loss"] / n)
            _accumulate(out, gl, n)
        s.step("g")
        set_requires_grad(s.D_module, True)
        s.after_step()
        out["bad"] = sum(int(b["bad"]) for b in micro_batches) if "bad" in micro_batches[0] else 0
        return out


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _accumulate(out: dict, losses: dict, n: int) -> None:
    for k, v in losses.items():
        v = v.detach() / n
        out[k] = out[k] + v if k in out else v

"""Pure loss functions (paper section 3; the authors' averaging of the unconditional head).

D returns logits; everything uses BCE-with-logits in fp32, which autocast accepts and which stays
finite where Sigmoid + BCELoss saturates.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    logits = logits.float()
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def kl_loss(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, I)) = 1/2 sum(mu^2 + sigma^2 - log sigma^2 - 1), summed over dims, mean over batch."""
    mu, logvar = mu.float(), logvar.float()
    return 0.5 * torch.mean(torch.sum(mu.pow(2) + logvar.exp() - logvar - 1.0, dim=1))


def mismatched_conditions(text: torch.Tensor, cls: torch.Tensor | None = None) -> torch.Tensor:
    """The "wrong" text for the matching-aware D: each image gets another image's text.

    Without classes: the batch shifted by one (image i gets text i+1), as the authors do. With classes
    (``cls`` >= 0): the nearest following sample of a different class, so a wrong pair is never a
    same-class pair that is really a match; falls back to the shift where a batch has one class.
    """
    b = text.shape[0]
    i = torch.arange(b, device=text.device)
    if cls is None or b < 2:
        return text[torch.roll(i, -1)]
    # on the device, without a host sync: candidate k = 1..b-1 for row i is sample (i + k) mod b
    cand = (i[:, None] + i[None, 1:]) % b  # (b, b-1)
    differs = cls[cand] != cls[:, None]
    first = differs.int().argmax(dim=1) + 1  # the first k whose class differs (argmax takes the first max)
    use = differs.any(dim=1) & (cls >= 0).all()
    return text[(i + torch.where(use, first, torch.ones_like(first))) % b]


def discriminator_loss(real: torch.Tensor, wrong: torch.Tensor, fake: torch.Tensor,
                       real_uncond: torch.Tensor | None = None, fake_uncond: torch.Tensor | None = None) -> dict:
    """L_D = BCE(s_r, 1) + 1/2 (BCE(s_w, 0) + BCE(s_f, 0)); with an unconditional head its real and fake
    terms are averaged with the conditional ones (the authors' Stage-II)."""
    d_real, d_wrong, d_fake = bce(real, 1.0), bce(wrong, 0.0), bce(fake, 0.0)
    if real_uncond is not None:
        d_real = 0.5 * (d_real + bce(real_uncond, 1.0))
        d_fake = 0.5 * (d_fake + bce(fake_uncond, 0.0))
    total = d_real + 0.5 * (d_wrong + d_fake)
    return {"d_loss": total, "d_real": d_real, "d_wrong": d_wrong, "d_fake": d_fake}


def pixel_mean_cov(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image mean (B, C) and covariance (B, C, C) of the pixel colours, in fp32 (also under autocast,
    which would otherwise run the matmul over every pixel in bf16/fp16)."""
    with torch.autocast(img.device.type, enabled=False):
        x = img.float().flatten(2)  # (B, C, H*W)
        mu = x.mean(dim=2)
        xc = x - mu.unsqueeze(2)
        return mu, xc @ xc.transpose(1, 2) / x.shape[2]


def color_consistency(img: torch.Tensor, lower: torch.Tensor, cov_weight: float = 5.0) -> torch.Tensor:
    """StackGAN++'s colour-consistency regulariser (Zhang et al., TPAMI 2018, eq. 8), as the authors' code
    computes it: MSE(mu, mu_lower) + 5 MSE(Sigma, Sigma_lower), the pixel mean and covariance of each image
    against those of the lower stage's image from the same text and noise. Resolution-independent."""
    mu, cov = pixel_mean_cov(img)
    mu_lo, cov_lo = pixel_mean_cov(lower)
    return F.mse_loss(mu, mu_lo) + cov_weight * F.mse_loss(cov, cov_lo)


def generator_loss(fake: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, kl_coeff: float,
                   fake_uncond: torch.Tensor | None = None, color: torch.Tensor | None = None,
                   color_coeff: float = 0.0) -> dict:
    """Non-saturating L_G = BCE(s_f, 1) (+ the unconditional term) + lambda * KL (+ the colour term)."""
    g_adv = bce(fake, 1.0)
    if fake_uncond is not None:
        g_adv = g_adv + bce(fake_uncond, 1.0)
    kl = kl_loss(mu, logvar)
    out = {"g_loss": g_adv + kl_coeff * kl, "g_adv": g_adv, "kl": kl}
    if color is not None:
        out["g_color"] = color
        out["g_loss"] = out["g_loss"] + color_coeff * color
    return out

"""Pure loss functions (paper section 3) and the switches that select the authors' variants instead.

D returns logits. By default every term is BCE-with-logits in fp32, which autocast accepts and which stays
finite where Sigmoid + BCELoss saturates; ``LossOptions`` selects the authors' Sigmoid + BCELoss, their
weighting of the unconditional head, their wrong pairs, their D conditioning and their frozen Stage-I
BatchNorm mode (docs/faithfulness.md lists every difference and its test).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossOptions:
    """The loss-side faithfulness switches (the config keys of the same names; defaults: ours)."""

    d_output: str = "logits"  # train.d_output: "logits" | "sigmoid"
    d_loss_weights: str = "ours"  # train.d_loss_weights: "ours" | "authors"
    wrong_pairs: str = "other_class"  # train.wrong_pairs: "other_class" | "shift"
    d_condition: str = "text"  # model.d_condition: "text" | "ca_mu"
    stage1_bn: str = "eval"  # train.stage1_bn: "eval" | "train"

    @classmethod
    def from_config(cls, cfg) -> "LossOptions":
        t = cfg.train
        return cls(t.d_output, t.d_loss_weights, t.wrong_pairs, cfg.model.d_condition, t.stage1_bn)


def bce(logits: torch.Tensor, target: float, output: str = "logits") -> torch.Tensor:
    """Mean binary cross-entropy of D's logits against a constant label, in fp32.

    ``output="sigmoid"``: the authors' nn.Sigmoid + nn.BCELoss (log clamped at -100, so a saturated sigmoid
    gives 100 rather than inf); ``"logits"``: BCE-with-logits (exact where the sigmoid saturates).
    """
    logits = logits.float()
    target_t = torch.full_like(logits, target)
    if output == "sigmoid":
        return F.binary_cross_entropy(torch.sigmoid(logits), target_t)
    return F.binary_cross_entropy_with_logits(logits, target_t)


def kl_loss(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, I)) = 1/2 sum(mu^2 + sigma^2 - log sigma^2 - 1), summed over dims, mean over batch."""
    mu, logvar = mu.float(), logvar.float()
    return 0.5 * torch.mean(torch.sum(mu.pow(2) + logvar.exp() - logvar - 1.0, dim=1))


def d_condition(text: torch.Tensor, mu: torch.Tensor, mode: str = "text") -> torch.Tensor:
    """What D's conditional head is given: the text embedding (``"text"``: D compresses it itself, the
    paper) or G's CA mean, detached (``"ca_mu"``: the authors' code)."""
    return mu.detach() if mode == "ca_mu" else text


def mismatched_conditions(text: torch.Tensor, cls: torch.Tensor | None = None,
                          mode: str = "other_class") -> torch.Tensor:
    """The "wrong" condition for the matching-aware D: each real image gets another image's condition.

    ``mode="shift"`` (the authors'): image i gets text i+1 for i < B-1, so B-1 rows come back and D scores
    only the first B-1 real images against them (``text[1:]``). ``"other_class"`` (ours): B rows; without
    classes the batch rolled by one (image B-1 gets text 0); with classes (``cls`` >= 0) the nearest
    following sample of a different class, so a wrong pair is never a same-class pair that is really a
    match; falls back to the roll where a batch has one class.
    """
    b = text.shape[0]
    if mode == "shift":
        return text[1:]
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
                       real_uncond: torch.Tensor | None = None, fake_uncond: torch.Tensor | None = None,
                       weights: str = "ours", output: str = "logits") -> dict:
    """The matching-aware D loss (paper eq. 3 as a minimised BCE): L_D = BCE(s_r, 1) + 1/2 (BCE(s_w, 0) +
    BCE(s_f, 0)). With an unconditional head (Stage-II; not in the paper):

    - ``weights="ours"``: its real and fake terms are averaged with the conditional ones first,
      (r + ur)/2 + 1/2 (w + (f + uf)/2): conditional and unconditional evidence weigh the same, and real
      weighs as much as wrong and fake together, as in the paper's equation;
    - ``weights="authors"``: (r + ur)/2 + (f + w + uf)/3 (code/miscc/utils.py), where the fake terms
      weigh twice the wrong term.

    Without the head both give r + (w + f)/2. ``d_real``/``d_fake`` report the (cond + uncond)/2 averages.
    """
    d_real, d_wrong, d_fake = bce(real, 1.0, output), bce(wrong, 0.0, output), bce(fake, 0.0, output)
    if real_uncond is None:
        total = d_real + 0.5 * (d_wrong + d_fake)
        return {"d_loss": total, "d_real": d_real, "d_wrong": d_wrong, "d_fake": d_fake}
    u_real, u_fake = bce(real_uncond, 1.0, output), bce(fake_uncond, 0.0, output)
    if weights == "authors":
        total = (d_real + u_real) / 2.0 + (d_fake + d_wrong + u_fake) / 3.0
    else:
        total = 0.5 * (d_real + u_real) + 0.5 * (d_wrong + 0.5 * (d_fake + u_fake))
    return {"d_loss": total, "d_real": 0.5 * (d_real + u_real), "d_wrong": d_wrong, "d_fake": 0.5 * (d_fake + u_fake)}


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
                   color_coeff: float = 0.0, output: str = "logits") -> dict:
    """Non-saturating L_G = BCE(s_f, 1) (+ the unconditional term, summed as the authors do) + kl_coeff * KL
    (+ the colour term). ``kl_loss`` sums over dimensions: config.kl_weight turns train.kl_coeff and
    train.kl_reduction into ``kl_coeff`` (the authors' mean over dimensions = the sum / condition_dim)."""
    g_adv = bce(fake, 1.0, output)
    if fake_uncond is not None:
        g_adv = g_adv + bce(fake_uncond, 1.0, output)
    kl = kl_loss(mu, logvar)
    out = {"g_loss": g_adv + kl_coeff * kl, "g_adv": g_adv, "kl": kl}
    if color is not None:
        out["g_color"] = color
        out["g_loss"] = out["g_loss"] + color_coeff * color
    return out

"""Shapes of every module at both stages, CA against the closed form, loss terms by hand."""
import math

import pytest
import torch

from stackgan_dist.config import ModelConfig
from stackgan_dist.losses import (color_consistency, discriminator_loss, generator_loss, kl_loss,
                                  mismatched_conditions, pixel_mean_cov)
from stackgan_dist.models.build import build_models, build_stage1_generator
from stackgan_dist.models.conditioning import CondAugment

B = 3


def small(stage):
    return ModelConfig(stage=stage, gf_dim=16, df_dim=8, condition_dim=12, z_dim=10, text_dim=20, res_blocks=2)


def test_stage1_shapes():
    m = build_models(small(1))
    text, z = torch.randn(B, 20), torch.randn(B, 10)
    img, mu, logvar = m.G(text, z)
    assert img.shape == (B, 3, 64, 64) and mu.shape == (B, 12) and logvar.shape == (B, 12)
    assert img.abs().max() <= 1.0
    h = m.D.encode_image(img)
    assert h.shape == (B, 8 * 8, 4, 4)
    out = m.D(img, text, torch.randn(B, 20))
    assert out["cond"].shape == (B,) and out["wrong"].shape == (B,) and "uncond" not in out


def test_stage2_shapes():
    m = build_models(small(2))
    g1 = build_stage1_generator(small(1))
    text = torch.randn(B, 20)
    s0, _, _ = g1(text, torch.randn(B, 10))
    img, mu, logvar = m.G(text, s0)
    assert img.shape == (B, 3, 256, 256) and mu.shape == (B, 12)
    assert m.D.encode_image(img).shape == (B, 8 * 8, 4, 4)
    out = m.D(img, text, torch.randn(B, 20))
    assert {k: v.shape for k, v in out.items()} == {"cond": (B,), "uncond": (B,), "wrong": (B,)}


def test_paper_defaults_parameter_counts():
    """The paper's CUB widths give the parameter counts of the reference (G 10.3 M, D 5.7 M at Stage-I)."""
    m = build_models(ModelConfig(text_dim=1024))  # the release's char-CNN-RNN embeddings
    n = lambda mod: sum(p.numel() for p in mod.parameters()) / 1e6  # noqa: E731
    assert 9.5 < n(m.G) < 11.0
    assert 2.5 < n(m.D) < 6.5
    m2 = build_models(ModelConfig(stage=2, text_dim=1024))
    assert 20 < n(m2.G) < 30


def test_ca_reparameterisation_and_kl():
    torch.manual_seed(0)
    ca = CondAugment(8, 4)
    text = torch.randn(5, 8)
    eps = torch.randn(5, 4)
    c, mu, logvar = ca(text, eps)
    assert torch.allclose(c, mu + torch.exp(0.5 * logvar) * eps, atol=1e-6)
    # closed form KL(N(mu, s^2) || N(0,1)) = 1/2 sum(mu^2 + s^2 - log s^2 - 1), batch mean
    mu = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    logvar = torch.tensor([[0.0, math.log(4.0)], [math.log(0.25), 0.0]])
    row1 = 0.5 * ((1 + 1 - 0 - 1) + (0 + 4 - math.log(4) - 1))
    row2 = 0.5 * ((0 + 0.25 - math.log(0.25) - 1) + (4 + 1 - 0 - 1))
    assert kl_loss(mu, logvar).item() == pytest.approx((row1 + row2) / 2, rel=1e-6)
    # a Monte-Carlo check of the same KL
    big_mu, big_lv = torch.randn(1, 3), torch.randn(1, 3) * 0.3
    s = torch.exp(0.5 * big_lv)
    x = big_mu + s * torch.randn(200000, 3)
    logq = (-0.5 * ((x - big_mu) / s) ** 2 - torch.log(s)).sum(1)
    logp = (-0.5 * x ** 2).sum(1)
    assert (logq - logp).mean().item() == pytest.approx(kl_loss(big_mu, big_lv).item(), abs=0.02)


def test_ca_relu_switch():
    ca = CondAugment(8, 4, relu=True)
    _, _, logvar = ca(torch.randn(16, 8))
    assert (logvar >= 0).all()


def _bce(x, y):
    return -(y * math.log(1 / (1 + math.exp(-x))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-x))))


def test_discriminator_loss_by_hand():
    real, wrong, fake = torch.tensor([2.0]), torch.tensor([0.5]), torch.tensor([-1.0])
    out = discriminator_loss(real, wrong, fake)
    want = _bce(2.0, 1) + 0.5 * (_bce(0.5, 0) + _bce(-1.0, 0))
    assert out["d_loss"].item() == pytest.approx(want, rel=1e-6)
    # with the unconditional head: real and fake terms averaged with it
    out = discriminator_loss(real, wrong, fake, torch.tensor([1.0]), torch.tensor([0.0]))
    want = 0.5 * (_bce(2.0, 1) + _bce(1.0, 1)) + 0.5 * (_bce(0.5, 0) + 0.5 * (_bce(-1.0, 0) + _bce(0.0, 0)))
    assert out["d_loss"].item() == pytest.approx(want, rel=1e-6)


def test_generator_loss_by_hand():
    fake = torch.tensor([0.3, -0.2])
    mu, logvar = torch.zeros(2, 3), torch.zeros(2, 3)
    out = generator_loss(fake, mu, logvar, kl_coeff=2.0)
    want = (_bce(0.3, 1) + _bce(-0.2, 1)) / 2
    assert out["g_loss"].item() == pytest.approx(want, rel=1e-6)
    assert out["kl"].item() == 0.0
    out = generator_loss(fake, torch.ones(2, 3), logvar, 2.0, fake_uncond=torch.tensor([0.0, 0.0]))
    assert out["g_loss"].item() == pytest.approx(want + _bce(0.0, 1) + 2.0 * 1.5, rel=1e-6)


def test_pixel_mean_cov_against_numpy():
    import numpy as np
    img = torch.rand(2, 3, 8, 5) * 2 - 1
    mu, cov = pixel_mean_cov(img)
    for b in range(2):
        px = img[b].reshape(3, -1).numpy()
        assert np.allclose(mu[b].numpy(), px.mean(axis=1), atol=1e-6)
        assert np.allclose(cov[b].numpy(), np.cov(px, bias=True), atol=1e-6)
    # the memory format does not change the statistics
    mu2, cov2 = pixel_mean_cov(img.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(mu, mu2) and torch.allclose(cov, cov2)
    # autocast does not lower the covariance's precision
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mu3, cov3 = pixel_mean_cov(img)
    assert cov3.dtype == torch.float32 and torch.allclose(cov, cov3)


def test_color_consistency_by_hand():
    lo = torch.rand(2, 3, 16, 16) * 2 - 1
    # a 4x nearest up-sampling has exactly the same pixel statistics: no penalty across resolutions
    hi = torch.nn.functional.interpolate(lo, scale_factor=4, mode="nearest")
    assert color_consistency(hi, lo).item() == pytest.approx(0.0, abs=1e-10)
    # flat images: the means differ by (1, 0, -0.5), both covariances are 0 -> MSE over the 6 means
    a = torch.zeros(2, 3, 4, 4)
    b = a + torch.tensor([1.0, 0.0, -0.5]).view(1, 3, 1, 1)
    assert color_consistency(b, a).item() == pytest.approx((1.0 + 0.25) / 3, rel=1e-6)
    # a channel with values +-1 (variance 1) against a flat one: 5 x MSE over the 2 x 9 covariance entries
    c = a.clone()
    c[:, 0, ::2] = 1.0
    c[:, 0, 1::2] = -1.0
    assert color_consistency(c, a).item() == pytest.approx(5.0 * 1.0 / 9, rel=1e-6)
    # and it enters the generator's loss with its coefficient
    fake = torch.tensor([0.3, -0.2])
    z = torch.zeros(2, 3)
    base = generator_loss(fake, z, z, 2.0)["g_loss"].item()
    out = generator_loss(fake, z, z, 2.0, color=torch.tensor(0.5), color_coeff=10.0)
    assert out["g_loss"].item() == pytest.approx(base + 5.0, rel=1e-6) and out["g_color"].item() == 0.5


def test_bce_with_logits_is_stable_where_sigmoid_bce_saturates():
    x = torch.tensor([-200.0])
    assert torch.isfinite(discriminator_loss(x, x, -x)["d_loss"])
    assert torch.isfinite(generator_loss(x, torch.zeros(1, 2), torch.zeros(1, 2), 1.0)["g_loss"])
    assert not torch.isfinite(-torch.log(torch.sigmoid(x))).all()  # what Sigmoid + log would give


def test_mismatched_conditions():
    text = torch.arange(4.0)[:, None]
    assert mismatched_conditions(text).flatten().tolist() == [1.0, 2.0, 3.0, 0.0]
    cls = torch.tensor([0, 0, 1, 1])
    wrong = mismatched_conditions(text, cls).flatten().tolist()
    assert wrong == [2.0, 2.0, 0.0, 0.0]  # always another class
    assert mismatched_conditions(text, torch.tensor([5, 5, 5, 5])).flatten().tolist() == [1.0, 2.0, 3.0, 0.0]
    # the nearest following sample of another class, wrapping around; unknown classes (-1): the shift
    text6 = torch.arange(6.0)[:, None]
    got = mismatched_conditions(text6, torch.tensor([3, 3, 3, 1, 3, 2])).flatten().tolist()
    assert got == [3.0, 3.0, 3.0, 4.0, 5.0, 0.0]
    assert mismatched_conditions(text6, torch.tensor([3, 3, -1, 1, 3, 2])).flatten().tolist() == [1, 2, 3, 4, 5, 0]


def test_few_steps_lower_d_loss():
    """A few D optimisation steps on a fixed batch lower D's loss."""
    torch.manual_seed(0)
    m = build_models(small(1))
    opt = torch.optim.Adam(m.D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    real = torch.rand(8, 3, 64, 64) * 2 - 1
    text = torch.randn(8, 20)
    with torch.no_grad():
        fake, _, _ = m.G(text, torch.randn(8, 10))
    wrong = mismatched_conditions(text)
    losses = []
    for _ in range(15):
        r, f = m.D(real, text, wrong), m.D(fake, text)
        loss = discriminator_loss(r["cond"], r["wrong"], f["cond"])["d_loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.8


def test_condition_reinjected_in_stage1_generator():
    """model.cond_reinject: c enters again at 8/16/32; off (the paper) the parameters are today's exactly."""
    import dataclasses

    from stackgan_dist.config import ConfigError, load_config

    base = build_stage1_generator(small(1))
    for res, block in ((8, 1), (16, 2), (32, 3)):
        g = build_stage1_generator(dataclasses.replace(small(1), cond_reinject=res))
        assert set(g.state_dict()) == set(base.state_dict())  # same names: only one conv is wider
        wider = {k for k, v in g.state_dict().items() if v.shape != base.state_dict()[k].shape}
        assert wider == {f"up.{block}.1.weight"}
        assert g.state_dict()[f"up.{block}.1.weight"].shape[1] == base.state_dict()[f"up.{block}.1.weight"].shape[1] + 12
        torch.manual_seed(0)
        text, z = torch.randn(B, 20), torch.randn(B, 10)
        eps = torch.zeros(B, 12, requires_grad=True)
        img, _, _ = g(text, z, eps)
        assert img.shape == (B, 3, 64, 64)
        # the condition reaches the image through the re-injection: zero the first-layer path and it still does
        with torch.no_grad():
            g.fc[0].weight[:, :12] = 0
        g(text, z, eps)[0].sum().backward()
        assert eps.grad.abs().sum() > 0
    eps = torch.zeros(B, 12, requires_grad=True)  # off: with that path zeroed, c no longer reaches the image
    with torch.no_grad():
        base.fc[0].weight[:, :12] = 0
    base(text, z, eps)[0].sum().backward()
    assert eps.grad.abs().sum() == 0
    with pytest.raises(ValueError, match="cond_reinject"):
        build_stage1_generator(dataclasses.replace(small(1), cond_reinject=12))
    with pytest.raises(ConfigError, match="model.cond_reinject"):
        load_config(None, ["model.cond_reinject=12"])


def test_stage2_generator_padding():
    """model.g_padding: "replicate" pads every 3x3 conv of Stage-II G with its border pixels; same parameters as
    "zeros" (the paper), so weights load across, and the image changes."""
    import dataclasses

    from stackgan_dist.config import ConfigError, load_config

    zeros = build_models(small(2)).G
    rep = build_models(dataclasses.replace(small(2), g_padding="replicate")).G
    modes = {m.padding_mode for m in rep.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)}
    assert modes == {"replicate"}
    assert {m.padding_mode for m in zeros.modules() if isinstance(m, torch.nn.Conv2d)} == {"zeros"}
    rep.load_state_dict(zeros.state_dict())
    zeros.eval(), rep.eval()
    text, s0 = torch.randn(B, 20), torch.rand(B, 3, 64, 64) * 2 - 1
    a, b = zeros(text, s0)[0], rep(text, s0)[0]
    assert a.shape == b.shape == (B, 3, 256, 256) and not torch.allclose(a, b)
    # a constant map stays constant through a replicate-padded conv, border included; zeros darken the border
    conv = rep.img[0]
    with torch.no_grad():
        conv.weight.fill_(1.0)
        y = conv(torch.ones(1, conv.in_channels, 8, 8))
    assert torch.allclose(y, torch.full_like(y, 9.0 * conv.in_channels))
    with pytest.raises(ConfigError, match="model.g_padding"):
        load_config(None, ["model.g_padding=reflect"])

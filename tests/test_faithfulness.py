"""docs/faithfulness.md, row by row.

Formula rows: our implementation under the "authors" preset, on a fixed batch, against the authors'
StackGAN-Pytorch formulas WRITTEN OUT HERE in plain torch (nn.Sigmoid + nn.BCELoss, their averaging, their
KL mean times their coefficient, their wrong pairs, their Adam), not imported from our losses. The networks
are ours (the same weights on both sides); what is compared is everything the step does with them.
Setting rows: the preset (or the config the row names) sets the value.
"""
import copy

import pytest
import torch
from torch import nn, optim

from stackgan_dist.config import (ConfigError, Config, ModelConfig, kl_weight, load_config, model_defining,
                                  preset_overrides)
from stackgan_dist.distributed.env import DistEnv
from stackgan_dist.distributed import make_strategy
from stackgan_dist.distributed.optim import make_adam
from stackgan_dist.losses import LossOptions, bce, discriminator_loss, mismatched_conditions
from stackgan_dist.models.build import build_models, build_stage1_generator
from stackgan_dist.models.conditioning import CondAugment
from stackgan_dist.models.stage1 import frozen_stage1_forward
from stackgan_dist.train_step import GANStep

SMALL = ["model.gf_dim=16", "model.df_dim=8", "model.condition_dim=12", "model.z_dim=10", "model.text_dim=20",
         "model.res_blocks=1", "train.batch_size=5", "train.device=cpu"]
B = 5


def authors_cfg(stage: int, preset: bool = True):
    return load_config(None, (preset_overrides("authors") if preset else []) + SMALL + [f"model.stage={stage}"])


def fixed_batch(stage: int, cfg) -> dict:
    g = torch.Generator().manual_seed(7)
    size = 64 if stage == 1 else 256
    return {"image": torch.randint(0, 256, (B, 3, size, size), dtype=torch.uint8, generator=g),
            "text": torch.randn(B, cfg.model.text_dim, generator=g), "cls": torch.tensor([0, 0, 1, 2, 1])}


def stage1_generator(cfg):
    s1 = ModelConfig(**{**model_defining(cfg), "stage": 1})
    torch.manual_seed(3)
    g1 = build_stage1_generator(s1).requires_grad_(False).eval()
    with torch.no_grad():  # non-trivial stored statistics, so that train and eval mode differ
        for m in g1.modules():
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return g1


def our_step(cfg, stage: int, G, D, G1):
    """One GANStep (the trainer's step) at world size 1 over the configured strategy."""
    strategy = make_strategy(cfg, DistEnv(device=torch.device("cpu")))
    strategy.setup(G, D)
    gen = torch.Generator().manual_seed(1)
    step = GANStep(strategy, stage, cfg.model.z_dim, cfg.model.condition_dim, kl_weight(cfg), G1, gen, 1, False,
                   cfg.train.color_coeff, LossOptions.from_config(cfg))
    return step, strategy


def authors_step(stage: int, batch: dict, G, D, G1, z_dim: int, cond_dim: int) -> dict:
    """code/trainer.py GANTrainer.train, one iteration, with code/miscc/utils.py's losses written out."""
    criterion, sigmoid = nn.BCELoss(), nn.Sigmoid()  # D_GET_LOGITS ends in nn.Sigmoid
    real = batch["image"].float() / 127.5 - 1.0
    text = batch["text"]
    b = real.shape[0]
    gen = torch.Generator().manual_seed(1)  # the noise our step draws: z, eps, then Stage-I's eps
    z = torch.randn(b, z_dim, generator=gen)
    eps = torch.randn(b, cond_dim, generator=gen)
    real_labels, fake_labels = torch.ones(b), torch.zeros(b)
    optimizerD = optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    optimizerG = optim.Adam([p for p in G.parameters() if p.requires_grad], lr=2e-4, betas=(0.5, 0.999))
    if stage == 1:
        fake_imgs, mu, logvar = G(text, z, eps)
    else:
        eps1 = torch.randn(b, G1.ca.cond_dim, generator=gen)
        G1.train()  # STAGE1_G is a submodule of STAGE2_G, which is in train mode
        _, stage1_img = None, G1(text, z, eps1)[0]
        fake_imgs, mu, logvar = G(text, stage1_img.detach(), eps)
    uncond = stage == 2

    def cond_logits(feats, c):  # D_GET_LOGITS: the condition concatenated as is, then Sigmoid
        return sigmoid(D.cond(feats, c))

    # compute_discriminator_loss(netD, real_imgs, fake_imgs, real_labels, fake_labels, mu)
    D.zero_grad()
    cond = mu.detach()
    fake = fake_imgs.detach()
    real_features = D.encode_image(real)
    fake_features = D.encode_image(fake)
    errD_real = criterion(cond_logits(real_features, cond), real_labels)
    errD_wrong = criterion(cond_logits(real_features[:(b - 1)], cond[1:]), fake_labels[1:])
    errD_fake = criterion(cond_logits(fake_features, cond), fake_labels)
    if uncond:
        uncond_errD_real = criterion(sigmoid(D.uncond(real_features)), real_labels)
        uncond_errD_fake = criterion(sigmoid(D.uncond(fake_features)), fake_labels)
        errD = ((errD_real + uncond_errD_real) / 2. + (errD_fake + errD_wrong + uncond_errD_fake) / 3.)
    else:
        errD = errD_real + (errD_fake + errD_wrong) * 0.5
    errD.backward()
    optimizerD.step()
    # compute_generator_loss(netD, fake_imgs, real_labels, mu) + KL_loss(mu, logvar) * COEFF.KL
    G.zero_grad()
    fake_features = D.encode_image(fake_imgs)
    errG = criterion(cond_logits(fake_features, cond), real_labels)
    if uncond:
        errG = errG + criterion(sigmoid(D.uncond(fake_features)), real_labels)
    KLD_element = mu.pow(2).add(logvar.exp()).mul(-1).add(1).add(logvar)
    kl = torch.mean(KLD_element).mul(-0.5)
    errG_total = errG + kl * 2.0
    errG_total.backward()
    optimizerG.step()
    return {"d_loss": errD.detach(), "g_loss": errG_total.detach(), "kl_term": (kl * 2.0).detach()}


@pytest.mark.parametrize("stage", [1, 2])
def test_one_step_under_the_preset_is_the_authors_step(stage):
    """Rows: D loss weighting, Sigmoid + BCELoss, KL reduction and coefficient, D conditioned on the CA mean,
    CA ReLU, wrong pairs, Adam settings, frozen Stage-I BatchNorm mode: losses and every weight and
    statistic after one step agree."""
    cfg = authors_cfg(stage)
    torch.manual_seed(0)
    models = build_models(cfg.model)
    G1 = stage1_generator(cfg) if stage == 2 else None
    aG, aD, aG1 = copy.deepcopy(models.G), copy.deepcopy(models.D), copy.deepcopy(G1)
    batch = fixed_batch(stage, cfg)
    step, strategy = our_step(cfg, stage, models.G, models.D, G1)
    ours = step([batch])
    theirs = authors_step(stage, batch, aG, aD, aG1, cfg.model.z_dim, cfg.model.condition_dim)
    assert torch.allclose(ours["d_loss"], theirs["d_loss"], rtol=1e-5, atol=1e-6), (ours["d_loss"], theirs["d_loss"])
    assert torch.allclose(ours["g_loss"], theirs["g_loss"], rtol=1e-5, atol=1e-6), (ours["g_loss"], theirs["g_loss"])
    for name, a, b in (("G", strategy.g.net, aG), ("D", strategy.d.net, aD)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:  # parameters after their Adam step, and BatchNorm statistics
            assert torch.allclose(sa[k].float(), sb[k].float(), rtol=1e-4, atol=1e-5), f"{name}.{k}"
    if stage == 2:
        for k, v in G1.state_dict().items():
            assert torch.allclose(v.float(), aG1.state_dict()[k].float(), rtol=1e-5, atol=1e-6), f"G1.{k}"


def test_kl_term_is_their_mean_times_their_coefficient():
    """Row: KL reduction. Theirs: -0.5 * mean(1 + logvar - mu^2 - exp(logvar)) * COEFF.KL (= 2)."""
    cfg = authors_cfg(1)
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(6, 12, generator=g), torch.randn(6, 12, generator=g)
    from stackgan_dist.losses import generator_loss

    ours = generator_loss(torch.zeros(6), mu, logvar, kl_weight(cfg))
    theirs = torch.mean(mu.pow(2).add(logvar.exp()).mul(-1).add(1).add(logvar)).mul(-0.5) * 2.0
    assert torch.allclose(ours["g_loss"] - ours["g_adv"], theirs, rtol=1e-6)
    # the paper's equation (sum over dimensions, lambda = 1) is the other choice
    paper = load_config(None, SMALL + ["train.kl_reduction=sum", "train.kl_coeff=1"])
    ours_p = generator_loss(torch.zeros(6), mu, logvar, kl_weight(paper))
    by_hand = 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).sum(dim=1).mean()
    assert torch.allclose(ours_p["g_loss"] - ours_p["g_adv"], by_hand, rtol=1e-6)


def test_ca_relu_is_theirs():
    """Row: CA ReLU. CA_NET.encode: x = ReLU(fc(phi)); mu, logvar = x[:, :c], x[:, c:]; c = eps * exp(logvar/2) + mu."""
    cfg = authors_cfg(1)
    torch.manual_seed(0)
    ca = CondAugment(20, 12, cfg.model.ca_relu)
    text, eps = torch.randn(4, 20), torch.randn(4, 12)
    x = nn.ReLU()(ca.fc(text))
    mu, logvar = x[:, :12], x[:, 12:]
    c, m, lv = ca(text, eps)
    assert torch.allclose(c, eps.mul(logvar.mul(0.5).exp()).add(mu), atol=1e-6)
    assert torch.equal(m, mu) and torch.equal(lv, logvar) and (lv >= 0).all()
    assert not CondAugment(20, 12).relu  # the paper's CA (the default) has no ReLU


def test_d_loss_weighting_with_the_unconditional_head():
    """Row: D loss weighting at Stage-II. Theirs: (real + uncond_real)/2 + (fake + wrong + uncond_fake)/3.
    Ours (default): (real + uncond_real)/2 + (wrong + (fake + uncond_fake)/2)/2."""
    g = torch.Generator().manual_seed(0)
    r, w, f, ur, uf = (torch.randn(8, generator=g) * 3 for _ in range(5))
    crit, sig = nn.BCELoss(), nn.Sigmoid()
    one, zero = torch.ones(8), torch.zeros(8)
    er, ew, ef = crit(sig(r), one), crit(sig(w), zero), crit(sig(f), zero)
    eur, euf = crit(sig(ur), one), crit(sig(uf), zero)
    theirs = (er + eur) / 2. + (ef + ew + euf) / 3.
    ours_authors = discriminator_loss(r, w, f, ur, uf, weights="authors", output="sigmoid")["d_loss"]
    assert torch.allclose(ours_authors, theirs, rtol=1e-6)
    ours_default = discriminator_loss(r, w, f, ur, uf)["d_loss"]
    assert torch.allclose(ours_default, (er + eur) / 2 + (ew + (ef + euf) / 2) / 2, rtol=1e-5)
    assert not torch.allclose(ours_default, theirs)
    # Stage-I (no unconditional head): both are real + (fake + wrong) / 2
    s1 = er + (ef + ew) * 0.5
    for weights in ("ours", "authors"):
        assert torch.allclose(discriminator_loss(r, w, f, weights=weights, output="sigmoid")["d_loss"], s1)


def test_sigmoid_bce_is_theirs_and_saturates_as_theirs():
    """Row: D output. nn.Sigmoid + nn.BCELoss, including its clamp of log at -100 where the sigmoid
    saturates; BCE-with-logits (ours) is exact there."""
    x = torch.tensor([-3.0, 0.2, 5.0, 120.0])
    assert torch.allclose(bce(x, 0.0, "sigmoid"), nn.BCELoss()(nn.Sigmoid()(x), torch.zeros(4)))
    assert torch.allclose(bce(x, 1.0, "sigmoid"), nn.BCELoss()(nn.Sigmoid()(x), torch.ones(4)))
    big = torch.tensor([200.0])
    assert bce(big, 0.0, "sigmoid").item() == pytest.approx(100.0)  # their clamp
    assert bce(big, 0.0).item() == pytest.approx(200.0)  # the true value


def test_sigmoid_output_is_refused_under_mixed_precision():
    with pytest.raises(ConfigError, match="train.d_output=sigmoid"):
        load_config(None, preset_overrides("authors") + ["train.precision=bf16"])


def test_wrong_pairs_shift_is_theirs():
    """Row: wrong pairs. Theirs: real_features[:B-1] against cond[1:] (B-1 pairs, no wrap, no class check)."""
    text = torch.arange(5.0)[:, None].repeat(1, 3)
    cls = torch.tensor([0, 0, 1, 1, 2])
    assert torch.equal(mismatched_conditions(text, cls, "shift"), text[1:])
    ours = mismatched_conditions(text, cls)  # B rows, each from another class, wrapping around
    assert ours.shape == text.shape and torch.equal(ours[:, 0], torch.tensor([2.0, 2.0, 4.0, 4.0, 0.0]))
    cfg = authors_cfg(1)
    m = build_models(cfg.model)
    out = m.D(torch.randn(5, 3, 64, 64), text[:, :1].repeat(1, 12), text[1:, :1].repeat(1, 12))
    assert out["wrong"].shape == (4,) and out["cond"].shape == (5,)


def test_d_conditioned_on_the_ca_mean_has_no_text_layer():
    """Row: D's condition. Theirs: the detached CA mean concatenated as is (nef = CONDITION_DIM); the paper:
    D's own FC compression of phi_t. A model-defining key: the parameter shapes differ."""
    paper, theirs = authors_cfg(1, preset=False), authors_cfg(1)
    assert (paper.model.d_condition, theirs.model.d_condition) == ("text", "ca_mu")
    dp, dt = build_models(paper.model).D, build_models(theirs.model).D
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(dp) - n(dt) == 20 * 12 + 12  # the text FC's weight and bias
    assert paper.model_hash() != theirs.model_hash()


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_frozen_stage1_bn_mode(mode):
    """Row: frozen Stage-I BatchNorm. Default: eval mode, statistics unchanged. Preset: train mode,
    statistics move as theirs do, weights unchanged; G1 back in eval mode after the step."""
    cfg = authors_cfg(2) if mode == "train" else authors_cfg(2, preset=False)
    assert cfg.train.stage1_bn == mode
    torch.manual_seed(0)
    models = build_models(cfg.model)
    G1 = stage1_generator(cfg)
    before = {k: v.clone() for k, v in G1.state_dict().items()}
    step, _ = our_step(cfg, 2, models.G, models.D, G1)
    step([fixed_batch(2, cfg)])
    after = G1.state_dict()
    weights = [k for k in before if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert weights and stats and not G1.training
    assert all(torch.equal(before[k], after[k]) for k in weights)
    moved = [k for k in stats if not torch.equal(before[k], after[k])]
    assert (moved == stats) if mode == "train" else not moved


def test_frozen_stage1_forward_train_mode_normalises_with_the_batch():
    cfg = authors_cfg(2)
    G1 = stage1_generator(cfg)
    g = torch.Generator().manual_seed(0)
    text, z, eps = torch.randn(4, 20, generator=g), torch.randn(4, 10, generator=g), torch.randn(4, 12, generator=g)
    ref = copy.deepcopy(G1).train()
    with torch.no_grad():
        want = ref(text, z, eps)[0]
    got = frozen_stage1_forward(G1, text, z, eps, "train")
    assert torch.allclose(got, want) and not got.requires_grad
    assert not torch.allclose(frozen_stage1_forward(G1, text, z, eps, "eval"), want)


def test_adam_settings():
    """Row: Adam. Theirs: optim.Adam(params, lr=2e-4, betas=(0.5, 0.999)), torch's defaults otherwise
    (foreach and fused left to torch). Ours: fused on every device (its found_inf input lets the non-finite
    guard skip a step on the device)."""
    cfg = authors_cfg(1)
    p = [nn.Parameter(torch.zeros(3))]
    opt = make_adam(p, cfg.train.lr_d, (cfg.train.beta1, cfg.train.beta2), torch.device("cpu"),
                    cfg.train.optimizer, cfg.train.adam_foreach)
    d = opt.defaults
    assert (d["lr"], d["betas"], d["foreach"], d["fused"], d["eps"], d["weight_decay"], d["amsgrad"]) == \
        (2e-4, (0.5, 0.999), None, None, 1e-8, 0, False)
    ours = make_adam(p, 2e-4, (0.5, 0.999), torch.device("cpu"))
    assert ours.defaults["fused"] is True and Config().train.adam_foreach is True


def test_preset_sets_every_setting_row():
    """Setting rows: what the preset sets, and the defaults (the paper, or ours where the paper is silent)."""
    c, d = authors_cfg(2), authors_cfg(2, preset=False)
    want = {"model.ca_relu": (True, False), "model.d_condition": ("ca_mu", "text"),
            "train.d_output": ("sigmoid", "logits"), "train.d_loss_weights": ("authors", "ours"),
            "train.wrong_pairs": ("shift", "other_class"), "train.kl_reduction": ("mean", "mean"),
            "train.kl_coeff": (2.0, 2.0), "train.stage1_bn": ("train", "eval"),
            "train.adam_foreach": (False, True), "train.precision": ("fp32", "fp32"),
            "train.color_coeff": (0.0, 0.0), "train.lr_g": (2e-4, 2e-4), "train.lr_d": (2e-4, 2e-4),
            "train.beta1": (0.5, 0.5), "train.beta2": (0.999, 0.999), "train.lr_decay_factor": (0.5, 0.5)}
    for key, (theirs, default) in want.items():
        sec, name = key.split(".")
        assert getattr(getattr(c, sec), name) == theirs, key
        assert getattr(getattr(d, sec), name) == default, key
    # the command line wins over the preset
    assert load_config(None, preset_overrides("authors") + ["train.stage1_bn=eval"]).train.stage1_bn == "eval"
    with pytest.raises(ConfigError, match="unknown preset"):
        preset_overrides("nope")
    with pytest.raises(ConfigError, match="plain name"):
        preset_overrides("../authors")


def test_preprocessing_rows():
    """Row: image pre-processing. Load at 76/64 of the crop (76 -> 64, 304 -> 256) and the birds box crop:
    R = int(max(w, h) * 0.75) around the box centre, clipped (code/miscc/datasets.py get_img)."""
    import numpy as np
    from PIL import Image

    from stackgan_dist.data.prepare.stackgan_release import crop_box
    from stackgan_dist.data.format import LOAD_SIZES

    assert LOAD_SIZES == {1: int(64 * 76 / 64), 2: int(256 * 76 / 64)}
    img = Image.new("RGB", (500, 375))
    for bbox in ([60, 40, 200, 150], [0, 0, 490, 370], [300.5, 200.2, 150.7, 80.1]):
        width, height = img.size
        R = int(np.maximum(bbox[2], bbox[3]) * 0.75)
        center_x, center_y = int((2 * bbox[0] + bbox[2]) / 2), int((2 * bbox[1] + bbox[3]) / 2)
        y1, y2 = np.maximum(0, center_y - R), np.minimum(height, center_y + R)
        x1, x2 = np.maximum(0, center_x - R), np.minimum(width, center_x + R)
        assert crop_box(img, bbox).size == (x2 - x1, y2 - y1)


def test_batch_and_epochs_rows():
    """Row: batch and epochs. The birds and flowers configs follow the paper (batch 64, 600 epochs, lr
    halved every 100 epochs); the preset leaves them to the dataset config (the authors' PyTorch release
    has COCO settings only)."""
    import os

    from conftest import REPO

    assert not any(k.startswith(("train.batch_size", "train.max_", "train.lr_decay_steps", "train.lr_decay_epochs"))
                   for k in preset_overrides("authors"))
    for name, n_train in (("birds", 8855), ("flowers", 7034)):
        for stage in (1, 2):
            cfg = load_config(os.path.join(REPO, "configs", name, f"stage{stage}.yaml"))
            t = cfg.train
            assert (t.global_batch, t.batch_size) == (64, 0) and t.lr_decay_factor == 0.5  # 64 at any world size
            if getattr(t, "max_epochs", 0):  # epoch-based schedules (the architecture issue)
                assert (t.max_epochs, t.lr_decay_epochs) == (600, 100)
            else:
                per_epoch = n_train // 64
                assert (t.max_steps, t.lr_decay_steps) == (600 * per_epoch, 100 * per_epoch), (name, stage)


def test_colour_term_is_off_by_default_and_in_the_preset():
    """Row: colour consistency (StackGAN++, not the ICCV 2017 paper, not the StackGAN-Pytorch code)."""
    assert Config().train.color_coeff == 0.0 and authors_cfg(2).train.color_coeff == 0.0


def test_benchmark_baseline_is_our_step_under_the_preset():
    """benchmarks/throughput.py --baseline: the authors' step is GANStep under the preset, not a copy."""
    import os
    import sys

    from conftest import REPO

    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import throughput

    a = throughput.parser().parse_args(["--stage", "2", "--batch-size", "2", "--gf-dim", "16", "--df-dim", "8",
                                        "--condition-dim", "8", "--z-dim", "8", "--text-dim", "16", "--channels-last",
                                        "--precision", "bf16"])
    base = throughput.BaselineStep(a, torch.device("cpu"), torch.Generator().manual_seed(0))
    c = base.cfg
    assert (c.train.precision, c.train.channels_last, c.train.compile, c.train.adam_foreach) == ("fp32", False, False,
                                                                                                  False)
    assert base.step.loss_options == LossOptions("sigmoid", "authors", "shift", "ca_mu", "train")
    assert base.step.kl_coeff == pytest.approx(2.0 / 8) and base.step.G1.ca.relu
    assert base.step.s.d.optimizer.defaults["foreach"] is None

"""The paper-width networks as the scaling model sees them: parameter shapes and BatchNorm layers (built on the
meta device: no memory, no init cost) and the FLOPs of one training step per image (throughput.py's counter)."""
from __future__ import annotations

from types import SimpleNamespace

import common  # noqa: F401  (puts the repo on sys.path)
import torch

from scaling_model import Net
from stackgan_dist.config import Config
from stackgan_dist.models.build import build_models

PAPER = {"gf_dim": 128, "df_dim": 64, "condition_dim": 128, "z_dim": 100, "text_dim": 1024}


def paper_modules(stage: int):
    cfg = Config()
    cfg.model.stage, cfg.model.text_dim = stage, PAPER["text_dim"]  # char-CNN-RNN embeddings (no dataset here)
    with torch.device("meta"):  # shapes only: no memory, no init cost
        m = build_models(cfg.model)
    return m.G, m.D


def net_of(module: torch.nn.Module) -> Net:
    bns = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    return Net(params=tuple(tuple(p.shape) for p in module.parameters()),
               buffer_elems=sum(b.numel() for b in module.buffers() if b.is_floating_point()),
               bn_channels=tuple(m.num_features for m in bns))


def paper_nets(stage: int) -> tuple[Net, Net]:
    """(G, D) of ``stage`` at the paper widths (the frozen Stage-I generator of Stage II trains nothing)."""
    return tuple(net_of(m) for m in paper_modules(stage))


def paper_grad_bytes(stage: int) -> int:
    return sum(p.numel() * 4 for mod in paper_modules(stage) for p in mod.parameters())


def paper_flops_per_img(stage: int) -> float:
    """throughput.py's FLOP count (torch.utils.flop_counter) of one training step at the paper widths, per
    image (batch 2, fp32 on CPU: the count does not depend on the precision)."""
    import throughput

    a = SimpleNamespace(stage=stage, batch_size=2, precision="fp32", backend="ddp", compile=False,
                        channels_last=False, device="cpu", baseline=False, **PAPER)
    _cfg, ours, _base, batch, _dev = throughput.build(a)
    return throughput.step_flops(ours, batch) / 2

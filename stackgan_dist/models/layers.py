"""Building blocks shared by both stages."""
from __future__ import annotations

import torch
from torch import nn


def conv3x3(in_ch: int, out_ch: int, padding: str = "zeros") -> nn.Conv2d:
    """``padding``: "zeros" (the paper's and the authors') or "replicate" (the border pixel repeated)."""
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=1, padding=1, bias=False, padding_mode=padding)


def up_block(in_ch: int, out_ch: int, padding: str = "zeros") -> nn.Sequential:
    """Nearest-neighbour x2, 3x3 conv, BatchNorm, ReLU: H x W -> 2H x 2W."""
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="nearest"),
        conv3x3(in_ch, out_ch, padding),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


def down_block(in_ch: int, out_ch: int, bn: bool = True) -> nn.Sequential:
    """4x4 stride-2 conv (+ BatchNorm), LeakyReLU 0.2: H x W -> H/2 x W/2."""
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, 4, 2, 1, bias=False)]
    if bn:
        layers.append(nn.BatchNorm2d(out_ch))
    layers.append(nn.LeakyReLU(0.2, inplace=True))
    return nn.Sequential(*layers)


class ResBlock(nn.Module):
    def __init__(self, ch: int, padding: str = "zeros"):
        super().__init__()
        self.block = nn.Sequential(
            conv3x3(ch, ch, padding), nn.BatchNorm2d(ch), nn.ReLU(inplace=True), conv3x3(ch, ch, padding),
            nn.BatchNorm2d(ch)
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.block(x))


class CondLogits(nn.Module):
    """D head: image code (B, 8ndf, 4, 4) [+ text code replicated to 4x4] -> one logit per image."""

    def __init__(self, ndf: int, cond_dim: int = 0):
        super().__init__()
        self.cond_dim = cond_dim
        if cond_dim:
            self.joint = nn.Sequential(
                conv3x3(ndf * 8 + cond_dim, ndf * 8), nn.BatchNorm2d(ndf * 8), nn.LeakyReLU(0.2, inplace=True)
            )
        self.out = nn.Conv2d(ndf * 8, 1, kernel_size=4, stride=4)

    def forward(self, h: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        if self.cond_dim:
            c = c.view(c.shape[0], self.cond_dim, 1, 1).expand(-1, -1, h.shape[2], h.shape[3])
            h = self.joint(torch.cat([h, c.to(h.dtype)], dim=1))
        return self.out(h).view(-1)


def init_weights(m: nn.Module) -> None:
    """The authors' initialisation: N(0, 0.02) convs and linears, N(1, 0.02) BatchNorm scales."""
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)

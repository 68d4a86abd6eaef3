"""Stage-I: 64x64 images from z and the augmented text condition."""
from __future__ import annotations

import torch
from torch import nn

from .conditioning import CondAugment
from .layers import CondLogits, conv3x3, down_block, up_block


class Stage1Generator(nn.Module):
    def __init__(self, text_dim: int, cond_dim: int, z_dim: int, gf_dim: int, ca_relu: bool = False):
        super().__init__()
        self.z_dim = z_dim
        ngf = gf_dim * 8
        self.ngf = ngf
        self.ca = CondAugment(text_dim, cond_dim, ca_relu)
        self.fc = nn.Sequential(nn.Linear(z_dim + cond_dim, ngf * 16, bias=False), nn.BatchNorm1d(ngf * 16),
                                nn.ReLU(inplace=True))
        self.up = nn.Sequential(
            up_block(ngf, ngf // 2),  # -> ngf/2 x 8 x 8
            up_block(ngf // 2, ngf // 4),  # -> ngf/4 x 16 x 16
            up_block(ngf // 4, ngf // 8),  # -> ngf/8 x 32 x 32
            up_block(ngf // 8, ngf // 16),  # -> ngf/16 x 64 x 64
        )
        self.img = nn.Sequential(conv3x3(ngf // 16, 3), nn.Tanh())

    def forward(self, text: torch.Tensor, z: torch.Tensor, eps: torch.Tensor | None = None):
        """text (B, text_dim), z (B, z_dim) -> image (B, 3, 64, 64), mu, logvar (B, cond_dim)."""
        c, mu, logvar = self.ca(text, eps)
        h = self.fc(torch.cat([c, z.to(c.dtype)], dim=1)).view(-1, self.ngf, 4, 4)
        return self.img(self.up(h)), mu, logvar


class TextCompress(nn.Module):
    """D's own text path: phi_t -> N_d (paper: FC + LeakyReLU), replicated spatially by the head."""

    def __init__(self, text_dim: int, cond_dim: int):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(text_dim, cond_dim), nn.LeakyReLU(0.2, inplace=True))

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.fc(text)


class Stage1Discriminator(nn.Module):
    has_uncond = False

    def __init__(self, text_dim: int, cond_dim: int, df_dim: int):
        super().__init__()
        ndf = df_dim
        self.encode = nn.Sequential(
            down_block(3, ndf, bn=False),  # -> ndf x 32 x 32
            down_block(ndf, ndf * 2),  # -> 2ndf x 16 x 16
            down_block(ndf * 2, ndf * 4),  # -> 4ndf x 8 x 8
            down_block(ndf * 4, ndf * 8),  # -> 8ndf x 4 x 4
        )
        self.text = TextCompress(text_dim, cond_dim)
        self.cond = CondLogits(ndf, cond_dim)

    def encode_image(self, img: torch.Tensor) -> torch.Tensor:
        return self.encode(img)

    def cond_logits(self, h: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.cond(h, self.text(text))

    def forward(self, img: torch.Tensor, text: torch.Tensor, wrong_text: torch.Tensor | None = None) -> dict:
        """One image encoding shared by the right-text and wrong-text heads -> logits (B,) each."""
        h = self.encode_image(img)
        out = {"cond": self.cond_logits(h, text)}
        if wrong_text is not None:
            out["wrong"] = self.cond_logits(h, wrong_text)
        return out

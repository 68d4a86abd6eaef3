"""Stage-II: 256x256 images from the (frozen) Stage-I image and a second CA of the text."""
from __future__ import annotations

import torch
from torch import nn

from .conditioning import CondAugment
from .layers import CondLogits, ResBlock, conv3x3, down_block, up_block
from .stage1 import TextCompress


class Stage2Generator(nn.Module):
    """``padding`` of every 3x3 conv: "zeros" (the paper) or "replicate" (model.g_padding; the demo: with
    zero padding and few channels the up-sampling chain draws a frame along the image border)."""

    def __init__(self, text_dim: int, cond_dim: int, gf_dim: int, res_blocks: int = 4, ca_relu: bool = False,
                 padding: str = "zeros"):
        super().__init__()
        ngf = gf_dim
        p = padding
        self.ca = CondAugment(text_dim, cond_dim, ca_relu)  # its own CA, separate from Stage-I's
        self.encode = nn.Sequential(
            conv3x3(3, ngf, p), nn.ReLU(inplace=True),  # -> ngf x 64 x 64
            nn.Conv2d(ngf, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(inplace=True),  # 32
            nn.Conv2d(ngf * 2, ngf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(inplace=True),  # 16
        )
        self.joint = nn.Sequential(conv3x3(cond_dim + ngf * 4, ngf * 4, p), nn.BatchNorm2d(ngf * 4),
                                   nn.ReLU(inplace=True))
        self.residual = nn.Sequential(*[ResBlock(ngf * 4, p) for _ in range(res_blocks)])
        self.up = nn.Sequential(
            up_block(ngf * 4, ngf * 2, p),  # -> 2ngf x 32 x 32
            up_block(ngf * 2, ngf, p),  # -> ngf x 64 x 64
            up_block(ngf, ngf // 2, p),  # -> ngf/2 x 128 x 128
            up_block(ngf // 2, ngf // 4, p),  # -> ngf/4 x 256 x 256
        )
        self.img = nn.Sequential(conv3x3(ngf // 4, 3, p), nn.Tanh())

    def forward(self, text: torch.Tensor, stage1_img: torch.Tensor, eps: torch.Tensor | None = None):
        """text (B, text_dim), stage1_img (B, 3, 64, 64) -> image (B, 3, 256, 256), mu, logvar."""
        h = self.encode(stage1_img)
        c, mu, logvar = self.ca(text, eps)
        c = c.view(c.shape[0], -1, 1, 1).expand(-1, -1, h.shape[2], h.shape[3])
        h = self.joint(torch.cat([h, c.to(h.dtype)], dim=1))
        return self.img(self.up(self.residual(h))), mu, logvar


class Stage2Discriminator(nn.Module):
    has_uncond = True

    def __init__(self, text_dim: int, cond_dim: int, df_dim: int, condition: str = "text"):
        super().__init__()
        ndf = df_dim
        self.encode = nn.Sequential(
            down_block(3, ndf, bn=False),  # -> ndf x 128 x 128
            down_block(ndf, ndf * 2),  # 64
            down_block(ndf * 2, ndf * 4),  # 32
            down_block(ndf * 4, ndf * 8),  # 16
            down_block(ndf * 8, ndf * 16),  # 8
            down_block(ndf * 16, ndf * 32),  # -> 32ndf x 4 x 4
            conv3x3(ndf * 32, ndf * 16), nn.BatchNorm2d(ndf * 16), nn.LeakyReLU(0.2, inplace=True),
            conv3x3(ndf * 16, ndf * 8), nn.BatchNorm2d(ndf * 8), nn.LeakyReLU(0.2, inplace=True),  # 8ndf x 4 x 4
        )
        self.text = TextCompress(text_dim, cond_dim, condition)
        self.cond = CondLogits(ndf, cond_dim)
        self.uncond = CondLogits(ndf, 0)

    def encode_image(self, img: torch.Tensor) -> torch.Tensor:
        return self.encode(img)

    def cond_logits(self, h: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.cond(h, self.text(text))

    def uncond_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.uncond(h)

    def forward(self, img: torch.Tensor, text: torch.Tensor, wrong_text: torch.Tensor | None = None) -> dict:
        """One image encoding shared by the heads -> conditional, wrong-text and unconditional logits (B,).
        A ``wrong_text`` of B' < B rows (the authors' shifted pairs) is scored against the first B' images."""
        h = self.encode_image(img)
        out = {"cond": self.cond_logits(h, text), "uncond": self.uncond_logits(h)}
        if wrong_text is not None:
            out["wrong"] = self.cond_logits(h[:wrong_text.shape[0]], wrong_text)
        return out

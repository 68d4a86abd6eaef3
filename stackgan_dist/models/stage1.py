"""Stage-I: 64x64 images from z and the augmented text condition."""
from __future__ import annotations

import torch
from torch import nn

from .conditioning import CondAugment
from .layers import CondLogits, conv3x3, down_block, up_block


class Stage1Generator(nn.Module):
    """``cond_reinject`` (8, 16 or 32; 0: off, the paper): the augmented condition c, replicated spatially, is
    concatenated again to the feature map at that resolution, so the layers that draw the outline see the
    text directly rather than only through z and c's 4x4 start (not in the paper; the demo turns it on)."""

    def __init__(self, text_dim: int, cond_dim: int, z_dim: int, gf_dim: int, ca_relu: bool = False,
                 cond_reinject: int = 0):
        super().__init__()
        self.z_dim = z_dim
        ngf = gf_dim * 8
        self.ngf = ngf
        self.ca = CondAugment(text_dim, cond_dim, ca_relu)
        self.fc = nn.Sequential(nn.Linear(z_dim + cond_dim, ngf * 16, bias=False), nn.BatchNorm1d(ngf * 16),
                                nn.ReLU(inplace=True))
        # the up-sampling block whose input is at the re-injection resolution (4 * 2**k) takes c too
        self.reinject_at = {8: 1, 16: 2, 32: 3}.get(cond_reinject, -1)
        if cond_reinject and self.reinject_at < 0:
            raise ValueError(f"cond_reinject must be 0, 8, 16 or 32, got {cond_reinject}")
        extra = [cond_dim if k == self.reinject_at else 0 for k in range(4)]
        self.up = nn.Sequential(
            up_block(ngf + extra[0], ngf // 2),  # -> ngf/2 x 8 x 8
            up_block(ngf // 2 + extra[1], ngf // 4),  # -> ngf/4 x 16 x 16
            up_block(ngf // 4 + extra[2], ngf // 8),  # -> ngf/8 x 32 x 32
            up_block(ngf // 8 + extra[3], ngf // 16),  # -> ngf/16 x 64 x 64
        )
        self.img = nn.Sequential(conv3x3(ngf // 16, 3), nn.Tanh())

    def forward(self, text: torch.Tensor, z: torch.Tensor, eps: torch.Tensor | None = None):
        """text (B, text_dim), z (B, z_dim) -> image (B, 3, 64, 64), mu, logvar (B, cond_dim)."""
        c, mu, logvar = self.ca(text, eps)
        h = self.fc(torch.cat([c, z.to(c.dtype)], dim=1)).view(-1, self.ngf, 4, 4)
        for k, block in enumerate(self.up):
            if k == self.reinject_at:
                cc = c.to(h.dtype).view(c.shape[0], -1, 1, 1).expand(-1, -1, h.shape[2], h.shape[3])
                h = torch.cat([h, cc], dim=1)
            h = block(h)
        return self.img(h), mu, logvar


@torch.no_grad()
def frozen_stage1_forward(G1: nn.Module, text: torch.Tensor, z: torch.Tensor, eps: torch.Tensor | None = None,
                          bn: str = "eval") -> torch.Tensor:
    """Stage-II's input: the frozen Stage-I generator's image, without gradients.

    ``bn="eval"`` (ours): BatchNorm uses its stored statistics, so G1 is a fixed function. ``bn="train"``
    (the authors': their STAGE1_G is a submodule of STAGE2_G, which trains in train mode): BatchNorm
    normalises with the batch's statistics and its running statistics drift with every step, while the
    weights stay frozen. G1 is left in eval mode afterwards either way (sample grids use the stored,
    possibly drifted, statistics, as the authors' test-time ``netG.eval()`` does).
    """
    G1.train(bn == "train")
    try:
        return G1(text, z, eps)[0].detach()
    finally:
        G1.eval()


class TextCompress(nn.Module):
    """D's own text path: phi_t -> N_d (paper: FC + LeakyReLU), replicated spatially by the head.

    ``condition="ca_mu"`` (the authors' code): D is given G's detached CA mean, already N_g = N_d wide, and
    concatenates it as is: no layer, no parameters."""

    def __init__(self, text_dim: int, cond_dim: int, condition: str = "text"):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(text_dim, cond_dim), nn.LeakyReLU(0.2, inplace=True)) \
            if condition == "text" else nn.Identity()

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.fc(text)


class Stage1Discriminator(nn.Module):
    has_uncond = False

    def __init__(self, text_dim: int, cond_dim: int, df_dim: int, condition: str = "text"):
        super().__init__()
        ndf = df_dim
        self.encode = nn.Sequential(
            down_block(3, ndf, bn=False),  # -> ndf x 32 x 32
            down_block(ndf, ndf * 2),  # -> 2ndf x 16 x 16
            down_block(ndf * 2, ndf * 4),  # -> 4ndf x 8 x 8
            down_block(ndf * 4, ndf * 8),  # -> 8ndf x 4 x 4
        )
        self.text = TextCompress(text_dim, cond_dim, condition)
        self.cond = CondLogits(ndf, cond_dim)

    def encode_image(self, img: torch.Tensor) -> torch.Tensor:
        return self.encode(img)

    def cond_logits(self, h: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.cond(h, self.text(text))

    def forward(self, img: torch.Tensor, text: torch.Tensor, wrong_text: torch.Tensor | None = None) -> dict:
        """One image encoding shared by the right-text and wrong-text heads -> logits (B,) each. A
        ``wrong_text`` of B' < B rows (the authors' shifted pairs) is scored against the first B' images."""
        h = self.encode_image(img)
        out = {"cond": self.cond_logits(h, text)}
        if wrong_text is not None:
            out["wrong"] = self.cond_logits(h[:wrong_text.shape[0]], wrong_text)
        return out

"""Conditioning Augmentation (paper section 3.1)."""
from __future__ import annotations

import torch
from torch import nn


class CondAugment(nn.Module):
    """phi_t (B, text_dim) -> c_hat = mu + sigma * eps, with mu, log sigma^2 from one linear layer.

    The authors' code applies a ReLU before splitting, which forces log sigma^2 >= 0 (sigma >= 1). The
    paper says nothing of it; we follow the paper by default (``relu=False``) and keep the switch.
    """

    def __init__(self, text_dim: int, cond_dim: int, relu: bool = False):
        super().__init__()
        self.cond_dim = cond_dim
        self.fc = nn.Linear(text_dim, cond_dim * 2)
        self.relu = relu

    def forward(self, text: torch.Tensor, eps: torch.Tensor | None = None):
        h = self.fc(text)
        if self.relu:
            h = torch.relu(h)
        mu, logvar = h[:, : self.cond_dim], h[:, self.cond_dim :]
        # exp in fp32: under autocast a large logvar overflows fp16
        std = torch.exp(0.5 * logvar.float())
        if eps is None:
            eps = torch.randn_like(std)
        c = mu.float() + std * eps
        return c.to(h.dtype), mu, logvar

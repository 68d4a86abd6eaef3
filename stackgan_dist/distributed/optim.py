"""The one optimizer factory both backends use (one Adam per network)."""
from __future__ import annotations

import torch

from ..errors import UserError


def make_adam(params, lr: float, betas: tuple, device: torch.device, kind: str = "adam", foreach: bool = True):
    """``foreach=False`` (train.adam_foreach): torch.optim.Adam with torch's defaults, as the authors call it."""
    if kind == "apex_fused_adam":
        try:
            from apex.optimizers import FusedAdam  # optional: apex is not on PyPI
        except ImportError:
            raise UserError("train.optimizer=apex_fused_adam needs NVIDIA apex, which is not importable here; "
                            "use train.optimizer=adam (fused on CUDA)") from None
        return FusedAdam(params, lr=lr, betas=betas)
    if not foreach:  # torch.optim.Adam with its defaults, as the authors call it (the "authors" preset)
        return torch.optim.Adam(params, lr=lr, betas=betas)
    # fused on CPU too: its found_inf input lets the non-finite guard skip a step without a host sync
    return torch.optim.Adam(params, lr=lr, betas=betas, fused=True)

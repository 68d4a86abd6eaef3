"""BatchNorm across ranks: global-batch statistics (``model.sync_bn``) and buffer averaging (the default).

``nn.SyncBatchNorm`` computes statistics over the global batch on CUDA; on CPU, where it refuses to run,
``GlobalBatchNorm`` does the same with one differentiable all-reduce of per-channel sum, sum of squares and
count. Without ``sync_bn`` every rank normalises with its own batch and ``BufferSync`` averages the running
statistics after every step in one coalesced all-reduce, so they stay identical on all ranks.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training-mode statistics cover the batches of all ranks (CPU/gloo SyncBatchNorm).

    Forward: all-reduce (sum, sum of squares, count) per channel through the autograd-aware
    ``torch.distributed.nn.functional.all_reduce``, so backward sums the statistics' gradients over
    ranks exactly as ``nn.SyncBatchNorm`` does. Eval mode and world size 1 use plain batch norm.
    """

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        dims = [0] + list(range(2, x.dim()))
        xf = x.float()
        count = torch.full((1,), float(xf.numel() // xf.shape[1]), device=x.device)
        stats = all_reduce(torch.cat([xf.sum(dims), (xf * xf).sum(dims), count]))
        c = x.shape[1]
        n = stats[2 * c]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0.0)  # biased, as BatchNorm normalises with
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach() * m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1).clamp_min(1)) * m)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm -> SyncBatchNorm (CUDA) or GlobalBatchNorm (CPU), keeping weights and buffers."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        out = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        out.load_state_dict(module.state_dict())
        out.train(module.training)
        out.to(next(iter(module.state_dict().values())).device)
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, device))
    return out


class BufferSync:
    """Averages floating-point buffers (BN running statistics) across ranks in one coalesced all-reduce."""

    def __init__(self, modules, env):
        self.env = env
        self.buffers = [b for m in modules for _n, b in m.named_buffers() if b.dtype.is_floating_point]

    def __call__(self) -> None:
        if not (self.env.distributed and self.buffers):
            return
        flat = torch._utils._flatten_dense_tensors(self.buffers)
        dist.all_reduce(flat)
        flat /= self.env.world_size
        for b, v in zip(self.buffers, torch._utils._unflatten_dense_tensors(flat, self.buffers)):
            b.copy_(v)

"""FLOPs counted by PyTorch's dispatcher (torch.utils.flop_counter): convolutions, matmuls, their backward.

Counts are 2 x multiply-accumulates, the convention MFU figures use; elementwise ops (BatchNorm,
activations, the optimizer update) are not counted, so MFU computed from them is a lower bound on work done.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_flops(fn: Callable[[], object]) -> int:
    """Total FLOPs of everything ``fn()`` runs (forward and backward alike)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def conv2d_flops(batch: int, c_in: int, c_out: int, k: int, h_out: int, w_out: int, groups: int = 1) -> int:
    """Hand count of one Conv2d forward: 2 * B * C_out * H_out * W_out * (C_in / groups) * k * k (bias not counted)."""
    return 2 * batch * c_out * h_out * w_out * (c_in // groups) * k * k


def linear_flops(batch: int, n_in: int, n_out: int) -> int:
    return 2 * batch * n_in * n_out


# Dense peaks the vendors state, FLOP/s (no sparsity): MFU is measured against these.
STATED_PEAK = {
    ("H100", "bf16"): 989e12, ("H100", "fp16"): 989e12, ("H100", "fp32"): 67e12,  # H100 SXM
    ("H200", "bf16"): 989e12, ("H200", "fp16"): 989e12, ("H200", "fp32"): 67e12,
    ("A100", "bf16"): 312e12, ("A100", "fp16"): 312e12, ("A100", "fp32"): 19.5e12,
}


def stated_peak(device_name: str, precision: str) -> float | None:
    for (name, prec), v in STATED_PEAK.items():
        if name in device_name and prec == precision:
            return v
    return None


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, iters: int = 5) -> float:
    """FLOP/s of a large square matmul on ``device``: the practical ceiling for this dtype here."""
    import time

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    best = float("inf")
    for _ in range(iters):
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best

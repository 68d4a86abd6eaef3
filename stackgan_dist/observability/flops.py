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


# Dense peaks the vendors state, FLOP/s (no sparsity), per precision the tensor cores run. Most specific name
# first: "H100 PCIe" before "H100" (the SXM part). MFU is measured only against these.
STATED_PEAK: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    ("H100 NVL", {"bf16": 835e12, "fp16": 835e12, "tf32": 418e12, "fp32": 60e12}),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "tf32": 495e12, "fp32": 67e12}),  # SXM: 494.7 TF32 dense
    ("H200", {"bf16": 989e12, "fp16": 989e12, "tf32": 495e12, "fp32": 67e12}),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
]


def compute_precision(precision: str, device_type: str, cudnn_allow_tf32: bool, matmul_allow_tf32: bool) -> str:
    """The precision the tensor cores actually run. An "fp32" step on CUDA runs its convolutions in TF32
    (``torch.backends.cudnn.allow_tf32`` is on by torch's default), and this model's FLOPs are nearly all
    convolutions: its MFU is measured against the TF32 peak, not the 67 TFLOP/s fp32 one. (Matmuls follow
    ``torch.backends.cuda.matmul.allow_tf32``, off by default; with both off the step is true fp32.)"""
    if precision != "fp32" or device_type != "cuda":
        return precision
    return "tf32" if cudnn_allow_tf32 or matmul_allow_tf32 else "fp32"


def stated_peak(device_name: str, precision: str) -> float | None:
    """The vendor's dense peak for ``precision`` ("bf16", "fp16", "tf32", "fp32") on this device, or None."""
    for name, peaks in STATED_PEAK:
        if name in device_name:
            return peaks.get(precision)
    return None


def mfu(flops_per_s: float, peak: float) -> float:
    """Model FLOPs utilisation against a datasheet peak. Above 1 is impossible: it means the FLOP count, the
    timing or the peak is wrong, so it is an error, never a figure."""
    if not (peak > 0 and flops_per_s >= 0):
        raise ValueError(f"MFU needs a positive peak and a non-negative rate (got {flops_per_s!r} / {peak!r})")
    u = flops_per_s / peak
    if u > 1:
        raise ValueError(f"MFU {u:.3f} > 1: {flops_per_s:.3g} FLOP/s against a {peak:.3g} FLOP/s peak is a "
                         "measurement error (FLOPs counted twice, an unsynchronised timer, or the wrong peak)")
    return u


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

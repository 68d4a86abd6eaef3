"""Mixed precision and the non-finite guard: which autocast dtype a precision means, where AMP is refused,
and how a step with inf/nan gradients is skipped without the host reading a flag.

The guard decides on the device: the optimizer step is skipped through fused Adam's ``found_inf`` input (the
path GradScaler uses), so a step never waits for the host.
"""
from __future__ import annotations

import torch

from ..errors import UserError


def amp_dtype(precision: str):
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def refuse_cpu_amp(precision: str, device: torch.device) -> None:
    if precision != "fp32" and device.type != "cuda":
        raise UserError(f"train.precision={precision} needs CUDA: on CPU bf16/fp16 autocast is ~30x slower than "
                        "fp32 here, so it is refused rather than silently slow; use train.precision=fp32")


def nonfinite_flag(params) -> torch.Tensor:
    """1.0 on the device when any gradient holds inf/nan (or its L2 norm overflows), else 0.0. One fused read
    of all gradients (isfinite per tensor took ~40 ms a check at the paper's Stage-I widths on CPU)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=params[0].device if params else "cpu")
    return (~torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()).float()


def guarded_step(opt: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """``opt.step()`` unless ``found_inf`` (a device tensor) is 1, decided on the device.

    Fused optimizers take ``found_inf`` themselves (parameters, moments and step counters untouched when
    set). Any other optimizer steps, then its parameters and state are put back where ``found_inf`` is set
    (``torch.where``: no host read either, at the cost of one copy of the state)."""
    if getattr(opt, "_step_supports_amp_scaling", False):
        opt.grad_scale, opt.found_inf = None, found_inf
        try:
            opt.step()
        finally:
            del opt.grad_scale, opt.found_inf
        return
    tensors = [p for g in opt.param_groups for p in g["params"]]
    tensors += [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    before = [t.detach().clone() for t in tensors]
    opt.step()
    # state created by this step (a first step) has no "before": zero is the fresh state
    tensors2 = [p for g in opt.param_groups for p in g["params"]]
    tensors2 += [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    before += [torch.zeros_like(t) for t in tensors2[len(before):]]
    with torch.no_grad():
        for t, b in zip(tensors2, before):
            t.copy_(torch.where(found_inf.bool(), b.to(t.dtype), t))

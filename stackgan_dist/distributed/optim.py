"""The one optimizer factory both backends use (one Adam per network)."""
from __future__ import annotations

import torch

from ..errors import CheckpointError, UserError


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


# what a saved Adam (torch's or apex's FusedAdam) holds per parameter; anything else in a checkpoint is a lie
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
ADAM_GROUP_NUMBERS = ("lr", "eps", "weight_decay")


def check_adam_state(opt: torch.optim.Optimizer, sd, what: str) -> None:
    """Refuses (CheckpointError, one line) a saved optimizer state that does not fit ``opt``: its groups and
    parameter counts, each moment's type and shape against its parameter, finite hyper-parameters. torch's
    ``load_state_dict`` checks only the counts; a moment of another shape would pass it and fail at the first
    step with a traceback, and a NaN learning rate would train on silently."""
    def bad(msg: str) -> CheckpointError:
        return CheckpointError(f"checkpoint optimizer state of {what}: {msg}; the checkpoint is damaged or was not "
                               "written by this model")

    if not isinstance(sd, dict) or not isinstance(sd.get("state"), dict) or not isinstance(sd.get("param_groups"),
                                                                                           list):
        raise bad("not an optimizer state (state and param_groups)")
    groups = sd["param_groups"]
    if len(groups) != len(opt.param_groups):
        raise bad(f"{len(groups)} parameter groups for {len(opt.param_groups)}")
    shapes = {}
    for i, (saved, live) in enumerate(zip(groups, opt.param_groups)):
        ids = saved.get("params") if isinstance(saved, dict) else None
        if not isinstance(ids, list) or len(ids) != len(live["params"]):
            raise bad(f"group {i} lists {len(ids) if isinstance(ids, list) else 'no'} parameters for "
                      f"{len(live['params'])}")
        for key in ADAM_GROUP_NUMBERS:
            if key in live and not _finite(saved.get(key)):
                raise bad(f"group {i} has {key}={saved.get(key)!r}")
        betas = saved.get("betas")
        if "betas" in live and not (isinstance(betas, (list, tuple)) and len(betas) == 2 and all(map(_finite, betas))):
            raise bad(f"group {i} has betas={betas!r}")
        for pid, p in zip(ids, live["params"]):
            shapes[pid] = tuple(p.shape)
    for pid, st in sd["state"].items():
        if pid not in shapes:
            raise bad(f"state for parameter {pid!r}, which no group lists")
        if not isinstance(st, dict):
            raise bad(f"state of parameter {pid} is a {type(st).__name__}")
        for key, v in st.items():
            if key == "step":
                if not (isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.numel() == 1)):
                    raise bad(f"step of parameter {pid} is not one number")
            elif key in ADAM_MOMENTS:
                if not isinstance(v, torch.Tensor) or tuple(v.shape) != shapes[pid]:
                    got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                    raise bad(f"{key} of parameter {pid} is {got} for a parameter of shape {shapes[pid]}")
                if not v.is_floating_point():
                    raise bad(f"{key} of parameter {pid} holds {v.dtype}")
            else:
                raise bad(f"unknown entry {key!r} in the state of parameter {pid}")


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and abs(float(v)) < float("inf")

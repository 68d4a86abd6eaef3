"""Serialising state that torch.load(weights_only=True) cannot hold as is: numpy RNG state, CPU copies."""
from __future__ import annotations

import numpy as np
import torch


def to_cpu(obj):
    """Deep copy of a state tree onto the CPU (so that writing can overlap training)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        t = [to_cpu(v) for v in obj]
        return type(obj)(t) if isinstance(obj, list) else tuple(t)
    return obj


def numpy_state_to_safe(state) -> dict:
    name, keys, pos, has_gauss, gauss = state
    return {"name": name, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def numpy_state_from_safe(d: dict):
    return (d["name"], d["keys"].numpy().astype(np.uint32), d["pos"], d["has_gauss"], d["gauss"])

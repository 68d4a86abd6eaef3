"""Loading DeepSpeed's engine files (``CKPT/engine/{G,D}/*.pt``) without the power to run code.

DeepSpeed's own ``TorchCheckpointEngine.load`` calls ``torch.load(weights_only=False)``: a tampered
engine file (its manifest hashes recomputed) would run arbitrary code on resume. ``SafeLoadingEngine``
wraps the engine's checkpoint engine and loads with ``weights_only=True``; everything else (saving,
commit) goes to the wrapped one.

DeepSpeed's ZeRO optimizer files pickle a few of its own classes, which ``weights_only`` refuses as they
are. Exactly these are allowed (``torch.serialization.safe_globals``), each a plain data holder that the
weights-only unpickler rebuilds by setting attributes, never by calling code of the file's choosing:

- ``deepspeed.runtime.fp16.loss_scaler.LossScaler`` / ``DynamicLossScaler``: the loss scaler's numbers;
- ``deepspeed.runtime.zero.config.ZeroStageEnum``: an ``int`` enum;
- ``deepspeed.utils.tensor_fragment.fragment_address``: a dataclass of two ints (parameter slices).

This module does not import deepspeed (``deepspeed.py`` beside it does, when that backend is chosen): the classes
are taken from the modules DeepSpeed has already loaded, which it has whenever one of its engines exists.
"""
from __future__ import annotations

import sys

import torch

from ..errors import CheckpointError, first_line

DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def deepspeed_safe_globals() -> list:
    """The allowed DeepSpeed classes among the modules already imported (none when DeepSpeed is not)."""
    out = []
    for qual in DEEPSPEED_SAFE_GLOBALS:
        mod, name = qual.rsplit(".", 1)
        cls = getattr(sys.modules.get(mod), name, None)
        if cls is not None:
            out.append(cls)
    return out


def load_engine_file(path, map_location=None):
    """``torch.load(weights_only=True)`` with exactly the DeepSpeed classes above allowed. A file that
    needs anything else is refused with a CheckpointError naming it."""
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"DeepSpeed engine file missing: {path}") from None
    except Exception as e:  # noqa: BLE001 -- a damaged or hostile file is one clear line
        raise CheckpointError(f"refused to load DeepSpeed engine file {path}: {first_line(e)} (only tensors, "
                              "plain containers and DeepSpeed's loss-scaler/ZeRO metadata classes load; use a "
                              "checkpoint this project wrote)") from None


class SafeLoadingEngine:
    """Stands in for a DeepSpeed engine's ``checkpoint_engine``: ``load`` is weights-only, the rest is the
    wrapped engine's. ``SafeLoadingEngine.wrap(engine)`` installs it (idempotent)."""

    def __init__(self, inner):
        self._inner = inner

    def load(self, path, map_location=None):
        return load_engine_file(path, map_location)

    def __getattr__(self, name):
        return getattr(self._inner, name)

    @classmethod
    def wrap(cls, engine) -> None:
        if not isinstance(engine.checkpoint_engine, cls):
            engine.checkpoint_engine = cls(engine.checkpoint_engine)

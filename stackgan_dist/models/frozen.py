"""The frozen Stage-I generator Stage-II trains against, from a checkpoint: the one loader used by training
(fresh start and resume), sampling and evaluation, so it is always in eval mode and out of every optimizer."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..checkpoint.contents import model_config_from
from ..checkpoint.readers import load_newest
from ..config import ModelConfig
from ..errors import CheckpointError
from ..train_state import read_checkpoint
from .build import build_stage1_generator


@dataclass(frozen=True)
class FrozenStage1:
    G1: nn.Module
    ref: str  # the Stage-I run or checkpoint it came from (recorded in Stage-II checkpoints)
    model_config: ModelConfig


def _frozen(mcfg: ModelConfig, weights: dict) -> nn.Module:
    G1 = build_stage1_generator(mcfg)
    G1.load_state_dict(weights)
    return G1.eval().requires_grad_(False)  # frozen: eval-mode BatchNorm, no gradients, in no optimizer


def load_frozen_stage1(saved: dict | None = None, path: str = "", text_dim: int | None = None,
                       z_dim: int | None = None) -> FrozenStage1:
    """From a loaded Stage-II ``model.pt`` (``saved``, which carries its Stage-I copy), or else from the
    Stage-I run or checkpoint at ``path``. Its widths and condition_dim may differ from Stage-II's; its
    text_dim and z_dim (Stage-II draws the noise Stage-I consumes) may not: checked when given."""
    if saved is not None and "stage1_G" in saved:
        mcfg = model_config_from(saved["stage1_model_config"], saved.get("stage1_ref", ""), "stage1_model_config")
        return FrozenStage1(_frozen(mcfg, saved["stage1_G"]), saved.get("stage1_ref", ""), mcfg)
    if not path:
        raise CheckpointError("Stage-II needs model.stage1_checkpoint (a Stage-I run or checkpoint directory)")
    try:  # the newest valid one (read again if pruned while read); its version and contents checked
        ck, state, _ = load_newest(path, read_checkpoint)
    except CheckpointError as e:
        raise CheckpointError(f"model.stage1_checkpoint: {e}; set model.stage1_checkpoint to a Stage-I run "
                              "directory or checkpoint") from None
    mcfg = model_config_from(state["model_config"], ck, "model_config")
    if mcfg.stage != 1:
        raise CheckpointError(f"model.stage1_checkpoint {ck} is a Stage-{mcfg.stage} checkpoint, not Stage-I")
    if text_dim is not None and mcfg.text_dim != text_dim:
        raise CheckpointError(f"Stage-I checkpoint {ck} has text_dim {mcfg.text_dim}, model.text_dim is {text_dim}")
    if z_dim is not None and mcfg.z_dim != z_dim:
        raise CheckpointError(f"Stage-I checkpoint {ck} draws z of {mcfg.z_dim} dims, model.z_dim is {z_dim}: "
                              f"set model.z_dim={mcfg.z_dim} (Stage-II feeds its noise to the Stage-I generator)")
    return FrozenStage1(_frozen(mcfg, state["G"]), ck, mcfg)

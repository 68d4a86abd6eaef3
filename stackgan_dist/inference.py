"""Loading a trained run for sampling, evaluation and inspection (no process group, no optimizer)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .checkpoint.contents import check_model_file
from .checkpoint.manager import params_digest
from .checkpoint.readers import load_newest
from .errors import UserError
from .models.build import build_models
from .models.frozen import load_frozen_stage1
from .train_state import read_checkpoint


@dataclass
class LoadedRun:
    path: str
    step: int
    stage: int
    G: torch.nn.Module
    D: torch.nn.Module
    G1: torch.nn.Module | None
    model_config: ModelConfig
    text_encoder: dict
    state: dict


def load_run(path: str, device: str = "cpu") -> LoadedRun:
    ck, st, tstate = load_newest(path, read_checkpoint)  # contents checked before anything is built
    mc = check_model_file(st, ck)
    models = build_models(mc)
    models.G.load_state_dict(st["G"])
    models.D.load_state_dict(st["D"])
    G1 = None
    if mc.stage == 2:
        G1 = load_frozen_stage1(st).G1.to(device)
    return LoadedRun(ck, tstate.step, mc.stage, models.G.eval().to(device), models.D.eval().to(device), G1,
                     mc, st.get("text_encoder", {}), st)


@torch.no_grad()
def generate(run: LoadedRun, text: torch.Tensor, z: torch.Tensor, eps: torch.Tensor | None = None):
    """-> (stage-I images, stage-II images or None), each (B, 3, H, W) in [-1, 1]. eps=None: zero (the mean)."""
    if run.stage == 1:
        e = torch.zeros(text.shape[0], run.model_config.condition_dim, device=text.device) if eps is None else eps
        img, _, _ = run.G(text, z, e)
        return img, None
    e1 = torch.zeros(text.shape[0], run.G1.ca.cond_dim, device=text.device)
    s0, _, _ = run.G1(text, z, e1)
    e = torch.zeros(text.shape[0], run.model_config.condition_dim, device=text.device) if eps is None else eps
    img, _, _ = run.G(text, s0, e)
    return s0, img


def inspect(path: str) -> dict:
    """A checkpoint is reported valid only when its manifest verifies and its contents load into the model
    it declares (``read_checkpoint``); anything less is one line, exit 2."""
    # a snapshot: manifest and model.pt read together (a live run may prune the folder right after)
    ck, st, tstate, man = load_newest(path, read_checkpoint, with_manifest=True)
    ok, why = True, "ok"  # resolve_checkpoint verified every file; the snapshot matched the manifest
    return {"path": ck, "step": tstate.step, "stage": int(st["model_config"]["stage"]), "valid": ok,
            "reason": why, "world_size": man.get("world_size"), "config_hash": st.get("config_hash"),
            "params_sha256": params_digest(st["G"], st["D"]), "text_encoder": st.get("text_encoder")}


def run_dir_of(ck: str) -> str | None:
    """The run directory a checkpoint folder belongs to (RUN for RUN/checkpoints/step_X), or None for a step
    folder kept on its own: nothing is then written two levels above it."""
    parent = os.path.dirname(os.path.abspath(ck))
    return os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else None


def check_output_path(path: str, what: str, suffixes: tuple[str, ...] = ()) -> str:
    """Refuses, before any work is done, an output path that cannot be written: an existing directory, a
    name without one of ``suffixes``, or a place under a file or a directory this user cannot write. Creates
    nothing."""
    if not path or not path.strip():
        raise UserError(f"{what}: empty output path; give a file path")
    if os.path.isdir(path):
        example = os.path.join(path, "out" + (suffixes[0] if suffixes else ".json"))
        raise UserError(f"{what} {path} is a directory; give a file path (e.g. {example})")
    if suffixes and not path.lower().endswith(suffixes):
        raise UserError(f"{what} {path} must end with {' or '.join(suffixes)}")
    probe = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UserError(f"{what} {path} cannot be created: {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UserError(f"{what} {path} is not writable (read-only {probe}); give a writable path")
    return path

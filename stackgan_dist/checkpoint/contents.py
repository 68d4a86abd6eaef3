"""What a ``model.pt`` must hold before anything is built from it: bounded model sizes, exact state shapes.

A checkpoint whose manifest hashes match can still be hostile or careless (hashes only say the bytes are
the ones the manifest lists; anyone can recompute them). So a checkpoint counts as valid for inspect,
resume, sample, eval and Stage-II start only when:

- its ``model_config`` names only known keys, each of the right type and within ``MODEL_LIMITS``;
- the networks that config declares, counted analytically (built on the ``meta`` device: shapes only, no
  memory) stay under ``MAX_MODEL_PARAMS``: a 3 MB file whose config says ``gf_dim: 3232`` must not make us
  allocate 12 GB;
- its G and D (and at Stage-II its frozen Stage-I G) state dicts have exactly the keys and shapes of those
  networks, as floating-point tensors (so loading them is a copy into memory already bounded above);
- its ``text_encoder`` record names an encoder of the model's ``text_dim`` (a ``dim`` of 1e10 would ask a
  hashing encoder for 37 GiB).
Every refusal is one CheckpointError line (exit 2).
"""
from __future__ import annotations

import dataclasses

import torch

from ..config import ModelConfig
from ..errors import CheckpointError

# Bounds of the model-defining integers: far above any StackGAN (the paper: gf_dim 128, df_dim 64, Ng 128,
# z 100, text 1024, 4 residual blocks), far below what would not fit a node's memory.
MODEL_LIMITS = {"stage": (1, 2), "gf_dim": (1, 2048), "df_dim": (1, 2048), "condition_dim": (1, 4096),
                "z_dim": (1, 4096), "text_dim": (1, 65536), "res_blocks": (0, 64), "cond_reinject": (0, 32)}
# parameters + buffers of G and D together (x4 bytes in fp32, x3-4 again with Adam): the paper's Stage-II
# pair is ~90 M; 600 M (2.4 GB of weights) leaves room for wider experiments and refuses a 10 GB model
MAX_MODEL_PARAMS = 600_000_000
_FIELDS = {f.name: f for f in dataclasses.fields(ModelConfig)}
_STR_CHOICES = {"d_condition": ("text", "ca_mu"), "g_padding": ("zeros", "replicate")}


def model_config_from(d, ck: str, what: str = "model_config") -> ModelConfig:
    """A checkpoint's model-config dict -> ModelConfig, refusing unknown keys, wrong types, out-of-range values.
    A key the checkpoint predates takes its default (older checkpoints lack later keys)."""
    if not isinstance(d, dict):
        raise CheckpointError(f"checkpoint {ck}: {what} is a {type(d).__name__}, not a mapping (corrupt)")
    unknown = sorted(str(k) for k in d if k not in _FIELDS)
    if unknown:
        raise CheckpointError(f"checkpoint {ck}: {what} has unknown key {unknown[0][:60]!r} (written by another "
                              "program or version; refusing to guess what it means)")
    for k, v in d.items():
        if k in MODEL_LIMITS or k == "text_dim":
            lo, hi = MODEL_LIMITS[k]
            if type(v) is not int or not lo <= v <= hi:
                raise CheckpointError(f"checkpoint {ck}: {what}.{k} is {_short(v)}; expected an integer in "
                                      f"[{lo}, {hi}]")
        elif k in ("sync_bn", "ca_relu"):
            if type(v) is not bool:
                raise CheckpointError(f"checkpoint {ck}: {what}.{k} is {_short(v)}; expected true or false")
        elif k in _STR_CHOICES:
            if v not in _STR_CHOICES[k]:
                raise CheckpointError(f"checkpoint {ck}: {what}.{k} is {_short(v)}; expected one of "
                                      f"{', '.join(_STR_CHOICES[k])}")
        elif k == "stage1_checkpoint" and not isinstance(v, str):
            raise CheckpointError(f"checkpoint {ck}: {what}.{k} is {_short(v)}; expected a path")
    if "text_dim" not in d:
        raise CheckpointError(f"checkpoint {ck}: {what} records no text_dim (corrupt)")
    if d.get("cond_reinject", 0) not in (0, 8, 16, 32):
        raise CheckpointError(f"checkpoint {ck}: {what}.cond_reinject is {d['cond_reinject']}; expected 0, 8, 16 "
                              "or 32")
    return ModelConfig(**d)


def _short(v) -> str:
    r = repr(v)
    return f"{type(v).__name__} {r[:40]}{'...' if len(r) > 40 else ''}"


def expected_shapes(mc: ModelConfig, stage1_only: bool = False) -> dict[str, dict[str, tuple]]:
    """{"G": {name: shape}, "D": {...}} of the networks ``mc`` declares, built on the meta device (no memory:
    the count is exact and costs nothing whatever the widths)."""
    from ..models.build import build_models, build_stage1_generator

    with torch.device("meta"):
        if stage1_only:
            nets = {"G": build_stage1_generator(mc)}
        else:
            m = build_models(mc)
            nets = {"G": m.G, "D": m.D}
    return {k: {n: tuple(t.shape) for n, t in net.state_dict().items()} for k, net in nets.items()}


def model_params(shapes: dict[str, dict[str, tuple]]) -> int:
    total = 0
    for sd in shapes.values():
        for shp in sd.values():
            n = 1
            for s in shp:
                n *= s
            total += n
    return total


def check_size(mc: ModelConfig, ck: str, what: str = "model_config", stage1_only: bool = False) -> dict:
    """The shapes of ``mc``'s networks, after refusing a model over ``MAX_MODEL_PARAMS`` (before any real
    allocation)."""
    shapes = expected_shapes(mc, stage1_only)
    n = model_params(shapes)
    if n > MAX_MODEL_PARAMS:
        raise CheckpointError(f"checkpoint {ck}: {what} declares a model of {n / 1e6:.0f} M parameters "
                              f"({n * 4 / 2**30:.1f} GiB in fp32), more than the {MAX_MODEL_PARAMS / 1e6:.0f} M this "
                              "program loads (corrupt or not a StackGAN checkpoint)")
    return shapes


def check_state_dict(sd, shapes: dict[str, tuple], ck: str, what: str) -> None:
    """``sd`` loads into the declared network exactly: same keys, same shapes, tensors of a float (or, for
    BatchNorm's counter, integer) type."""
    if not isinstance(sd, dict):
        raise CheckpointError(f"checkpoint {ck}: {what} is a {type(sd).__name__}, not a state dict (corrupt)")
    missing = [k for k in shapes if k not in sd]
    extra = [str(k) for k in sd if k not in shapes]
    if missing or extra:
        name, how = (missing[0], "is missing") if missing else (extra[0][:80], "is not in the declared model")
        raise CheckpointError(f"checkpoint {ck}: {what} does not fit the model its model_config declares: "
                              f"{name!r} {how} ({len(missing)} missing, {len(extra)} unexpected)")
    for k, shp in shapes.items():
        t = sd[k]
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"checkpoint {ck}: {what}[{k!r}] is a {type(t).__name__}, not a tensor")
        if tuple(t.shape) != shp:
            raise CheckpointError(f"checkpoint {ck}: {what}[{k!r}] has shape {tuple(t.shape)}, the declared model "
                                  f"needs {shp}")
        if not (t.is_floating_point() or (k.endswith("num_batches_tracked") and t.dtype == torch.int64)):
            raise CheckpointError(f"checkpoint {ck}: {what}[{k!r}] is {t.dtype}, not a floating-point tensor")


def check_text_encoder(rec, text_dim: int, ck: str) -> None:
    """The recorded encoder must be a mapping with a name and a ``dim`` equal to the model's ``text_dim``."""
    if rec is None or rec == {}:
        return
    if not isinstance(rec, dict) or not isinstance(rec.get("name", ""), str):
        raise CheckpointError(f"checkpoint {ck}: text_encoder is {_short(rec)}; expected a mapping with a name")
    dim = rec.get("dim", text_dim)
    if type(dim) is not int or dim != text_dim:
        raise CheckpointError(f"checkpoint {ck}: text_encoder.dim is {_short(dim)}, the model's text_dim is "
                              f"{text_dim} (corrupt)")


def check_model_file(saved, ck: str) -> ModelConfig:
    """Every check above on a loaded ``model.pt``; -> its ModelConfig. Call before building anything."""
    if not isinstance(saved, dict):
        raise CheckpointError(f"checkpoint {ck}: model.pt holds a {type(saved).__name__}, not a mapping (corrupt)")
    for key in ("model_config", "G", "D"):
        if key not in saved:
            raise CheckpointError(f"checkpoint {ck}: model.pt has no {key!r} (corrupt)")
    mc = model_config_from(saved["model_config"], ck)
    if not isinstance(saved.get("strategy", {}), dict):  # optimizer and scaler states: loaded by the strategy
        raise CheckpointError(f"checkpoint {ck}: strategy state is {_short(saved['strategy'])}, not a mapping")
    shapes = check_size(mc, ck)
    check_state_dict(saved["G"], shapes["G"], ck, "G")
    check_state_dict(saved["D"], shapes["D"], ck, "D")
    check_text_encoder(saved.get("text_encoder"), mc.text_dim, ck)
    if mc.stage == 2 and "stage1_G" in saved:
        mc1 = model_config_from(saved.get("stage1_model_config"), ck, "stage1_model_config")
        if mc1.stage != 1 or mc1.text_dim != mc.text_dim:
            raise CheckpointError(f"checkpoint {ck}: stage1_model_config is not a Stage-I model of text_dim "
                                  f"{mc.text_dim} (corrupt)")
        check_state_dict(saved["stage1_G"], check_size(mc1, ck, "stage1_model_config", True)["G"], ck, "stage1_G")
    elif mc.stage == 2:
        raise CheckpointError(f"checkpoint {ck}: a Stage-II model.pt without its frozen Stage-I generator")
    return mc

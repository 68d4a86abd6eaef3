"""Typed configuration: YAML + dotted ``key=value`` overrides -> validated dataclasses.

This is the only place where strings become typed values. Unknown keys and wrongly typed
values are refused with a message that names the key and the closest valid key.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import reprlib
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

from .errors import UserError


class ConfigError(UserError):
    pass


@dataclass
class RunConfig:
    dir: str = "runs/default"  # fixed run directory: a requeued job finds its own checkpoints here


@dataclass
class DataConfig:
    train: str = ""  # prepared split directory (holding dataset.json) or a shard pattern/URL
    test: str = ""
    num_workers: int = 2  # DataLoader worker processes per rank
    shuffle_buffer: int = 512  # samples held for in-stream shuffling (per worker)
    prefetch_factor: int = 4
    max_bad_fraction: float = 0.01  # stop the run if more than this share of samples fail to decode
    pipe_timeout_s: float = 600.0


@dataclass
class ModelConfig:
    stage: int = 1  # 1: 64x64 from text; 2: 256x256 from text + frozen Stage-I image
    gf_dim: int = 128
    df_dim: int = 64
    condition_dim: int = 128  # N_g (CA output) and N_d (D's text compression)
    z_dim: int = 100
    text_dim: int = 1024
    res_blocks: int = 4
    stage1_checkpoint: str = ""  # Stage-II: a Stage-I run directory or checkpoint directory
    sync_bn: bool = False  # SyncBatchNorm across ranks (DDP only)
    ca_relu: bool = False  # the authors' code applies ReLU before splitting mu/logvar; the paper does not


@dataclass
class TrainConfig:
    max_steps: int = 1000
    batch_size: int = 64  # per worker
    grad_accum: int = 1
    seed: int = 0
    backend: str = "ddp"  # ddp | deepspeed
    precision: str = "fp32"  # fp32 | bf16 | fp16
    zero_stage: int = 0
    deepspeed_config: str = ""  # a DeepSpeed JSON file; empty: generated from this config
    optimizer: str = "adam"  # adam | apex_fused_adam
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    lr_decay_steps: int = 0  # halve (x lr_decay_factor) every N steps; 0: constant
    lr_decay_factor: float = 0.5
    kl_coeff: float = 2.0  # lambda; the paper uses 1, the authors' code 2
    # "mean": KL averaged over the condition dimensions, as the authors' code computes it (their lambda=2
    # at 128 dims weighs the KL 64x less than the paper's equation); "sum": the paper's equation
    kl_reduction: str = "mean"
    # Stage-II only, 0 = off (the ICCV 2017 paper): weight of StackGAN++'s colour-consistency term, which
    # ties each Stage-II image's pixel mean and covariance to its Stage-I image's (losses.color_consistency)
    color_coeff: float = 0.0
    compile: bool = False
    channels_last: bool = False
    deterministic: bool = False
    device: str = "auto"  # auto | cpu | cuda
    dist_timeout_s: float = 120.0  # process-group formation and collectives


@dataclass
class CheckpointConfig:
    every_steps: int = 500
    every_minutes: float = 0.0  # 0: off
    keep_last: int = 3
    max_restarts: int = 5  # restarts without progress past the resumed step before giving up
    signal: str = "USR1"  # the warning signal the scheduler sends before a time limit
    background: bool = True  # write files in a background thread after copying state to CPU


@dataclass
class LogConfig:
    every_steps: int = 10
    sample_every: int = 500
    progress: bool = True
    level: str = "INFO"


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def dump(self, path: str) -> None:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)
        os.replace(tmp, path)

    def full_hash(self) -> str:
        """Digest of the whole config (restart accounting: a changed command starts the count afresh)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, default=str).encode("utf-8",
                                                                                            "surrogatepass")
                              ).hexdigest()[:16]

    def model_hash(self) -> str:
        """Digest of the keys that define parameter shapes: resuming across a change is refused."""
        return hashlib.sha256(json.dumps(model_defining(self), sort_keys=True).encode()).hexdigest()[:16]


MODEL_DEFINING_KEYS = ("stage", "gf_dim", "df_dim", "condition_dim", "z_dim", "text_dim", "res_blocks", "ca_relu")

CHOICES = {
    "train.backend": ("ddp", "deepspeed"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "train.optimizer": ("adam", "apex_fused_adam"),
    "train.kl_reduction": ("mean", "sum"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.zero_stage": (0, 1, 2),
    "model.stage": (1, 2),
    "checkpoint.signal": ("USR1", "USR2", "TERM"),
    "log.level": ("DEBUG", "INFO", "WARNING", "ERROR"),
}
POSITIVE = ("train.max_steps", "train.batch_size", "train.grad_accum", "model.gf_dim", "model.df_dim",
            "model.condition_dim", "model.z_dim", "model.text_dim", "checkpoint.keep_last", "log.every_steps",
            "log.sample_every", "checkpoint.every_steps")


def model_defining(cfg: Config) -> dict:
    return {k: getattr(cfg.model, k) for k in MODEL_DEFINING_KEYS}


def _all_keys() -> list[str]:
    out = []
    for sec in fields(Config):
        for f in fields(sec.type if not isinstance(sec.type, str) else globals()[sec.type]):
            out.append(f"{sec.name}.{f.name}")
    return out


def _closest(key: str) -> str:
    keys = _all_keys()
    m = difflib.get_close_matches(key, keys, n=1, cutoff=0.0)
    if not m:  # match on the leaf name alone
        leaf = key.split(".")[-1]
        m = [k for k in keys if k.split(".")[-1] == leaf] or keys[:1]
    return m[0]


def _coerce(key: str, value: Any, typ: type) -> Any:
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if value is None:
            return ""
    raise ConfigError(f"config key '{key}' expects {typ.__name__}, got {type(value).__name__} {reprlib.repr(value)}")


_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def _set(cfg: Config, key: str, value: Any) -> None:
    parts = key.split(".")
    if len(parts) != 2 or not hasattr(cfg, parts[0]) or not dataclasses.is_dataclass(getattr(cfg, parts[0])):
        raise ConfigError(f"unknown config key '{key}' (did you mean '{_closest(key)}'?)")
    section = getattr(cfg, parts[0])
    names = {f.name: f for f in fields(section)}
    if parts[1] not in names:
        raise ConfigError(f"unknown config key '{key}' (did you mean '{_closest(key)}'?)")
    f = names[parts[1]]
    typ = _TYPES[f.type] if isinstance(f.type, str) else f.type
    setattr(section, parts[1], _coerce(key, value, typ))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


class _Loader(yaml.SafeLoader):
    """safe_load, except that an alias may only repeat a scalar: aliases of lists or mappings nested in each
    other ("billion laughs") expand exponentially as soon as anything walks or prints the value."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            anchor = self.peek_event().anchor
            node = self.anchors.get(anchor)
            if node is not None and not isinstance(node, yaml.ScalarNode):
                raise ConfigError(f"YAML alias *{anchor} repeats a list or mapping; only single values may be "
                                  "aliased in a config (write the list or mapping out)")
        return super().compose_node(parent, index)


def _yaml_load(stream):
    return yaml.load(stream, Loader=_Loader)  # noqa: S506 -- a SafeLoader subclass


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    try:
        value = _yaml_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def kl_weight(cfg: Config) -> float:
    """The weight on the true KL (summed over dimensions) that ``train.kl_coeff`` and ``kl_reduction`` mean."""
    return cfg.train.kl_coeff / (cfg.model.condition_dim if cfg.train.kl_reduction == "mean" else 1)


def validate(cfg: Config) -> None:
    flat = _flatten(cfg.to_dict())
    for key, allowed in CHOICES.items():
        if flat[key] not in allowed:
            raise ConfigError(f"config key '{key}' must be one of {list(allowed)}, got {flat[key]!r}")
    for key in POSITIVE:
        if flat[key] <= 0:
            raise ConfigError(f"config key '{key}' must be positive, got {flat[key]!r}")
    if cfg.data.num_workers < 0:
        raise ConfigError(f"config key 'data.num_workers' must be >= 0, got {cfg.data.num_workers}")
    if cfg.model.gf_dim % 16 and cfg.model.stage == 1:
        raise ConfigError(f"config key 'model.gf_dim' must be a multiple of 16 at Stage-I, got {cfg.model.gf_dim}")
    if cfg.model.gf_dim % 4:
        raise ConfigError(f"config key 'model.gf_dim' must be a multiple of 4, got {cfg.model.gf_dim}")
    if not 0.0 <= cfg.data.max_bad_fraction <= 1.0:
        raise ConfigError("config key 'data.max_bad_fraction' must lie in [0, 1]")
    if cfg.train.color_coeff < 0:
        raise ConfigError(f"config key 'train.color_coeff' must be >= 0, got {cfg.train.color_coeff}")
    if cfg.train.color_coeff and cfg.model.stage != 2:
        raise ConfigError("config key 'train.color_coeff' needs model.stage=2 (it compares with the Stage-I image)")
    if cfg.train.backend == "ddp" and cfg.train.zero_stage != 0:
        raise ConfigError("config key 'train.zero_stage' needs train.backend=deepspeed")
    _validate_numbers(cfg, flat)


# (key, lowest, highest, lowest allowed itself, highest allowed itself): one line naming key, value and range
RANGES = (
    ("train.lr_g", 0.0, None, False, True), ("train.lr_d", 0.0, None, False, True),
    ("train.beta1", 0.0, 1.0, True, False), ("train.beta2", 0.0, 1.0, True, False),
    ("train.lr_decay_factor", 0.0, 1.0, False, True), ("train.kl_coeff", 0.0, None, True, True),
    ("train.lr_decay_steps", 0, None, True, True), ("train.dist_timeout_s", 0.0, None, False, True),
    ("data.prefetch_factor", 1, None, True, True), ("data.shuffle_buffer", 1, None, True, True),
    ("data.pipe_timeout_s", 0.0, None, False, True), ("checkpoint.every_minutes", 0.0, None, True, True),
    ("checkpoint.max_restarts", 1, None, True, True), ("model.res_blocks", 0, None, True, True),
)


def _validate_numbers(cfg: Config, flat: dict) -> None:
    import math

    for key, lo, hi, lo_ok, hi_ok in RANGES:
        v = flat[key]
        bad = isinstance(v, float) and not math.isfinite(v)
        bad = bad or (v < lo if lo_ok else v <= lo) or (hi is not None and (v > hi if hi_ok else v >= hi))
        if bad:
            rng = f"{'[' if lo_ok else '('}{lo}, {hi if hi is not None else 'inf'}{']' if hi_ok else ')'}"
            raise ConfigError(f"config key '{key}' must lie in {rng}, got {v!r}")
    if not cfg.run.dir.strip():
        raise ConfigError("config key 'run.dir' is empty; give the run a directory (e.g. run.dir=runs/x)")
    for key, v in flat.items():  # paths from a shell may hold bytes that are not UTF-8 (config.yaml is UTF-8)
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise ConfigError(f"config key '{key}' is not valid UTF-8 ({v.encode('utf-8', 'replace')!r}); "
                                  "use a path whose name is UTF-8") from None


def load_config(path: str | None, overrides: list[str] | tuple = ()) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None) and apply ``key=value`` overrides."""
    cfg = Config()
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        try:
            with open(path, "rb") as f:
                data = _yaml_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        except OSError as e:
            raise ConfigError(f"config file {path} cannot be read ({e.strerror})") from None
        except ConfigError as e:
            raise ConfigError(f"config file {path}: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
        for key, value in _flatten(data).items():
            _set(cfg, key, value)
    for text in overrides:
        key, value = parse_override(text)
        _set(cfg, key, value)
    validate(cfg)
    return cfg


def config_from_dict(d: dict) -> Config:
    cfg = Config()
    for key, value in _flatten(d).items():
        _set(cfg, key, value)
    validate(cfg)
    return cfg

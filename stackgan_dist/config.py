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
    test: str = ""  # the held-out split, in the same forms (sample grids and `stackgan eval` read it)
    # where the shards a dataset.json names are read from, for shards kept in an object store: a template
    # applied to each shard, e.g. "pipe:aws s3 cp s3://bucket/{name} -" ({name}: the shard's path as the
    # dataset file writes it; {path}: its local path). Config and command line only, never the dataset file
    shard_url: str = ""
    num_workers: int = 2  # DataLoader worker processes per rank; "auto": the CPUs this rank was granted, less one
    shuffle_buffer: int = 512  # samples held for in-stream shuffling (per worker)
    prefetch_factor: int = 4  # batches each loader worker prepares ahead
    slots: int = 0  # shuffle units of an epoch, fixed whatever the world size (0: auto; data/read/slots.py)
    max_bad_fraction: float = 0.01  # stop the run if more than this share of samples fail to decode
    max_image_pixels: int = (16 * 304) ** 2  # larger images are bad samples, not GBs of RAM (safety/budgets.py)
    pipe_timeout_s: float = 600.0  # reserved for `pipe:` shard streams; not read by the loader yet


@dataclass
class ModelConfig:
    stage: int = 1  # 1: 64x64 from text; 2: 256x256 from text + frozen Stage-I image
    gf_dim: int = 128  # generator width: its first 4x4 map has gf_dim x 8 channels; the paper: 128
    df_dim: int = 64  # discriminator width; the paper: 64
    condition_dim: int = 128  # N_g (CA output) and N_d (D's text compression)
    z_dim: int = 100  # noise dimension (Stage-I)
    # None (null or "auto"): the dimension data.train's dataset.json records for its encoder; a number: a
    # check against it. Recorded in checkpoints: resume, sample and eval read it from there
    text_dim: int | None = None
    res_blocks: int = 4  # Stage-II generator residual blocks
    stage1_checkpoint: str = ""  # Stage-II: a Stage-I run directory or checkpoint directory
    sync_bn: bool = False  # SyncBatchNorm across ranks (DDP only)
    ca_relu: bool = False  # the authors' code applies ReLU before splitting mu/logvar; the paper does not
    # what D's conditional head reads: "text": its own FC + LeakyReLU compression of phi_t (the paper);
    # "ca_mu": G's conditioning-augmentation mean, detached, as is (the authors' code; no FC in D)
    d_condition: str = "text"
    # Stage-I G: the augmented condition, replicated spatially, concatenated again to the feature map at this
    # resolution (8, 16 or 32) before the next up-sampling block; 0: off (the paper: c enters once, with z)
    cond_reinject: int = 0
    # Stage-II G: padding of its 3x3 convs, "zeros" (the paper) or "replicate" (no frame at the border)
    g_padding: str = "zeros"


@dataclass
class TrainConfig:
    # Length and schedules: in epochs (images seen / dataset size), which mean the same at any world size,
    # or in optimizer steps of the global batch (batch_size x grad_accum x world size)
    max_steps: int = 1000  # used when max_epochs is 0
    max_epochs: float = 0.0  # > 0: train until this many epochs of images are seen (max_steps ignored)
    batch_size: int = 64  # per worker
    grad_accum: int = 1  # micro-batches per optimizer step
    seed: int = 0  # initialisation, noise and data order (the same seed and world size give the same weights)
    backend: str = "ddp"  # ddp | deepspeed
    precision: str = "fp32"  # fp32 | bf16 | fp16
    zero_stage: int = 0  # DeepSpeed ZeRO stage (backend deepspeed only)
    deepspeed_config: str = ""  # a DeepSpeed JSON file; empty: generated from this config
    optimizer: str = "adam"  # adam | apex_fused_adam
    lr_g: float = 2e-4  # generator learning rate (Adam); the paper: 2e-4
    lr_d: float = 2e-4  # discriminator learning rate (Adam); the paper: 2e-4
    beta1: float = 0.5  # Adam's beta1; the paper: 0.5
    beta2: float = 0.999  # Adam's beta2
    lr_decay_steps: int = 0  # halve (x lr_decay_factor) every N steps; 0: constant
    lr_decay_epochs: float = 0.0  # or every N epochs of images seen (the paper: 100); 0: off
    lr_decay_factor: float = 0.5  # the factor applied at each decay
    kl_coeff: float = 2.0  # lambda; the paper uses 1, the authors' code 2
    # "mean": KL averaged over the condition dimensions, as the authors' code computes it (their lambda=2
    # at 128 dims weighs the KL 64x less than the paper's equation); "sum": the paper's equation
    kl_reduction: str = "mean"
    # Stage-II only, 0 = off (the ICCV 2017 paper): weight of StackGAN++'s colour-consistency term, which
    # ties each Stage-II image's pixel mean and covariance to its Stage-I image's (losses.color_consistency)
    color_coeff: float = 0.0
    # the faithfulness switches (docs/faithfulness.md; the "authors" preset sets the other side of each)
    d_output: str = "logits"  # "logits": BCE-with-logits; "sigmoid": Sigmoid + BCELoss, the authors' (fp32 only)
    # "ours": real + (wrong + fake)/2, the unconditional head's real/fake terms averaged into real/fake;
    # "authors": Stage-II (real + uncond_real)/2 + (fake + wrong + uncond_fake)/3 (Stage-I: the same as ours)
    d_loss_weights: str = "ours"
    # wrong pairs for the matching-aware D: "other_class": each real image with the text of the next sample of
    # another class (B pairs, wrapping around); "shift": the authors' image i with text i+1, B-1 pairs
    wrong_pairs: str = "other_class"
    stage1_bn: str = "eval"  # the frozen Stage-I G's BatchNorm: "eval" (fixed statistics) or "train" (authors)
    # True: fused Adam (CPU and CUDA: the guard skips on the device); False: torch's defaults (the authors')
    adam_foreach: bool = True
    # resuming at another world size: "keep" the global batch (train.grad_accum adjusted; refused where it
    # cannot be) or "free": the configured per-worker batch and accumulation as they are
    elastic_batch: str = "keep"
    compile: bool = False  # torch.compile G and D (DDP backend only)
    channels_last: bool = False  # models and images in channels-last memory format (faster convolutions on CPU)
    deterministic: bool = False  # torch.use_deterministic_algorithms (warn only) and no cudnn.benchmark
    device: str = "auto"  # auto | cpu | cuda
    dist_timeout_s: float = 120.0  # process-group formation and collectives
    # collectives of the first steps (ranks compiling at different speeds wait for each other there)
    dist_startup_timeout_s: float = 900.0
    stop_check_every: int = 10  # steps between agreements on the stop flag and the every_minutes clock


@dataclass
class DistributedConfig:
    """Gradient communication of the data-parallel backends (defaults: today's behaviour, plain fp32 all-reduce).
    Not model-defining: a run may resume with other values. See docs/precision.md and wrap.comm_hook_for."""
    # none | fp16 | bf16 (gradients cast for the all-reduce, fp32 again after) | powersgd (low-rank, error
    # feedback; DDP only). DeepSpeed: fp16/bf16 become its communication_data_type, powersgd is refused
    comm_hook: str = "none"
    bucket_cap_mb: float = 0.0  # 0: the backend's default (DDP 25 MB; DeepSpeed reduce_bucket_size 5e7 elements)
    static_graph: bool = False  # DDP's static_graph (the same parameters get gradients every step); DDP only
    powersgd_rank: int = 1  # PowerSGD's matrix_approximation_rank
    # optimizer steps of plain all-reduce before PowerSGD starts (torch: >= 2 with error feedback); counted per
    # process from its start: a resumed run warms up again (the error feedback is not checkpointed)
    powersgd_start_step: int = 1000


@dataclass
class CheckpointConfig:
    every_steps: int = 500  # used when every_epochs is 0
    every_epochs: float = 0.0  # > 0: a checkpoint each time this many epochs of images are seen
    every_minutes: float = 0.0  # 0: off (checked every train.stop_check_every steps)
    keep_last: int = 3  # the newest valid checkpoints kept; older ones are removed after each commit
    max_restarts: int = 5  # restarts without progress past the resumed step before giving up
    signal: str = "USR1"  # the warning signal the scheduler sends before a time limit
    background: bool = True  # write files in a background thread after copying state to CPU


@dataclass
class LogConfig:
    every_steps: int = 10  # steps between records in metrics.jsonl and TensorBoard
    sample_every: int = 500  # steps; used when sample_every_epochs is 0
    sample_every_epochs: float = 0.0  # > 0: a sample grid each time this many epochs of images are seen
    progress: bool = True  # a progress bar on the main rank; false: a plain line per log record
    level: str = "INFO"  # logging level of every rank


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
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


MODEL_DEFINING_KEYS = ("stage", "gf_dim", "df_dim", "condition_dim", "z_dim", "text_dim", "res_blocks", "ca_relu",
                       "d_condition", "cond_reinject", "g_padding")

CHOICES = {
    "train.backend": ("ddp", "deepspeed"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "train.optimizer": ("adam", "apex_fused_adam"),
    "train.kl_reduction": ("mean", "sum"),
    "train.d_output": ("logits", "sigmoid"),
    "train.d_loss_weights": ("ours", "authors"),
    "train.wrong_pairs": ("other_class", "shift"),
    "train.stage1_bn": ("eval", "train"),
    "train.elastic_batch": ("keep", "free"),
    "model.d_condition": ("text", "ca_mu"),
    "model.cond_reinject": (0, 8, 16, 32),
    "model.g_padding": ("zeros", "replicate"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.zero_stage": (0, 1, 2),
    "model.stage": (1, 2),
    "checkpoint.signal": ("USR1", "USR2", "TERM"),
    "log.level": ("DEBUG", "INFO", "WARNING", "ERROR"),
}
POSITIVE = ("train.max_steps", "train.batch_size", "train.grad_accum", "model.gf_dim", "model.df_dim",
            "model.condition_dim", "model.z_dim", "model.text_dim", "checkpoint.keep_last", "log.every_steps",
            "log.sample_every", "checkpoint.every_steps", "train.stop_check_every", "train.dist_timeout_s",
            "train.dist_startup_timeout_s")
NON_NEGATIVE = ("train.max_epochs", "train.lr_decay_epochs", "train.lr_decay_steps", "checkpoint.every_epochs",
                "log.sample_every_epochs", "checkpoint.every_minutes")


def model_defining(cfg: Config) -> dict:
    return {k: getattr(cfg.model, k) for k in MODEL_DEFINING_KEYS}


def _all_keys() -> list[str]:
    out = []
    for sec in fields(Config):
        for f in fields(sec.type if not isinstance(sec.type, str) else globals()[sec.type]):
            out.append(f"{sec.name}.{f.name}")
    return out


def _closest(key: str) -> str | None:
    """The known key a typo most likely meant, or None when nothing is close (no unrelated suggestion)."""
    keys = _all_keys()
    m = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if m:
        return m[0]
    leaf = key.split(".")[-1]
    same_leaf = [k for k in keys if k.split(".")[-1] == leaf]  # right name, wrong section
    if same_leaf:
        return same_leaf[0]
    m = difflib.get_close_matches(leaf, [k.split(".")[-1] for k in keys], n=1, cutoff=0.75)
    return next(k for k in keys if k.split(".")[-1] == m[0]) if m else None


def _unknown(key: str) -> "ConfigError":
    near = _closest(key)
    hint = f"did you mean '{near}'?" if near else \
        f"sections: {', '.join(f.name for f in fields(Config))}; see docs/config.md"
    return ConfigError(f"unknown config key '{key}' ({hint})")


def granted_cpus(environ=os.environ, affinity: set | None = None) -> int:
    """CPUs this process may use: its CPU affinity (what cgroups / srun binding allow), and no more than
    Slurm's SLURM_CPUS_PER_TASK where that is set (without task binding the affinity can be the whole node)."""
    if affinity is None:
        affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    n = max(1, len(affinity))
    try:
        slurm = int(environ.get("SLURM_CPUS_PER_TASK", ""))
    except ValueError:
        slurm = 0
    return min(n, slurm) if slurm > 0 else n


def auto_num_workers(cpus: int, cap: int = 16) -> int:
    """Loader workers for ``data.num_workers=auto``: one CPU stays with the training process, the rest decode
    (at most ``cap``); one CPU: the training process loads itself (0 workers). The data partition does not
    depend on the worker count, so this may differ between runs of one job."""
    return max(0, min(cpus - 1, cap))


def _coerce(key: str, value: Any, typ: type) -> Any:
    if key == "data.num_workers" and isinstance(value, str) and value.strip().lower() == "auto":
        return auto_num_workers(granted_cpus())  # resolved here, per process: the rest of the code sees an int
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
OPTIONAL_INT = "int | None"  # a key that may be left unset (null or "auto"): model.text_dim


def _set(cfg: Config, key: str, value: Any) -> None:
    parts = key.split(".")
    if len(parts) != 2 or not hasattr(cfg, parts[0]) or not dataclasses.is_dataclass(getattr(cfg, parts[0])):
        raise _unknown(key)
    section = getattr(cfg, parts[0])
    names = {f.name: f for f in fields(section)}
    if parts[1] not in names:
        raise _unknown(key)
    f = names[parts[1]]
    if f.type == OPTIONAL_INT:
        unset = value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto", "null", "none"))
        setattr(section, parts[1], None if unset else _coerce(key, value, int))
        return
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
        if flat[key] is not None and flat[key] <= 0:
            raise ConfigError(f"config key '{key}' must be positive, got {flat[key]!r}")
    for key in NON_NEGATIVE:
        if flat[key] < 0:
            raise ConfigError(f"config key '{key}' must be >= 0, got {flat[key]!r}")
    if cfg.train.lr_decay_steps and cfg.train.lr_decay_epochs:
        raise ConfigError("config keys 'train.lr_decay_steps' and 'train.lr_decay_epochs' are both set; "
                          "keep one (epochs mean the same at any world size)")
    if cfg.data.num_workers < 0:
        raise ConfigError(f"config key 'data.num_workers' must be >= 0, got {cfg.data.num_workers}")
    if cfg.data.slots < 0:
        raise ConfigError(f"config key 'data.slots' must be >= 0, got {cfg.data.slots}")
    if cfg.model.gf_dim % 16 and cfg.model.stage == 1:
        raise ConfigError(f"config key 'model.gf_dim' must be a multiple of 16 at Stage-I, got {cfg.model.gf_dim}")
    if cfg.model.gf_dim % 4:
        raise ConfigError(f"config key 'model.gf_dim' must be a multiple of 4, got {cfg.model.gf_dim}")
    if cfg.data.shard_url and "{name}" not in cfg.data.shard_url and "{path}" not in cfg.data.shard_url:
        raise ConfigError(f"config key 'data.shard_url' must hold {{name}} or {{path}} (each shard's name or local "
                          f"path goes there), got {cfg.data.shard_url!r}; e.g. 'pipe:aws s3 cp s3://bucket/{{name}} -'")
    if not 0.0 <= cfg.data.max_bad_fraction <= 1.0:
        raise ConfigError("config key 'data.max_bad_fraction' must lie in [0, 1]")
    if cfg.train.color_coeff < 0:
        raise ConfigError(f"config key 'train.color_coeff' must be >= 0, got {cfg.train.color_coeff}")
    if cfg.train.color_coeff and cfg.model.stage != 2:
        raise ConfigError("config key 'train.color_coeff' needs model.stage=2 (it compares with the Stage-I image)")
    if cfg.train.d_output == "sigmoid" and cfg.train.precision != "fp32":
        raise ConfigError(f"config key 'train.d_output=sigmoid' needs train.precision=fp32 (Sigmoid + BCELoss is "
                          f"unsafe under autocast), got {cfg.train.precision}; use train.d_output=logits")
    if cfg.train.backend == "ddp" and cfg.train.zero_stage != 0:
        raise ConfigError("config key 'train.zero_stage' needs train.backend=deepspeed")
    _validate_numbers(cfg, flat)
    _validate_comm(cfg)
    if cfg.train.backend == "deepspeed":  # before any process group forms
        from .distributed.deepspeed_strategy import validate_settings

        validate_settings(cfg)


# (key, lowest, highest, lowest allowed itself, highest allowed itself): one line naming key, value and range
RANGES = (
    ("train.lr_g", 0.0, None, False, True), ("train.lr_d", 0.0, None, False, True),
    ("train.beta1", 0.0, 1.0, True, False), ("train.beta2", 0.0, 1.0, True, False),
    ("train.lr_decay_factor", 0.0, 1.0, False, True), ("train.kl_coeff", 0.0, None, True, True),
    ("train.lr_decay_steps", 0, None, True, True), ("train.dist_timeout_s", 0.0, None, False, True),
    ("data.prefetch_factor", 1, None, True, True), ("data.shuffle_buffer", 0, None, True, True),
    ("data.pipe_timeout_s", 0.0, None, False, True), ("checkpoint.every_minutes", 0.0, None, True, True),
    ("checkpoint.max_restarts", 1, None, True, True), ("model.res_blocks", 0, None, True, True),
    ("data.max_image_pixels", 1, None, True, True),
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


COMM_HOOKS = ("none", "fp16", "bf16", "powersgd")
# pytorch#143580 (fix pending in pytorch#187732): DDP's static graph with no_sync fails an internal assert
# (expect_autograd_hooks_) at the first backward, and once past it stops reducing gradients silently
STATIC_GRAPH_ACCUM = ("config key 'distributed.static_graph' cannot be used with train.grad_accum={accum} > 1 "
                      "(torch's static graph breaks under no_sync, pytorch#143580); set distributed.static_graph=false")


def _validate_comm(cfg: Config) -> None:
    """The ``distributed.*`` section: ranges, and what the DeepSpeed backend cannot honour."""
    d = cfg.distributed
    if d.comm_hook not in COMM_HOOKS:
        raise ConfigError(f"config key 'distributed.comm_hook' must be one of {list(COMM_HOOKS)}, got {d.comm_hook!r}")
    if not (d.bucket_cap_mb >= 0 and d.bucket_cap_mb < float("inf")):
        raise ConfigError(f"config key 'distributed.bucket_cap_mb' must be >= 0 (0: the backend's default), "
                          f"got {d.bucket_cap_mb!r}")
    if d.powersgd_rank < 1:
        raise ConfigError(f"config key 'distributed.powersgd_rank' must be >= 1, got {d.powersgd_rank}")
    if d.powersgd_start_step < 2:  # torch's PowerSGD needs 2 with error feedback and warm start
        raise ConfigError(f"config key 'distributed.powersgd_start_step' must be >= 2, got {d.powersgd_start_step}")
    if d.static_graph and cfg.train.grad_accum > 1:
        raise ConfigError(STATIC_GRAPH_ACCUM.format(accum=cfg.train.grad_accum))
    if cfg.train.backend == "deepspeed":
        if d.comm_hook == "powersgd":
            raise ConfigError("config key 'distributed.comm_hook=powersgd' needs train.backend=ddp (DeepSpeed has no "
                              "PowerSGD); use distributed.comm_hook=bf16 (DeepSpeed's communication_data_type)")
        if d.static_graph:
            raise ConfigError("config key 'distributed.static_graph' needs train.backend=ddp (a DDP option)")


PRESET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "presets")


def preset_overrides(name: str) -> list[str]:
    """``configs/presets/NAME.yaml`` (a mapping of sections, like a config) -> dotted ``key=value`` strings,
    to be applied before the command line's own overrides. Unknown preset -> ConfigError naming the choices."""
    if not name or os.sep in name or "/" in name or name.startswith("."):
        raise ConfigError(f"preset name {name!r} is not a plain name (choose from {_preset_names()})")
    path = os.path.join(PRESET_DIR, name + ".yaml")
    if not os.path.isfile(path):
        raise ConfigError(f"unknown preset {name!r} (choose from {_preset_names()})")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"preset {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"preset {path} must hold a mapping of sections")
    out = []
    for key, value in _flatten(data).items():
        _set(Config(), key, value)  # unknown keys and wrong types are refused here, naming the key
        out.append(f"{key}={json.dumps(value) if isinstance(value, (bool, str)) else value}")
    return out


def _preset_names() -> list[str]:
    if not os.path.isdir(PRESET_DIR):
        return []
    return sorted(f[:-5] for f in os.listdir(PRESET_DIR) if f.endswith(".yaml"))


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
    apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def apply_overrides(cfg: Config, overrides: list[str] | tuple) -> Config:
    """Dotted ``key=value`` strings onto ``cfg`` in place (typed, unknown keys refused; not validated)."""
    for text in overrides:
        key, value = parse_override(text)
        _set(cfg, key, value)
    return cfg


def config_from_dict(d: dict) -> Config:
    cfg = Config()
    for key, value in _flatten(d).items():
        _set(cfg, key, value)
    validate(cfg)
    return cfg

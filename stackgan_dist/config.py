"""Typed configuration: YAML + dotted ``key=value`` overrides -> validated dataclasses.

Each key's rule sits beside its field (``one_of``, ``num``; rules across keys in the section's ``check()``).
Unknown keys and wrongly typed values are refused with a message that names the key and the closest valid
key (config_parse.py turns strings into typed values). Imports nothing of distributed/: what needs the
world size or a backend is checked by the start plan (plan.py).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

from .config_parse import closest_key, coerce, flatten, parse_override, yaml_load
from .errors import ConfigError  # noqa: F401 -- callers import ConfigError and parse_override from here

# -- the rule of each key, beside its field ----------------------------------------------------------------
# ``one_of``: the allowed values (the first is the default); ``num``: a range, checked by ``validate``;
# rules that tie several keys together are in the section's ``check()``, next to the fields they tie.
AUTO = -1  # data.num_workers=auto: resolved at start on the node that runs (distributed/env.py), not at parse


def one_of(*choices, bools: bool = False):
    """``bools``: YAML's true/false are read as the strings "true"/"false" (log.progress)."""
    return field(default=choices[0], metadata={"choices": choices, "bools": bools})


def num(default, lo=None, hi=None, lo_open: bool = False, hi_open: bool = False, auto: bool = False, words=""):
    """A number in [lo, hi] (``*_open``: the bound itself excluded; None: unbounded), refused as "must be
    ``words``" or else "must lie in [lo, hi]". ``auto``: the string "auto" is accepted, stored as AUTO."""
    return field(default=default, metadata={"range": (lo, hi, lo_open, hi_open), "auto": auto, "words": words})


POSITIVE, NON_NEGATIVE = {"lo": 0, "lo_open": True, "words": "positive"}, {"lo": 0, "words": ">= 0"}


@dataclass
class RunConfig:
    dir: str = "runs/default"  # fixed run directory: a requeued job finds its own checkpoints here

    def check(self) -> None:
        if not self.dir.strip():
            raise ConfigError("config key 'run.dir' is empty; give the run a directory (e.g. run.dir=runs/x)")
        if "\0" in self.dir:
            raise ConfigError("config key 'run.dir' holds a NUL byte; no file system accepts it in a path")


@dataclass
class DataConfig:
    train: str = ""  # prepared split directory (holding dataset.json) or a shard pattern/URL
    test: str = ""  # the held-out split, in the same forms (sample grids and `stackgan eval` read it)
    # where the shards a dataset.json names are read from, for shards kept in an object store: a template
    # applied to each shard, e.g. "pipe:aws s3 cp s3://bucket/{name} -" ({name}: the shard's path as the
    # dataset file writes it; {path}: its local path). Config and command line only, never the dataset file
    shard_url: str = ""
    # DataLoader worker processes per rank; "auto" (stored as -1): the CPUs this rank was granted, less one,
    # found at start on the node that runs (a login node's CPU count says nothing of a compute node's)
    num_workers: int = num(2, lo=AUTO, auto=True, words=">= 0 or auto")
    shuffle_buffer: int = num(512, lo=0)  # samples held for in-stream shuffling (per worker)
    prefetch_factor: int = num(4, lo=1)  # batches each loader worker prepares ahead
    # shuffle units of an epoch, fixed whatever the world size (0: auto; data/read/slots.py); at most the number
    # of samples (checked at start, where the dataset is known)
    slots: int = num(0, **NON_NEGATIVE)  # shuffle units of an epoch, fixed whatever the world size (0: auto; data/read/slots.py)
    max_bad_fraction: float = num(0.01, lo=0.0, hi=1.0)  # stop the run if more than this share fails to decode
    max_image_pixels: int = num((16 * 304) ** 2, **POSITIVE)  # larger images are bad samples, not GBs of RAM (safety/budgets.py)
    pipe_timeout_s: float = num(600.0, lo=0.0, lo_open=True)  # reserved for `pipe:` shard streams; not read by the loader yet

    def check(self) -> None:
        if self.shard_url and "{name}" not in self.shard_url and "{path}" not in self.shard_url:
            raise ConfigError(f"config key 'data.shard_url' must hold {{name}} or {{path}} (each shard's name or "
                              f"local path goes there), got {self.shard_url!r}; e.g. 'pipe:aws s3 cp "
                              "s3://bucket/{name} -'")


@dataclass
class ModelConfig:
    stage: int = one_of(1, 2)  # 1: 64x64 from text; 2: 256x256 from text + frozen Stage-I image
    gf_dim: int = num(128, **POSITIVE)  # a multiple of 16 at Stage-I, of 4 at Stage-II (check below)
    df_dim: int = num(64, **POSITIVE)  # discriminator width; the paper: 64
    condition_dim: int = num(128, **POSITIVE)  # N_g (CA output) and N_d (D's text compression)
    z_dim: int = num(100, **POSITIVE)  # noise dimension (Stage-I)
    # None (null or "auto"): the dimension data.train's dataset.json records for its encoder; a number: a
    # check against it. Recorded in checkpoints: resume, sample and eval read it from there
    text_dim: int | None = num(None, **POSITIVE)
    res_blocks: int = num(4, lo=0)  # Stage-II generator residual blocks
    stage1_checkpoint: str = ""  # Stage-II: a Stage-I run directory or checkpoint directory
    sync_bn: bool = False  # SyncBatchNorm across ranks (DDP only)
    ca_relu: bool = False  # the authors' code applies ReLU before splitting mu/logvar; the paper does not
    # what D's conditional head reads: "text": its own FC + LeakyReLU compression of phi_t (the paper);
    # "ca_mu": G's conditioning-augmentation mean, detached, as is (the authors' code; no FC in D)
    d_condition: str = one_of("text", "ca_mu")
    # Stage-I G: the augmented condition, replicated spatially, concatenated again to the feature map at this
    # resolution (8, 16 or 32) before the next up-sampling block; 0: off (the paper: c enters once, with z)
    cond_reinject: int = one_of(0, 8, 16, 32)
    # Stage-II G: padding of its 3x3 convs, "zeros" (the paper) or "replicate" (no frame at the border)
    g_padding: str = one_of("zeros", "replicate")

    def check(self) -> None:
        if self.gf_dim % 16 and self.stage == 1:
            raise ConfigError(f"config key 'model.gf_dim' must be a multiple of 16 at Stage-I, got {self.gf_dim}")
        if self.gf_dim % 4:
            raise ConfigError(f"config key 'model.gf_dim' must be a multiple of 4, got {self.gf_dim}")


@dataclass
class TrainConfig:
    # Length and schedules: in epochs (images seen / dataset size), the same at any world size, or in steps
    # of the global batch. A command-line train.max_steps beside a config's max_epochs wins (load_config)
    max_steps: int = num(1000, **POSITIVE)  # used when max_epochs is 0
    max_epochs: float = num(0.0, **NON_NEGATIVE)  # > 0: train until this many epochs of images are seen
    # The batch, exactly one > 0 (plan.py splits it). global_batch: images per optimizer step (the paper: 64),
    # split over world size x grad_accum: the same optimisation on 1 or 16 GPUs (strong scaling). batch_size:
    # per worker, the global batch grows with the world size (weak scaling; pair it with train.lr_scaling)
    global_batch: int = num(0, **NON_NEGATIVE)
    batch_size: int = num(64, **NON_NEGATIVE)  # per worker
    grad_accum: int = num(1, **POSITIVE)  # micro-batches per optimizer step
    # lr_g/lr_d scaled by none, sqrt or linear in global batch / lr_reference_batch (the paper's 64);
    # a linear warmup over lr_warmup_epochs (0: off)
    lr_scaling: str = one_of("none", "sqrt", "linear")
    lr_reference_batch: int = num(64, **POSITIVE)
    lr_warmup_epochs: float = num(0.0, **NON_NEGATIVE)
    seed: int = num(0, lo=0, hi=2**63 - 1)  # seeds torch's generators, which take 0..2**63-1
    backend: str = one_of("ddp", "deepspeed")  # ddp | deepspeed
    precision: str = one_of("fp32", "bf16", "fp16")  # fp32 | bf16 | fp16
    zero_stage: int = one_of(0, 1, 2)  # DeepSpeed ZeRO stage (check below)
    deepspeed_config: str = ""  # a DeepSpeed JSON file; empty: generated from this config
    optimizer: str = one_of("adam", "apex_fused_adam")  # adam | apex_fused_adam
    lr_g: float = num(2e-4, lo=0.0, lo_open=True)  # generator learning rate (Adam); the paper: 2e-4
    lr_d: float = num(2e-4, lo=0.0, lo_open=True)  # discriminator learning rate (Adam); the paper: 2e-4
    beta1: float = num(0.5, lo=0.0, hi=1.0, hi_open=True)  # Adam's beta1; the paper: 0.5
    beta2: float = num(0.999, lo=0.0, hi=1.0, hi_open=True)  # Adam's beta2
    lr_decay_steps: int = num(0, **NON_NEGATIVE)  # halve (x lr_decay_factor) every N steps; 0: constant
    lr_decay_epochs: float = num(0.0, **NON_NEGATIVE)  # or every N epochs of images (the paper: 100); 0: off
    lr_decay_factor: float = num(0.5, lo=0.0, hi=1.0, lo_open=True)  # the factor applied at each decay
    kl_coeff: float = num(2.0, lo=0.0)  # lambda; the paper uses 1, the authors' code 2
    # "mean": KL averaged over the condition dimensions, as the authors' code computes it (their lambda=2
    # at 128 dims weighs the KL 64x less than the paper's equation); "sum": the paper's equation
    kl_reduction: str = one_of("mean", "sum")
    # Stage-II only, 0 = off (the ICCV 2017 paper): weight of StackGAN++'s colour-consistency term, which
    # ties each Stage-II image's pixel mean and covariance to its Stage-I image's (losses.color_consistency)
    color_coeff: float = num(0.0, **NON_NEGATIVE)
    # the faithfulness switches (docs/faithfulness.md; the "authors" preset sets the other side of each)
    d_output: str = one_of("logits", "sigmoid")  # sigmoid: Sigmoid + BCELoss, the authors' (fp32 only)
    # "ours": real + (wrong + fake)/2, the unconditional head's real/fake terms averaged into real/fake;
    # "authors": Stage-II (real + uncond_real)/2 + (fake + wrong + uncond_fake)/3 (Stage-I: the same as ours)
    d_loss_weights: str = one_of("ours", "authors")
    # wrong pairs for the matching-aware D: "other_class": each real image with the text of the next sample of
    # another class (B pairs, wrapping around); "shift": the authors' image i with text i+1, B-1 pairs
    wrong_pairs: str = one_of("other_class", "shift")
    stage1_bn: str = one_of("eval", "train")  # the frozen Stage-I G's BatchNorm: fixed statistics or authors'
    # True: fused Adam (CPU and CUDA: the guard skips on the device); False: torch's defaults (the authors')
    adam_foreach: bool = True
    # resuming at another world size with train.batch_size (per worker): "keep" the global batch
    # (train.grad_accum adjusted; refused where it cannot be) or "free": the configured batch as it is.
    # With train.global_batch the global batch is kept by construction
    elastic_batch: str = one_of("keep", "free")
    compile: bool = False  # torch.compile G and D (DDP backend only)
    channels_last: bool = False  # models and images in channels-last memory format (faster convolutions on CPU)
    deterministic: bool = False  # torch.use_deterministic_algorithms (warn only) and no cudnn.benchmark
    device: str = one_of("auto", "cpu", "cuda")  # auto | cpu | cuda
    dist_timeout_s: float = num(120.0, lo=0.0, lo_open=True)  # process-group formation and collectives
    # collectives of the first steps (ranks compiling at different speeds wait for each other there)
    dist_startup_timeout_s: float = num(900.0, **POSITIVE)
    stop_check_every: int = num(10, **POSITIVE)  # steps between agreements on the stop flag and the clock

    def check(self) -> None:
        if (self.global_batch > 0) == (self.batch_size > 0):
            if self.batch_size == 0:
                raise ConfigError("config key 'train.batch_size' must be positive (images per worker), or set "
                                  "train.global_batch > 0 (images per optimizer step) instead; got both 0")
            raise ConfigError(f"config keys 'train.global_batch' ({self.global_batch}) and 'train.batch_size' "
                              f"({self.batch_size}) are both set; keep one: train.batch_size=0 to split the global "
                              "batch over the workers, or train.global_batch=0 for a fixed per-worker batch")
        if self.lr_decay_steps and self.lr_decay_epochs:
            raise ConfigError("config keys 'train.lr_decay_steps' and 'train.lr_decay_epochs' are both set; "
                              "keep one (epochs mean the same at any world size)")
        if self.d_output == "sigmoid" and self.precision != "fp32":
            raise ConfigError(f"config key 'train.d_output=sigmoid' needs train.precision=fp32 (Sigmoid + BCELoss "
                              f"is unsafe under autocast), got {self.precision}; use train.d_output=logits")
        if self.backend == "ddp" and self.zero_stage != 0:
            raise ConfigError("config key 'train.zero_stage' needs train.backend=deepspeed")


@dataclass
class DistributedConfig:
    """Gradient communication (default: plain fp32 all-reduce). Not model-defining: a resume may change it.
    See docs/precision.md and distributed/comm_hooks.py."""
    # none | fp16 | bf16 (gradients cast for the all-reduce, fp32 again after) | powersgd (low-rank, error
    # feedback; DDP only). DeepSpeed: fp16/bf16 become its communication_data_type, powersgd is refused
    comm_hook: str = one_of("none", "fp16", "bf16", "powersgd")
    # 0: the backend's default (DDP 25 MB; DeepSpeed reduce_bucket_size 5e7 elements)
    bucket_cap_mb: float = num(0.0, lo=0.0, words=">= 0 (0: the backend's default)")
    static_graph: bool = False  # DDP's static_graph (the same parameters get gradients every step); DDP only
    powersgd_rank: int = num(1, lo=1)  # PowerSGD's matrix_approximation_rank
    # optimizer steps of plain all-reduce before PowerSGD starts (torch: >= 2 with error feedback and warm
    # start); counted per process from its start: a resumed run warms up again (error feedback not saved)
    powersgd_start_step: int = num(1000, lo=2)


@dataclass
class CheckpointConfig:
    every_steps: int = num(500, **POSITIVE)  # used when every_epochs is 0
    every_epochs: float = num(0.0, **NON_NEGATIVE)  # > 0: a checkpoint each time this many epochs are seen
    every_minutes: float = num(0.0, **NON_NEGATIVE)  # 0: off (checked every train.stop_check_every steps)
    keep_last: int = num(3, **POSITIVE)  # the newest valid checkpoints kept; older ones are removed after each commit
    max_restarts: int = num(5, lo=1)  # restarts without progress past the resumed step before giving up
    signal: str = one_of("USR1", "USR2", "TERM")  # the warning signal the scheduler sends before a time limit
    background: bool = True  # write files in a background thread after copying state to CPU


@dataclass
class LogConfig:
    every_steps: int = num(10, **POSITIVE)  # steps between records in metrics.jsonl and TensorBoard
    sample_every: int = num(500, **POSITIVE)  # steps; used when sample_every_epochs is 0
    sample_every_epochs: float = num(0.0, **NON_NEGATIVE)  # > 0: a sample grid each time this many epochs of images are seen
    # the tqdm bar: "auto" draws it only on a terminal outside Slurm/Ray jobs; else a plain line per log tick
    progress: str = one_of("auto", "true", "false", bools=True)  # a progress bar on the main rank; false: a plain line per log record
    level: str = one_of("INFO", "DEBUG", "WARNING", "ERROR")  # logging level of every rank


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    # what load_config decided for the user (e.g. a command-line max_steps over the config's max_epochs):
    # lines for the start banner; not a section, not dumped, not hashed
    notes: list = field(default_factory=list, compare=False, repr=False)

    def check(self) -> None:
        """The rules across sections."""
        t, d = self.train, self.distributed
        if t.color_coeff and self.model.stage != 2:
            raise ConfigError("config key 'train.color_coeff' needs model.stage=2 (it compares with the Stage-I "
                              "image)")
        # pytorch#143580 (fix pending in pytorch#187732): DDP's static graph with no_sync fails an internal
        # assert at the first backward, and once past it stops reducing gradients silently
        if d.static_graph and t.grad_accum > 1:
            raise ConfigError(STATIC_GRAPH_ACCUM.format(accum=t.grad_accum))
        if t.backend == "deepspeed" and d.comm_hook == "powersgd":
            raise ConfigError("config key 'distributed.comm_hook=powersgd' needs train.backend=ddp (DeepSpeed has "
                              "no PowerSGD); use distributed.comm_hook=bf16 (DeepSpeed's communication_data_type)")
        if t.backend == "deepspeed" and d.static_graph:
            raise ConfigError("config key 'distributed.static_graph' needs train.backend=ddp (a DDP option)")

    def to_dict(self) -> dict:
        return {f.name: dataclasses.asdict(getattr(self, f.name)) for f in _sections()}

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


STATIC_GRAPH_ACCUM = ("config key 'distributed.static_graph' cannot be used with train.grad_accum={accum} > 1 "
                      "(torch's static graph breaks under no_sync, pytorch#143580); set distributed.static_graph=false")
MODEL_DEFINING_KEYS = ("stage", "gf_dim", "df_dim", "condition_dim", "z_dim", "text_dim", "res_blocks", "ca_relu",
                       "d_condition", "cond_reinject", "g_padding")


def model_defining(cfg: Config) -> dict:
    return {k: getattr(cfg.model, k) for k in MODEL_DEFINING_KEYS}


def _sections() -> list:
    return [f for f in fields(Config) if f.name != "notes"]


def _all_keys() -> list[str]:
    out = []
    for sec in _sections():
        for f in fields(sec.type if not isinstance(sec.type, str) else globals()[sec.type]):
            out.append(f"{sec.name}.{f.name}")
    return out



_TYPES = {"int": int, "float": float, "str": str, "bool": bool}
OPTIONAL_INT = "int | None"  # a key that may be left unset (null or "auto"): model.text_dim


def _unknown(key: str) -> "ConfigError":
    near = closest_key(key, _all_keys())
    hint = f"did you mean '{near}'?" if near else \
        f"sections: {', '.join(f.name for f in _sections())}; see README's config table"
    return ConfigError(f"unknown config key '{key}' ({hint})")


def _set(cfg: Config, key: str, value: Any) -> None:
    parts = key.split(".")
    if len(parts) != 2 or parts[0] == "notes" or not hasattr(cfg, parts[0]) or \
            not dataclasses.is_dataclass(getattr(cfg, parts[0])):
        raise _unknown(key)
    section = getattr(cfg, parts[0])
    names = {f.name: f for f in fields(section)}
    if parts[1] not in names:
        raise _unknown(key)
    f = names[parts[1]]
    if f.type == OPTIONAL_INT:
        unset = value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto", "null", "none"))
        setattr(section, parts[1], None if unset else coerce(key, value, int))
        return
    typ = _TYPES[f.type] if isinstance(f.type, str) else f.type
    setattr(section, parts[1], coerce(key, value, typ, f.metadata))


def kl_weight(cfg: Config) -> float:
    """The weight on the true KL (summed over dimensions) that ``train.kl_coeff`` and ``kl_reduction`` mean."""
    return cfg.train.kl_coeff / (cfg.model.condition_dim if cfg.train.kl_reduction == "mean" else 1)


def _check_key(key: str, v: Any, meta) -> None:
    if "choices" in meta and v not in meta["choices"]:
        raise ConfigError(f"config key '{key}' must be one of {list(meta['choices'])}, got {v!r}")
    if "range" not in meta or v is None:
        return
    lo, hi, lo_open, hi_open = meta["range"]
    bad = isinstance(v, float) and not math.isfinite(v)
    bad = bad or (lo is not None and (v <= lo if lo_open else v < lo)) or \
        (hi is not None and (v >= hi if hi_open else v > hi))
    if not bad:
        return
    if meta.get("words"):
        raise ConfigError(f"config key '{key}' must be {meta['words']}, got {v!r}")
    rng = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}{')' if hi_open else ']'}"
    raise ConfigError(f"config key '{key}' must lie in {rng}, got {v!r}")


def validate(cfg: Config) -> None:
    """Every key's rule (its field's metadata), then each section's ``check()`` and the config's own. Run
    after every change to a config: load_config does, and so does the start plan after it adjusts one."""
    for sec in _sections():
        section = getattr(cfg, sec.name)
        for f in fields(section):
            v = getattr(section, f.name)
            _check_key(f"{sec.name}.{f.name}", v, f.metadata)
            if isinstance(v, str):  # paths from a shell may hold bytes that are not UTF-8 (config.yaml is)
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError:
                    raise ConfigError(f"config key '{sec.name}.{f.name}' is not valid UTF-8 "
                                      f"({v.encode('utf-8', 'replace')!r}); use a path whose name is UTF-8") from None
        if hasattr(section, "check"):
            section.check()
    cfg.check()


PRESET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "presets")  # package data (setup.py)


def preset_overrides(name: str) -> list[str]:
    """``stackgan_dist/presets/NAME.yaml`` (a mapping of sections, like a config) -> dotted ``key=value`` strings,
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
    for key, value in flatten(data).items():
        _set(Config(), key, value)  # unknown keys and wrong types are refused here, naming the key
        out.append(f"{key}={json.dumps(value) if isinstance(value, (bool, str)) else value}")
    return out


def _preset_names() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(PRESET_DIR) if f.endswith(".yaml")) if os.path.isdir(PRESET_DIR) else []


def load_config(path: str | None, overrides: list[str] | tuple = ()) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None) and apply ``key=value`` overrides.

    Two decisions follow what was given where: a train.global_batch given without a train.batch_size makes
    the per-worker batch derived (batch_size 0); a train.max_steps on the command line beside a config's
    max_epochs wins (max_epochs 0), noted in ``cfg.notes`` for the start banner."""
    cfg = Config()
    given: set = set()
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        try:
            with open(path, "rb") as f:
                data = yaml_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        except OSError as e:
            raise ConfigError(f"config file {path} cannot be read ({e.strerror})") from None
        except ConfigError as e:
            raise ConfigError(f"config file {path}: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
        for key, value in flatten(data).items():
            _set(cfg, key, value)
            given.add(key)
    from_cli = {parse_override(o)[0] for o in overrides}
    file_epochs = cfg.train.max_epochs
    apply_overrides(cfg, overrides)
    given |= from_cli
    if cfg.train.global_batch > 0 and "train.batch_size" not in given:
        cfg.train.batch_size = 0
    if "train.max_steps" in from_cli and "train.max_epochs" not in from_cli and file_epochs > 0:
        cfg.train.max_epochs = 0.0
        cfg.notes.append(f"train.max_steps from the command line; the config's max_epochs {file_epochs:g} ignored")
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
    for key, value in flatten(d).items():
        _set(cfg, key, value)
    validate(cfg)
    return cfg

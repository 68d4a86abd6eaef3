"""What a checkpoint holds, and the schedules measured in images seen.

``TrainState`` is the progress of a run (step, images seen, epoch, the loader's cursor, the schedule it ran
under); ``CHECKPOINT_FORMAT_VERSION`` is written into ``model.pt`` and read back: a newer or unknown version is refused
with one clear line, version 1 (checkpoints written before this module existed) is migrated on load.

Files of a step folder (the file protocol itself is ``checkpoint/manager.py``'s):
- ``model.pt`` (rank 0): G and D (unwrapped), the strategy's state (tagged with its backend), the frozen
  Stage-I generator at Stage-II, ``format_version``, ``train_state``, the model-defining config and its hash;
- ``rank_XXXXX.pt`` (every rank): this rank's RNG streams: CPU, numpy, python, the noise generator and the
  RNG of the device in use (only that one: a resume may see fewer devices).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import random
from dataclasses import dataclass, field

import numpy as np
import torch

from .checkpoint.state import numpy_state_from_safe, numpy_state_to_safe, to_cpu
from .config import MODEL_DEFINING_KEYS, Config, ModelConfig, model_defining
from .distributed import unwrap
from .errors import CheckpointError

log = logging.getLogger("stackgan_dist.train")

# the layout of model.pt and rank_*.pt (keys, train_state); versions 1..this are read, a newer one refused
CHECKPOINT_FORMAT_VERSION = 2
FORMAT_VERSION = CHECKPOINT_FORMAT_VERSION  # the name before the split (tests and older callers)


@dataclass
class Schedule:
    """The run's length and its ticks, resolved against the dataset size. ``*_images`` (> 0) win over
    ``*_steps``: epochs of images mean the same at any world size, steps of the global batch do not."""

    epoch_images: int  # images in one epoch: the training split's size
    max_steps: int = 0
    max_images: int = 0
    lr_decay_steps: int = 0
    lr_decay_images: int = 0
    ckpt_every_steps: int = 0
    ckpt_every_images: int = 0
    sample_every_steps: int = 0
    sample_every_images: int = 0
    warmup_images: int = 0  # linear lr warmup over this many images seen (train.lr_warmup_epochs)

    @classmethod
    def from_config(cls, cfg: Config, epoch_images: int) -> "Schedule":
        def images(epochs: float) -> int:
            return int(round(epochs * epoch_images)) if epochs > 0 else 0

        t = cfg.train
        s = cls(epoch_images=epoch_images,
                max_images=images(t.max_epochs), lr_decay_images=images(t.lr_decay_epochs),
                ckpt_every_images=images(cfg.checkpoint.every_epochs),
                sample_every_images=images(cfg.log.sample_every_epochs), warmup_images=images(t.lr_warmup_epochs))
        s.max_steps = 0 if s.max_images else t.max_steps
        s.lr_decay_steps = 0 if s.lr_decay_images else t.lr_decay_steps
        s.ckpt_every_steps = 0 if s.ckpt_every_images else cfg.checkpoint.every_steps
        s.sample_every_steps = 0 if s.sample_every_images else cfg.log.sample_every
        return s

    def done(self, st: "TrainState") -> bool:
        return st.images_seen >= self.max_images if self.max_images else st.step >= self.max_steps

    def lr_factor_exponent(self, st: "TrainState") -> int:
        """How many decays have happened by now (lr = base x lr_decay_factor ** this)."""
        if self.lr_decay_images:
            return st.images_seen // self.lr_decay_images
        return st.step // self.lr_decay_steps if self.lr_decay_steps else 0

    def lr_factor(self, st: "TrainState", decay_factor: float, global_batch: int) -> float:
        """The multiplier on the (batch-scaled) learning rates for the step about to run: the decays so far,
        times the linear warmup (the first step at global_batch / warmup_images of the peak)."""
        f = decay_factor ** self.lr_factor_exponent(st)
        if self.warmup_images and st.images_seen < self.warmup_images:
            f *= min(1.0, (st.images_seen + global_batch) / self.warmup_images)
        return f

    def warmup_steps(self, global_batch: int) -> int:
        return math.ceil(self.warmup_images / global_batch) if self.warmup_images else 0

    @staticmethod
    def _due(st: "TrainState", before: int, every_steps: int, every_images: int) -> bool:
        """Whether the step that just ran (from ``before`` images) crossed a tick."""
        if every_images:
            return st.images_seen // every_images > before // every_images
        return st.step % every_steps == 0

    def checkpoint_due(self, st: "TrainState", before: int) -> bool:
        return self._due(st, before, self.ckpt_every_steps, self.ckpt_every_images)

    def sample_due(self, st: "TrainState", before: int) -> bool:
        return self._due(st, before, self.sample_every_steps, self.sample_every_images)

    def total_steps(self, st: "TrainState", global_batch: int) -> int:
        """The step the run ends at (an estimate at resume when the global batch changed)."""
        if self.max_images:
            return st.step + max(0, math.ceil((self.max_images - st.images_seen) / global_batch))
        return self.max_steps


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    images_seen: int = 0  # global: summed over ranks and micro-batches
    epoch: int = 0  # images_seen // epoch size, at the last save
    # the loader's position, opaque here (the data package writes and reads it); today's per-rank loader:
    # {"kind": "rank_batches", "batches": per-rank batches consumed, "world_size", "num_workers"}
    cursor: dict = field(default_factory=dict)
    schedule: dict = field(default_factory=dict)  # the Schedule it ran under (reported if it changes)

    def advance(self, global_batch: int, epoch_images: int) -> None:
        self.step += 1
        self.images_seen += global_batch
        self.epoch = self.images_seen // max(1, epoch_images)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def read_train_state(saved: dict, ck: str) -> TrainState:
    """``model.pt`` -> TrainState, enforcing the format version (version 1 migrates)."""
    v = saved.get("format_version", 1)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1 or v > CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {ck} has state format version {v!r}; this stackgan_dist reads versions "
                              f"1 to {CHECKPOINT_FORMAT_VERSION}: resume it with the stackgan_dist that wrote it")
    if v == 1:
        try:
            return _from_v1(saved)
        except (KeyError, TypeError, ValueError, OverflowError, AttributeError) as e:
            raise CheckpointError(f"checkpoint {ck}: a version-1 model.pt without a readable step ({type(e).__name__})"
                                  ) from None
    d = saved.get("train_state")
    try:
        return TrainState(step=int(d["step"]), images_seen=int(d["images_seen"]), epoch=int(d["epoch"]),
                          cursor=dict(d["cursor"]), schedule=dict(d["schedule"]))
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise CheckpointError(f"checkpoint {ck}: train_state is malformed ({type(e).__name__}: {e})") from None


def read_checkpoint(saved, ck: str) -> TrainState:
    """A loaded ``model.pt`` that readers and resume may build from: its format version read
    (``read_train_state``), then its contents checked against the model it declares, before anything is
    allocated (``checkpoint/contents.check_model_file``: bounded sizes, exact keys and shapes)."""
    from .checkpoint.contents import check_model_file

    if not isinstance(saved, dict):
        raise CheckpointError(f"checkpoint {ck}: model.pt holds a {type(saved).__name__}, not a mapping (corrupt)")
    st = read_train_state(saved, ck)
    check_model_file(saved, ck)
    return st


def _from_v1(saved: dict) -> TrainState:
    """Version 1 kept ``step`` (and an unread ``epoch``) at the top of model.pt and each rank's batches
    consumed (``step x grad_accum``) in its rank file; the global batch follows from the saved config."""
    step = int(saved["step"])
    cfg = saved.get("config", {})
    t = cfg.get("train", {})
    ws = int(saved.get("world_size", 1))
    accum = int(t.get("grad_accum", 1))
    images = step * int(t.get("batch_size", 0)) * accum * ws
    cursor = {"kind": "rank_batches", "batches": step * accum, "world_size": ws,
              "num_workers": int(cfg.get("data", {}).get("num_workers", 0))}
    return TrainState(step=step, images_seen=images, epoch=int(saved.get("epoch", 0)), cursor=cursor)


def check_resume_compatible(saved_model_config: dict, cfg: Config, ck: str) -> None:
    """The model-defining keys must match; a key the checkpoint predates counts as its default then (e.g.
    model.d_condition, added after version-1 checkpoints were written, was "text" for all of them)."""
    cur, default = model_defining(cfg), ModelConfig()
    for k in MODEL_DEFINING_KEYS:
        was = saved_model_config.get(k, getattr(default, k))
        if was != cur[k]:
            raise CheckpointError(f"cannot resume from {ck}: model.{k} changed ({was!r} -> {cur[k]!r}); "
                                  "this changes the model's shape. Use a new run.dir")


def saved_batch_layout(saved: dict) -> tuple[int, int, int] | None:
    """(per-worker batch, grad_accum, world size) a checkpoint trained with, from its recorded config; None
    where the record is missing or malformed (the resume then takes the configured batch as it is)."""
    try:
        t = saved["config"]["train"]
        out = (int(t["batch_size"]), int(t.get("grad_accum", 1)), int(saved["world_size"]))
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    return out if min(out) > 0 else None


def saved_step(saved: dict, ck: str) -> int:
    """The step of a loaded model.pt, any supported version (for readers: inspect, sample, eval), after
    ``read_checkpoint``'s checks."""
    return read_checkpoint(saved, ck).step


def model_state(strategy, cfg: Config, st: TrainState, world_size: int, text_encoder: dict,
                stage1=None) -> dict:
    """Rank 0's model.pt, as a CPU copy (written while training goes on). ``stage1``: (G1, its ModelConfig,
    where it came from) at Stage-II."""
    out = {"format_version": CHECKPOINT_FORMAT_VERSION, "train_state": st.to_dict(),
           "G": unwrap(strategy.g.net).state_dict(), "D": unwrap(strategy.d.net).state_dict(),
           "strategy": strategy.state_dict(),
           "model_config": model_defining(cfg) | {"stage1_checkpoint": cfg.model.stage1_checkpoint},
           "config": cfg.to_dict(), "config_hash": cfg.model_hash(), "text_encoder": text_encoder,
           "world_size": world_size}
    if stage1 is not None:
        G1, mcfg, ref = stage1
        out["stage1_G"] = G1.state_dict()
        out["stage1_model_config"] = {k: getattr(mcfg, k) for k in MODEL_DEFINING_KEYS}
        out["stage1_ref"] = ref
    return to_cpu(out)


# -- per-rank RNG ------------------------------------------------------------------------------------------

def rng_state(noise_gen: torch.Generator, device: torch.device) -> dict:
    """This process's random streams; of the accelerators only the one in use."""
    py = random.getstate()
    st = {"noise_gen": noise_gen.get_state().cpu(), "torch_cpu": torch.get_rng_state(),
          "python": list(py[1]), "python_version": py[0], "numpy": numpy_state_to_safe(np.random.get_state())}
    if device.type == "cuda":
        st["device"] = torch.cuda.get_rng_state(device)
    return st


def device_rng_from(saved: dict, device: torch.device) -> torch.Tensor | None:
    """The saved RNG state for ``device``: version 2 keeps one ("device"); version 1 kept every visible
    CUDA device's ("cuda", a list) and resuming with fewer visible devices indexed past its end."""
    if device.type != "cuda":
        return None
    if "device" in saved:
        return saved["device"]
    states = saved.get("cuda") or []
    idx = device.index or 0
    return states[idx] if idx < len(states) else None


def set_rng_state(saved: dict, noise_gen: torch.Generator, device: torch.device) -> None:
    noise_gen.set_state(saved["noise_gen"].to(noise_gen.get_state().device))
    torch.set_rng_state(saved["torch_cpu"])
    random.setstate((saved["python_version"], tuple(saved["python"]), None))
    np.random.set_state(numpy_state_from_safe(saved["numpy"]))
    dev = device_rng_from(saved, device)
    if dev is not None:
        torch.cuda.set_rng_state(dev, device)


def rank_state(rank: int, world_size: int, noise_gen: torch.Generator, device: torch.device) -> dict:
    return {"format_version": CHECKPOINT_FORMAT_VERSION, "rank": rank, "world_size": world_size,
            "rng": rng_state(noise_gen, device)}


def rank_rng(saved_rank: dict) -> dict:
    """The RNG part of a rank file, any supported version (version 1 kept the streams at the top level)."""
    return saved_rank["rng"] if saved_rank.get("format_version", 1) >= 2 else saved_rank

"""``RUN/metrics.jsonl`` (the machine-readable record) and TensorBoard scalars/images under ``RUN/tb``."""
from __future__ import annotations

import json
import os

import numpy as np


class MetricsWriter:
    def __init__(self, run_dir: str, enabled: bool, resume_step: int = 0, tensorboard: bool = True):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.tb = None
        if not enabled:
            return
        if os.path.isfile(self.path):  # drop records past the step we resume from: they will be redone
            with open(self.path) as f:
                keep = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            with open(self.path + ".tmp", "w") as f:
                f.writelines(keep)
            os.replace(self.path + ".tmp", self.path)
        self.f = open(self.path, "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=resume_step + 1 if resume_step else None)
            except ImportError:
                self.tb = None

    def log(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        rec = {"step": step, **record}
        self.f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(_tb_tag(k), v, step)

    def image(self, step: int, tag: str, grid_hwc: np.ndarray) -> None:
        if self.enabled and self.tb is not None:
            self.tb.add_image(tag, grid_hwc, step, dataformats="HWC")

    def close(self) -> None:
        if self.enabled:
            self.f.close()
            if self.tb is not None:
                self.tb.close()


def _tb_tag(k: str) -> str:
    if k.startswith(("d_", "g_", "kl")):
        return f"loss/{k}"
    if k.startswith("lr"):
        return f"lr/{k}"
    return f"train/{k}"

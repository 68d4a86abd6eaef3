"""Training statistics between two log ticks: kept on the device, reduced over ranks once per log tick."""
from __future__ import annotations

import logging
import math
import time

import torch

from ..distributed.collectives import all_reduce_sum_
from ..errors import UserError

log = logging.getLogger("stackgan_dist.train")


class StepStats:
    """Sums of the step's detached losses (device tensors: adding them never waits for the device)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.sums: dict = {}
        self.n = 0
        self.t0 = time.perf_counter()

    def add(self, losses: dict) -> None:
        for k, v in losses.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.n += 1

    def reduce(self, env, extra: dict) -> dict:
        """One all-reduce over ranks: the mean of every loss over steps and ranks, plus the *sums* over
        ranks of ``extra`` (host or device scalars such as skipped-step and bad-sample counts)."""
        keys = sorted(self.sums)
        dev = self.sums[keys[0]].device
        ext = sorted(extra)
        vec = torch.stack([self.sums[k].float() / self.n for k in keys]
                          + [torch.as_tensor(extra[k], dtype=torch.float32, device=dev).reshape(()) for k in ext])
        all_reduce_sum_(vec, env)
        vals = vec.tolist()  # the host read of the log tick
        rec = {k: v / env.world_size for k, v in zip(keys, vals[:len(keys)])}
        rec.update({k: v for k, v in zip(ext, vals[len(keys):])})
        return rec


def finite_losses(rec: dict, keys) -> bool:
    return all(math.isfinite(rec[k]) for k in keys)


class LogTick:
    """A log tick: the statistics reduced over ranks, the run's health checks (non-finite losses, too many
    undecodable samples, skipped optimizer steps), one metrics record and, without the progress bar, one
    plain step line (what batch-system logs need: greppable, no carriage returns)."""

    def __init__(self, env, metrics, global_batch: int, total_steps: int, max_bad_fraction: float, plain: bool):
        self.env, self.metrics = env, metrics
        self.global_batch, self.total_steps = global_batch, total_steps
        self.max_bad_fraction, self.plain = max_bad_fraction, plain
        self.skipped_seen = 0

    def __call__(self, stats: StepStats, strategy, bad_total: int, st, steps_run: int, last_good) -> dict:
        """``last_good()``: the last good checkpoint, asked only when the losses went non-finite."""
        env, s = self.env, strategy
        dt = time.perf_counter() - stats.t0
        rec = stats.reduce(env, {"data_skipped": float(bad_total), "d_skipped": s.d.skipped, "g_skipped": s.g.skipped})
        loss_keys = sorted(stats.sums)
        for k in ("d_skipped", "g_skipped"):
            rec[k] = int(rec[k] / env.world_size)  # every rank skips the same steps
        rec["data_skipped"] = int(rec["data_skipped"])
        seen_all = steps_run * self.global_batch
        rec.update({"img_per_s": stats.n * self.global_batch / max(dt, 1e-9), "lr_g": s.g.lr, "lr_d": s.d.lr,
                    "epoch": st.epoch, "images_seen": st.images_seen})
        sc = s.scaler_scale()
        if sc is not None:
            rec["grad_scale"] = sc
        if not finite_losses(rec, loss_keys):
            raise UserError(f"non-finite loss at step {st.step} "
                            f"({', '.join(f'{k}={rec[k]}' for k in loss_keys)}); last good checkpoint: {last_good()}")
        if rec["data_skipped"] > 0 and rec["data_skipped"] / max(seen_all, 1) > self.max_bad_fraction:
            raise UserError(f"{rec['data_skipped']} of {seen_all} samples failed to decode "
                            f"(> data.max_bad_fraction={self.max_bad_fraction}); stopping")
        if rec["d_skipped"] + rec["g_skipped"] > self.skipped_seen:
            self.skipped_seen = rec["d_skipped"] + rec["g_skipped"]
            log.warning("non-finite gradients: %d D and %d G steps skipped so far", rec["d_skipped"], rec["g_skipped"])
        self.metrics.log(st.step, rec)
        stats.reset()
        if env.is_main and self.plain:
            log.info("step %d/%d images %d epoch %.2f d_loss %.4f g_loss %.4f kl %.4f %.1f img/s", st.step,
                     self.total_steps, st.images_seen, st.epoch, rec["d_loss"], rec["g_loss"],
                     rec.get("kl", float("nan")), rec["img_per_s"])
        return rec

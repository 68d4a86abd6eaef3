"""Goodput: what checkpointing and restarts cost a run.

- checkpoint stall: wall ms the training loop waits per save (``Trainer.save_checkpoint``), synchronous and in
  the background (state copied to CPU, files written by a thread), and its share of wall time at the
  default interval (checkpoint.every_steps, checkpoint.background) at the measured step time;
- restart to first step: process start (imports), then Trainer.build() with the checkpoint load, then the
  first training step;
- steps lost per preemption: 0 with the scheduler's warning signal (a checkpoint is written at the next step
  boundary, exit 75); every_steps / 2 on average for a kill without warning (an expected value, not measured).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import common
import torch

from stackgan_dist.config import CheckpointConfig, load_config
from stackgan_dist.distributed.env import DistEnv
from stackgan_dist.trainer import Trainer


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--saves", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--gf-dim", type=int, default=16)
    p.add_argument("--df-dim", type=int, default=8)
    p.add_argument("--workdir", default="", help="default: a temporary directory, removed afterwards")
    p.add_argument("--json", default="")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=a.workdir or None) as tmp:
        data = os.path.join(tmp, "data")
        subprocess.run([sys.executable, "-m", "stackgan_dist", "prepare", "synthetic", "--out", data,
                        "--train", "64", "--test", "16"], check=True, capture_output=True, cwd=common.REPO)
        ov = [f"run.dir={tmp}/run", f"data.train={data}/train", f"data.test={data}/test", "data.num_workers=0",
              f"train.max_steps={a.steps}", f"train.batch_size={a.batch_size}", "log.progress=false",
              f"model.gf_dim={a.gf_dim}", f"model.df_dim={a.df_dim}", "train.device=cpu",
              f"checkpoint.every_steps={10 ** 6}", f"log.sample_every={10 ** 6}", "log.every_steps=1000"]
        cfg = load_config(os.path.join(common.REPO, "configs/demo/stage1.yaml"), ov)
        env = DistEnv()
        tr = Trainer(cfg, env)
        tr.build()
        t = time.perf_counter()
        tr.train()  # includes one final save
        train_s = time.perf_counter() - t
        saves, bg_stall, bg_total = [], [], []
        for _ in range(a.saves):
            tr.step += 1
            t = time.perf_counter()
            tr.save_checkpoint(background=False)
            saves.append(time.perf_counter() - t)
        for _ in range(a.saves):  # background: the loop waits only for the copy to CPU
            tr.step += 1
            t = time.perf_counter()
            tr.save_checkpoint(background=True)
            bg_stall.append(time.perf_counter() - t)
            tr.commit_pending()  # normally a few steps later; here at once, to time the whole write
            bg_total.append(time.perf_counter() - t)
        save_ms = 1e3 * common.percentile(saves, 0.5)
        bg_ms = 1e3 * common.percentile(bg_stall, 0.5)
        step_ms = 1e3 * train_s / a.steps  # an upper bound: includes the final save and sample grid
        every = CheckpointConfig().every_steps
        # restart: a fresh process's imports, then build (checkpoint load), then one step
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import stackgan_dist.trainer"], check=True, cwd=common.REPO)
        import_s = time.perf_counter() - t
        t = time.perf_counter()
        cfg.train.max_steps = tr.step + 1000  # the run is not finished: the restart trains on
        tr2 = Trainer(cfg, env)
        tr2.build()
        build_s = time.perf_counter() - t
        it = iter(tr2.loader)
        t = time.perf_counter()
        tr2.gan_step([next(it)])
        first_s = time.perf_counter() - t
        tr2.metrics.close()
        del it
        model_mb = os.path.getsize(os.path.join(tr.ckpt.last_saved, "model.pt")) / 2 ** 20
    r = {"checkpoint_save_ms_sync": save_ms, "checkpoint_save_ms_background": bg_ms,
         "checkpoint_background_write_ms": 1e3 * common.percentile(bg_total, 0.5),
         "checkpoint_model_mb": model_mb, "step_ms": step_ms, "default_every_steps": every,
         "default_background": CheckpointConfig().background,
         "stall_share_at_default_interval_sync": save_ms / (every * step_ms + save_ms),
         "stall_share_at_default_interval_background": bg_ms / (every * step_ms + bg_ms),
         "restart_import_s": import_s, "restart_build_and_load_s": build_s, "restart_first_step_s": first_s,
         "restart_to_first_step_s": import_s + build_s + first_s, "resumed_at_step": tr2.step,
         "steps_lost_per_preemption_with_signal": 0, "steps_lost_per_preemption_hard_kill_expected": every / 2,
         "setup": {"stage": 1, "batch_size": a.batch_size, "gf_dim": a.gf_dim, "df_dim": a.df_dim,
                   "threads": torch.get_num_threads()}}
    r["stall_share_at_default_interval"] = r["stall_share_at_default_interval_background" if r["default_background"]
                                             else "stall_share_at_default_interval_sync"]
    out = {**common.header("cpu"), "goodput": r}
    common.write_json(out, a.json)
    print(f"checkpoint save {save_ms:.0f} ms sync, {bg_ms:.0f} ms stall in the background ({model_mb:.1f} MB "
          f"model.pt); {100 * r['stall_share_at_default_interval']:.3f}% of wall time at every_steps={every}; "
          f"restart to first step {r['restart_to_first_step_s']:.2f} s", flush=True)
    return out


if __name__ == "__main__":
    main()

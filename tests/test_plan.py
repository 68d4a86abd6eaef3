"""The start plan (stackgan_dist/plan.py), pure: batch split, loader numbers, lr rules, stop rule, resume."""
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stackgan_dist.config import load_config
from stackgan_dist.plan import (MIN_BATCH_PER_WORKER, PlanError, images_used_per_pass, lr_scale, make_plan,
                                resolved_config, resume_grad_accum, split_global_batch)

CUB_TRAIN = 8855  # the authors' birds release: training images


def _plan(overrides, world_size=1, num_samples=CUB_TRAIN, **kw):
    cfg = load_config(None, list(overrides))
    return make_plan(cfg, launcher="single", world_size=world_size, device="cpu", num_samples=num_samples,
                     num_workers=kw.pop("num_workers", 7), **kw)


def test_cub_at_16_ranks_by_7_workers_drops_at_most_63_images_per_pass():
    p = _plan(["train.global_batch=64", "train.max_epochs=600"], world_size=16)
    assert (p.global_batch, p.batch_per_worker, p.grad_accum, p.batch_mode) == (64, 4, 1, "global")
    assert p.images_used_per_epoch == 64 * (CUB_TRAIN // 64) == 8832
    assert p.images_dropped_per_epoch == 23 <= 63
    assert p.steps_per_epoch == 138
    assert p.total_steps == math.ceil(600 * CUB_TRAIN / 64) and p.stop_rule == "epochs"
    assert any("per worker" in w and "sweep" in w for w in p.warnings)  # 4 per GPU: a sweep would do better


@given(n=st.integers(1, 100_000), b=st.integers(1, 64), w=st.integers(1, 128))
def test_images_used_per_pass_drops_less_than_one_global_micro_batch(n, b, w):
    used = images_used_per_pass(n, b, w)
    assert used % (b * w) == 0 and 0 <= n - used < b * w


def test_global_batch_that_does_not_split_is_refused_naming_what_splits():
    with pytest.raises(PlanError) as e:
        split_global_batch(64, 3, 1)
    msg = str(e.value)
    assert "\n" not in msg and "does not split over world size 3" in msg
    assert "[1, 2, 4, 8, 16, 32]" in msg  # the world sizes that work, each leaving >= 2 per worker
    with pytest.raises(PlanError, match="train.grad_accum must divide 64"):
        split_global_batch(64, 2, 3)


def test_per_worker_batch_below_the_batchnorm_minimum_is_refused():
    assert MIN_BATCH_PER_WORKER == 2
    with pytest.raises(PlanError) as e:
        split_global_batch(64, 64, 1)
    msg = str(e.value)
    assert "1 image per worker" in msg and "minimum is 2" in msg and "BatchNorm1d" in msg
    assert "at most 32 workers" in msg
    assert split_global_batch(64, 32, 1) == 2
    with pytest.raises(PlanError, match="train.batch_size 1 is below the minimum of 2"):
        _plan(["train.batch_size=1"])


def test_lr_scaling_by_hand():
    assert lr_scale("none", 1024, 64) == 1.0
    assert lr_scale("linear", 1024, 64) == 16.0
    assert lr_scale("sqrt", 1024, 64) == 4.0
    assert lr_scale("sqrt", 16, 64) == 0.5
    p = _plan(["train.batch_size=64", "train.lr_scaling=sqrt", "train.lr_g=2e-4", "train.lr_d=1e-4"], world_size=16)
    assert p.global_batch == 1024 and p.lr_scale == 4.0
    assert p.lr_g == pytest.approx(8e-4) and p.lr_d == pytest.approx(4e-4)
    p = _plan(["train.global_batch=256", "train.lr_scaling=linear", "train.lr_reference_batch=128",
               "train.lr_warmup_epochs=2"], world_size=4)
    assert p.lr_g == pytest.approx(4e-4) and p.lr_warmup_steps == math.ceil(2 * CUB_TRAIN / 256)


def test_warmup_and_decay_factor_by_hand():
    from stackgan_dist.train_state import Schedule, TrainState

    cfg = load_config(None, ["train.lr_warmup_epochs=1", "train.lr_decay_epochs=2"])
    s = Schedule.from_config(cfg, 100)
    assert s.lr_factor(TrainState(images_seen=0), 0.5, 25) == 0.25  # the first step: 25 of 100 images
    assert s.lr_factor(TrainState(images_seen=50), 0.5, 25) == 0.75
    assert s.lr_factor(TrainState(images_seen=100), 0.5, 25) == 1.0
    assert s.lr_factor(TrainState(images_seen=200), 0.5, 25) == 0.5  # one decay after 2 epochs


def test_stop_rule_is_stated():
    p = _plan(["train.max_steps=10"])
    assert p.stop_rule == "steps" and p.stops == f"stops at step 10: 640 images seen, {640 / CUB_TRAIN:.2f} epochs"
    p = _plan(["train.max_epochs=2", "train.global_batch=64"])
    assert p.stop_rule == "epochs" and p.total_steps == math.ceil(2 * CUB_TRAIN / 64)
    assert f"{2 * CUB_TRAIN} images seen" in p.stops


def test_resume_at_another_world_size_keeps_the_global_batch():
    # per-worker mode: grad_accum rises to keep the checkpoint's 64 (as keep_global_batch did)
    assert resume_grad_accum(8, 1, 4, "keep", 8, 1, 8) == (2, "world size 8 -> 4: train.grad_accum 1 -> 2 keeps "
                                                                   "the global batch of 64")
    with pytest.raises(PlanError, match="it was trained with 64.*train.elastic_batch=free"):
        resume_grad_accum(6, 1, 4, "keep", 8, 1, 8)
    assert resume_grad_accum(6, 1, 4, "free", 8, 1, 8)[0] == 1
    # global mode: the split follows the world size, the global batch stays
    p = _plan(["train.global_batch=64"], world_size=4, saved_batch=(8, 1, 8), resume_from="ck", resume_step=5,
              resume_images=320)
    assert (p.global_batch, p.batch_per_worker, p.notes) == (64, 16, ())


def test_slots_beyond_the_samples_are_refused():
    with pytest.raises(PlanError, match="data.slots 100 exceeds the 50 samples"):
        _plan(["data.slots=100"], num_samples=50)


def test_resolved_config_is_per_worker_and_validated():
    cfg = load_config(None, ["train.global_batch=64"])
    p = make_plan(cfg, launcher="single", world_size=4, device="cpu", num_samples=CUB_TRAIN, num_workers=3)
    r = resolved_config(cfg, p)
    assert (r.train.batch_size, r.train.global_batch, r.data.num_workers) == (16, 0, 3)
    assert cfg.train.global_batch == 64 and cfg.train.batch_size == 0  # the user's config is untouched


def test_config_batch_keys_and_command_line_stop_rule():
    from stackgan_dist.config import ConfigError

    cfg = load_config(None, ["train.global_batch=64"])  # a global batch alone: the per-worker batch is derived
    assert (cfg.train.global_batch, cfg.train.batch_size) == (64, 0)
    with pytest.raises(ConfigError, match="both set; keep one"):
        load_config(None, ["train.global_batch=64", "train.batch_size=8"])
    with pytest.raises(ConfigError, match="train.seed' must lie in"):
        load_config(None, [f"train.seed={2 ** 63}"])
    with pytest.raises(ConfigError, match="NUL byte"):
        load_config(None, ["run.dir=a\0b"])


def test_gpus_that_no_rank_uses_are_warned():
    from stackgan_dist.distributed.env import ranks_on_this_node

    assert [ranks_on_this_node(e) for e in ({}, {"LOCAL_WORLD_SIZE": "8"}, {"SLURM_TASKS_PER_NODE": "1(x2)"},
                                            {"SLURM_STEP_TASKS_PER_NODE": "4,3"})] == [1, 8, 1, 4]
    p = _plan(["train.batch_size=64"], unused_devices=7)
    assert any("7 CUDA device(s) on this node are used by no rank" in w and "--ntasks-per-node" in w
               for w in p.warnings)
    assert p.to_dict()["warnings"] == list(p.warnings)  # the dry run's JSON; a real start logs it at warning

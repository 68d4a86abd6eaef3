"""TrainState, its format version, schedules in images seen, per-rank RNG, the device-side non-finite guard,
the merged stop-check collective and the test rendezvous: in-process, no training runs."""
from __future__ import annotations

import contextlib
import threading

import pytest
import torch

from stackgan_dist.config import load_config
from stackgan_dist.errors import CheckpointError
from stackgan_dist.train_state import (FORMAT_VERSION, Schedule, TrainState, device_rng_from, read_train_state,
                                       rng_state)


def test_format_version_is_enforced():
    good = {"format_version": FORMAT_VERSION, "train_state": TrainState(step=3, images_seen=12).to_dict()}
    assert read_train_state(good, "ck").step == 3
    for bad in (FORMAT_VERSION + 1, 0, "2", None, True):
        with pytest.raises(CheckpointError, match=r"state format version .* this stackgan_dist reads versions 1 to"):
            read_train_state({**good, "format_version": bad}, "ck")
    with pytest.raises(CheckpointError, match="train_state is malformed"):
        read_train_state({"format_version": FORMAT_VERSION, "train_state": {"step": 1}}, "ck")


def test_version1_state_migrates():
    v1 = {"step": 5, "epoch": 0, "world_size": 2,
          "config": {"train": {"batch_size": 4, "grad_accum": 3}, "data": {"num_workers": 2}}}
    st = read_train_state(v1, "ck")
    assert (st.step, st.images_seen) == (5, 5 * 4 * 3 * 2)
    assert st.cursor == {"kind": "rank_batches", "batches": 15, "world_size": 2, "num_workers": 2}


def _run(schedule: Schedule, global_batch: int):
    """Steps until done -> (steps, lr-decay exponent after each step, checkpoint ticks by images seen)."""
    st, lrs, ticks = TrainState(), [], []
    while not schedule.done(st):
        before = st.images_seen
        st.advance(global_batch, schedule.epoch_images)
        lrs.append((st.images_seen, schedule.lr_factor_exponent(st)))
        if schedule.checkpoint_due(st, before):
            ticks.append(st.images_seen)
    return st, lrs, ticks


def test_epoch_schedules_mean_the_same_at_any_world_size():
    cfg = load_config(None, ["train.max_epochs=6", "train.lr_decay_epochs=2", "checkpoint.every_epochs=3"])
    s = Schedule.from_config(cfg, epoch_images=96)
    assert (s.max_steps, s.max_images, s.lr_decay_images, s.ckpt_every_images) == (0, 576, 192, 288)
    for world in (1, 2, 4, 8):  # batch 8 per worker
        st, lrs, ticks = _run(s, 8 * world)
        assert st.images_seen == 576 and st.step == 576 // (8 * world) and st.epoch == 6
        # a tick falls on the first step that reaches its image count
        assert len(ticks) == 2 and 288 <= ticks[0] < 288 + 8 * world and ticks[1] == 576
        assert all(e == img // 192 for img, e in lrs)


def test_step_schedules_still_work_and_are_exclusive_with_epochs():
    s = Schedule.from_config(load_config(None, ["train.max_steps=7", "train.lr_decay_steps=3",
                                                "checkpoint.every_steps=2"]), epoch_images=96)
    st, lrs, ticks = _run(s, 16)
    assert st.step == 7 and ticks == [32, 64, 96]
    assert [e for _, e in lrs] == [0, 0, 1, 1, 1, 2, 2]
    with pytest.raises(Exception, match="both set"):
        load_config(None, ["train.lr_decay_steps=3", "train.lr_decay_epochs=1"])


def test_rng_state_keeps_only_the_device_in_use():
    st = rng_state(torch.Generator(), torch.device("cpu"))
    assert "device" not in st and "cuda" not in st  # CPU: no accelerator state at all
    states = [torch.full((16,), i, dtype=torch.uint8) for i in range(2)]
    # a version-1 file held every visible device's state; resuming on fewer devices indexed past its end
    assert torch.equal(device_rng_from({"cuda": states}, torch.device("cuda", 1)), states[1])
    assert device_rng_from({"cuda": states}, torch.device("cuda", 5)) is None
    assert device_rng_from({"cuda": states}, torch.device("cpu")) is None
    assert torch.equal(device_rng_from({"device": states[0]}, torch.device("cuda", 3)), states[0])


def _strategy(optimizer_kind="fused"):
    from stackgan_dist.distributed.env import DistEnv
    from stackgan_dist.distributed.ddp import DDPStrategy
    from stackgan_dist.models.build import build_models

    cfg = load_config(None, ["model.gf_dim=16", "model.df_dim=8", "model.condition_dim=16", "model.z_dim=16",
                             "model.text_dim=32"])
    m = build_models(cfg.model)
    s = DDPStrategy(cfg, DistEnv(device=torch.device("cpu")))
    s.setup(m.G, m.D)
    if optimizer_kind == "foreach":  # any non-fused optimizer: the masked-update fallback
        s.d.optimizer = torch.optim.Adam(s.d.net.parameters(), lr=1e-3, foreach=True)
    return s


class _NoHostRead:
    """Fails any host read of a tensor (.item(), bool(), float(), int()) inside the block."""

    def __enter__(self):
        self.saved = {n: getattr(torch.Tensor, n) for n in ("item", "__bool__", "__float__", "__int__", "tolist")}

        def boom(*_a, **_k):
            raise AssertionError("host read of a device tensor inside the step")

        for n in self.saved:
            setattr(torch.Tensor, n, boom)

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(torch.Tensor, n, f)
        return False


@pytest.mark.parametrize("kind", ["fused", "foreach"])
def test_non_finite_guard_skips_on_the_device_without_a_host_read(kind):
    s = _strategy(kind)
    text = torch.randn(4, 32)
    for bad in (False, True, False):
        before = [p.detach().clone() for p in s.d.net.parameters()]
        state_before = {k: v.clone() for st in s.d.optimizer.state.values() for k, v in st.items()}
        loss = s.d.wrapped(torch.randn(4, 3, 64, 64), text)["cond"].float().mean() * (float("nan") if bad else 1.0)
        s.d.backward(loss)
        # the decision itself never reads the device; non-fused Adam reads its own step counter on CPU
        with _NoHostRead() if kind == "fused" else contextlib.nullcontext():
            s.d.step()
        same = all(torch.equal(a, b) for a, b in zip(before, s.d.net.parameters()))
        assert same == bad
        if bad:  # Adam's moments and step counter untouched too
            after = {k: v for st in s.d.optimizer.state.values() for k, v in st.items()}
            assert all(torch.equal(after[k], v) for k, v in state_before.items())
    assert s.skipped_steps() == {"d": 1, "g": 0}


def test_optimizers_are_fused_so_the_guard_needs_no_host_read():
    s = _strategy()
    assert all(ph.optimizer.defaults["fused"] for ph in s.phases)


def test_merged_flags_single_process():
    from stackgan_dist.distributed.collectives import any_flags
    from stackgan_dist.distributed.env import DistEnv

    assert any_flags([True, False, True], DistEnv()) == [True, False, True]


def test_rendezvous_pauses_until_go(tmp_path):
    from stackgan_dist.testing import Hooks

    h = Hooks({"STACKGAN_TEST_PAUSE_AT_STEP": "3", "STACKGAN_TEST_RENDEZVOUS_DIR": str(tmp_path),
               "STACKGAN_TEST_RENDEZVOUS_TIMEOUT_S": "60"})
    h.after_step(2, None, 0)  # not the step: returns at once
    assert not (tmp_path / "rank0.step2").exists()
    done = threading.Event()
    t = threading.Thread(target=lambda: (h.after_step(3, None, 0), done.set()))
    t.start()
    from conftest import wait_until

    wait_until(lambda: (tmp_path / "rank0.step3").exists(), "the marker")
    assert not done.is_set()  # still waiting for go
    (tmp_path / "go").touch()
    t.join(60)
    assert done.is_set()
    quick = Hooks({"STACKGAN_TEST_PAUSE_AT_STEP": "1", "STACKGAN_TEST_RENDEZVOUS_DIR": str(tmp_path / "x"),
                   "STACKGAN_TEST_RENDEZVOUS_TIMEOUT_S": "0.05"})
    with pytest.raises(RuntimeError, match="no .*go within"):
        quick.after_step(1, None, 0)

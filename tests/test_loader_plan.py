"""The loader plan (#26 point 2): each rank takes a contiguous run of whole batches and its loader workers
share them, so a pass drops fewer images than one global batch and a dataset is too small only below one
global batch; ranks get equal batch counts and the rank's workers yield its batches in order."""
import os

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from conftest import CFG1, one_line_error, run_cli, tiny_overrides
from stackgan_dist.data.prepare.writer import make_sample, write_manifest, write_parallel
from stackgan_dist.data.read.index import resolve_dataset
from stackgan_dist.data.read.loader import LoaderSpec, make_loader
from stackgan_dist.data.read.slots import Order, batches_of, check_slots, plan, plan_numbers
from stackgan_dist.errors import DataError


def _positions(share):
    return [(s, p) for s, lo, hi in share for p in range(lo, hi)]


def _check_plan(order, consumed, world, batch, accum=1):
    """The plan's invariants; returns the samples it uses."""
    shares = plan(order, consumed, world, batch, accum)
    sizes = {len(_positions(sh)) for sh in shares}
    assert len(sizes) == 1, sizes  # equal batches on every rank: no collective waits at an epoch's end
    size = sizes.pop()
    assert size % (batch * accum) == 0
    used = [x for sh in shares for x in _positions(sh)]
    assert len(used) == len(set(used)), "a sample planned twice"
    assert not any(any(a <= p < b for a, b in consumed.get(s, ())) for s, p in used), "a consumed sample planned"
    left = order.num_samples - sum(hi - lo for rs in consumed.values() for lo, hi in rs)
    assert left - len(used) <= world * batch * accum - 1  # dropped: less than one global batch
    for sh in shares:  # each rank's run is contiguous in the epoch's order (slots in turn)
        pos = _positions(sh)
        assert pos == sorted(pos)
    return used


def test_cub_at_16_ranks_by_7_workers_drops_at_most_63():
    """The issue's case: CUB's 8,855 training images, 16 ranks x 7 workers at batch 4 (global batch 64)."""
    n = plan_numbers(8855, 16, 4)
    assert n.images_used == 64 * (8855 // 64) == 8832 and n.images_dropped == 23 <= 63
    assert n.batches_per_rank == 138
    order = Order(8855, 64, 0, 512)
    used = _check_plan(order, {}, 16, 4)
    assert len(used) == n.images_used
    # 64 ranks x 7 workers used to refuse to start; now only a dataset under one global batch is too small
    assert plan_numbers(8855, 64, 4).images_used == 256 * (8855 // 256)
    with pytest.raises(DataError, match="too small for one global batch of 256"):
        plan_numbers(255, 64, 4)


@given(n=st.integers(0, 3000), world=st.integers(1, 70), batch=st.integers(1, 64), accum=st.integers(1, 4))
def test_plan_numbers_agree_with_the_global_batch(n, world, batch, accum):
    glob = world * batch * accum
    if n < glob:
        with pytest.raises(DataError, match="too small"):
            plan_numbers(n, world, batch, accum)
        return
    p = plan_numbers(n, world, batch, accum)
    assert p.images_used == glob * (n // glob) and p.images_dropped == n - p.images_used <= glob - 1
    assert p.batches_per_rank * batch * world == p.images_used and p.batches_per_rank % accum == 0


@given(n=st.integers(1, 600), slots=st.integers(1, 9), world=st.integers(1, 12), batch=st.integers(1, 9),
       accum=st.integers(1, 3), cut=st.lists(st.tuples(st.integers(0, 8), st.integers(0, 80), st.integers(1, 30)),
                                             max_size=4))
def test_plan_properties(n, slots, world, batch, accum, cut):
    """Any dataset size, world size, batch and consumed runs: every sample at most once, fewer than one
    global batch dropped, equal batches per rank."""
    order = Order(n, min(slots, n), 0, 16)
    consumed = {}
    for s, lo, ln in cut:
        s %= order.slots
        size = order.slot_size(s)
        lo = min(lo, size - 1)
        if size:
            consumed.setdefault(s, []).append([lo, min(size, lo + ln)])
    consumed = {s: [list(r) for r in sorted({tuple(r) for r in rs})] for s, rs in consumed.items()}
    merged = {}
    for s, rs in consumed.items():  # disjoint runs, as a cursor holds them
        out = []
        for lo, hi in sorted(rs):
            if out and lo <= out[-1][1]:
                out[-1][1] = max(out[-1][1], hi)
            else:
                out.append([lo, hi])
        merged[s] = out
    _check_plan(order, merged, world, batch, accum)


@given(batches=st.integers(1, 40), workers=st.integers(1, 8), batch=st.integers(1, 5))
def test_workers_share_a_rank_in_order(batches, workers, batch):
    """Worker k takes the rank's batches k, k + K, ...; taking one batch from each worker in turn (what
    torch's DataLoader does) gives back the rank's order, also when the count is no multiple of K."""
    share = [(0, 0, batches * batch)]
    mine = [[b for t, b in enumerate(batches_of(share, batch)) if t % workers == k] for k in range(workers)]
    round_robin = [mine[t % workers][t // workers] for t in range(batches)]
    assert round_robin == batches_of(share, batch)


N, DIM, B = 44, 8, 4  # 11 batches per epoch at one rank: no multiple of 3 workers


def _build(i):
    emb = np.zeros((1, DIM), np.float32)
    emb[0, 0] = i
    return make_sample(f"s{i:05d}", Image.new("RGB", (16, 16), (i % 256, 9, 9)), emb, ["x"], 0)


@pytest.fixture(scope="module")
def info(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("plan"))
    shards, _ = write_parallel(out, N, _build, workers=1, max_count=10, progress=False)
    write_manifest(out, shards, {"name": "hashing", "dim": DIM}, "test")
    return resolve_dataset(out)


def _seq(info, workers, n, **kw):
    _, dl = make_loader(info, LoaderSpec(1, B, seed=2, num_workers=workers, shuffle_buffer=8, slots=2, **kw))
    it = iter(dl)
    out = [next(it) for _ in range(n)]
    del it
    return [(int(b["epoch"]), [int(v) for v in b["text"][:, 0]]) for b in out]


def test_three_real_workers_yield_the_rank_order_across_uneven_epochs(info):
    """Three worker processes on 11 batches an epoch: the same batches, in the same order, as one process,
    through two epoch ends (where the round robin no longer starts at worker 0)."""
    one = _seq(info, 0, 24)
    assert [e for e, _ in one] == [0] * 11 + [1] * 11 + [2] * 2
    assert _seq(info, 3, 24) == one
    assert sorted(i for _, ids in one[:11] for i in ids) == list(range(N))  # nothing dropped: 44 = 11 x 4
    assert _seq(info, 3, 10, start_batches=14) == one[14:]  # resumed mid-epoch with another worker phase


def test_slots_beyond_the_data_are_refused_in_one_line(info):
    with pytest.raises(DataError, match=r"data.slots=1000000000 but the dataset holds 44 samples"):
        make_loader(info, LoaderSpec(1, B, seed=0, num_workers=0, slots=1_000_000_000))
    check_slots(44, 44)
    with pytest.raises(DataError, match="data.slots=45"):
        check_slots(45, 44)


def test_two_ranks_equal_batches_and_exact_samples(info):
    """Two ranks x two workers: 5 batches each (40 of 44 images, 4 < one global batch of 8 dropped)."""
    seen = []
    for rank in range(2):
        ds, dl = make_loader(info, LoaderSpec(1, B, seed=2, rank=rank, world_size=2, num_workers=2,
                                              shuffle_buffer=8, slots=2))
        assert ds.batches_per_epoch == 5
        it = iter(dl)
        bs = [next(it) for _ in range(5)]
        del it
        assert all(int(b["epoch"]) == 0 for b in bs)
        seen += [int(v) for b in bs for v in b["text"][:, 0]]
    assert len(seen) == len(set(seen)) == 40
    assert torch.tensor(seen).max() < N


@pytest.mark.timeout(300)
def test_dry_run_refuses_too_many_slots_and_a_dataset_under_one_global_batch(synth_data, tmp_path):
    """What the real start refuses, the dry run refuses first, in one line (exit 2): 10^9 slots (it used to
    pass the dry run, then spin), 96 samples for 32 ranks x batch 4."""
    base = ["train", CFG1, "--dry-run", *tiny_overrides(synth_data, tmp_path / "run")]
    one_line_error(run_cli(*base, "data.slots=1000000000"), "data.slots", "1000000000", "96 samples", rc=2)
    one_line_error(run_cli(*base, env={"WORLD_SIZE": "32"}), "too small for one global batch of 128", rc=2)
    assert not os.path.exists(tmp_path / "run")

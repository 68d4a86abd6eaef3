"""The world-size-independent loader cursor: ranks record what they consumed, the merged cursor resumes at
any world size with no sample of the epoch seen twice and none skipped beyond the new layout's drop-last
remainder; at the same layout the batches are exactly those of an uninterrupted run."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from stackgan_dist.data.read.index import resolve_dataset
from stackgan_dist.data.read.loader import LoaderSpec, make_loader
from stackgan_dist.data.read.cursor import CursorTracker, merge_cursors
from stackgan_dist.data.read.slots import Order, buffer_shuffle_order, plan
from stackgan_dist.data.prepare.writer import make_sample, write_manifest, write_parallel
from stackgan_dist.errors import DataError

N, DIM, B = 103, 8, 4


def _build(i):
    emb = np.zeros((2, DIM), np.float32)
    emb[:, 0] = i  # the text of a batch names its samples
    return make_sample(f"s{i:05d}", Image.new("RGB", (16, 16), (i % 256, 3, 7)), emb, ["a", "b"], i % 3)


@pytest.fixture(scope="module")
def info(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cur"))
    shards, _ = write_parallel(out, N, _build, workers=1, max_count=20, progress=False)
    write_manifest(out, shards, {"name": "hashing", "dim": DIM}, "test")
    return resolve_dataset(out)


def _ids(b):
    return [int(v) for v in b["text"][:, 0]]


def _loader(info, rank, world, workers=0, cursor=None, slots=3, buffer=16):
    return make_loader(info, LoaderSpec(1, B, seed=5, rank=rank, world_size=world, num_workers=workers,
                       shuffle_buffer=buffer, cursor=cursor, slots=slots))


def _take(info, world, k, workers=0, cursor=None, **kw):
    """Each rank's loader for k batches: (per-rank batches, merged cursor)."""
    states, got = [], []
    for r in range(world):
        ds, dl = _loader(info, r, world, workers, cursor, **kw)
        tr = ds.tracker()
        it = iter(dl)
        bs = []
        for _ in range(k):
            b = next(it)
            tr.update(b)
            bs.append(b)
        del it
        states.append(json.loads(json.dumps(tr.state())))  # JSON round trip, as in a checkpoint
        got.append(bs)
    return got, merge_cursors(states[::-1])  # any order


def _rest_of_epoch(info, world, cursor, epoch=0, workers=0, **kw):
    """Every rank's batches of ``epoch`` after resuming from ``cursor``."""
    out = []
    for r in range(world):
        _, dl = _loader(info, r, world, workers, cursor, **kw)
        later, bs = 0, []
        for b in dl:
            if int(b["epoch"]) == epoch:
                bs.append(b)
            elif int(b["epoch"]) > epoch:
                later += 1
                if later > max(1, workers):
                    break
        out.append(bs)
    return out


def test_buffer_shuffle_order_is_a_permutation_and_seeded():
    for n, buf in ((0, 4), (1, 4), (10, 1), (10, 4), (100, 16), (7, 100)):
        a = buffer_shuffle_order(n, buf, np.random.default_rng(1))
        assert sorted(a) == list(range(n))
        assert a == buffer_shuffle_order(n, buf, np.random.default_rng(1))
    assert buffer_shuffle_order(100, 16, np.random.default_rng(1)) != list(range(100))


@pytest.mark.parametrize("world,workers", [(1, 1), (2, 1), (2, 3), (3, 2), (5, 1)])
def test_plan_deals_equal_disjoint_shares(world, workers):
    order = Order(N, 3, 0, 16)
    consumed = {0: [[0, 5], [9, 12]], 2: [[30, 34]]}
    shares = plan(order, consumed, world, B)  # per rank; the workers share their rank's batches
    sizes = [sum(hi - lo for _, lo, hi in sh) for sh in shares]
    remaining = N - 5 - 3 - 4
    assert len(set(sizes)) == 1 and sizes[0] % B == 0
    assert remaining - sum(sizes) < world * B  # only the drop-last remainder (< one global batch) is left out
    seen = set()
    for sh in shares:
        for s, lo, hi in sh:
            for p in range(lo, hi):
                assert (s, p) not in seen and not any(a <= p < b for a, b in consumed.get(s, []))
                seen.add((s, p))


def test_same_layout_resume_is_exact(info):
    full, _ = _take(info, 2, 9)
    head, cur = _take(info, 2, 4)
    tail, _ = _take(info, 2, 5, cursor=cur)
    for r in range(2):
        for x, y in zip(full[r][4:], tail[r]):
            for k in ("image", "text", "cls", "epoch", "cursor"):
                assert torch.equal(x[k], y[k]), k


@pytest.mark.parametrize("new_world", [1, 2, 3])
def test_resume_at_another_world_size_sees_each_sample_once(info, new_world):
    per_epoch = 2 * (N // (2 * B))  # batches of epoch 0 over both ranks: 12 each
    head, cur = _take(info, 2, 5)
    first = [i for bs in head for b in bs for i in _ids(b)]
    rest = [i for bs in _rest_of_epoch(info, new_world, cur) for b in bs for i in _ids(b)]
    seen = first + rest
    assert len(seen) == len(set(seen)), "a sample of the epoch seen twice"
    left = N - len(first)
    dropped = left - left // (new_world * B) * (new_world * B)  # the new layout's drop-last remainder
    assert len(seen) == N - dropped
    assert per_epoch >= 5 * 2


def test_resume_twice_through_three_world_sizes(info):
    head, cur = _take(info, 2, 3)
    mid, cur = _take(info, 3, 2, cursor=cur)
    assert cur["epochs"]["0"]["plan"]["world_size"] == 3  # re-planned over what was left
    rest = _rest_of_epoch(info, 1, cur)
    seen = [i for part in (head, mid, rest) for bs in part for b in bs for i in _ids(b)]
    assert len(seen) == len(set(seen))
    left = N - 2 * 3 * B - 3 * 2 * B  # what the single rank had left; with W=1 fewer than B are dropped
    assert len(seen) == N - left % B


def test_workers_round_robin_resume_is_exact_and_elastic(info):
    """Two ranks with two loader workers each (real worker processes); 3 batches: an odd count, so the
    resumed DataLoader must start with the second worker's reader."""
    full, _ = _take(info, 2, 6, workers=2)
    head, cur = _take(info, 2, 3, workers=2)
    tail, _ = _take(info, 2, 3, workers=2, cursor=cur)
    for r in range(2):
        for x, y in zip(full[r][3:], tail[r]):
            assert torch.equal(x["text"], y["text"]) and torch.equal(x["image"], y["image"])
    first = [i for bs in head for b in bs for i in _ids(b)]
    rest = [i for bs in _rest_of_epoch(info, 3, cur, workers=2) for b in bs for i in _ids(b)]
    assert len(first + rest) == len(set(first + rest))
    left = N - len(first)
    assert len(rest) == left // (3 * B) * (3 * B)  # the drop-last remainder: less than one global batch


def test_epochs_chain_and_completed_epochs_leave_the_cursor(info):
    ds, dl = _loader(info, 0, 1)
    tr = ds.tracker()
    it = iter(dl)
    per_epoch = ds.batches_per_epoch
    for _ in range(per_epoch + 2):
        tr.update(next(it))
    st = tr.state()
    assert st["epoch"] == 1 and list(st["epochs"]) == ["1"]
    assert sum(hi - lo for rs in st["epochs"]["1"]["consumed"].values() for lo, hi in rs) == 2 * B


def test_start_batches_equals_cursor_of_an_uninterrupted_run(info):
    full, _ = _take(info, 2, 7)
    for r in range(2):
        _, dl = make_loader(info, LoaderSpec(1, B, seed=5, rank=r, world_size=2, num_workers=0, shuffle_buffer=16,
                                             slots=3, start_batches=4))
        it = iter(dl)
        for x in full[r][4:]:
            assert torch.equal(next(it)["text"], x["text"])


def test_bad_cursors_are_one_clear_error(info):
    _, cur = _take(info, 1, 2)
    with pytest.raises(DataError, match="shuffle_buffer"):
        _loader(info, 0, 1, cursor=cur, buffer=8)
    with pytest.raises(DataError, match="slots"):
        _loader(info, 0, 1, cursor=cur, slots=4)
    for bad in ([], {**cur, "epochs": {"0": {"plan": cur["epochs"]["0"]["plan"], "consumed": {"0": [[5, 2]]}}}},
                {**cur, "epochs": {"0": {"plan": cur["epochs"]["0"]["plan"], "consumed": {"9": [[0, 1]]}}}},
                {**cur, "epoch": -1}, {**cur, "version": 99}, {**cur, "epochs": {"x": {}}}):
        with pytest.raises(DataError, match="cursor"):
            _loader(info, 0, 1, cursor=bad)
    with pytest.raises(ValueError, match="disagree"):
        merge_cursors([cur, {**cur, "epoch": 3}])


def test_tracker_is_pure_and_json(info):
    ds, dl = _loader(info, 0, 1)
    tr = ds.tracker()
    before = json.dumps(tr.state())
    b = next(iter(dl))
    tr2 = CursorTracker(json.loads(before) | {"layout": ds.resume.start["layout"]}, 0)
    tr.update(b)
    tr2.update(b)
    assert tr.state() == tr2.state() and json.dumps(tr.state()) != before

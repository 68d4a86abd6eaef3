"""`stackgan prepare coco` on a tiny fake copy of the authors' COCO release: filenames.pickle and a ragged
char-CNN-RNN embeddings pickle (COCO images have 5 to 7 captions), images in the three places the release's
users keep them (images/, train2014/ and val2014/, a key naming its folder), captions for some images only.
The shards written are read back as tar files, and the training start checks (`train --dry-run`) accept them.
Every file of the release is hostile: bad names, embeddings and pickles are refused in one line."""
from __future__ import annotations

import io
import json
import os
import pickle
import tarfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import run_cli, tiny_overrides
from stackgan_dist.data.prepare.coco_release import coco_embeddings, coco_keys, load_coco_split, prepare_coco
from stackgan_dist.errors import DataError

DIM = 16
TRAIN = {  # key as filenames.pickle holds it -> (where the image is, relative to ROOT), colour
    "COCO_train2014_000000000009": ("images/COCO_train2014_000000000009.jpg", (200, 30, 30)),
    "COCO_train2014_000000000025.jpg": ("train2014/COCO_train2014_000000000025.jpg", (30, 200, 30)),
    "train2014/COCO_train2014_000000000030": ("train2014/COCO_train2014_000000000030.jpg", (30, 30, 200)),
    "COCO_train2014_000000000034": ("train2014/COCO_train2014_000000000034.jpg", (200, 200, 30)),
}
TEST = {"COCO_val2014_000000000042": ("val2014/COCO_val2014_000000000042.jpg", (30, 200, 200))}


def write_split(root, split, entries, emb):
    d = root / split
    d.mkdir(parents=True)
    with open(d / "filenames.pickle", "wb") as f:
        pickle.dump(list(entries), f, protocol=2)  # the authors' files are Python 2 pickles
    with open(d / "char-CNN-RNN-embeddings.pickle", "wb") as f:
        pickle.dump(emb, f, protocol=2)
    for rel, colour in entries.values():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (96, 64), colour).save(root / rel)  # not square: resized whole


@pytest.fixture
def release(tmp_path):
    root = tmp_path / "coco"
    rng = np.random.default_rng(0)
    train_emb = [rng.standard_normal((n, DIM)).astype(np.float32) for n in (5, 6, 5, 7)]  # ragged
    write_split(root, "train", TRAIN, train_emb)
    write_split(root, "test", TEST, rng.standard_normal((1, 5, DIM)).astype(np.float32))  # regular
    (root / "text").mkdir()
    (root / "text" / "COCO_train2014_000000000009.txt").write_text("".join(f"a red thing {i}\n" for i in range(5)))
    return root, train_emb


def read_shards(split_dir) -> list[dict]:
    out = []
    for shard in sorted(p for p in os.listdir(split_dir) if p.endswith(".tar")):
        with tarfile.open(os.path.join(split_dir, shard)) as t:
            by_key: dict[str, dict] = {}
            for m in t.getmembers():
                key, ext = m.name.split(".", 1)
                by_key.setdefault(key, {})[ext] = t.extractfile(m).read()
            out += [by_key[k] for k in sorted(by_key)]
    return out


def test_prepare_coco_writes_every_image_with_its_embeddings_and_captions(release, tmp_path):
    root, emb = release
    out = tmp_path / "data"
    for split in ("train", "test"):
        p = run_cli("prepare", "coco", "--root", root, "--split", split, "--out", out / split, "--workers", "1",
                    "--no-progress")
        assert p.returncode == 0, p.stderr
    samples = read_shards(out / "train")
    assert len(samples) == 4
    for s, e, (_, colour) in zip(samples, emb, TRAIN.values()):
        np.testing.assert_array_equal(np.load(io.BytesIO(s["emb.npy"])), e)
        img = np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB"), dtype=np.float32)
        assert img.shape[0] == img.shape[1]  # stored square
        assert np.abs(img.mean(axis=(0, 1)) - colour).max() < 8  # the right image for the right embeddings
    assert json.loads(samples[0]["txt.json"]) == [f"a red thing {i}" for i in range(5)]
    assert all(json.loads(s["txt.json"]) == [] for s in samples[1:])
    m = json.loads((out / "train" / "dataset.json").read_text())
    assert (m["num_samples"], m["text_dim"], m["captions_per_image"], m["captioned"]) == (4, DIM, [5, 7], 1)
    assert json.loads((out / "test" / "dataset.json").read_text())["captions_per_image"] == 5

    # the training start checks accept what was written (text_dim read from dataset.json)
    p = run_cli("train", "configs/demo/stage1.yaml", "--dry-run",
                *tiny_overrides(out, tmp_path / "run", extra=["model.text_dim=auto", "train.batch_size=2"]))
    assert p.returncode == 0, p.stderr
    plan = json.loads(p.stdout)
    assert (plan["train_samples"], plan["test_samples"], plan["text_dim"]) == (4, 1, DIM)


def test_a_missing_image_is_one_line_and_nothing_is_written(release, tmp_path):
    root, _ = release
    os.remove(root / "train2014" / "COCO_train2014_000000000034.jpg")
    out = tmp_path / "out"
    p = run_cli("prepare", "coco", "--root", root, "--split", "train", "--out", out, "--no-progress")
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "1 of 4 images not found, first: COCO_train2014_000000000034" in lines[0], p.stderr
    assert f"{root}/train2014/COCO_train2014_000000000034.jpg" in lines[0]  # says where it looked
    assert not out.exists()


@pytest.mark.parametrize("names,words", [
    (["../../etc/passwd"], ["entry 0", "not a relative image name"]),
    (["ok", "/abs/path"], ["entry 1"]),
    ([b"ok", 7], ["entry 1"]),
    ({"a": 1}, ["expected a list of image names"]),
])
def test_hostile_filenames_are_refused(names, words):
    with pytest.raises(DataError) as e:
        coco_keys(names, "filenames.pickle")
    assert all(w in str(e.value) for w in words), str(e.value)


@pytest.mark.parametrize("emb,words", [
    ([np.zeros((5, 4)), np.zeros((5, 3))], ["entry 1 has dim 3, entry 0 has 4"]),
    ([np.zeros((5, 4)), np.full((5, 4), np.nan)], ["entry 1 holds a non-finite value"]),
    ([np.zeros((5, 4))], ["1 embedding entries for 2 filenames"]),
    (np.array(["a", "b"]), ["expected (images, captions, dim) numbers"]),
    ([np.zeros((0, 4)), np.zeros((5, 4))], ["entry 0 has shape (0, 4)"]),
    ("text", ["expected an array or a list of arrays"]),
])
def test_hostile_embeddings_are_refused(emb, words):
    with pytest.raises(DataError) as e:
        coco_embeddings(emb, 2, "emb.pickle")
    assert all(w in str(e.value) for w in words), str(e.value)


def test_a_pickle_that_runs_code_is_refused(release):
    root, _ = release

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch /tmp/stackgan-coco-pwned",))

    with open(root / "train" / "filenames.pickle", "wb") as f:
        pickle.dump([Evil()], f)
    with pytest.raises(DataError):
        load_coco_split(str(root), "train")
    assert not os.path.exists("/tmp/stackgan-coco-pwned")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=30), st.binary(max_size=30)), max_size=6))
def test_accepted_keys_never_leave_the_release(names):
    root = "/release"
    try:
        keys = coco_keys(names, "filenames.pickle")
    except DataError:
        return
    assert len(keys) == len(names)
    for k in keys:
        assert os.path.normpath(os.path.join(root, "images", k + ".jpg")).startswith(root + "/")
        assert os.path.normpath(os.path.join(root, k + ".jpg")).startswith(root + "/")


finite = st.floats(allow_nan=True, allow_infinity=True, width=32)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.lists(finite, min_size=0, max_size=3), max_size=3), min_size=1, max_size=4))
def test_embeddings_are_regular_per_image_or_refused(rows):
    try:
        out = coco_embeddings(rows, len(rows), "emb.pickle")
    except DataError:
        return
    assert len(out) == len(rows)
    assert all(a.dtype == np.float32 and a.ndim == 2 and a.shape[0] >= 1 and np.isfinite(a).all() for a in out)
    assert len({a.shape[1] for a in out}) == 1


def test_prepare_coco_in_process_matches_the_ragged_counts(release, tmp_path):
    root, emb = release
    m = prepare_coco(str(root), "train", str(tmp_path / "o"), progress=False)
    assert m["num_samples"] == len(emb) and m["text_encoder"]["dim"] == DIM


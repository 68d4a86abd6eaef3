"""Hostile data (#28, the data side): nothing blocks on a special file, budgets are checked before anything is
allocated, bad values are bad samples, bad first samples are one line, prepare keeps to its inputs and its
own files."""
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import zlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from conftest import REPO, one_line_error, run_cli
from stackgan_dist.data.prepare.writer import make_sample, npy_bytes, write_manifest, write_parallel
from stackgan_dist.data.read.decode import BadSample, decode
from stackgan_dist.data.read.index import resolve_dataset
from stackgan_dist.data.read.loader import LoaderSpec, first_sample_check, make_loader
from stackgan_dist.errors import DataError, UserError
from stackgan_dist.safety.budgets import OverBudget, read_npy
from stackgan_dist.safety.unpickle import safe_load

DIM = 8


def _dataset(out, n=8, build=None):
    def good(i):
        return make_sample(f"s{i:05d}", Image.new("RGB", (16, 16), (i, 9, 9)), np.full((2, DIM), i, np.float32),
                           ["a", "b"], i % 3)

    shards, _ = write_parallel(str(out), n, build or good, workers=1, max_count=4, progress=False)
    write_manifest(str(out), shards, {"name": "hashing", "dim": DIM}, "test")
    return str(out)


# -- special files ------------------------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_fifo_in_place_of_a_shard_a_dataset_file_or_a_pickle_fails_in_one_line(tmp_path):
    d = _dataset(tmp_path / "ds")
    shard = os.path.join(d, "shard-000001.tar")
    os.remove(shard)
    os.mkfifo(shard)  # nobody ever writes to it: opening it for reading would block for good
    with pytest.raises(DataError, match="shard-000001.tar is a FIFO, not a regular file"):
        resolve_dataset(d)
    with pytest.raises(DataError, match="is a FIFO"):
        resolve_dataset(os.path.join(d, "shard-{000000..000001}.tar"))  # a pattern from the config
    os.mkfifo(tmp_path / "dataset.json")
    with pytest.raises(DataError, match="dataset file .* is a FIFO"):
        resolve_dataset(str(tmp_path))
    os.mkfifo(tmp_path / "x.pickle")
    with pytest.raises(DataError, match="is a FIFO"):
        safe_load(str(tmp_path / "x.pickle"))
    from stackgan_dist.data.prepare.prepare_index import prepare_index

    with pytest.raises(DataError, match="shard-000001.tar is a FIFO"):  # indexing shards in place
        prepare_index(os.path.join(d, "shard-*.tar"), "hashing:16", str(tmp_path / "idx"), progress=False)


@pytest.mark.timeout(300)
def test_train_dry_run_on_a_fifo_shard_exits_2_with_one_line(tmp_path):
    d = _dataset(tmp_path / "ds")
    os.remove(os.path.join(d, "shard-000000.tar"))
    os.mkfifo(os.path.join(d, "shard-000000.tar"))
    p = run_cli("train", os.path.join(REPO, "configs", "demo", "stage1.yaml"), "--dry-run",
                f"run.dir={tmp_path}/run", f"data.train={d}", f"data.test={d}", f"model.text_dim={DIM}",
                timeout=240)
    one_line_error(p, "FIFO", "shard-000000.tar", rc=2)
    assert not os.path.exists(tmp_path / "run")


# -- npy headers --------------------------------------------------------------------------------------------

def _npy_header(shape, descr="<f4", fortran=False) -> bytes:
    h = repr({"descr": descr, "fortran_order": fortran, "shape": tuple(shape)}).encode()
    h += b" " * ((64 - (10 + len(h) + 1) % 64) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(h)) + h


def test_npy_header_claiming_a_huge_shape_is_refused_before_reading():
    for shape in ((1 << 40, DIM), (1 << 20, 1 << 20), (3, DIM) * 3):
        with pytest.raises(OverBudget):
            read_npy(_npy_header(shape), DIM, 1024)
    for descr in ("|O", "<U8", "<i4", "|b1"):
        with pytest.raises(OverBudget, match="not floats"):
            read_npy(_npy_header((2, DIM), descr) + b"\0" * 256, DIM, 1024)
    with pytest.raises(OverBudget, match="not a .npy"):
        read_npy(b"0.1 0.2 0.3\n", DIM, 1024)
    with pytest.raises(OverBudget, match="at least one row"):
        read_npy(npy_bytes(np.zeros((0, DIM))), DIM, 1024)
    with pytest.raises(OverBudget, match="cut short"):
        read_npy(npy_bytes(np.ones((4, DIM)))[:-5], DIM, 1024)
    a = np.arange(3 * DIM, dtype=np.float32).reshape(3, DIM)
    assert np.array_equal(read_npy(npy_bytes(a), DIM, 1024), a)


@given(st.binary(max_size=300))
def test_npy_reader_on_any_bytes_returns_a_checked_array_or_refuses(raw):
    try:
        a = read_npy(raw, DIM, 16)
    except OverBudget:
        return
    assert a.dtype.kind == "f" and a.shape[-1] == DIM and a.ndim in (1, 2)


@given(shape=st.lists(st.integers(0, 1 << 62), min_size=0, max_size=3),
       descr=st.sampled_from(["<f4", "<f8", ">f4", "<f2", "|O", "<i8", "<U4", "<c8"]), fortran=st.booleans())
def test_npy_reader_on_any_header(shape, descr, fortran):
    raw = _npy_header(shape, descr, fortran) + b"\0" * 64
    try:
        a = read_npy(raw, DIM, 4)
    except OverBudget:
        return
    assert a.dtype.kind == "f" and a.shape == tuple(shape) and a.nbytes <= 64


def test_first_sample_emb_npy_text_object_or_empty_is_one_line(tmp_path):
    for name, emb in (("text", b"1 2 3 4 5 6 7 8"), ("object", None), ("empty", npy_bytes(np.zeros((0, DIM))))):
        if emb is None:
            buf = io.BytesIO()
            np.save(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)
            emb = buf.getvalue()

        def build(i, emb=emb):
            s = make_sample(f"s{i:05d}", Image.new("RGB", (16, 16)), np.zeros((1, DIM)), ["a"])
            s["emb.npy"] = emb
            return s

        info = resolve_dataset(_dataset(tmp_path / name, 2, build))
        with pytest.raises(DataError) as e:
            first_sample_check(info, DIM)
        assert "\n" not in str(e.value) and "emb.npy" in str(e.value), str(e.value)


# -- bad values are bad samples -----------------------------------------------------------------------------

def test_non_finite_embeddings_and_out_of_range_classes_are_counted_bad_samples(tmp_path):
    def build(i):
        s = make_sample(f"s{i:05d}", Image.new("RGB", (16, 16), (i, 1, 1)), np.full((1, DIM), i, np.float32), ["a"])
        if i == 1:
            s["emb.npy"] = npy_bytes(np.full((1, DIM), np.nan))
        if i == 2:
            s["emb.npy"] = npy_bytes(np.full((1, DIM), 3e38))
        if i == 3:
            s["cls"] = str(1 << 64).encode()
        if i == 4:
            s["cls"] = b"-5"
        return s

    info = resolve_dataset(_dataset(tmp_path / "ds", 8, build))
    _, dl = make_loader(info, LoaderSpec(1, 8, 0, num_workers=0, shuffle_buffer=1, train=False))
    b = next(iter(dl))
    assert int(b["bad"]) == 4
    assert np.isfinite(b["text"].numpy()).all() and np.abs(b["text"].numpy()).max() <= 7
    assert (b["cls"] >= -1).all()
    with pytest.raises(UserError, match="non-finite"):
        make_sample("k", Image.new("RGB", (4, 4)), np.full((1, DIM), np.inf), ["a"])
    with pytest.raises(UserError, match="class"):
        make_sample("k", Image.new("RGB", (4, 4)), np.zeros((1, DIM)), ["a"], 1 << 64)


# -- image pixels -------------------------------------------------------------------------------------------

def _png_16bit(w: int, h: int) -> bytes:
    """A w x h 16-bit greyscale PNG of zeros, compressed row by row (never held whole in memory)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    co = zlib.compressobj(9)
    row = bytes(1 + 2 * w)
    idat = b"".join(co.compress(row) for _ in range(h)) + co.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_image_over_the_pixel_budget_is_a_bad_sample():
    buf = io.BytesIO()
    Image.new("RGB", (300, 200)).save(buf, "PNG")
    sample = {"__key__": "k", "jpg": buf.getvalue(), "emb.npy": npy_bytes(np.zeros((1, DIM)))}
    with pytest.raises(BadSample, match="max_image_pixels=59999"):
        decode(sample, 76, 64, None, DIM, train=False, max_pixels=59_999)
    assert decode(sample, 76, 64, None, DIM, train=False, max_pixels=60_000).image.shape == (3, 64, 64)


CHILD = r"""
import json, resource, sys
from stackgan_dist.data.read.index import resolve_dataset
from stackgan_dist.data.read.loader import LoaderSpec, make_loader
_, dl = make_loader(resolve_dataset(sys.argv[1]), LoaderSpec(1, 1, 0, num_workers=0, shuffle_buffer=1))
it = iter(dl)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
b = next(it)
print(json.dumps({"growth_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base, "bad": int(b["bad"])}))
"""


@pytest.mark.timeout(300)
def test_decompression_bomb_png_in_an_indexed_shard_stays_small(tmp_path):
    """A ~370 KB shard holding one 13000 x 13000 16-bit PNG, indexed in place: the loader process reads it as a
    bad sample, its peak RSS grows by less than 500 MB (it used to reach about 5 GB)."""
    from stackgan_dist.data.prepare.prepare_index import prepare_index

    png = _png_16bit(13000, 13000)
    shard = tmp_path / "bomb-0000.tar"
    with tarfile.open(shard, "w") as t:
        for name, data in (("x0.png", png), ("x0.txt", b"a grey square\n")):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
    assert os.path.getsize(shard) < 1 << 20
    prepare_index(str(shard), "hashing:16", str(tmp_path / "idx"), test_fraction=0.0, progress=False)
    env = {**os.environ, "PYTHONPATH": REPO}
    p = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "idx" / "train")], capture_output=True,
                       text=True, timeout=240, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["bad"] == 1 and res["growth_kb"] < 500 * 1024, res


# -- prepare ------------------------------------------------------------------------------------------------

def _images(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    Image.new("RGB", (20, 20), (200, 0, 0)).save(d / "a.png")
    Image.new("RGB", (20, 20), (0, 200, 0)).save(tmp_path / "outside.png")
    return d


def test_prepare_refuses_images_outside_its_folder_unless_allowed(tmp_path):
    from stackgan_dist.data.prepare.captions import prepare_captions

    d = _images(tmp_path)
    for name in ("../outside.png", str(tmp_path / "outside.png")):
        caps = tmp_path / "c.jsonl"
        caps.write_text(json.dumps({"file": "a.png", "captions": ["red"]}) + "\n"
                        + json.dumps({"file": name, "captions": ["green"]}) + "\n")
        with pytest.raises(DataError, match="outside the images folder"):
            prepare_captions(str(d), str(caps), "hashing:16", str(tmp_path / "out"), progress=False)
        assert not os.path.exists(tmp_path / "out")
    res = prepare_captions(str(d), str(caps), "hashing:16", str(tmp_path / "out"), progress=False,
                           test_fraction=0.0, allow_outside=True)
    assert res["train"]["num_samples"] == 2


def test_prepare_bounds_caption_length_and_class_ids(tmp_path):
    from stackgan_dist.data.prepare.captions import prepare_captions

    d = _images(tmp_path)
    csv_path = tmp_path / "c.csv"
    csv_path.write_text("file,caption\na.png," + "x" * 200_000 + "\n")
    with pytest.raises(DataError) as e:
        prepare_captions(str(d), str(csv_path), "hashing:16", str(tmp_path / "out"), progress=False)
    assert "c.csv:2" in str(e.value) and "\n" not in str(e.value)
    csv_path.write_text("file,caption\na.png," + "y" * 5000 + "\n")
    with pytest.raises(DataError, match="a caption of 5000 characters"):
        prepare_captions(str(d), str(csv_path), "hashing:16", str(tmp_path / "out"), progress=False)
    jl = tmp_path / "c.jsonl"
    jl.write_text(json.dumps({"file": "a.png", "captions": ["red"], "class": 1 << 64}) + "\n")
    with pytest.raises(DataError, match="outside 0 to 2"):
        prepare_captions(str(d), str(jl), "hashing:16", str(tmp_path / "out"), progress=False)


def test_prepare_out_never_deletes_a_file_it_did_not_write(tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    mine = out / "shard-000007.tar"
    mine.write_bytes(b"the user's own file")
    with pytest.raises(DataError, match="shard-000007.tar"):
        _dataset(out)
    assert mine.read_bytes() == b"the user's own file"
    mine.unlink()
    _dataset(out, 8)  # two shards of 4
    assert sorted(os.listdir(out)) == ["dataset.json", "shard-000000.tar", "shard-000001.tar"]
    _dataset(out, 4)  # prepared again: the shards its dataset.json listed are replaced, the extra one removed
    assert sorted(os.listdir(out)) == ["dataset.json", "shard-000000.tar"]


def test_prepare_synthetic_negative_counts_are_one_line(tmp_path):
    p = run_cli("prepare", "synthetic", "--out", str(tmp_path / "s"), "--train", "-5", "--test", "2")
    one_line_error(p, "--train >= 1", rc=2)
    assert not os.path.exists(tmp_path / "s" / "train" / "dataset.json")


def test_embeddings_file_header_is_checked_before_its_data(tmp_path):
    """`stackgan sample --embeddings FILE`: a header claiming 2^40 rows, an object array or a FIFO is one
    UserError line; a good file reads back."""
    from stackgan_dist.cli import _load_embeddings

    huge = tmp_path / "huge.npy"
    huge.write_bytes(_npy_header((1 << 40, DIM)))
    obj = tmp_path / "obj.npy"
    np.save(obj, np.array([None, 1], dtype=object), allow_pickle=True)
    os.mkfifo(tmp_path / "fifo.npy")
    for path, words in ((huge, "more than 65536 rows"), (obj, "not floats"), (tmp_path / "fifo.npy", "FIFO")):
        with pytest.raises(UserError, match=words) as e:
            _load_embeddings(str(path), DIM)
        assert "\n" not in str(e.value)
    good = tmp_path / "good.npy"
    np.save(good, np.ones((3, DIM), np.float64))
    a = _load_embeddings(str(good), DIM)
    assert a.shape == (3, DIM) and a.dtype == np.float32

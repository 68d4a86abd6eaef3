"""dataset.json is untrusted: its schema is checked, it can name shard files only (never a pipe: command or
a URL, never a path out of its folder unless absolute), counts are bounded, and every problem is one
DataError line naming the file; a pipe: pattern from the config still works."""
import copy
import json
import os
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import run_cli, tiny_overrides
from stackgan_dist.data.read.index import resolve_dataset, validate_manifest
from stackgan_dist.data.read.loader import LoaderSpec, make_loader
from stackgan_dist.data.prepare.writer import make_sample, write_manifest, write_parallel
from stackgan_dist.errors import DataError

N, DIM = 12, 8


def _build(i):
    emb = np.full((2, DIM), i, np.float32)
    return make_sample(f"s{i:03d}", Image.new("RGB", (16, 16), (i, 0, 0)), emb, ["a", "b"], i % 2)


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("split"))
    shards, _ = write_parallel(out, N, _build, workers=1, max_count=5, progress=False)
    write_manifest(out, shards, {"name": "hashing", "dim": DIM}, "test")
    return out


def _copy(split, tmp_path, edit=None, raw=None):
    d = tmp_path / "ds"
    shutil.copytree(split, d)
    if raw is not None:
        (d / "dataset.json").write_bytes(raw)
    elif edit is not None:
        m = json.load(open(d / "dataset.json"))
        edit(m)
        (d / "dataset.json").write_text(json.dumps(m))
    return d


def _one_line_error(spec, *words):
    with pytest.raises(DataError) as e:
        resolve_dataset(str(spec))
    msg = str(e.value)
    assert "\n" not in msg and "dataset.json" in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def test_pipe_or_url_in_dataset_json_never_runs(split, tmp_path):
    marker = tmp_path / "pwned"
    for path in (f"pipe:touch {marker}; cat shard-000000.tar", "http://example.invalid/x.tar",
                 "s3://bucket/x.tar"):
        d = _copy(split, tmp_path, lambda m: m["shards"][0].__setitem__("path", path))
        _one_line_error(d, "shards[0].path", "never a pipe: command or a URL")
        shutil.rmtree(d)
    assert not marker.exists()


def test_train_and_eval_refuse_a_pipe_dataset_with_exit_2(split, tmp_path, synth_data):
    marker = tmp_path / "pwned"
    data = tmp_path / "data"
    shutil.copytree(synth_data, data)
    m = json.load(open(data / "train" / "dataset.json"))
    m["shards"][0]["path"] = f"pipe:touch {marker}; cat {m['shards'][0]['path']}"
    (data / "train" / "dataset.json").write_text(json.dumps(m))
    run = tmp_path / "run"
    r = run_cli("train", "configs/demo/stage1.yaml", *tiny_overrides(data, run, steps=1), timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "pipe:" in r.stderr and "dataset.json" in r.stderr
    assert not marker.exists() and not run.exists()
    r = run_cli("eval", run, "--data", data / "train", "--metrics", "caption", timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr and not marker.exists(), r.stderr[-2000:]
    assert "pipe:" in r.stderr and "dataset.json" in r.stderr  # refused for the data, before the run is read


def test_pipe_pattern_from_the_config_still_reads(split):
    pat = os.path.join(split, "shard-{000000..000002}.tar")
    info = resolve_dataset(f"pipe:cat {pat}")
    assert info.num_samples == N and info.shards[0].url.startswith("pipe:cat ")


def test_paths_outside_the_folder_only_when_absolute(split, tmp_path):
    d = _copy(split, tmp_path, lambda m: m["shards"][0].__setitem__("path", "../elsewhere/shard-000000.tar"))
    _one_line_error(d, "leaves the split folder", "absolute path")
    shutil.rmtree(d)
    # shards indexed in place: the file records their absolute paths, which are read
    d = _copy(split, tmp_path, lambda m: [s.__setitem__("path", os.path.join(split, s["path"]))
                                          for s in m["shards"]])
    for name in os.listdir(d):
        if name.endswith(".tar"):
            os.remove(d / name)
    info = resolve_dataset(str(d))
    assert info.num_samples == N and all(s.url.startswith(split) for s in info.shards)
    assert resolve_dataset(str(d), verify="sha256").num_samples == N


@pytest.mark.parametrize("edit,words", [
    (lambda m: m["shards"][0].__setitem__("samples", -5), ["shards[0].samples", "must lie in"]),
    (lambda m: m["shards"][0].__setitem__("samples", 10 ** 12), ["shards[0].samples"]),
    (lambda m: m["shards"][0].__setitem__("samples", "5"), ["shards[0].samples", "integer"]),
    (lambda m: m["shards"][0].__setitem__("samples", True), ["shards[0].samples", "integer"]),
    (lambda m: m["shards"][1].pop("size"), ["shards[1].size"]),
    (lambda m: m["shards"][1].__setitem__("sha256", "zz"), ["shards[1].sha256"]),
    (lambda m: m.__setitem__("shards", []), ["'num_samples'", "shards' samples 0"]),  # an empty split says 0
    (lambda m: m.__setitem__("shards", {"a": 1}), ["'shards'"]),
    (lambda m: m["shards"].__setitem__(0, "shard-000000.tar"), ["shards[0]", "object"]),
    (lambda m: m.__setitem__("num_samples", 13), ["'num_samples' 13"]),
    (lambda m: m.__setitem__("text_dim", 0), ["'text_dim'"]),
    (lambda m: m.pop("text_encoder"), ["'text_encoder'"]),
    (lambda m: m["text_encoder"].__setitem__("name", "pickle"), ["'text_encoder.name'"]),
    (lambda m: m["text_encoder"].__setitem__("dim", 9), ["'text_encoder.dim'"]),
    (lambda m: m.__setitem__("version", 7), ["newer"]),
    # indexed shards: where captions are embedded is "worker" (hashing) or "device" (sentence-transformers)
    (lambda m: m.__setitem__("index", {"image_keys": ["jpg"], "caption_key": "txt", "embed_on": "gpu"}),
     ["'index.embed_on'", "worker", "device"]),
    (lambda m: m.__setitem__("index", {"image_keys": ["jpg"], "caption_key": "txt", "embed_on": ["device"]}),
     ["'index.embed_on'"]),
    (lambda m: m.__setitem__("index", {"image_keys": ["jpg"], "caption_key": "txt", "embed_on": "device"}),
     ["'index.embed_on' 'device'", "sentence-transformers", "'text_encoder.name' is 'hashing'"]),
    (lambda m: m.__setitem__("format", "other"), ["'format'"]),
])
def test_schema_errors_name_the_field(split, tmp_path, edit, words):
    _one_line_error(_copy(split, tmp_path, edit), *words)


@pytest.mark.parametrize("raw,words", [
    (b"", ["dataset.json:1", "not valid JSON"]),
    (b"[]", ["JSON object"]),
    (b"null", ["JSON object"]),
    (b'{"format": \n "x",\n', ["dataset.json:3", "not valid JSON"]),
    ('{"source": "caf\u00e9"}'.encode("latin-1"), ["dataset.json:1", "not UTF-8"]),
    ('{"a": 1}'.encode("utf-16"), ["not UTF-8"]),
    (b'{"a": NaN}', ["not valid JSON"]),
    (b"[" * 100000, ["not valid JSON"]),
])
def test_malformed_file_is_one_line(split, tmp_path, raw, words):
    _one_line_error(_copy(split, tmp_path, raw=raw), *words)


def test_utf8_bom_is_accepted(split, tmp_path):
    raw = open(os.path.join(split, "dataset.json"), "rb").read()
    assert resolve_dataset(str(_copy(split, tmp_path, raw=b"\xef\xbb\xbf" + raw))).num_samples == N


def test_counts_beyond_the_shards_are_bounded_holes(split, tmp_path, caplog):
    """A count larger than a shard delivers (yet within the bound the schema sets) makes holes, not a hang."""
    def edit(m):
        m["shards"][0]["samples"] += 3
        m["num_samples"] += 3
    info = resolve_dataset(str(_copy(split, tmp_path, edit)))
    ds, dl = make_loader(info, LoaderSpec(1, 3, seed=0, num_workers=0, shuffle_buffer=4))
    it = iter(dl)
    bs = [next(it) for _ in range(2 * ds.batches_per_epoch)]
    assert sum(int(b["bad"]) for b in bs) == 2 * 3 and int(bs[-1]["epoch"]) == 1


_json = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=False)
                     | st.text(max_size=20),
                     lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12), c, max_size=4),
                     max_leaves=20)
_keys = ["format", "version", "num_samples", "text_dim", "text_encoder", "shards", "image_size", "source"]
_shard_keys = ["path", "samples", "size", "sha256"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_json_only_ever_gives_the_clear_error(split, data):
    good = json.load(open(os.path.join(split, "dataset.json")))
    m = copy.deepcopy(good)
    for _ in range(data.draw(st.integers(1, 3))):
        where = data.draw(st.sampled_from(["top", "shard", "encoder", "whole"]))
        if where == "whole":
            m = data.draw(_json)
        elif where == "top" and isinstance(m, dict):
            m[data.draw(st.sampled_from(_keys))] = data.draw(_json)
        elif where == "shard" and isinstance(m, dict) and isinstance(m.get("shards"), list) and m["shards"]:
            s = m["shards"][data.draw(st.integers(0, len(m["shards"]) - 1))]
            if isinstance(s, dict):
                s[data.draw(st.sampled_from(_shard_keys))] = data.draw(_json | st.sampled_from(
                    ["pipe:true", "../x.tar", "/etc/passwd", "a\0b", "C:x.tar", "http://h/x"]))
        elif where == "encoder" and isinstance(m, dict) and isinstance(m.get("text_encoder"), dict):
            m["text_encoder"][data.draw(st.sampled_from(["name", "dim", "path"]))] = data.draw(_json)
    try:
        shards, n, dim = validate_manifest(m, split)
    except ValueError as e:
        assert str(e) and "\n" not in str(e)
        return
    # what passes is sane: bounded non-negative counts that add up, file paths only
    assert n == sum(s.samples for s in shards) and all(0 <= s.samples <= s.size // 1024 for s in shards)
    assert all(not s.url.startswith("pipe:") and "://" not in s.url for s in shards) and 1 <= dim <= 65536


def test_an_empty_split_is_valid_and_says_so(tmp_path):
    """A held-out split may be empty (a small own-data set): it resolves with no samples, and a loader over it
    is refused with a line saying so (evaluation is skipped, training cannot start on it)."""
    from stackgan_dist.data.read.index import resolve_dataset
    from stackgan_dist.data.read.loader import LoaderSpec, make_loader
    from stackgan_dist.errors import DataError

    d = tmp_path / "empty"
    d.mkdir()
    (d / "dataset.json").write_text(json.dumps({
        "format": "stackgan_dist.webdataset", "version": 1, "num_samples": 0, "text_dim": 8,
        "text_encoder": {"name": "hashing", "dim": 8}, "shards": []}))
    info = resolve_dataset(str(d))
    assert info.num_samples == 0 and info.shards == []
    with pytest.raises(DataError, match="holds no samples"):
        make_loader(info, LoaderSpec(1, 4, 0))

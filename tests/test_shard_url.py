"""data.shard_url: where the shards a dataset.json names are read from (an object store's pipe: command or a
URL), from the config only; the file's shard names are quoted into it; sizes and hashes apply to the stream."""
import json
import os
import shutil

import pytest
import torch

from conftest import CFG1, run_cli, tiny_overrides
from stackgan_dist.config import ConfigError, load_config
from stackgan_dist.data.read.index import resolve_dataset, shard_from_template
from stackgan_dist.data.read.loader import LoaderSpec, make_loader
from stackgan_dist.errors import DataError

CAT = "pipe:cat {path}"


def _batches(info, n=3):
    _, dl = make_loader(info, LoaderSpec(1, 4, seed=3, num_workers=0, shuffle_buffer=8))
    it = iter(dl)
    return [next(it) for _ in range(n)]


def test_template_reads_the_same_samples_through_a_pipe(synth_data):
    split = str(synth_data / "train")
    local = resolve_dataset(split)
    for template in (CAT, f"pipe:cat {split}/{{name}}"):  # {path}, and {name} under a "bucket" prefix
        piped = resolve_dataset(split, shard_url=template)
        assert [s.url for s in piped.shards] == [f"pipe:cat {s.url}" for s in local.shards]
        assert piped.num_samples == local.num_samples and piped.text_dim == local.text_dim
        for a, b in zip(_batches(local), _batches(piped)):
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["text"], b["text"])
    # sizes and hashes apply to what the stream delivers (it is read through for verify="sha256")
    assert resolve_dataset(split, verify="sha256", shard_url=CAT).num_samples == local.num_samples


def test_stream_sizes_and_hashes_are_checked(synth_data, tmp_path):
    d = tmp_path / "train"
    shutil.copytree(synth_data / "train", d)
    shard = sorted(p for p in os.listdir(d) if p.endswith(".tar"))[1]
    with open(d / shard, "r+b") as f:  # same size, other bytes
        f.seek(700)
        f.write(b"X")
    with pytest.raises(DataError, match=f"{shard}.*sha256"):
        resolve_dataset(str(d), verify="sha256", shard_url=CAT)
    with open(d / shard, "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(DataError, match=r"streamed \d+ bytes"):
        resolve_dataset(str(d), verify="sha256", shard_url=CAT)
    with pytest.raises(DataError, match="cannot read shard"):
        resolve_dataset(str(d), verify="sha256", shard_url="pipe:false {path}")


def test_a_hostile_shard_name_cannot_add_a_command(synth_data, tmp_path):
    """The dataset file is hostile: its shard names are shell-quoted into a pipe: template."""
    d = tmp_path / "train"
    shutil.copytree(synth_data / "train", d)
    m = json.loads((d / "dataset.json").read_text())
    first = m["shards"][0]["path"]
    evil = "s;touch PWNED;x.tar"
    os.rename(d / first, d / evil)
    m["shards"][0]["path"] = evil
    (d / "dataset.json").write_text(json.dumps(m))
    info = resolve_dataset(str(d), verify="sha256", shard_url="pipe:cat " + str(d) + "/{name}")
    assert _batches(info, 2)[0]["image"].shape[0] == 4
    assert not os.path.exists("PWNED") and not (d / "PWNED").exists() and not (tmp_path / "PWNED").exists()
    assert shard_from_template("https://host/b/{name}", "a b#?.tar", "/x") == "https://host/b/a%20b%23%3F.tar"


def test_config_key_is_checked_and_trains(synth_data, tmp_path):
    with pytest.raises(ConfigError, match=r"data.shard_url.*\{name\}"):
        load_config(None, ["data.shard_url=pipe:cat x.tar"])
    with pytest.raises(DataError, match="data.shard_url applies"):
        resolve_dataset(str(synth_data / "train" / "*.tar"), shard_url=CAT, key="data.train")
    run = tmp_path / "run"
    run_cli("train", CFG1, *tiny_overrides(synth_data, run, 1, steps=2, extra=[f"data.shard_url={CAT}"]),
            check=True, timeout=300)
    assert os.path.isfile(run / "checkpoints" / "step_00000002" / "manifest.json")

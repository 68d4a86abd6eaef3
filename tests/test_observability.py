"""Observability during training: TensorBoard event files carry the required scalars and sample grids, the
grids are also PNGs under RUN/samples every log.sample_every steps, drawn from fixed z and fixed captions."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, run_cli, tiny_overrides

from stackgan_dist.observability.metrics import MetricsWriter

REQUIRED_SCALARS = {"loss/d_loss", "loss/d_real", "loss/d_wrong", "loss/d_fake", "loss/g_loss", "loss/kl",
                    "lr/lr_g", "lr/lr_d", "train/img_per_s", "train/data_skipped"}


def read_events(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def short_run(synth_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("obs") / "run"
    run_cli("train", os.path.join(REPO, "configs", "demo", "stage1.yaml"),
            *tiny_overrides(synth_data, run, 1, 6, ["log.sample_every=3", "log.every_steps=2"]),
            check=True, timeout=600)
    return run


def test_tensorboard_scalars_match_metrics_jsonl(short_run):
    acc = read_events(short_run / "tb")
    tags = set(acc.Tags()["scalars"])
    assert REQUIRED_SCALARS <= tags, REQUIRED_SCALARS - tags
    recs = [json.loads(ln) for ln in (short_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [2, 4, 6]
    for tag, key in (("loss/d_loss", "d_loss"), ("loss/kl", "kl"), ("lr/lr_g", "lr_g"),
                     ("train/img_per_s", "img_per_s")):
        ev = acc.Scalars(tag)
        assert [e.step for e in ev] == [2, 4, 6]
        assert [e.value for e in ev] == pytest.approx([r[key] for r in recs], rel=1e-5)
    assert all(e.value == 0 for e in acc.Scalars("train/data_skipped"))


def test_sample_grids_every_sample_every(short_run):
    files = sorted(os.listdir(short_run / "samples"))
    assert files == ["captions.json", "step_00000003.png", "step_00000006.png"]
    caps = json.load(open(short_run / "samples" / "captions.json"))["captions"]
    assert len(caps) == 8 and all(isinstance(c, str) and c for c in caps)
    acc = read_events(short_run / "tb")
    assert "samples" in acc.Tags()["images"]
    ev = acc.Images("samples")
    assert [e.step for e in ev] == [3, 6]  # no duplicate grid at the last step
    import io

    for e in ev:  # the TensorBoard image is the PNG on disk
        tb_img = np.asarray(Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB"))
        png = np.asarray(Image.open(short_run / "samples" / f"step_{e.step:08d}.png").convert("RGB"))
        assert tb_img.shape == png.shape and np.array_equal(tb_img, png)
    # 8 fixed captions, each on a line above its 64x64 image (labelled grid): taller than 8 images, and
    # wider than one image by the stage label
    assert png.shape[0] > 8 * 66 and 66 < png.shape[1] < 66 + 200 and png.shape[2] == 3


def test_sample_inputs_are_fixed(synth_data, tmp_path):
    """The grid's z and captions are drawn once: the same weights give the same grid at any later tick, and the
    training noise stream is untouched by writing samples."""
    import torch

    from stackgan_dist.config import load_config
    from stackgan_dist.distributed.env import DistEnv
    from stackgan_dist.trainer import Trainer

    cfg = load_config(os.path.join(REPO, "configs", "demo", "stage1.yaml"), tiny_overrides(synth_data, tmp_path / "r"))
    t = Trainer(cfg, DistEnv())
    t.build()
    try:
        before = t.gen.get_state().clone()
        t.write_samples()
        first = np.asarray(Image.open(tmp_path / "r" / "samples" / "step_00000000.png"))
        text, noise = t.samples._inputs()
        t.write_samples()
        second = np.asarray(Image.open(tmp_path / "r" / "samples" / "step_00000000.png"))
        assert np.array_equal(first, second)
        assert torch.equal(t.gen.get_state(), before)
        text2, noise2 = t.samples._inputs()
        assert torch.equal(text, text2) and torch.equal(noise["z"], noise2["z"])
        # the captions come from the test split, in file order: its first 8 samples' first captions
        from stackgan_dist.data.read.index import resolve_dataset
        from stackgan_dist.data.read.reader import read_batches

        b = next(read_batches(resolve_dataset(str(synth_data / "test")), 1, 8))
        assert torch.equal(text, b["text"]) and t.samples.captions == b["caption"]
    finally:
        t.metrics.close()


def test_metrics_writer_grad_scale_and_resume(tmp_path):
    """fp16 runs (CUDA only) log the grad-scaler scale; a resumed run drops records past its step (JSONL and TB)."""
    w = MetricsWriter(str(tmp_path), True)
    for s in (1, 2, 3):
        w.log(s, {"d_loss": 1.0 * s, "grad_scale": 65536.0 / s})
    w.close()
    w = MetricsWriter(str(tmp_path), True, resume_step=2)
    w.log(3, {"d_loss": 30.0, "grad_scale": 1024.0})
    w.close()
    recs = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["d_loss"]) for r in recs] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    acc = read_events(tmp_path / "tb")
    assert "train/grad_scale" in acc.Tags()["scalars"]
    assert [(e.step, e.value) for e in acc.Scalars("loss/d_loss")] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_log_lines_follow_the_current_streams_and_each_command_starts_fresh(tmp_path, monkeypatch, capsys):
    """A command run in-process after another (tests, a notebook) logs to today's sys.stderr, not to the
    stream of the moment logging was set up (closed since), and does not inherit the other's INFO level."""
    import io
    import logging

    from stackgan_dist.cli import main
    from stackgan_dist.observability.logging import setup_logging

    old = io.StringIO()
    monkeypatch.setattr("sys.stderr", old)
    setup_logging(0, "INFO")
    old.close()  # e.g. the capture of a test that has ended
    now = io.StringIO()
    monkeypatch.setattr("sys.stderr", now)
    logging.getLogger("stackgan_dist.checkpoint").warning("a warning after the old stream closed")
    assert "a warning after the old stream closed" in now.getvalue()
    monkeypatch.undo()
    # the next command starts as a fresh process would: warnings only, its error in one line
    assert main(["inspect", str(tmp_path / "no-run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no-run" in err, err
    logging.getLogger("stackgan_dist.checkpoint").info("an info line")
    assert "an info line" not in capsys.readouterr().err

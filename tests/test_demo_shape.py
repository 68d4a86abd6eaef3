"""benchmarks/demo_shape.py: the shape features, sharpness and fringe measures on drawn shapes, and its
``--run`` measurements on a (barely) trained Stage-I run."""
import os
import sys

import numpy as np
import pytest
from PIL import ImageFilter

from conftest import REPO, loader_view, run_cli

from stackgan_dist.data.prepare.synthetic import SIZE_WORDS, draw

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import demo_shape  # noqa: E402



def test_shape_features_sharpness_and_fringes_on_drawn_shapes():
    rng = np.random.default_rng(0)
    feats = {s: demo_shape.shape_features(loader_view(draw("red", s, "gray", rng, scale=SIZE_WORDS["large"]), 256))
             for s in ("circle", "square", "triangle")}
    assert feats["square"][0] > 0.95 and 0.7 < feats["circle"][0] < 0.88 and feats["triangle"][0] < 0.7
    assert feats["triangle"][1] < 0.6 < feats["circle"][1] and feats["square"][1] > 0.9
    crisp = draw("yellow", "square", "blue", rng, scale=SIZE_WORDS["large"])
    blurred = crisp.filter(ImageFilter.GaussianBlur(8))
    a, b = loader_view(crisp, 256), loader_view(blurred, 256)
    assert demo_shape.sharpness(a) > 5 * demo_shape.sharpness(b)  # blur widens the edge
    assert demo_shape.total_variation(a) == pytest.approx(demo_shape.total_variation(b), rel=0.2)  # same step
    assert demo_shape.off_colour_share(a) < 0.01 < demo_shape.off_colour_share(b)
    near0, step0 = demo_shape.border_frame(a)
    assert near0 < 0.1 and step0 == 0.0  # the shape keeps (nearly) off the border; the background is flat
    framed = a.copy()
    framed[0], framed[-1], framed[:, 0], framed[:, -1] = 255, 255, 255, 255  # a white frame on blue
    near, step = demo_shape.border_frame(framed)
    assert near > near0 and step > 100
    flat = np.full((64, 64, 3), 128, np.uint8)  # no foreground
    assert demo_shape.shape_features(flat) is None and demo_shape.off_colour_share(flat) == 0.0
    assert demo_shape.sharpness(flat) == 0.0 and demo_shape.total_variation(flat) == 0.0


@pytest.fixture(scope="module")
def tiny_stage1(tmp_path_factory):
    from stackgan_dist.data.prepare.synthetic import prepare_synthetic

    root = tmp_path_factory.mktemp("shape")
    prepare_synthetic(str(root / "d"), n_train=24, n_test=6, seed=0, text_dim=64, samples_per_shard=12,
                      progress=False)
    run = root / "stage1"
    run_cli("train", os.path.join(REPO, "configs", "demo", "stage1.yaml"), f"run.dir={run}",
            f"data.train={root}/d/train", f"data.test={root}/d/test", "train.max_steps=2", "model.gf_dim=16",
            "model.df_dim=8", "model.condition_dim=16", "model.z_dim=16", "model.text_dim=64",
            "model.cond_reinject=16", "train.batch_size=4", "data.num_workers=0", "log.progress=false",
            "log.sample_every=1000", "checkpoint.every_steps=1000", check=True, timeout=600)
    return root, run


def test_trained_run_measurements(tiny_stage1):
    root, run = tiny_stage1
    out = demo_shape.main(["--data", str(root / "d"), "--run", str(run), "--per-caption", "3"])
    assert out["stage"] == 1 and out["step"] == 2
    row = out["stage1_64"]
    for k in ("colour_acc", "shape_acc", "shape_varies_with_z"):
        assert 0.0 <= row[k] <= 1.0
    assert row["size_acc"] is None or 0.0 <= row["size_acc"] <= 1.0  # None: no caption named a size
    assert 0.0 <= row["fg_near_border"] <= 1.0 and row["border_ring_step"] >= 0
    assert row["sharpness"] >= 0 and 1.0 <= row["distinct_shapes_per_caption"] <= 3.0
    assert set(row["by_named_shape"]) <= {"circle", "square", "triangle"}
    ca = out["trained_ca_mu"]
    assert 0.0 <= ca["shape_probe_acc"] <= 1.0 and 0.0 <= ca["shape_variance_share"] <= 1.0
    assert ca["sigma_mean"] > 0 and ca["kl_per_dim_mean"] >= 0

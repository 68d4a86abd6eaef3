"""IS / FID / caption evaluation: known values of the statistics, weights handling, the CLI end to end, bad input.

No real Inception weights are needed: a randomly initialised network of the right shapes is written to a
temporary file and read through the same path as real weights. Inception on a 2-core CPU costs ~1-2 s per
image, so the image counts here are the smallest the checks allow.
"""
import json
import os
import subprocess

import numpy as np
import pytest
import torch
from torch import nn

from conftest import PY, REPO, cli_main, free_port, one_line_error, run_cli

from stackgan_dist.errors import UserError
from stackgan_dist.evaluation.inception import InceptionMetrics, build_inception, write_random_weights

TINY = ["model.gf_dim=16", "model.df_dim=8", "model.condition_dim=16", "model.z_dim=16", "model.text_dim=64",
        "model.res_blocks=1", "train.batch_size=4", "data.num_workers=0", "log.progress=false",
        "log.every_steps=2", "log.sample_every=1000", "checkpoint.every_steps=1000"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return write_random_weights(str(tmp_path_factory.mktemp("inc") / "inception_random.pt"), seed=0)


@pytest.fixture(scope="module")
def evalset(tmp_path_factory):
    """Train 32 / test 4 samples (few real images keep FID cheap), text_dim 64; plus a text_dim-32 test split."""
    from stackgan_dist.data.prepare.synthetic import prepare_synthetic

    root = tmp_path_factory.mktemp("evaldata")
    prepare_synthetic(str(root / "d64"), n_train=32, n_test=4, seed=0, text_dim=64, samples_per_shard=16,
                      progress=False)
    prepare_synthetic(str(root / "d32"), n_train=8, n_test=4, seed=0, text_dim=32, samples_per_shard=16,
                      progress=False)
    return root


@pytest.fixture(scope="module")
def tiny_run(evalset, tmp_path_factory):
    run = tmp_path_factory.mktemp("evalrun") / "stage1"
    d = evalset / "d64"
    run_cli("train", os.path.join(REPO, "configs", "demo", "stage1.yaml"), f"run.dir={run}",
            f"data.train={d}/train", f"data.test={d}/test", "train.max_steps=2", *TINY, check=True, timeout=600)
    return run


# -- statistics on known inputs ---------------------------------------------------------------------

class PixelClasses(nn.Module):
    """A stand-in feature network: class = first pixel's value mod C, logits ``confidence`` x one-hot;
    FID features = per-channel means. Returns (features, logits) like the Inception wrapper."""

    def __init__(self, classes: int, confidence: float = 50.0):
        super().__init__()
        self.c, self.conf = classes, confidence

    def forward(self, x):
        cls = x[:, 0, 0, 0].long() % self.c
        logits = self.conf * nn.functional.one_hot(cls, self.c).float()
        return x.float().mean(dim=(2, 3)), logits


def images_of_classes(classes):
    x = torch.zeros(len(classes), 3, 8, 8, dtype=torch.uint8)
    x[:, 0, 0, 0] = torch.tensor(classes, dtype=torch.uint8)
    return x


def test_is_uniform_predictions_is_one():
    m = InceptionMetrics(["is"], feature=PixelClasses(7, confidence=0.0))  # zero logits: uniform p(y|x)
    m.update(images_of_classes(list(range(7)) * 10), real=False)
    r = m.compute()
    assert r["is_mean"] == pytest.approx(1.0, abs=1e-5) and r["is_std"] == pytest.approx(0.0, abs=1e-5)
    assert r["is_splits"] == 10


def test_is_confident_evenly_spread_equals_classes():
    C = 7
    one = InceptionMetrics(["is"], feature=PixelClasses(C), splits=1)
    one.update(images_of_classes(list(range(C)) * 20), real=False)
    assert one.compute()["is_mean"] == pytest.approx(C, rel=1e-4)
    # 10 splits of a shuffled, evenly spread set: each split is nearly even, so IS ~ C (slightly below)
    ten = InceptionMetrics(["is"], feature=PixelClasses(C))
    ten.update(images_of_classes(list(range(C)) * 300), real=False)
    r = ten.compute()
    assert C * 0.97 < r["is_mean"] <= C + 1e-4 and r["is_std"] < 0.1
    # all images confidently one class: no diversity, IS 1
    same = InceptionMetrics(["is"], feature=PixelClasses(C))
    same.update(images_of_classes([3] * 50), real=False)
    assert same.compute()["is_mean"] == pytest.approx(1.0, abs=1e-4)


def test_is_repeatable_and_needs_splits():
    a = InceptionMetrics(["is"], feature=PixelClasses(5, confidence=2.0))
    x = images_of_classes([i * i % 5 for i in range(40)])
    a.update(x, real=False)
    assert a.compute(seed=3) == a.compute(seed=3)
    small = InceptionMetrics(["is"], feature=PixelClasses(5))
    small.update(images_of_classes([0, 1, 2]), real=False)
    with pytest.raises(UserError, match="splits"):
        small.compute()


def test_fid_matches_closed_form():
    """torchmetrics' FID on stand-in features equals ||mu1-mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)) by scipy."""
    from scipy import linalg

    g = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=g)
    fake = (torch.randint(0, 256, (40, 3, 8, 8), generator=g) * 0.6 + 30).to(torch.uint8)
    m = InceptionMetrics(["fid"], feature=PixelClasses(3))
    m.update(real, real=True)
    m.update(fake, real=False)
    f1, f2 = (x.float().mean(dim=(2, 3)).double().numpy() for x in (real, fake))
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    want = ((f1.mean(0) - f2.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert m.compute()["fid"] == pytest.approx(want, rel=1e-3)


def test_fid_inception_self_is_zero(weights):
    """Through the real Inception-v3 (random weights, read from the file): FID of a set against itself ~ 0,
    against a different set clearly not."""
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=g)
    b = torch.full((4, 3, 64, 64), 40, dtype=torch.uint8)
    b[:, :, 16:48, 16:48] = torch.randint(150, 256, (4, 3, 1, 1), dtype=torch.uint8, generator=g)
    net = build_inception(weights)
    feats = {k: net(x) for k, x in (("a", a), ("b", b))}
    assert feats["a"][0].shape == (4, 2048) and feats["a"][1].shape == (4, 1008)
    assert feats["a"][0].std(0).mean() > 1e-3  # the He init keeps features alive (not ~0 everywhere)

    class Replay(nn.Module):  # the features computed above, so Inception runs only twice in this test
        def forward(self, x):
            if x.shape[0] == 1:
                return torch.zeros(1, 2048), torch.zeros(1, 1008)
            return feats["a" if torch.equal(x, a) else "b"]

    same = InceptionMetrics(["fid"], feature=Replay())
    same.update(a, real=True)
    same.update(a, real=False)
    diff = InceptionMetrics(["fid"], feature=Replay())
    diff.update(a, real=True)
    diff.update(b, real=False)
    assert abs(same.compute()["fid"]) < 1e-3
    assert diff.compute()["fid"] > 1.0


# -- weights files ----------------------------------------------------------------------------------

def test_weights_errors_name_the_file(tmp_path, weights):
    missing = tmp_path / "nope.pt"
    with pytest.raises(UserError, match=r"weights.*nope\.pt"):
        build_inception(str(missing))
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("not a checkpoint")
    with pytest.raises(UserError, match=r"garbage\.pt.*weights"):
        build_inception(str(garbage))
    other = tmp_path / "other.pt"
    torch.save({"layer.weight": torch.zeros(3, 3)}, other)
    with pytest.raises(UserError, match=r"other\.pt.*weights"):
        build_inception(str(other))
    sd = torch.load(weights, weights_only=True)
    sd["Mixed_5b.branch1x1.conv.weight"] = torch.zeros(7, 192, 1, 1)  # a wrong shape deep inside
    sd.pop("Mixed_7c.branch_pool.bn.running_var")
    bad = tmp_path / "bad_shapes.pt"
    torch.save(sd, bad)
    with pytest.raises(UserError, match=r"bad_shapes\.pt.*weights"):
        build_inception(str(bad))
    with pytest.raises(UserError, match="--inception-weights"):
        build_inception("")


def test_finetuned_classifier_weights(tmp_path):
    """A K-way fine-tuned classifier (e.g. the CUB model for the paper's IS) loads with its own fc."""
    w = write_random_weights(str(tmp_path / "cub200.pt"), seed=1, classes=200)
    m = InceptionMetrics(["is"], w)
    assert m.classes == 200


# -- the CLI end to end -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def eval_single(tiny_run, evalset, weights, tmp_path_factory):
    """One process: 10 generated images (the fewest IS's 10 splits allow), 4 real ones."""
    out = tmp_path_factory.mktemp("evalout") / "res" / "eval.json"
    p = run_cli("eval", tiny_run, "--data", evalset / "d64" / "test", "--metrics", "fid,is,caption",
                "--num-samples", 10, "--inception-weights", weights, "--batch-size", 5, "--out", out, "--stage", 1,
                check=True, timeout=900)
    return json.loads(p.stdout), out


def test_eval_cli_end_to_end(eval_single, tiny_run, evalset):
    res, out = eval_single
    assert json.loads(out.read_text()) == res
    assert json.loads((tiny_run / "eval.json").read_text()) == res
    assert res["num_samples"] == 10 and res["num_real"] == 4 and res["stage"] == 1 and res["step"] == 2
    assert np.isfinite(res["fid"]) and res["fid"] >= -1e-3
    assert 1.0 - 1e-4 <= res["is_mean"] <= 1008 and res["is_std"] >= 0 and res["is_splits"] == 10
    assert res["real_color_accuracy"] == 1.0 and res["real_shape_accuracy"] == 1.0
    assert 0.0 <= res["color_accuracy"] <= 1.0
    # size: scored on the generated images whose caption (test caption i mod 4) names a size
    from stackgan_dist.data.read.index import resolve_dataset
    from stackgan_dist.data.read.reader import read_samples
    from stackgan_dist.evaluation.caption import size_word

    caps = [s["caption"] for s in read_samples(resolve_dataset(str(evalset / "d64" / "test")), 1)]
    named = [size_word(caps[i % len(caps)]) is not None for i in range(10)]
    assert res["num_sized"] == sum(named) and 0.0 <= res["size_accuracy"] <= 1.0
    assert res["real_size_accuracy"] == (1.0 if any(size_word(c) for c in caps) else 0.0)


def _err(p, *words):
    return one_line_error(p, *words, rc=2)


def test_eval_bad_input(tiny_run, evalset, weights, tmp_path, monkeypatch):
    """Through the CLI (one line, exit 2, no traceback) where the message matters most; the rest in-process."""
    from stackgan_dist.evaluation.run_eval import evaluate

    d = evalset / "d64" / "test"
    _err(cli_main("eval", tiny_run, "--data", d, "--metrics", "fid", "--inception-weights", tmp_path / "x.pt"),
         "weights", "x.pt")
    _err(cli_main("eval", tiny_run, "--data", evalset / "d32" / "test", "--metrics", "caption"), "text_dim", "32")
    with pytest.raises(UserError, match=r"5.*splits"):
        evaluate(str(tiny_run), str(d), "is", num_samples=5, inception_weights=weights)
    with pytest.raises(UserError, match=r"Stage-1 checkpoint, not Stage-2"):
        evaluate(str(tiny_run), str(d), "caption", stage=2)
    with pytest.raises(UserError, match="kid"):
        evaluate(str(tiny_run), str(d), "fid,kid")
    monkeypatch.delenv("STACKGAN_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(UserError, match="--inception-weights"):
        evaluate(str(tiny_run), str(d), "fid")


def test_eval_refuses_stage2_checkpoint_as_stage1(tiny_run, evalset, tmp_path):
    """A Stage-II run named where Stage-I is expected (and the reverse above): one clear line."""
    d = evalset / "d64"
    run2 = tmp_path / "stage2"
    run_cli("train", os.path.join(REPO, "configs", "demo", "stage2.yaml"), f"run.dir={run2}",
            f"data.train={d}/train", f"data.test={d}/test", "train.max_steps=1", f"model.stage1_checkpoint={tiny_run}",
            *TINY, check=True, timeout=600)
    _err(cli_main("eval", run2, "--data", d / "test", "--metrics", "caption", "--stage", 1), "Stage-2", "Stage-1")



@pytest.mark.slow
def test_eval_two_ranks_matches_one(eval_single, tiny_run, evalset, weights, tmp_path):
    """torchrun, 2 ranks: each generates half the images and scores half the real ones; torchmetrics
    gathers the features. Image i depends only on (seed, i), so the scores equal the 1-process ones."""
    ref = eval_single[0]
    out = tmp_path / "eval2.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([PY, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "stackgan_dist",
                        "eval", str(tiny_run), "--data", str(evalset / "d64" / "test"), "--metrics",
                        "fid,is,caption", "--num-samples", "10", "--inception-weights", weights, "--batch-size", "5",
                        "--out", str(out)], capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
    assert p.returncode == 0, f"{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    res = json.loads(out.read_text())
    assert res["world_size"] == 2 and res["num_samples"] == 10
    assert res["fid"] == pytest.approx(ref["fid"], rel=1e-3, abs=1e-2)
    assert res["is_mean"] == pytest.approx(ref["is_mean"], rel=1e-4)
    for k in ("color_accuracy", "shape_accuracy", "real_color_accuracy"):
        assert res[k] == ref[k]

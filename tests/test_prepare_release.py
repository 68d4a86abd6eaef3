"""`prepare stackgan` finds captions in text/ (the StackGAN-Pytorch / AttnGAN layout) as well as text_c10/,
says how many samples have captions and warns when none do (#26 point 10)."""
import json
import os
import shutil
import sys

from conftest import REPO
from stackgan_dist.data.prepare.stackgan_release import prepare_stackgan
from stackgan_dist.data.read.samples import iter_samples

sys.path.insert(0, os.path.join(REPO, "tests", "assets"))
from make_release import make_birds  # noqa: E402


def _captions(out):
    m = json.load(open(os.path.join(out, "dataset.json")))
    return m, [json.loads(s["txt.json"]) for sh in m["shards"] for s in iter_samples(os.path.join(out, sh["path"]))]


def test_captions_under_text_are_read_and_counted(tmp_path, capsys):
    root = str(tmp_path / "release")
    make_birds(root, n_train=4, n_test=2, size=(120, 90), dim=8, n_caps=3)
    os.rename(os.path.join(root, "text_c10"), os.path.join(root, "text"))
    out = str(tmp_path / "train")
    prepare_stackgan(root, "birds", "train", out, progress=False)
    m, caps = _captions(out)
    assert m["captioned"] == 4 and all(c and c[0].startswith("bird ") for c in caps)
    err = capsys.readouterr().err
    assert "captions: 4 of 4 samples have captions" in err and "warning" not in err


def test_no_captions_anywhere_is_a_warning_not_silence(tmp_path, capsys):
    root = str(tmp_path / "release")
    make_birds(root, n_train=3, n_test=1, size=(120, 90), dim=8, n_caps=2)
    shutil.rmtree(os.path.join(root, "text_c10"))
    out = str(tmp_path / "train")
    prepare_stackgan(root, "birds", "train", out, progress=False)
    m, caps = _captions(out)
    assert m["captioned"] == 0 and caps == [[], [], []]
    err = capsys.readouterr().err
    assert "captions: 0 of 3 samples" in err
    assert [ln for ln in err.splitlines() if ln.startswith("warning: no sample has captions")]

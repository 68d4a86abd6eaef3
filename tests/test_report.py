"""``stackgan report RUN``: one PNG with the loss curves and the latest sample grid; clear errors otherwise."""
import json
import os

import numpy as np
from PIL import Image

from conftest import REPO, cli_main, one_line_error, run_cli, tiny_overrides

from stackgan_dist.observability.report import make_report


def _err(p, *words):
    return one_line_error(p, *words, rc=2)


def test_report_of_a_real_run(synth_data, tmp_path):
    run = tmp_path / "run"
    run_cli("train", os.path.join(REPO, "configs", "demo", "stage1.yaml"),
            *tiny_overrides(synth_data, run, 1, 4, ["log.sample_every=2"]), check=True, timeout=600)
    p = run_cli("report", run, check=True, timeout=300)
    res = json.loads(p.stdout)
    assert res["out"] == str(run / "report.png") and res["last_step"] == 4 and res["records"] == 2
    assert res["sample"].endswith("step_00000004.png")
    assert {"d_loss", "d_real", "d_wrong", "d_fake", "g_loss", "kl"} <= set(res["curves"])
    img = Image.open(run / "report.png")
    assert img.format == "PNG" and img.size == (1600, 900)
    a = np.asarray(img.convert("RGB"))
    assert a.std() > 10  # not a blank canvas


def test_report_without_samples_and_torn_line(tmp_path):
    """A run killed mid-write (torn last line) and before its first grid still gets a report."""
    run = tmp_path / "run"
    run.mkdir()
    lines = [json.dumps({"step": s, "d_loss": 1.0 / s, "g_loss": 2.0 / s, "kl": 0.1, "img_per_s": 50.0})
             for s in (10, 20, 30)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 40, "d_lo')
    out = tmp_path / "elsewhere" / "r.png"
    res = make_report(str(run), str(out))
    assert res["records"] == 3 and res["last_step"] == 30 and res["sample"] is None
    assert res["curves"] == ["d_loss", "g_loss", "kl"]
    assert Image.open(out).size == (1600, 900)


def test_report_bad_input(tmp_path):
    _err(cli_main("report", tmp_path / "missing"), "not found", "missing")
    _err(cli_main("report", tmp_path), "metrics.jsonl")
    (tmp_path / "metrics.jsonl").write_text("")
    _err(cli_main("report", tmp_path), "no records")


def test_report_one_record_colour_term_and_kl_axis(tmp_path):
    """A run with a single log record still draws its points; g_color and kl get their own axis."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 5, "d_loss": 1.2, "g_loss": 3.0, "kl": 0.001,
                                                   "g_color": 0.4, "img_per_s": 10.0}) + "\n")
    res = make_report(str(run))
    assert res["curves"] == ["d_loss", "g_loss", "kl", "g_color"]
    a = np.asarray(Image.open(run / "report.png").convert("RGB"))
    # the one record is drawn as a marker in the loss panel (top-left): some non-white, non-grey pixels
    panel = a[60:560, 80:760].astype(int)
    coloured = (np.abs(panel[..., 0] - panel[..., 2]) > 60).sum()
    assert coloured > 10, coloured


def test_report_without_matplotlib_names_the_extra(tmp_path):
    """On a core install (no matplotlib) the report says which extra to install: one line, exit 2."""
    import subprocess
    import sys

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "d_loss": 1.0}) + "\n")
    block = ("import sys\n"
             "class Block:\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        if name == 'matplotlib' or name.startswith('matplotlib.'):\n"
             "            raise ImportError('No module named ' + repr(name))\n"
             "sys.meta_path.insert(0, Block())\n"
             "from stackgan_dist.cli import main\n"
             f"sys.exit(main(['report', {str(run)!r}]))\n")
    p = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, cwd=REPO, timeout=120)
    _err(p, "matplotlib", "stackgan_dist[eval]")
    assert not (run / "report.png").exists()


def test_labelled_grid_layout():
    """Each caption is written above its row pair; the rows carry their stage at the left."""
    from stackgan_dist.observability.images import labelled_grid

    size, pad = 64, 2
    red = np.zeros((3, size, size, 3), np.uint8)
    red[..., 0] = 255
    blue = np.zeros((3, size, size, 3), np.uint8)
    blue[..., 2] = 255
    caps = ["a small red circle", "a very long caption " * 10]
    g = labelled_grid([red, blue, red, blue], caps, ["Stage-I", "Stage-II"], size=size, pad=pad)
    assert g.dtype == np.uint8 and g.shape[2] == 3
    # the image blocks keep their pixels: the last column holds red then blue rows, twice
    col = g[:, -pad - size // 2]
    reds = np.where((col[:, 0] == 255) & (col[:, 2] == 0))[0]
    blues = np.where((col[:, 2] == 255) & (col[:, 0] == 0))[0]
    assert len(reds) == 2 * size and len(blues) == 2 * size
    assert reds[:size].max() < blues[:size].min()  # Stage-I above Stage-II
    # text: dark pixels above the first image row (the caption) and left of the images (the labels)
    first_img_row = int(reds.min())
    assert (g[:first_img_row, :, :] < 100).all(axis=2).sum() > 20
    left = g[:, : g.shape[1] - 3 * (size + pad) - pad]
    assert left.shape[1] > 10 and (left < 150).all(axis=2).sum() > 20
    # the long caption is cut to the grid's width, not widened
    assert g.shape[1] < 3 * (size + pad) + pad + 120

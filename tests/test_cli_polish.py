"""The command line's rough edges (#27): each as a user meets it, in-process where the CLI allows."""
import argparse
import json
import os
import subprocess
import sys

import pytest

from conftest import PY, REPO, run_cli, tiny_overrides
from stackgan_dist import cli


def _run(capsys, *argv) -> tuple[int, str, str]:
    """cli.main in this process: (exit code, stdout, stderr); argparse's SystemExit counts as an exit."""
    try:
        rc = cli.main(list(argv))
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def test_train_without_arguments_names_only_the_config(capsys):
    rc, _, err = _run(capsys, "train")
    assert rc == 2
    assert "required: config" in err and "overrides" not in err.splitlines()[-1], err


@pytest.mark.parametrize("argv, hint", [
    (["--max-steps", "10"], "train.max_steps=10"),
    (["--max-steps=10"], "train.max_steps=10"),
    (["--batch-size", "8", "run.dir=x"], "train.batch_size=8"),
    (["--gf-dim", "32"], "model.gf_dim=32"),
])
def test_a_config_key_written_as_a_flag_gets_its_key_value_form(capsys, argv, hint):
    rc, _, err = _run(capsys, "train", os.path.join(REPO, "configs", "demo", "stage1.yaml"), *argv)
    assert rc == 2
    last = err.strip().splitlines()[-1]
    assert "unrecognized arguments" in last and f"write {hint}" in last, err


def test_an_unknown_flag_that_is_no_config_key_gets_no_hint(capsys):
    rc, _, err = _run(capsys, "train", os.path.join(REPO, "configs", "demo", "stage1.yaml"), "--frobnicate")
    assert rc == 2 and "unrecognized arguments: --frobnicate" in err and "write" not in err
    rc, _, err = _run(capsys, "eval", "somerun", "--data", "d", "--max-steps", "3")  # eval takes no overrides
    assert rc == 2 and "unrecognized arguments: --max-steps 3" in err and "train.max_steps" not in err


def test_a_directory_as_the_config_lists_its_yaml_files(capsys, tmp_path):
    (tmp_path / "a.yaml").write_text("run: {dir: x}\n")
    (tmp_path / "b.yml").write_text("run: {dir: y}\n")
    (tmp_path / "notes.txt").write_text("not a config\n")
    for extra in ([], ["--dry-run"]):
        rc, _, err = _run(capsys, "train", str(tmp_path), *extra)
        assert rc == 2, err
        line = err.strip()
        assert len(line.splitlines()) == 1 and "is a directory" in line, err
        assert str(tmp_path / "a.yaml") in line and str(tmp_path / "b.yml") in line and "notes.txt" not in line


def _parsers(p: argparse.ArgumentParser, name="stackgan"):
    yield name, p
    for act in p._actions:
        if isinstance(act, argparse._SubParsersAction):
            for sub, sp in act.choices.items():
                yield from _parsers(sp, f"{name} {sub}")


def test_one_help_style_across_every_subcommand():
    """Each option with a default shows it once, as ``(default: X)`` or a help that says ``default: ...``
    itself; no option shows None/False; a machine-dependent default reads ``auto (...)``."""
    names = []
    for name, p in _parsers(cli.build_parser()):
        names.append(name)
        text = p.format_help()
        assert "(default: None)" not in text and "(default: False)" not in text, name
        assert "(default " not in text, f"{name}: write defaults as '(default: X)'"
        fmt = p._get_formatter()
        for act in p._actions:
            if not act.option_strings or act.default is argparse.SUPPRESS:
                continue
            shown = (fmt._get_help_string(act) or "").replace("%(default)s", str(act.default))
            assert shown.count("default") <= 1, (name, act.option_strings, shown)
            unset = act.default is None or act.default is False or act.default in ("", [])
            if not unset:
                assert "default" in shown, (name, act.option_strings, shown)
            if act.dest == "workers":
                assert "default: auto" in shown, (name, shown)
    assert {"stackgan train", "stackgan sample", "stackgan eval", "stackgan prepare synthetic",
            "stackgan prepare stackgan", "stackgan prepare captions"} <= set(names)


def test_prepare_synthetic_no_progress_writes_no_bar(capsys, tmp_path):
    rc, out, err = _run(capsys, "prepare", "synthetic", "--out", str(tmp_path / "d"), "--train", "4", "--test",
                        "2", "--text-dim", "16", "--samples-per-shard", "4", "--no-progress")
    assert rc == 0, err
    assert json.loads(out)["train"]["num_samples"] == 4
    assert "\r" not in err and "it/s" not in err, err


def test_a_reader_that_goes_away_ends_the_command_without_a_traceback(tiny_run):
    """``stackgan inspect RUN | head``: the pipe's read end is closed before the command writes, as after head
    exits."""
    r, w = os.pipe()
    env = dict(os.environ, PYTHONPATH=REPO)
    p = subprocess.Popen([PY, "-m", "stackgan_dist", "inspect", str(tiny_run)], stdout=w, stderr=subprocess.PIPE,
                         cwd=REPO, env=env)
    os.close(w)
    os.close(r)  # nobody reads: the first write gets EPIPE
    _, err = p.communicate(timeout=300)
    assert p.returncode == cli.EXIT_BROKEN_PIPE, err
    assert b"Traceback" not in err and b"BrokenPipeError" not in err, err


@pytest.fixture(scope="module")
def tiny_run(synth_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("polish") / "run"
    check = run_cli("train", os.path.join(REPO, "configs", "demo", "stage1.yaml"),
                    *tiny_overrides(synth_data, run, steps=2))
    assert check.returncode == 0, check.stderr[-3000:]
    return run


def test_sample_from_data_labels_the_grid_with_the_test_captions(capsys, tiny_run, synth_data, tmp_path):
    from stackgan_dist.data.read.index import resolve_dataset
    from stackgan_dist.data.read.reader import read_batches

    out = tmp_path / "grid.png"
    rc, stdout, err = _run(capsys, "sample", str(tiny_run), "--from-data", "--n", "3", "--out", str(out))
    assert rc == 0, err
    expected = next(read_batches(resolve_dataset(str(synth_data / "test")), 1, 3))["caption"]
    assert json.loads(stdout)["captions"] == expected
    assert json.loads((tmp_path / "grid.captions.json").read_text())["captions"] == expected
    assert out.stat().st_size > 0
    rc, _, err = _run(capsys, "sample", str(tiny_run), "--from-data", "--text", "a red circle")
    assert rc == 2 and "--from-data" in err


def test_sample_from_data_runs_no_command_named_by_the_run(capsys, tiny_run, tmp_path):
    """A run's config.yaml is untrusted: a ``pipe:`` data.test in a copied run is refused, not run."""
    import shutil

    copy = tmp_path / "copied"
    shutil.copytree(tiny_run, copy)
    marker = tmp_path / "ran"
    cfg = (copy / "config.yaml").read_text()
    (copy / "config.yaml").write_text(cfg.replace("test: ", f"test: 'pipe:touch {marker}; cat' # ", 1))
    rc, _, err = _run(capsys, "sample", str(copy), "--from-data", "--out", str(tmp_path / "g.png"))
    assert rc == 2 and "--data" in err and len(err.strip().splitlines()) == 1, err
    assert not marker.exists()


def test_eval_on_data_without_caption_labels_suggests_fid_and_is(capsys, tiny_run, tmp_path):
    from PIL import Image

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(4):
        Image.new("RGB", (40, 40), (60 * i, 20, 90)).save(imgs / f"{i}.png")
        (imgs / f"{i}.txt").write_text(f"a picture number {i}\n")
    rc, _, err = _run(capsys, "prepare", "captions", "--images", str(imgs), "--out", str(tmp_path / "own"),
                      "--encoder", "hashing:64", "--test-fraction", "0.5", "--workers", "1", "--no-progress")
    assert rc == 0, err
    split = tmp_path / "own" / "test"
    if json.loads((split / "dataset.json").read_text())["num_samples"] == 0:
        split = tmp_path / "own" / "train"
    rc, _, err = _run(capsys, "eval", str(tiny_run), "--data", str(split), "--metrics", "caption")
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and "--metrics fid,is" in err, err

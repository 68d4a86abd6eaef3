"""prepare's progress bar only on a terminal (#26 point 7, #27): a redirected log or a batch job's output gets
no carriage-return lines unless --progress on asks for them."""
import argparse
import os
import subprocess
import sys

from conftest import PY, REPO
from stackgan_dist.data.prepare.prepare_cli import add_progress_arg, progress_enabled


def _prepare(*extra):
    """The command's raw bytes (text mode would turn a carriage return into a newline)."""
    p = subprocess.run([PY, "-m", "stackgan_dist", "prepare", "synthetic", "--train", "12", "--test", "2",
                        "--samples-per-shard", "4", "--text-dim", "16", *extra], capture_output=True, timeout=300,
                       cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_redirected_prepare_writes_no_carriage_returns(tmp_path):
    quiet = _prepare("--out", str(tmp_path / "a"))  # stderr is a pipe here: auto means off
    assert b"\r" not in quiet.stderr and b"\r" not in quiet.stdout
    loud = _prepare("--out", str(tmp_path / "b"), "--progress", "on")
    assert b"\r" in loud.stderr  # the bar the default leaves out of logs
    assert quiet.stdout == loud.stdout  # the summary line is the same either way


def test_progress_modes(monkeypatch):
    p = argparse.ArgumentParser()
    add_progress_arg(p)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert progress_enabled(p.parse_args([])) is True
    assert progress_enabled(p.parse_args(["--no-progress"])) is False
    assert progress_enabled(p.parse_args(["--progress", "off"])) is False
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert progress_enabled(p.parse_args([])) is False
    assert progress_enabled(p.parse_args(["--progress", "on"])) is True

"""Exit codes by cause: a full disk anywhere is transient (75, requeue), a wrong-typed or read-only path is
permanent (2, found at start, never requeued); each is one line, and no 0-byte file is left behind.

The full disk is real: the run's process gets ``RLIMIT_FSIZE`` (and ignores SIGXFSZ), so the kernel fails
its writes past the limit with EFBIG exactly as a full filesystem fails them with ENOSPC; both map to 75
through ``checkpoint/files.os_error``.
"""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess

import pytest

from conftest import PY, REPO, tiny_overrides
from stackgan_dist.cli import main
from stackgan_dist.errors import EXIT_REQUEUE


def _limited(limit: int):
    def pre():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return pre


def _train(data, run, steps, extra=(), limit=None):
    cmd = [PY, "-m", "stackgan_dist", "train", "configs/demo/stage1.yaml",
           *tiny_overrides(data, run, 1, steps=steps, extra=extra)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"),
                          preexec_fn=_limited(limit) if limit else None)


def _one_line(p, rc, *words):
    assert p.returncode == rc, f"exit {p.returncode}\n{p.stderr[-3000:]}"
    assert "Traceback" not in p.stderr, p.stderr
    lines = [ln for ln in p.stderr.strip().splitlines() if "error" in ln]
    assert len(lines) == 1, p.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def _no_empty_files(run):
    """No 0-byte file and no temporary of ours is left (TensorBoard's own event files aside)."""
    for dp, _d, files in os.walk(run):
        if os.path.basename(dp) == "tb":
            continue
        for f in files:
            p = os.path.join(dp, f)
            assert not f.endswith(".tmp"), f"temporary {p} left behind"
            assert os.path.getsize(p) > 0, f"0-byte {p} left behind"


def test_full_disk_at_the_config_dump_of_a_resume_and_at_a_sample_grid_exits_75(synth_data, tmp_path):
    run = tmp_path / "run"
    p = _train(synth_data, run, 2, extra=["checkpoint.every_steps=2"])
    assert p.returncode == 0, p.stderr[-2000:]
    cfg_before = (run / "config.yaml").read_bytes()
    # resume with every new file limited to 1 KiB: config.yaml (~3 KiB) cannot be written
    p = _train(synth_data, run, 4, extra=["checkpoint.every_steps=2", "train.lr_g=0.0003"], limit=1024)
    _one_line(p, EXIT_REQUEUE, "config", "transient")
    assert (run / "config.yaml").read_bytes() == cfg_before, "the old config.yaml was lost"
    _no_empty_files(run)
    # a fresh run whose first sample grid (~9 KiB) meets the full disk mid-run, before TensorBoard gets it
    run2 = tmp_path / "run2"
    p = _train(synth_data, run2, 4, extra=["log.sample_every=2"], limit=6 << 10)  # grid ~9 KiB; config, metrics < 2
    _one_line(p, EXIT_REQUEUE, "sample grid", "transient")
    assert not list((run2 / "samples").glob("step_*.png")), "a grid was left behind"
    _no_empty_files(run2)


def test_full_disk_under_the_tensorboard_events_exits_75_in_one_line(synth_data, tmp_path):
    """TensorBoard writes from its own thread: its error must reach the run as one line (exit 75), not as a
    thread's traceback with the run going on or failing later without a file name."""
    run = tmp_path / "run"
    p = _train(synth_data, run, 60, extra=["log.every_steps=1"], limit=4096)  # events pass 4 KiB by step ~5
    _one_line(p, EXIT_REQUEUE, "TensorBoard", str(run / "tb"), "transient")
    assert "Exception in thread" not in p.stderr, p.stderr
    _no_empty_files(run)


_METRICS_FULL = """
import sys
from stackgan_dist.errors import TransientError
from stackgan_dist.observability.metrics import MetricsWriter
w = MetricsWriter(sys.argv[1], True, tensorboard=False)
try:
    for step in range(1, 10_000):
        w.log(step, {"d_loss": 1.0, "g_loss": 2.0, "note": "x" * 100})
    w.close()
except TransientError as e:
    print(e)
    sys.exit(75)
"""


def test_full_disk_on_the_metrics_record_is_transient_and_names_it(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    p = subprocess.run([PY, "-c", _METRICS_FULL, str(run)], cwd=REPO, capture_output=True, text=True, timeout=120,
                       preexec_fn=_limited(4096))
    assert p.returncode == EXIT_REQUEUE, p.stdout + p.stderr
    assert f"cannot append to {run / 'metrics.jsonl'}" in p.stdout and "transient" in p.stdout, p.stdout
    assert 0 < (run / "metrics.jsonl").stat().st_size <= 4096


@pytest.mark.parametrize("name,make", [
    ("checkpoints", lambda p: p.write_text("not a folder")),
    ("samples", lambda p: p.write_text("not a folder")),
    ("metrics.jsonl", lambda p: p.mkdir()),
    (".lock", lambda p: p.mkdir()),
])
def test_wrong_typed_run_entries_are_permanent_and_found_at_start(synth_data, tmp_path, capsys, name, make):
    run = tmp_path / "run"
    run.mkdir()
    make(run / name)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        for extra in (["--dry-run"], []):
            rc = main(["train", "configs/demo/stage1.yaml", *tiny_overrides(synth_data, run, 1, steps=2), *extra])
            err = capsys.readouterr().err.strip()
            assert rc == 2 and err.count("\n") == 0 and name in err and "error" in err, err
    finally:
        signal.signal(signal.SIGTERM, before[0])
        signal.signal(signal.SIGINT, before[1])
    assert sorted(os.listdir(run)) == [name], "a refused start wrote into the run directory"


def _read_only(path, on: bool) -> None:
    """A folder nobody may write into: mode 555, and for root (CI runs as root, and root writes through a
    mode) the immutable attribute, which the kernel enforces for root too."""
    if on:
        os.chmod(path, 0o555)
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i" if on else "-i", str(path)], check=True, capture_output=True, timeout=60)
    if not on:
        os.chmod(path, 0o755)


def test_read_only_checkpoints_folder_is_permanent(synth_data, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    _read_only(run / "checkpoints", True)
    try:
        with pytest.raises(OSError):  # really read-only for this user
            (run / "checkpoints" / "probe").write_bytes(b"")
        rc = main(["train", "configs/demo/stage1.yaml", *tiny_overrides(synth_data, run, 1, steps=2), "--dry-run"])
    finally:
        _read_only(run / "checkpoints", False)
    err = capsys.readouterr().err
    assert rc == 2 and "not writable" in err and err.strip().count("\n") == 0, err
    assert os.listdir(run / "checkpoints") == []


def test_report_skips_junk_metrics_lines_and_survives_an_unreadable_newest_grid(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    lines = ['{"step": 1, "d_loss": 1.0, "g_loss": 2.0}', "[[[", '"a string"', '{"step": "2"}', "\0\0\0",
             '{"step": 2, "d_loss": "NaN?", "g_loss": 1.5}', "{" * 5000, '{"step": 3, "d_loss": 0.5, "g_loss": 1.0}']
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (run / "samples" / "step_00000001.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 100)
    assert main(["report", str(run)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["records"] == 3 and out["skipped_lines"] == 5 and out["sample"] is None
    assert "unreadable" in out["sample_problem"] and os.path.getsize(run / "report.png") > 0
    os.unlink(run / "samples" / "step_00000001.png")
    os.rmdir(run / "samples")
    (run / "samples").write_text("a file")
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "samples" in err

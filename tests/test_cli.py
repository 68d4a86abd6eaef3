"""End-to-end CLI: train, sample, inspect, eval round trips and bad input (one line, non-zero, nothing changed)."""
import json
import os
import shutil
import signal
import socket
import subprocess
from contextlib import contextmanager

import numpy as np
import pytest

from conftest import PY, REPO, cli_main, inspect_run, one_line_error, run_cli, snapshot, tiny_overrides


@pytest.fixture
def stage1_run(tiny_stage1_run):
    """The session's tiny Stage-I run (conftest.py): these tests read it, never write it."""
    return tiny_stage1_run


def test_run_directory_contract(stage1_run):
    for p in ("config.yaml", "metrics.jsonl", "checkpoints/latest", "checkpoints/step_00000004/manifest.json",
              "samples/step_00000004.png", "tb"):
        assert os.path.exists(stage1_run / p), p
    recs = [json.loads(x) for x in open(stage1_run / "metrics.jsonl")]
    assert [r["step"] for r in recs] == [2, 4]
    for k in ("d_loss", "d_real", "d_wrong", "d_fake", "g_loss", "kl", "img_per_s"):
        assert np.isfinite(recs[-1][k])


def test_inspect_and_sample(stage1_run, tmp_path):
    p = run_cli("inspect", stage1_run, check=True)
    info = json.loads(p.stdout)
    assert info["step"] == 4 and info["stage"] == 1 and info["valid"] is True and len(info["params_sha256"]) == 64
    # the checkpoint folder and `latest` name the same checkpoint
    assert inspect_run(stage1_run / "checkpoints/latest")["params_sha256"] \
        == info["params_sha256"]
    out = tmp_path / "grid.png"
    run_cli("sample", stage1_run, "--text", "a red circle on a blue background", "--text", "a white square",
            "--num", "3", "--out", out, check=True)
    from PIL import Image

    w, h = Image.open(out).size
    assert w > 3 * 66 + 2 and h > 2 * 66 + 2  # a label column and a caption line per row
    saved = json.load(open(tmp_path / "grid.captions.json"))
    assert saved["captions"] == ["a red circle on a blue background", "a white square"]
    assert saved["rows"] == ["Stage-I"] and saved["num"] == 3


def test_stage2_train_sample_eval(stage1_run, synth_data, tmp_path):
    run = tmp_path / "s2"
    run_cli("train", "configs/demo/stage2.yaml",
            *tiny_overrides(synth_data, run, 2, steps=2, extra=[f"model.stage1_checkpoint={stage1_run}"]), check=True)
    info = inspect_run(run)
    assert info["stage"] == 2 and info["step"] == 2
    # the demo's Stage-II config turns on the colour term: it is logged beside the other losses
    rec = [json.loads(x) for x in open(run / "metrics.jsonl")][-1]
    assert np.isfinite(rec["g_color"]) and rec["g_color"] > 0
    out = tmp_path / "g.png"
    run_cli("sample", run, "--text", "a red circle", "--num", "2", "--out", out, check=True)
    from PIL import Image

    w, h = Image.open(out).size  # a Stage-I row and a Stage-II row under the caption, labelled at the left
    assert w > 2 * 258 + 2 and 2 * 258 + 2 < h < 2 * 258 + 60
    assert json.load(open(tmp_path / "g.captions.json"))["rows"] == ["Stage-I", "Stage-II"]
    p = run_cli("eval", run, "--data", f"{synth_data}/test", "--metrics", "caption", check=True)
    res = json.loads(p.stdout)
    assert 0.0 <= res["color_accuracy"] <= 1.0 and res["num_images"] == 24
    assert res["real_color_accuracy"] >= 0.95
    assert json.load(open(run / "eval.json"))["color_accuracy"] == res["color_accuracy"]


def test_caption_metric_scores_real_images(synth_data):
    from stackgan_dist.data.read.index import resolve_dataset
    from stackgan_dist.data.read.loader import LoaderSpec, make_loader
    from stackgan_dist.evaluation.caption import caption_scores

    for stage in (1, 2):
        _, dl = make_loader(resolve_dataset(f"{synth_data}/test"), LoaderSpec(stage, 24, 0, num_workers=0,
                                                                              shuffle_buffer=1))
        b = next(iter(dl))
        s = caption_scores(b["image"].permute(0, 2, 3, 1).numpy(), b["cls"].tolist())
        assert s["color_accuracy"] >= 0.95 and s["shape_accuracy"] >= 0.95


def test_bad_input_leaves_run_untouched(stage1_run, synth_data, tmp_path):
    before = snapshot(stage1_run)
    base = tiny_overrides(synth_data, stage1_run, 1, steps=8)
    one_line_error(cli_main("train", tmp_path / "missing.yaml", *base), "config file not found")
    one_line_error(cli_main("train", "configs/demo/stage1.yaml", *base, "train.max_step=9"), "train.max_steps")
    one_line_error(cli_main("train", "configs/demo/stage1.yaml", *base, "train.batch_size=x"), "train.batch_size")
    one_line_error(cli_main("train", "configs/demo/stage1.yaml", *base, "model.text_dim=32"), "text_dim")
    one_line_error(cli_main("train", "configs/demo/stage1.yaml", *base, f"data.train={tmp_path}/nodata"), "nodata")
    one_line_error(cli_main("train", "configs/demo/stage1.yaml", *base, "model.gf_dim=32"), "model.gf_dim")
    one_line_error(cli_main("train", "configs/demo/stage1.yaml", *base, "--fresh"), "--fresh")
    assert snapshot(stage1_run) == before


def test_stage2_without_stage1_is_refused(synth_data, tmp_path):
    run = tmp_path / "s2bad"
    p = cli_main("train", "configs/demo/stage2.yaml",
                *tiny_overrides(synth_data, run, 2, steps=2, extra=["model.stage1_checkpoint="]))
    one_line_error(p, "stage1_checkpoint")
    p = cli_main("train", "configs/demo/stage2.yaml",
                *tiny_overrides(synth_data, run, 2, steps=2, extra=[f"model.stage1_checkpoint={tmp_path}/none"]))
    one_line_error(p, "not found", "model.stage1_checkpoint")
    assert not run.exists() or not os.listdir(run)


def test_stage1_checkpoint_z_dim_must_match_but_widths_may_differ(stage1_run, synth_data, tmp_path):
    run = tmp_path / "s2"
    p = cli_main("train", "configs/demo/stage2.yaml", *tiny_overrides(
        synth_data, run, 2, steps=1, extra=[f"model.stage1_checkpoint={stage1_run}", "model.z_dim=8"]))
    one_line_error(p, "z of 16 dims", "model.z_dim is 8", "model.z_dim=16")
    assert p.returncode == 2 and not run.exists()
    # Stage-I's widths and condition_dim are its own: a Stage-II of other widths trains on it
    run_cli("train", "configs/demo/stage2.yaml", *tiny_overrides(
        synth_data, run, 2, steps=1, extra=[f"model.stage1_checkpoint={stage1_run}", "model.gf_dim=32",
                                             "model.condition_dim=8"]), check=True)


def test_dry_run_prints_batch_sizes(synth_data, tmp_path):
    p = cli_main("train", "configs/demo/stage1.yaml", "--dry-run", *tiny_overrides(synth_data, tmp_path / "d", 1),
                env={"WORLD_SIZE": "4"}, check=True)
    d = json.loads(p.stdout)
    assert d["world_size"] == 4 and d["global_batch"] == 16
    assert not (tmp_path / "d").exists()


def test_cli_help_version_and_usage():
    """`stackgan` alone lists the commands; --version; help shows defaults; a bad flag prints the
    subcommand's own usage."""
    p = cli_main()
    assert p.returncode == 2 and "COMMAND" in p.stderr and "sample" in p.stderr and "required" not in p.stderr
    v = cli_main("--version", check=True)
    assert v.stdout.strip().startswith("stackgan 0.")
    h = cli_main("sample", "--help", check=True)
    assert "(default: 4)" in h.stdout and "noise seed (default: 0)" in h.stdout
    b = cli_main("sample", "somerun", "--bogus")
    assert b.returncode == 2 and "usage: stackgan sample" in b.stderr and "--bogus" in b.stderr
    b = cli_main("prepare", "synthetic", "--out", "x", "--nope")
    assert b.returncode == 2 and "usage: stackgan prepare synthetic" in b.stderr


def test_sample_from_precomputed_embeddings(stage1_run, tmp_path):
    """`sample --embeddings FILE.npy`: the path for models trained on precomputed (char-CNN-RNN) embeddings."""
    dim = inspect_text_dim(stage1_run)
    emb = np.random.default_rng(0).standard_normal((2, dim)).astype(np.float32)
    np.save(tmp_path / "e.npy", emb)
    out = tmp_path / "e.png"
    run_cli("sample", stage1_run, "--embeddings", tmp_path / "e.npy", "--num", "2", "--out", out, check=True)
    assert json.load(open(tmp_path / "e.captions.json"))["captions"][1] == "embedding 1 of e.npy"
    np.save(tmp_path / "bad.npy", emb[:, :3])
    p = cli_main("sample", stage1_run, "--embeddings", tmp_path / "bad.npy", "--out", tmp_path / "b.png")
    assert p.returncode == 2 and f"(N, {dim})" in p.stderr and not (tmp_path / "b.png").exists()
    p = cli_main("sample", stage1_run, "--out", tmp_path / "c.png")
    assert p.returncode == 2 and "--text" in p.stderr and "--embeddings" in p.stderr


def inspect_text_dim(run) -> int:
    return inspect_run(run)["text_encoder"]["dim"]


# -- bad input: one line on stderr naming the problem and the fix, exit 2, nothing changed on disk ------------
LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi")) + "train:\n  max_steps: *i\n"


@pytest.mark.parametrize("override,words", [
    ("train.lr_g=-0.001", ("train.lr_g", "(0.0, inf]", "-0.001")),
    ("train.lr_d=0", ("train.lr_d",)),
    ("train.beta1=1", ("train.beta1", "[0.0, 1.0)")),
    ("train.beta1=1.5", ("train.beta1",)),
    ("train.beta2=-0.1", ("train.beta2",)),
    ("data.prefetch_factor=0", ("data.prefetch_factor",)),
    ("train.lr_g=nan", ("train.lr_g", "nan")),
    ("run.dir=", ("run.dir", "empty")),
    ("run.dir=  ", ("run.dir", "empty")),
])
def test_bad_numbers_and_run_dir_are_refused_in_one_line(tmp_path, override, words):
    p = cli_main("train", "configs/demo/stage1.yaml", "--dry-run", override)
    one_line_error(p, *words)
    assert p.returncode == 2


def test_non_utf8_run_dir_and_billion_laughs_are_refused(tmp_path):
    e = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([PY.encode(), b"-m", b"stackgan_dist", b"train", b"configs/demo/stage1.yaml", b"--dry-run",
                        b"run.dir=" + str(tmp_path).encode() + b"/r\xff\xfe"], capture_output=True, cwd=REPO, env=e,
                       timeout=120)
    p.stderr = p.stderr.decode("utf-8", "replace")
    one_line_error(p, "run.dir", "not valid UTF-8")
    assert p.returncode == 2 and os.listdir(tmp_path) == []
    cfg = tmp_path / "laughs.yaml"
    cfg.write_text(LAUGHS)
    p = run_cli("train", cfg, "--dry-run", timeout=60)  # expanded, this is 9**9 strings: it must not hang
    one_line_error(p, str(cfg), "alias", "write the list or mapping out")
    assert p.returncode == 2


@contextmanager
def read_only(path):
    """A directory no one can write, root included (the tests run as root, for whom mode bits do not count)."""
    subprocess.run(["chattr", "+i", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_run_dir_that_is_a_file_or_read_only_is_refused_before_anything(synth_data, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    p = cli_main("train", "configs/demo/stage1.yaml", *tiny_overrides(synth_data, f, 1, steps=2))
    one_line_error(p, "is a file", "run.dir")
    assert p.returncode == 2 and f.read_text() == "x"
    ro = tmp_path / "ro"
    ro.mkdir()
    with read_only(ro):
        for run in (ro, ro / "sub"):
            p = cli_main("train", "configs/demo/stage1.yaml", *tiny_overrides(synth_data, run, 1, steps=2))
            one_line_error(p, "read-only", "writable")
            assert p.returncode == 2
    assert os.listdir(ro) == []


def test_sample_bad_arguments(stage1_run, tmp_path):
    before = snapshot(tmp_path)
    cases = [(["--text", ""], ("--text number 1 is empty",)),
             (["--text", "a red circle", "--text", "   "], ("--text number 2 is empty",)),
             (["--text", "a red circle", "--num", "0"], ("--num 0",)),
             (["--text", "a red circle", "--num", "-3"], ("--num -3",)),
             (["--text", "a red circle", "--out", str(tmp_path)], ("is a directory",)),
             (["--text", "a red circle", "--out", str(tmp_path / "x.jpg")], ("must end with .png",)),
             (["--text", "a red circle", "--out", str(tmp_path / "afile" / "x.png")], ("is a file",))]
    (tmp_path / "afile").write_text("")
    before = snapshot(tmp_path)
    for args, words in cases:
        p = cli_main("sample", stage1_run, *args)
        one_line_error(p, *words)
        assert p.returncode == 2
    ro = tmp_path / "ro"
    ro.mkdir()
    before = snapshot(tmp_path)
    with read_only(ro):
        p = cli_main("sample", stage1_run, "--text", "a red circle", "--out", ro / "new" / "g.png")
        one_line_error(p, "not writable")
    assert snapshot(tmp_path) == before and os.listdir(ro) == []


def test_eval_on_a_read_only_run_fails_before_computing(stage1_run, synth_data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stage1_run, run, symlinks=True)
    before = snapshot(run)
    with read_only(run):
        p = cli_main("eval", run, "--data", f"{synth_data}/test", "--metrics", "caption")
        one_line_error(p, "eval.json", "not writable")
        assert p.returncode == 2 and "eval rank0" not in p.stderr  # refused before the first image
    assert snapshot(run) == before


def test_eval_on_a_step_folder_outside_its_run_writes_nothing_above_it(stage1_run, synth_data, tmp_path):
    solo = tmp_path / "kept" / "step_00000004"
    shutil.copytree(stage1_run / "checkpoints" / "step_00000004", solo)
    out = tmp_path / "res.json"
    p = run_cli("eval", solo, "--data", f"{synth_data}/test", "--metrics", "caption", "--out", out, check=True)
    assert json.loads(p.stdout)["step"] == 4 and json.loads(out.read_text())["step"] == 4
    assert sorted(os.listdir(tmp_path)) == ["kept", "res.json"] and os.listdir(tmp_path / "kept") == ["step_00000004"]


def test_submitit_bad_time_is_refused_before_anything(tmp_path):
    run = tmp_path / "run"
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    for t in ("abc", "1:2:3:4", "-5"):
        p = subprocess.run([PY, "launch/submitit_job.py", "--local", "--time", t, "configs/demo/stage1.yaml",
                            f"run.dir={run}"], capture_output=True, text=True, cwd=REPO, env=e, timeout=120)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "--time" in lines[0] and "Slurm time limit" in lines[0], p.stderr
    assert not run.exists()


def test_ctrl_c_while_ray_job_submits_is_one_line(tmp_path):
    """The Jobs API 'server' accepts the connection and never answers; once ray_job.py has connected (the
    accept is the rendezvous), Ctrl-C arrives while it waits inside the submission."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    e = dict(os.environ, OMP_NUM_THREADS="1")
    # Ctrl-C as a terminal delivers it: a command started in the background of a non-interactive shell (a CI
    # script's `cmd &`) inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler
    p = subprocess.Popen([PY, "launch/ray_job.py", "--address", f"http://127.0.0.1:{port}", "--num-workers", "1",
                          "configs/demo/stage1.yaml", f"run.dir={tmp_path / 'run'}"], cwd=REPO, env=e,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        srv.settimeout(120)
        conn, _ = srv.accept()
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
        conn.close()
    finally:
        srv.close()
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130 and "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "interrupted before the submission was confirmed" in lines[0], err
    assert "ray job list" in lines[0] and not (tmp_path / "run").exists()

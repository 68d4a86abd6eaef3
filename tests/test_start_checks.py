"""What a start checks, and what `train --dry-run` checks (the same, writing nothing): model.text_dim read
from the dataset or checked against it, missing data, a missing Stage-I checkpoint, bf16 on CPU, one summary
under torchrun; train's messages name config keys, never eval's --data flag."""
import json
import os

import pytest
import yaml

from conftest import CFG1, CFG2, cli_main, inspect_run, one_line_error, run_cli, snapshot, tiny_overrides, torchrun

NO_TEXT_DIM = "model.text_dim=64"


def without_text_dim(overrides):
    assert NO_TEXT_DIM in overrides
    return [o for o in overrides if o != NO_TEXT_DIM]


def test_text_dim_is_read_from_the_dataset_and_an_explicit_one_is_a_check(synth_data, tmp_path):
    run = tmp_path / "s1"
    o = without_text_dim(tiny_overrides(synth_data, run, 1, steps=2))
    dry = json.loads(cli_main("train", CFG1, "--dry-run", *o, check=True).stdout)
    assert dry["text_dim"] == 64 and dry["config"]["model"]["text_dim"] == 64  # the synthetic set's hashing dim
    assert not run.exists()
    run_cli("train", CFG1, *o, check=True)
    # recorded as a number: in the run's config and in the checkpoint (sample and eval read it from there)
    assert yaml.safe_load(open(run / "config.yaml"))["model"]["text_dim"] == 64
    info = inspect_run(run)
    assert info["text_encoder"]["dim"] == 64
    run_cli("sample", run, "--text", "a red circle", "--num", "1", "--out", tmp_path / "s.png", check=True)
    # resuming with it unset, or set to the same number, is the same model
    o4 = without_text_dim(tiny_overrides(synth_data, run, 1, steps=4))
    assert "resumed from" in run_cli("train", CFG1, *o4, check=True).stdout
    before = snapshot(run)
    p = cli_main("train", CFG1, *o4, "train.max_steps=6", "model.text_dim=32")
    one_line_error(p, "model.text_dim is 32", "64-d", str(synth_data / "train" / "dataset.json"), "unset")
    assert snapshot(run) == before


@pytest.mark.parametrize("case", ["missing_data", "missing_test_data", "missing_stage1", "bf16_on_cpu", "text_dim"])
def test_dry_run_refuses_what_a_start_refuses(synth_data, tmp_path, case):
    run = tmp_path / "run"
    stage, extra, words = 1, [], ()
    if case == "missing_data":
        extra, words = [f"data.train={tmp_path}/no_such_split"], ("data.train", "no_such_split", "does not exist")
    elif case == "missing_test_data":
        extra, words = [f"data.test={tmp_path}/no_test"], ("data.test", "no_test")
    elif case == "missing_stage1":
        stage, extra = 2, [f"model.stage1_checkpoint={tmp_path}/no_stage1"]
        words = ("model.stage1_checkpoint", "no_stage1")
    elif case == "bf16_on_cpu":
        extra, words = ["train.precision=bf16", "train.device=cpu"], ("train.precision=bf16", "CUDA")
    else:
        extra, words = ["model.text_dim=128"], ("128", "64", "dataset.json")
    p = cli_main("train", CFG2 if stage == 2 else CFG1, "--dry-run",
                 *tiny_overrides(synth_data, run, stage, extra=extra))
    line = one_line_error(p, *words)
    assert "--data" not in line and p.stdout == ""
    assert not run.exists()


def test_dry_run_of_a_finished_run_and_of_a_stage2_run(synth_data, tmp_path):
    """A dry run reads a run directory (resume, its lock) and the Stage-I checkpoint, and changes nothing."""
    s1 = tmp_path / "s1"
    run_cli("train", CFG1, *tiny_overrides(synth_data, s1, 1, steps=2), check=True)
    before = snapshot(s1)
    d = json.loads(cli_main("train", CFG1, "--dry-run", *tiny_overrides(synth_data, s1, 1, steps=2), check=True).stdout)
    assert d["finished"] and d["resume_from"].endswith("step_00000002")
    s2 = tmp_path / "s2"
    d = json.loads(cli_main("train", CFG2, "--dry-run", *tiny_overrides(
        synth_data, s2, 2, steps=2, extra=[f"model.stage1_checkpoint={s1}"]), check=True).stdout)
    assert d["stage1_checkpoint"].endswith("step_00000002") and not d["finished"]
    # Stage-I's z_dim must be Stage-II's: the dry run loads the Stage-I checkpoint as a start does
    p = cli_main("train", CFG2, "--dry-run", *tiny_overrides(
        synth_data, s2, 2, steps=2, extra=[f"model.stage1_checkpoint={s1}", "model.z_dim=8"]))
    one_line_error(p, "model.z_dim=16")
    assert snapshot(s1) == before and not s2.exists()


def test_dry_run_under_torchrun_speaks_once(synth_data, tmp_path):
    run = tmp_path / "run"
    p = torchrun(2, "train", CFG1, "--dry-run", *tiny_overrides(synth_data, run, 1), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count('"launcher"') == 1, p.stdout
    d = json.loads(p.stdout)
    assert d["launcher"] == "torchrun" and d["world_size"] == 2 and d["global_batch"] == 8
    assert not run.exists()
    # a refusal is one line too (every rank checks; only rank 0 speaks)
    p = torchrun(2, "train", CFG1, "--dry-run", *tiny_overrides(synth_data, run, 1, extra=["train.precision=bf16"]),
                 timeout=300)
    assert p.returncode != 0
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("stackgan train: error")]
    assert len(lines) == 1 and "train.precision=bf16" in lines[0], p.stderr[-3000:]
    assert not run.exists()


def test_train_messages_name_config_keys_and_eval_keeps_its_flag(synth_data, tmp_path):
    """train has no --data flag: its data errors name data.train / data.test; eval names its --data."""
    run = tmp_path / "run"
    for extra, key in ((["data.train="], "data.train"), ([f"data.train={tmp_path}/x-{{0..3}}.tar"], "data.train"),
                       ([f"data.test={tmp_path}/empty"], "data.test")):
        os.makedirs(tmp_path / "empty", exist_ok=True)
        p = cli_main("train", CFG1, *tiny_overrides(synth_data, run, 1, steps=1, extra=extra))
        line = one_line_error(p, key)
        assert "--data" not in line, line
        assert not run.exists()
    one_line_error(cli_main("eval", tmp_path / "norun", "--data", tmp_path / "nodata"), "--data", "nodata")
    one_line_error(cli_main("eval", tmp_path / "norun", "--data", ""), "set --data")


def test_step_lines_without_the_bar_and_log_lines_apart_from_it(synth_data, tmp_path):
    """log.progress=false: one plain line per log tick (step, images, losses, img/s); with the bar drawn,
    log lines go through tqdm's logging redirection and start on a line of their own."""
    p = run_cli("train", CFG1, *tiny_overrides(synth_data, tmp_path / "plain", 1, steps=4), check=True)
    steps = [ln for ln in p.stderr.splitlines() if " step " in ln and "img/s" in ln]
    assert [ln.split(" step ")[1].split()[0] for ln in steps] == ["2/4", "4/4"], p.stderr
    for w in ("images 8", "d_loss", "g_loss", "kl"):
        assert w in steps[0], steps[0]
    assert "stage1:" not in p.stderr and "\r" not in p.stderr  # no bar
    p = run_cli("train", CFG1, *tiny_overrides(synth_data, tmp_path / "bar", 1, steps=4,
                                               extra=["log.progress=true", "checkpoint.every_steps=2",
                                                      "checkpoint.background=false"]), check=True)
    assert "stage1:" in p.stderr  # the bar is drawn
    logged = [ln for ln in p.stderr.split("\n") if "rank0 INFO]" in ln]
    assert any("checkpoint" in ln for ln in logged), p.stderr[-3000:]
    for ln in logged:  # after the bar is cleared (\r), the log line stands alone: nothing of the bar before it
        assert ln.split("\r")[-1].startswith("["), repr(ln)
    assert not [ln for ln in p.stderr.splitlines() if " step " in ln and "img/s" in ln and "INFO]" in ln]

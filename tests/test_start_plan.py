"""The start plan end to end: a dry run passes iff the real start passes its checks; a command-line
train.max_steps beside a config's max_epochs stops where asked and says so; a CUDA run planned on this CPU
host; plain step lines (no carriage returns) in a redirected log."""
import json
import os
import pty

import pytest
import yaml
from conftest import CFG1, run_cli, tiny_overrides

from stackgan_dist.config import load_config
from stackgan_dist.distributed.env import planned_env
from stackgan_dist.errors import DataError
from stackgan_dist.observability.logging import show_progress
from stackgan_dist.train import dry_run_checks, run_training


@pytest.fixture
def restore_logging():
    """run_training sets up the run's loggers in this process (no propagation to the root): put them back so
    that later tests' caplog still sees stackgan_dist records."""
    import logging

    saved = [(lg, lg.handlers[:], lg.level, lg.propagate) for lg in map(logging.getLogger,
                                                                         ("stackgan_dist", "stackgan_dist.user"))]
    yield
    for lg, handlers, level, propagate in saved:
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate


def _outcome(fn):
    try:
        fn()
    except DataError as e:
        return str(e)
    return "ok"


def test_dry_run_and_real_start_agree_on_a_dataset_too_small_for_the_shape(synth_data, tmp_path, restore_logging):
    """96 samples cannot fill one batch of 128: the dry run and the real start refuse with the same line and
    nothing is written; at 4 per batch both pass. A 64-rank layout planned from here meets the loader's
    reader check in the dry run, as its real start would."""
    for batch, want_ok in ((128, False), (4, True)):
        run = tmp_path / f"b{batch}"

        def cfg():
            return load_config(CFG1, tiny_overrides(synth_data, run, steps=1, extra=[f"train.batch_size={batch}"]))

        dry = _outcome(lambda: dry_run_checks(cfg()))
        assert not run.exists()
        real = _outcome(lambda: run_training(cfg()))
        assert dry == real and (dry == "ok") == want_ok, (batch, dry, real)
        assert run.exists() == want_ok  # a refused start wrote nothing
    wide = _outcome(lambda: dry_run_checks(load_config(CFG1, tiny_overrides(synth_data, tmp_path / "w")),
                                           env=planned_env("cpu", 64)))
    assert "too small" in wide and "64" in wide, wide


def test_world_size_64_dry_run_fails_in_one_line(synth_data, tmp_path):
    p = run_cli("train", CFG1, "--dry-run", *tiny_overrides(synth_data, tmp_path / "r"),
                env=dict(os.environ, WORLD_SIZE="64"))
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "too small" in lines[0], p.stderr
    assert not (tmp_path / "r").exists()


def test_command_line_max_steps_beats_the_configs_max_epochs_and_logs_plain_lines(synth_data, tmp_path):
    """A config with max_epochs 600 (the birds recipe's length) and train.max_steps=3 on the command line: the
    run stops at step 3, the banner says why; its log, redirected to a pipe, has step lines and no carriage
    return (log.progress=auto draws no bar there); an end summary names the checkpoint and `stackgan report`."""
    with open(CFG1) as f:
        base = yaml.safe_load(f)
    base["train"]["max_epochs"] = 600
    cfg = tmp_path / "long.yaml"
    cfg.write_text(yaml.safe_dump(base))
    run = tmp_path / "r"
    ov = [o for o in tiny_overrides(synth_data, run, steps=3) if not o.startswith("log.progress")]
    p = run_cli("train", str(cfg), *ov, "log.every_steps=1", check=True)
    assert "\r" not in p.stderr and "\r" not in p.stdout
    assert "train.max_steps from the command line; the config's max_epochs 600 ignored" in p.stderr, p.stderr
    assert "stops at step 3:" in p.stderr
    steps = [ln for ln in p.stderr.splitlines() if " step " in ln and "/3 images" in ln]
    assert len(steps) == 3 and "step 3/3 images 12" in steps[-1], p.stderr
    assert sorted(os.listdir(run / "checkpoints")) == ["latest", "step_00000003"]
    last = p.stdout.strip().splitlines()[-1]
    assert last.startswith("done: step 3") and "step_00000003" in last and f"stackgan report {run}" in last


def test_cuda_bf16_plan_on_a_cpu_host(synth_data, tmp_path):
    """--device cuda plans a CUDA run here: every check but the device; bf16 (refused on a CPU device) passes,
    at the layout of --nodes x --tasks-per-node."""
    run = tmp_path / "r"
    p = run_cli("train", CFG1, "--dry-run", "--device", "cuda", "--nodes", "2", "--tasks-per-node", "2",
                *tiny_overrides(synth_data, run), "train.precision=bf16", "train.batch_size=0",
                "train.global_batch=16")
    assert p.returncode == 0, p.stderr
    plan = json.loads(p.stdout)
    assert plan["device"].startswith("cuda") and plan["precision"] == "bf16" and plan["world_size"] == 4
    assert plan["launcher"] == "planned (2 node(s) x 2 task(s))" and (plan["nodes"], plan["tasks_per_node"]) == (2, 2)
    assert plan["banner"][0].startswith("stage 1: planned (2 node(s) x 2 task(s)), world size 4, cuda")
    assert (plan["global_batch"], plan["batch_per_worker"], plan["grad_accum"]) == (16, 4, 1)
    assert plan["images_used_per_epoch"] == 96 and plan["images_dropped_per_epoch"] == 0
    assert plan["total_steps"] == 4 and plan["lr_g"] == pytest.approx(4e-4)
    assert not run.exists()


def test_progress_bar_only_on_a_terminal_outside_batch_jobs(tmp_path):
    main, child = pty.openpty()
    try:
        with os.fdopen(os.dup(child), "w") as tty, open(tmp_path / "log", "w") as log:
            assert show_progress("auto", True, batch_job=False, stream=tty)
            assert not show_progress("auto", True, batch_job=True, stream=tty)  # a Slurm/Ray job's log
            assert not show_progress("auto", True, batch_job=False, stream=log)  # redirected
            assert not show_progress("auto", False, batch_job=False, stream=tty)  # not rank 0
            assert show_progress("true", True, batch_job=True, stream=log)
            assert not show_progress("false", True, batch_job=False, stream=tty)
    finally:
        os.close(main)
        os.close(child)

"""Sweeps, in process and locally: the sweep file's expansion (property-based), the halving rule (a pure
function), trial records read as hostile input, `--dry-run`, a local sweep whose failing trial leaves the
others finishing, a rerun that touches nothing finished, a trial killed mid-run that resumes exactly, and the
report's table and PNG."""
from __future__ import annotations

import json
import math
import os
import signal

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from conftest import (PY, TINY, Rendezvous, committed, digest, finish, inspect_run, one_line_error, run_cli, snapshot,
                      start)
from stackgan_dist.sweep.halving import keep_going, segments
from stackgan_dist.sweep.spec import SweepError, expand, load_sweep, parse_sweep
from stackgan_dist.sweep.trials import load_record, metric_at

CFG1 = "configs/demo/stage1.yaml"

# -- expansion -------------------------------------------------------------------------------------------
values = st.one_of(st.integers(-5, 5), st.floats(-1, 1, allow_nan=False), st.sampled_from(["a", "b"]))
grids = st.dictionaries(st.sampled_from(["train.kl_coeff", "train.lr_g", "model.gf_dim", "train.beta1"]),
                        st.lists(values, min_size=1, max_size=3), max_size=3)


@given(grid=grids, seeds=st.lists(st.integers(0, 9), min_size=1, max_size=3, unique=True),
       n=st.integers(1, 3), seed=st.integers(0, 2**31))
def test_expansion_is_the_product_in_a_fixed_order_and_reproducible(grid, seeds, n, seed):
    dists = {"train.lr_d": ("loguniform", [1e-5, 1e-2]), "train.kl_coeff_x": ("uniform", [0.0, 2.0])}
    a = expand(grid, dists, seeds, n, seed)
    b = expand(grid, dists, seeds, n, seed)
    assert [t.changes for t in a] == [t.changes for t in b]  # the same file always gives the same trials
    assert len(a) == n * math.prod(len(v) for v in grid.values()) * len(seeds)
    assert [t.index for t in a] == list(range(len(a))) and len({t.name for t in a}) == len(a)
    for t in a:
        assert t.changes["train.seed"] in seeds
        assert 1e-5 <= t.changes["train.lr_d"] <= 1e-2 and 0.0 <= t.changes["train.kl_coeff_x"] <= 2.0
        assert all(t.changes[k] in v for k, v in grid.items())
    # seeds vary fastest: consecutive trials of one grid point differ in the seed only
    if len(seeds) > 1:
        assert {k: v for k, v in a[0].changes.items() if k != "train.seed"} == \
               {k: v for k, v in a[1].changes.items() if k != "train.seed"}


@given(data=st.one_of(st.none(), st.integers(), st.text(max_size=20), st.lists(st.integers(), max_size=3),
                      st.dictionaries(st.text(max_size=8), st.one_of(st.integers(), st.text(max_size=8),
                                                                        st.lists(st.integers(), max_size=2)),
                                      max_size=5)))
def test_any_malformed_sweep_mapping_is_a_sweep_error_never_a_crash(data):
    try:
        parse_sweep(data, "x.yaml")
    except SweepError:
        pass


@pytest.mark.parametrize("bad, words", [
    ({"grid": {"run.dir": ["a"]}}, ["run.dir", "cannot be swept"]),
    ({"random": {"train.lr_g": {"loguniform": [0, 1]}}}, ["loguniform needs lo > 0"]),
    ({"random": {"train.lr_g": {"normal": [0, 1]}}}, ["random.train.lr_g"]),
    ({"bogus": 1}, ["unknown key 'bogus'"]),
    ({"stage": 3}, ["stage must be 1, 2 or both"]),
    ({"grid": {"stage2.train.lr_g": [1e-4]}}, ["stage prefix"]),
    ({"early_stop": {"rungs": [4, 2]}, "metric": {"name": "color_accuracy"}}, ["rungs must be increasing"]),
    ({"early_stop": {"rungs": [4]}}, ["early_stop needs a metric"]),
    ({"trials": 3}, ["add a random space"]),
])
def test_bad_sweep_files_name_the_problem(bad, words):
    data = {"base": CFG1, "dir": "x"} | bad
    with pytest.raises(SweepError) as e:
        parse_sweep(data, "x.yaml")
    for w in words:
        assert w in str(e.value)


def test_both_stage_overrides_apply_per_stage_and_chain_stage2_on_its_own_stage1():
    from stackgan_dist.sweep.trials import stage_args

    sw = parse_sweep({"base": {"stage1": CFG1, "stage2": "configs/demo/stage2.yaml"}, "stage": "both", "dir": "/s",
                      "overrides": ["stage2.train.max_steps=3", "train.batch_size=2"],
                      "grid": {"stage1.train.lr_g": [1e-4, 2e-4]}, "seeds": [5]}, "x.yaml", ["log.progress=false"])
    t = sw.trials[1]
    a1, a2 = stage_args(sw, t, 1), stage_args(sw, t, 2)
    assert "train.lr_g=0.0002" in a1 and not any(a.startswith("train.lr_g") for a in a2)
    assert "train.max_steps=3" in a2 and not any(a.startswith("train.max_steps") for a in a1)
    assert all("train.seed=5" in a and "train.batch_size=2" in a and "log.progress=false" in a for a in (a1, a2))
    assert a2[-1] == "model.stage1_checkpoint=/s/t001/stage1" and "run.dir=/s/t001/stage2" in a2


# -- the halving rule ------------------------------------------------------------------------------------
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=1, max_size=12), st.integers(2, 4),
       st.sampled_from(["max", "min"]))
def test_halving_keeps_exactly_the_top_fraction(vals, eta, mode):
    kept = [keep_going(vals, v, eta, mode) for v in vals]
    finite = [v for v in vals if math.isfinite(v)]
    assert not any(k for k, v in zip(kept, vals) if not math.isfinite(v))  # a diverged trial never goes on
    if finite:
        assert 1 <= sum(kept)  # the best finite trial always goes on
        best = max(finite) if mode == "max" else min(finite)
        assert keep_going(vals, best, eta, mode)
    distinct = len(set(finite)) == len(finite) == len(vals)
    if distinct:
        assert sum(kept) == math.ceil(len(vals) / eta)


def test_halving_examples_and_segments():
    assert keep_going([0.9], 0.9, 2)  # the first trial at a rung goes on (asynchronous, as ASHA)
    assert not keep_going([0.9, 0.5], 0.5, 2) and keep_going([0.9, 0.5], 0.9, 2)
    assert keep_going([0.9, 0.5, 0.7], 0.7, 2)  # ceil(3/2) = 2 go on
    assert keep_going([0.2, 0.5], 0.2, 2, mode="min") and not keep_going([0.2, 0.5, float("nan")], float("nan"), 2)
    assert segments(10, (4, 8, 12)) == [4, 8, 10] and segments(10, None) == [10]


# -- trial records ---------------------------------------------------------------------------------------
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode),
                 st.dictionaries(st.sampled_from(["status", "evals", "changes", "wall_s"]),
                                 st.one_of(st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=2)),
                                 max_size=4).map(lambda d: json.dumps(d).encode())))
def test_a_damaged_trial_record_is_no_record(tmp_path_factory, blob):
    p = tmp_path_factory.mktemp("rec") / "trial.json"
    p.write_bytes(blob)
    rec = load_record(str(p))
    assert rec is None or (rec["status"] in ("pending", "running", "finished", "failed", "stopped early"))


# -- the command -----------------------------------------------------------------------------------------
def _sweep_file(tmp_path, data, sweep_dir, name="s.yaml", grid=None, steps=4, extra=(), **top):
    doc = {"base": CFG1, "dir": str(sweep_dir),
           "overrides": [f"data.train={data}/train", f"data.test={data}/test", *TINY, f"train.max_steps={steps}",
                         "checkpoint.every_steps=2", "log.sample_every=2", "train.channels_last=false", *extra],
           "metric": {"name": "color_accuracy", "num_samples": 8}} | top
    if grid:
        doc["grid"] = grid
    p = tmp_path / name
    p.write_text(yaml.safe_dump(doc))
    return p


def test_dry_run_lists_trials_and_unknown_keys_are_refused(synth_data, tmp_path):
    f = _sweep_file(tmp_path, synth_data, tmp_path / "sw", grid={"train.kl_coeff": [1.0, 2.0]}, seeds=[0, 1])
    p = run_cli("sweep", f, "--dry-run", check=True)
    assert "4 trials" in p.stdout and "t003  train.kl_coeff=2.0 train.seed=1" in p.stdout, p.stdout
    assert not (tmp_path / "sw").exists()  # a dry run writes nothing
    bad = run_cli("sweep", f, "--dry-run", "train.kl_coef=1")
    one_line_error(bad, "train.kl_coef", "train.kl_coeff", rc=2)
    bad = run_cli("sweep", f, "--dry-run", "train.lr_g=-1")
    one_line_error(bad, "train.lr_g", rc=2)


def test_failing_trial_leaves_the_others_and_a_rerun_touches_nothing_finished(synth_data, tmp_path):
    sw = tmp_path / "sw"
    f = _sweep_file(tmp_path, synth_data, sw, grid={"data.train": [f"{synth_data}/train", str(tmp_path / "nodata")]})
    p = run_cli("sweep", f, "--parallel", "2")
    assert p.returncode == 1, p.stdout + p.stderr
    recs = [json.loads((sw / t / "trial.json").read_text()) for t in ("t000", "t001")]
    assert recs[0]["status"] == "finished" and [e["step"] for e in recs[0]["evals"]] == [2, 4], recs[0]
    assert all(isinstance(e["value"], float) for e in recs[0]["evals"])
    assert recs[1]["status"] == "failed" and "nodata" in recs[1]["error"] and "(exit 2)" in recs[1]["error"]
    assert "\n" not in recs[1]["error"]
    before = snapshot(sw / "t000")
    p = run_cli("sweep", f, "--parallel", "2")
    assert p.returncode == 1 and "t000 finished (left as it is)" in p.stdout, p.stdout + p.stderr
    assert snapshot(sw / "t000") == before
    # the report: one row per trial, the metric at each evaluation, a PNG with the best trial's samples
    r = json.loads(run_cli("sweep", "report", sw, check=True).stdout)
    assert r["best"] == "t000" and r["status"] == {"failed": 1, "finished": 1}
    assert r["sample"].endswith("step_00000004.png") and "run.dir=" in r["continue"]
    lines = (sw / "report.csv").read_text().splitlines()
    assert lines[0].split(",")[:6] == ["trial", "changes", "status", "steps", "color_accuracy@2", "color_accuracy@4"]
    assert lines[1].startswith("t000,") and ",finished,4," in lines[1] and ",failed,," in lines[2]
    md = (sw / "report.md").read_text()
    assert md.count("\n| t0") == 2 and "Continue it:" in md
    from PIL import Image

    with Image.open(sw / "report.png") as im:
        assert im.size == (1600, 700)


def test_a_killed_trial_resumes_exactly(synth_data, tmp_path):
    """A trial's training process SIGKILLed at step 3 (after its step-2 checkpoint): the trial is marked failed,
    the rerun resumes it from its own checkpoint and ends with the weights of an uninterrupted sweep."""
    ref = tmp_path / "ref"
    fg = ["checkpoint.background=false"]
    run_cli("sweep", _sweep_file(tmp_path, synth_data, ref, "ref.yaml", steps=6, extra=fg), check=True)
    sw = tmp_path / "sw"
    f = _sweep_file(tmp_path, synth_data, sw, steps=6, extra=fg)
    rz = Rendezvous(tmp_path / "rz", step=3)
    log = str(tmp_path / "sweep.log")
    p = start([PY, "-m", "stackgan_dist", "sweep", str(f)], env=rz.env, log_path=log)
    rz.wait(p)  # paused after step 3, its step-2 checkpoint committed (written in the foreground)
    assert committed(sw / "t000" / "stage1", 2)
    os.kill(rz.pid(0), signal.SIGKILL)
    text = finish(p, log, expect=1)
    rec = json.loads((sw / "t000" / "trial.json").read_text())
    assert rec["status"] == "failed" and "exit -9" in rec["error"], text
    p = run_cli("sweep", f)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "resumed from" in (sw / "t000" / "stage1.err").read_text() + (sw / "t000" / "stage1.out").read_text()
    rec = json.loads((sw / "t000" / "trial.json").read_text())
    assert rec["status"] == "finished" and rec["attempts"] == 2
    assert digest(sw / "t000" / "stage1") == digest(ref / "t000" / "stage1")


def test_local_early_stopping_applies_the_halving_rule_at_each_rung(synth_data, tmp_path):
    """Three seeds one at a time, a rung at step 2 of 4, eta 2: trial k goes on exactly when the rule, fed the
    rung's metrics of trials 0..k, says so; a stopped trial's run ends at the rung, the others at the stop."""
    sw = tmp_path / "sw"
    f = _sweep_file(tmp_path, synth_data, sw, seeds=[0, 1, 2], early_stop={"rungs": [2], "eta": 2},
                    metric={"name": "color_accuracy", "num_samples": 24})
    p = run_cli("sweep", f)
    assert p.returncode == 0, p.stdout + p.stderr
    seen = []
    for t in ("t000", "t001", "t002"):
        rec = json.loads((sw / t / "trial.json").read_text())
        v = metric_at(rec, 1, 2)
        assert isinstance(v, float), rec
        seen.append(v)
        go = keep_going(seen, v, 2)
        assert rec["status"] == ("finished" if go else "stopped early"), (seen, rec)
        assert inspect_run(sw / t / "stage1")["step"] == (4 if go else 2)
        assert [e["step"] for e in rec["evals"]] == ([2, 4] if go else [2])


def test_a_trial_below_the_rung_is_stopped_early(synth_data, tmp_path):
    """t000 carries a rung score from an earlier attempt (1.0 at step 2: a rerun never scores a rung twice);
    t001 scores lower there (a 2-step generator draws no colour) and is stopped at the rung, its run ending at
    step 2, while t000 trains on to the stop."""
    from stackgan_dist.sweep.spec import load_sweep
    from stackgan_dist.sweep.trials import read_record, write_record

    sw = tmp_path / "sw"
    f = _sweep_file(tmp_path, synth_data, sw, seeds=[0, 1], early_stop={"rungs": [2], "eta": 2},
                    metric={"name": "color_accuracy", "num_samples": 24})
    sweep = load_sweep(str(f))
    rec = read_record(sweep, sweep.trials[0])
    rec["evals"] = [{"stage": 1, "step": 2, "value": 1.0}]
    write_record(sweep, sweep.trials[0], rec)
    p = run_cli("sweep", f)
    assert p.returncode == 0, p.stdout + p.stderr
    r0, r1 = (json.loads((sw / t / "trial.json").read_text()) for t in ("t000", "t001"))
    assert r0["status"] == "finished" and inspect_run(sw / "t000" / "stage1")["step"] == 4
    assert metric_at(r1, 1, 2) < 1.0 and r1["status"] == "stopped early", r1
    assert "outside the top 1/2" in r1["error"] and inspect_run(sw / "t001" / "stage1")["step"] == 2
    r = json.loads(run_cli("sweep", "report", sw, check=True).stdout)
    assert r["status"] == {"finished": 1, "stopped early": 1}


def test_slurm_trial_times_come_from_train_sbatch_lines(tmp_path):
    """wall_s and attempts of a Slurm trial: the start-to-exit spans train.sbatch logs for each incarnation
    (a requeue appends a second one; a hard-killed one, with no exit line, adds an attempt but no time)."""
    from stackgan_dist.sweep.slurm import task_times

    out = tmp_path / "0.out"
    out.write_text("\n".join([
        "[2026-12-07T06:06:26Z] job 95 restart 0: 1 task(s) on vm, master 127.0.0.1:43795",
        "received SIGUSR1: checkpoint written at step 1; exiting with 75 (requeue)",
        "[2026-12-07T06:06:29Z] training exited with 75",
        "[2026-12-07T06:06:29Z] requeueing job 95",
        "[2026-12-07T06:08:30Z] job 95 restart 1: 1 task(s) on vm, master 127.0.0.1:54513",
        "[2026-12-07T06:09:00Z] job 95 restart 2: 1 task(s) on vm, master 127.0.0.1:54514",  # killed hard before
        "[2026-12-07T06:10:00Z] training exited with 0",
        "[not a time] training exited with 0", "\0\0junk"]) + "\n")
    assert task_times(str(out)) == (63.0, 3)
    assert task_times(str(tmp_path / "missing.out")) == (0.0, 0)
    os.mkfifo(tmp_path / "fifo.out")  # never opened: a FIFO would block the read
    assert task_times(str(tmp_path / "fifo.out")) == (0.0, 0)

"""Checkpoints whose hashes match but whose contents lie: refused in one line (exit 2), before allocation.

The manifest only proves the bytes are those it lists; anyone can recompute it. So every reader (inspect,
sample, eval, resume, Stage-II start) checks that ``model.pt`` loads into the model it declares, and bounds
that model before building it: a config implying 10 GB of weights, an encoder dimension of 1e10, a missing
key, a wrong shape, a string where a number belongs, an unknown key. None of them raises a command's peak
memory by more than 500 MB (measured in a fresh process).
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import PY, REPO
from stackgan_dist.checkpoint.contents import MAX_MODEL_PARAMS, check_size
from stackgan_dist.checkpoint.manager import CheckpointManager
from stackgan_dist.cli import main
from stackgan_dist.config import ModelConfig
from stackgan_dist.distributed.env import DistEnv
from stackgan_dist.errors import CheckpointError
from stackgan_dist.models.build import build_models
from stackgan_dist.train_state import read_checkpoint

MC = {"stage": 1, "gf_dim": 16, "df_dim": 8, "condition_dim": 16, "z_dim": 16, "text_dim": 64, "res_blocks": 1,
      "ca_relu": False, "d_condition": "text", "cond_reinject": 0, "g_padding": "zeros", "stage1_checkpoint": ""}


def good_state() -> dict:
    torch.manual_seed(0)
    m = build_models(ModelConfig(**MC))
    return {"format_version": 2, "train_state": {"step": 3, "images_seen": 12, "epoch": 0, "cursor": {},
                                                 "schedule": {}},
            "G": m.G.state_dict(), "D": m.D.state_dict(), "strategy": {}, "model_config": dict(MC),
            "config": {}, "config_hash": "x", "text_encoder": {"name": "hashing", "dim": 64}, "world_size": 1}


GOOD = good_state()


def commit(run: str, state: dict, step: int = 3) -> str:
    """A checkpoint with a correct manifest (hashes recomputed: what a tamperer can always do)."""
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    return CheckpointManager(run, env, keep_last=5).save(step, state, {"format_version": 2, "rank": 0})


# mutations: (name, function of a state dict) -- each makes the checkpoint not load into its declared model
def _set(path, value):
    def f(s):
        d = s
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
    return f


def _del(path):
    def f(s):
        d = s
        for k in path[:-1]:
            d = d[k]
        del d[path[-1]]
    return f


G_KEY = sorted(GOOD["G"])[0]
D_KEY = sorted(GOOD["D"])[-1]
BAD = {
    "missing G key": _del(("G", G_KEY)),
    "missing D key": _del(("D", D_KEY)),
    "wrong shape": _set(("G", G_KEY), torch.zeros(3, 3)),
    "string for a tensor": _set(("D", D_KEY), "zero"),
    "string for a number": _set(("model_config", "gf_dim"), "16"),
    "float for an int": _set(("model_config", "z_dim"), 16.0),
    "unknown model_config key": _set(("model_config", "use_magic"), True),
    "gf_dim 3232": _set(("model_config", "gf_dim"), 3232),
    "encoder dim 1e10": _set(("text_encoder", "dim"), 10 ** 10),
    "encoder dim float": _set(("text_encoder", "dim"), 1e10),
    "no model_config": _del(("model_config",)),
    "model_config a list": _set(("model_config",), [1, 2]),
    "G a list": _set(("G",), []),
    "extra G key": _set(("G", "evil.weight"), torch.zeros(1)),
    "int tensor": _set(("G", G_KEY), torch.zeros(GOOD["G"][G_KEY].shape, dtype=torch.int32)),
    "stage 7": _set(("model_config", "stage"), 7),
    "bool text_dim": _set(("model_config", "text_dim"), True),
    "train_state junk": _set(("train_state",), "x"),
    "huge step": _set(("train_state", "step"), float("inf")),
    "strategy a string": _set(("strategy",), "adam"),
}


@settings(max_examples=80, deadline=None)
@given(names=st.lists(st.sampled_from(sorted(BAD)), min_size=1, max_size=3, unique=True))
def test_every_lie_in_a_model_file_is_one_checkpoint_error(names):
    s = copy.deepcopy(GOOD)
    for n in names:
        try:
            BAD[n](s)
        except (KeyError, TypeError):  # an earlier mutation removed what this one edits: still a lie
            pass
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(s, "ck")
    assert "\n" not in str(e.value) and len(str(e.value)) < 400


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5),
                       st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                           max_size=2)),
       key=st.sampled_from(sorted(MC)))
def test_any_value_in_any_model_config_key_is_accepted_only_when_it_fits(value, key):
    s = copy.deepcopy(GOOD)
    s["model_config"][key] = value
    try:
        read_checkpoint(s, "ck")
    except CheckpointError as e:
        assert "\n" not in str(e)
        return
    m = build_models(ModelConfig(**s["model_config"]))  # accepted: it loads into the model it declares
    m.G.load_state_dict(s["G"])
    m.D.load_state_dict(s["D"])


def test_a_good_checkpoint_passes():
    assert read_checkpoint(copy.deepcopy(GOOD), "ck").step == 3


def test_a_10_gb_model_config_is_refused_by_counting_not_allocating():
    mc = ModelConfig(**{**MC, "stage": 2, "gf_dim": 2048, "res_blocks": 64, "text_dim": 1024})
    with pytest.raises(CheckpointError, match="M parameters"):
        check_size(mc, "ck")
    assert MAX_MODEL_PARAMS * 4 < 10 << 30


@pytest.mark.parametrize("bad", ["missing G key", "wrong shape", "string for a number", "unknown model_config key",
                                 "gf_dim 3232", "encoder dim 1e10"])
def test_inspect_and_sample_refuse_a_rehashed_lie_in_one_line(tmp_path, capsys, bad):
    s = copy.deepcopy(GOOD)
    BAD[bad](s)
    run = str(tmp_path / "run")
    commit(run, s)
    for argv in (["inspect", run], ["sample", run, "--text", "a red circle", "--out", str(tmp_path / "s.png")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "checkpoint" in err, err
    assert not os.path.exists(tmp_path / "s.png")


def test_inspect_of_a_good_checkpoint_is_valid(tmp_path, capsys):
    run = str(tmp_path / "run")
    commit(run, copy.deepcopy(GOOD))
    assert main(["inspect", run]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["valid"] is True and out["step"] == 3


def test_hostile_model_configs_do_not_raise_peak_memory_by_500_mb(tmp_path):
    """In a fresh process (so the peak is this command's): imports and a good inspect first, then inspect and
    sample on each hostile checkpoint; the peak RSS may not grow by more than 500 MB over the baseline."""
    runs = {}
    for bad in ("gf_dim 3232", "encoder dim 1e10", "wrong shape"):
        s = copy.deepcopy(GOOD)
        BAD[bad](s)
        runs[bad] = str(tmp_path / bad.replace(" ", "_"))
        commit(runs[bad], s)
    big = copy.deepcopy(GOOD)  # a config of ~10 GB of weights that passes every per-key bound
    big["model_config"].update(stage=2, gf_dim=2048, res_blocks=64, text_dim=1024)
    big["text_encoder"]["dim"] = 1024
    runs["10 GB"] = str(tmp_path / "ten_gb")
    commit(runs["10 GB"], big)
    good = str(tmp_path / "good")
    commit(good, copy.deepcopy(GOOD))
    code = textwrap.dedent(f"""
        import json, resource, sys
        from stackgan_dist.cli import main
        assert main(["inspect", {good!r}]) == 0
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        codes = []
        for run in {list(runs.values())!r}:
            codes.append(main(["inspect", run]))
            codes.append(main(["sample", run, "--text", "a red circle", "--out", {str(tmp_path / 'x.png')!r}]))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"codes": codes, "grew_kb": peak - base}}))
    """)
    p = subprocess.run([PY, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["codes"] == [2] * (2 * len(runs)), (res, p.stderr[-2000:])
    assert res["grew_kb"] < 500 * 1024, res


WRITER = """
import json, os, sys, torch
from stackgan_dist.checkpoint.manager import CheckpointManager
from stackgan_dist.config import ModelConfig
from stackgan_dist.distributed.env import DistEnv
from stackgan_dist.models.build import build_models
run, stop, mc = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
m = build_models(ModelConfig(**mc))
state = {"format_version": 2, "train_state": {"step": 0, "images_seen": 0, "epoch": 0, "cursor": {}, "schedule": {}},
         "G": m.G.state_dict(), "D": m.D.state_dict(), "strategy": {}, "model_config": mc, "config": {},
         "text_encoder": {"name": "hashing", "dim": mc["text_dim"]}, "world_size": 1}
mgr = CheckpointManager(run, DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")), keep_last=1)
step = 0
while not os.path.exists(stop) and step < 100000:
    step += 1
    state["train_state"]["step"] = step
    mgr.save(step, state, {"format_version": 2, "rank": 0})
print(step)
"""


def test_readers_of_a_live_run_take_the_newest_valid_checkpoint_while_it_is_pruned(tmp_path):
    """A real writer process commits checkpoints back to back with keep_last=1 (each prunes the one before);
    inspect and load_run on the run directory meanwhile always succeed, on ever newer steps."""
    from conftest import wait_for
    from stackgan_dist.inference import inspect, load_run

    run, stop = tmp_path / "run", tmp_path / "stop"
    p = subprocess.Popen([PY, "-c", WRITER, str(run), str(stop), json.dumps(MC)], cwd=REPO, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        wait_for(lambda: (run / "checkpoints" / "latest").exists(), p, what="the writer's first checkpoint")
        steps = []
        for i in range(30):
            steps.append(inspect(str(run))["step"] if i % 3 else load_run(str(run)).step)
    finally:
        stop.touch()
        out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-2000:]
    written = int(out.strip().splitlines()[-1])
    assert steps == sorted(steps) and steps[-1] > steps[0], steps
    assert written > 30, f"the writer committed only {written} checkpoints: the reads raced nothing"


def test_an_embeddings_header_claiming_a_huge_array_is_refused_before_reading(tmp_path, capsys):
    import struct

    run = str(tmp_path / "run")
    commit(run, copy.deepcopy(GOOD))
    hdr = "{'descr': '<f4', 'fortran_order': False, 'shape': (100000000000, 64), }"
    hdr = hdr + " " * (118 - len(hdr)) + "\n"
    (tmp_path / "huge.npy").write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(hdr)) + hdr.encode() + b"\0" * 64)
    (tmp_path / "text.npy").write_text("not an array")
    for name, what in (("huge.npy", "100000000000"), ("text.npy", "magic")):
        assert main(["sample", run, "--embeddings", str(tmp_path / name), "--out", str(tmp_path / "o.png")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and what in err, err
    import numpy as np

    np.save(tmp_path / "ok.npy", np.zeros((2, 64), np.float32))
    assert main(["sample", run, "--embeddings", str(tmp_path / "ok.npy"), "--num", "1", "--out",
                 str(tmp_path / "o.png")]) == 0


def test_a_manifest_of_a_newer_version_is_refused_in_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    ck = commit(str(run), copy.deepcopy(GOOD))
    man = json.loads((tmp_path / "run" / "checkpoints" / os.path.basename(ck) / "manifest.json").read_text())
    man["version"] = 99
    (tmp_path / "run" / "checkpoints" / os.path.basename(ck) / "manifest.json").write_text(json.dumps(man))
    assert main(["inspect", ck]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "newer" in err, err


# -- the optimizer state of a resumed checkpoint ------------------------------------------------------------

def _adam():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    from stackgan_dist.distributed.optim import make_adam

    opt = make_adam(net.parameters(), 2e-4, (0.5, 0.999), torch.device("cpu"))
    net(torch.ones(2, 3)).sum().backward()
    opt.step()
    return opt


def _lie(sd, kind):
    st, g = sd["state"], sd["param_groups"][0]
    if kind == "moment_shape":
        st[1]["exp_avg"] = torch.zeros(7)
    elif kind == "moment_not_a_tensor":
        st[0]["exp_avg_sq"] = [0.0] * 12
    elif kind == "moment_of_ints":
        st[2]["exp_avg"] = torch.zeros(4, 4, dtype=torch.int64)
    elif kind == "step_a_vector":
        st[0]["step"] = torch.zeros(3)
    elif kind == "unknown_entry":
        st[0]["momentum_buffer"] = torch.zeros(4, 3)
    elif kind == "state_for_no_parameter":
        st[99] = {"exp_avg": torch.zeros(1)}
    elif kind == "state_not_a_dict":
        st[0] = "exp_avg"
    elif kind == "nan_lr":
        g["lr"] = float("nan")
    elif kind == "bad_betas":
        g["betas"] = (0.5,)
    elif kind == "fewer_parameters":
        g["params"] = g["params"][:-1]
    elif kind == "two_groups":
        sd["param_groups"] = [g, dict(g)]
    elif kind == "not_a_state":
        return {"state": []}
    return sd


LIES = ("moment_shape", "moment_not_a_tensor", "moment_of_ints", "step_a_vector", "unknown_entry",
        "state_for_no_parameter", "state_not_a_dict", "nan_lr", "bad_betas", "fewer_parameters", "two_groups",
        "not_a_state")


@pytest.mark.parametrize("kind", LIES)
def test_an_optimizer_state_that_does_not_fit_is_one_checkpoint_error(kind):
    from stackgan_dist.distributed.optim import check_adam_state

    opt = _adam()
    check_adam_state(opt, opt.state_dict(), "G")  # the real thing passes
    with pytest.raises(CheckpointError) as e:
        check_adam_state(opt, _lie(copy.deepcopy(opt.state_dict()), kind), "G")
    assert "\n" not in str(e.value) and "optimizer state of G" in str(e.value)


def test_a_resume_from_a_resealed_lie_in_the_optimizer_state_is_refused_in_one_line(tiny_stage1_run, synth_data,
                                                                                     tmp_path):
    """Every checkpoint of a run carries an Adam moment of the wrong shape, with a manifest that agrees (as
    whoever wrote the lie would make it): the resume stops with one line before any step, not a traceback at
    the first step."""
    from conftest import run_cli, snapshot, tiny_overrides

    run = tmp_path / "run"
    subprocess.run(["cp", "-a", str(tiny_stage1_run), str(run)], check=True)
    for ck in sorted((run / "checkpoints").glob("step_*")):
        m = torch.load(ck / "model.pt", weights_only=True)
        st = m["strategy"]["opt_g"]["state"]
        st[0]["exp_avg"] = st[0]["exp_avg"].flatten()[:5].clone()
        torch.save(m, ck / "model.pt")
        man = json.loads((ck / "manifest.json").read_text())
        from stackgan_dist.checkpoint.manager import sha256_file

        man["files"]["model.pt"] = {"size": os.path.getsize(ck / "model.pt"), "sha256": sha256_file(ck / "model.pt")}
        (ck / "manifest.json").write_text(json.dumps(man, indent=1))
    before = snapshot(run)
    p = run_cli("train", "configs/demo/stage1.yaml",
                *tiny_overrides(synth_data, run, 1, steps=6, extra=["checkpoint.every_steps=2"]))
    err = [ln for ln in p.stderr.splitlines() if "error" in ln]
    assert p.returncode == 2 and len(err) == 1 and "optimizer state of G" in err[0], p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    assert snapshot(run) == before

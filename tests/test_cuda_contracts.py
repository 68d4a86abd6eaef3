"""What CPU can show of the CUDA path's contracts: the device index each process takes, and that no source
names an index-less CUDA device (torch.cuda.set_device refuses one: the first GPU benchmark died on it)."""
import ast
import os

import pytest

from conftest import REPO
from stackgan_dist.distributed.device import cuda_index
from stackgan_dist.errors import UserError


def test_cuda_index_from_local_rank():
    assert cuda_index(None, 8) == 0 and cuda_index("", 8) == 0  # a plain process
    assert [cuda_index(r, 4) for r in range(4)] == [0, 1, 2, 3]
    assert cuda_index("3", 8) == 3 and cuda_index(" 2 ", 8) == 2  # LOCAL_RANK / SLURM_LOCALID strings
    assert cuda_index(3, 1) == 0  # one GPU bound per task (--gpus-per-task): every rank sees its own as 0
    assert cuda_index(5, 4) == 1
    for bad in ("x", "1.5", -1, "-2"):
        with pytest.raises(UserError, match="LOCAL_RANK"):
            cuda_index(bad, 4)
    with pytest.raises(UserError, match="no CUDA device is visible"):
        cuda_index(0, 0)


def _sources():
    for top in ("stackgan_dist", "benchmarks", "tests"):
        for d, _, files in os.walk(os.path.join(REPO, top)):
            for f in files:
                if f.endswith(".py"):
                    yield os.path.join(d, f)


def _is(node, *names):
    return isinstance(node, ast.Attribute) and node.attr == names[-1] and (
        len(names) == 1 or _is(node.value, *names[:-1])) or isinstance(node, ast.Name) and names == (node.id,)


def test_no_source_uses_an_index_less_cuda_device():
    """``torch.device("cuda")`` / ``set_device("cuda")`` nowhere: every CUDA device is ``cuda:N``."""
    found = []
    for path in _sources():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for n in ast.walk(tree):
            if not isinstance(n, ast.Call) or not n.args:
                continue
            a = n.args[0]
            bare = isinstance(a, ast.Constant) and a.value == "cuda"
            if bare and len(n.args) == 1 and (_is(n.func, "torch", "device") or _is(n.func, "set_device")):
                found.append(f"{os.path.relpath(path, REPO)}:{n.lineno}")
            if _is(n.func, "set_device") and isinstance(a, ast.Call) and _is(a.func, "torch", "device") \
                    and len(a.args) == 1 and not (isinstance(a.args[0], ast.Constant) and ":" in str(a.args[0].value)):
                found.append(f"{os.path.relpath(path, REPO)}:{n.lineno} (set_device of a one-argument device)")
    assert not found, found


def test_throughput_benchmark_takes_the_indexed_device_of_its_local_rank(monkeypatch):
    """The wiring the first GPU run needs, on CPU: torch.cuda is replaced only where no GPU can answer
    (device count, set_device), and set_device must receive ``cuda:LOCAL_RANK``, never a bare "cuda"."""
    import sys

    import torch

    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import throughput

    given = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: given.append(torch.device(d)))
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert throughput.bench_device("cuda") == torch.device("cuda", 1)
    assert given == [torch.device("cuda", 1)] and given[0].index == 1
    assert throughput.bench_device("cpu") == torch.device("cpu")


# -- mixed precision under DeepSpeed: fp32 weights and buffers, bf16/fp16 only as autocast compute ---------

def test_batchnorm_needs_weights_and_running_statistics_in_one_dtype_or_the_amp_mixed_case():
    """Torch alone, on CPU: DeepSpeed's bf16 mode (bf16 weights, fp32 running statistics) fails at once;
    the contract we use instead (fp32 weights and statistics, bf16 activations from autocast) trains."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    bn = nn.BatchNorm2d(3)
    for p in bn.parameters():
        p.data = p.data.bfloat16()  # what DeepSpeed >= 0.19.2 does with bf16.enabled: parameters, not buffers
    with pytest.raises(RuntimeError, match="BFloat16"):
        bn(x.bfloat16())
    net = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = net(x)
    assert y.dtype == torch.bfloat16  # the BatchNorm saw a bf16 input with fp32 weights and statistics
    y.float().square().mean().backward()
    bn = net[1]
    assert bn.weight.grad.dtype == bn.running_mean.dtype == bn.running_var.dtype == torch.float32
    assert not torch.equal(bn.running_mean, torch.zeros(3)) and torch.isfinite(bn.weight.grad).all()


def _ds_cfg(*ov):
    from stackgan_dist.config import load_config

    return load_config(None, ["train.backend=deepspeed", *ov])


@pytest.mark.parametrize("precision,dtype", [("bf16", "bfloat16"), ("fp16", "float16"), ("fp32", None)])
def test_generated_deepspeed_config_keeps_weights_fp32_and_autocasts(precision, dtype):
    from stackgan_dist.distributed.deepspeed import build_ds_config

    zero = 0 if precision == "fp16" else 2
    ds = build_ds_config(_ds_cfg(f"train.precision={precision}", f"train.zero_stage={zero}"), 2)
    assert ds["bf16"] == {"enabled": False} and ds["fp16"] == {"enabled": False}  # no parameter casting
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"}
    if dtype is None:
        assert "torch_autocast" not in ds
    else:  # every gradient reduced in fp32 (no module marked lower-precision-safe), as DDP does
        assert ds["torch_autocast"] == {"enabled": True, "dtype": dtype, "lower_precision_safe_modules": []}


def test_deepspeed_config_refuses_what_breaks_the_dtype_contract(tmp_path):
    import json

    from stackgan_dist.distributed.deepspeed import build_ds_config

    with pytest.raises(UserError, match="fp16 with train.backend=deepspeed needs train.zero_stage=0"):
        build_ds_config(_ds_cfg("train.precision=fp16", "train.zero_stage=2"), 1)
    cases = [({"bf16": {"enabled": True}}, "remove 'bf16'"), ({"fp16": {"enabled": True}}, "remove 'fp16'"),
             ({"data_types": {"buffer_dtype": "bf16"}}, "data_types.buffer_dtype=bf16"),
             ({"torch_autocast": {"enabled": True, "dtype": "float16"}}, "remove 'torch_autocast'")]
    for i, (user, msg) in enumerate(cases):
        p = tmp_path / f"ds{i}.json"
        p.write_text(json.dumps(user))
        with pytest.raises(UserError, match=msg):
            build_ds_config(_ds_cfg("train.precision=bf16", f"train.deepspeed_config={p}"), 1)
    p = tmp_path / "off.json"
    p.write_text(json.dumps({"bf16": {"enabled": False}, "data_types": {"grad_accum_dtype": "fp32"}}))
    assert build_ds_config(_ds_cfg("train.precision=bf16", f"train.deepspeed_config={p}"), 1)["torch_autocast"]


def _engine_dtype_worker(out: str) -> None:
    """One process, gloo, CPU: DeepSpeed engines from our generated bf16 ZeRO-2 config and, for contrast,
    from DeepSpeed's own bf16 mode. Writes what each did."""
    import json

    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(out + ".store", 1), rank=0, world_size=1)
    os.environ.setdefault("LOCAL_RANK", "0")
    import deepspeed

    from stackgan_dist.distributed.deepspeed import build_ds_config, fp32_module_contract
    from stackgan_dist.models.build import build_models

    cfg = _ds_cfg("train.zero_stage=2", "train.precision=bf16", "train.batch_size=4", "model.gf_dim=16",
                  "model.df_dim=8", "model.condition_dim=8", "model.z_dim=8", "model.text_dim=16")
    res = {}
    for mode in ("ours", "deepspeed_bf16_mode"):
        torch.manual_seed(0)
        D = build_models(cfg.model).D
        ds = build_ds_config(cfg, 1)
        img, text = torch.randn(4, 3, 64, 64), torch.randn(4, 16)
        if mode != "ours":
            ds = {k: v for k, v in ds.items() if k != "torch_autocast"} | {"bf16": {"enabled": True}}
            img, text = img.bfloat16(), text.bfloat16()
        eng, *_ = deepspeed.initialize(model=D, optimizer=torch.optim.Adam(D.parameters(), 1e-3), config=ds,
                                       dist_init_required=False)
        r = {"not_fp32": fp32_module_contract(eng.module)}
        bn = next(m for m in eng.module.modules() if isinstance(m, torch.nn.BatchNorm2d))
        before = bn.running_mean.clone()
        try:
            out_ = eng(img, text)
            r["out_dtype"] = str(out_["cond"].dtype)
            eng.backward(out_["cond"].float().mean())
            eng.step()
            r.update(stepped=True, param_dtypes=sorted({str(p.dtype) for p in eng.module.parameters()}),
                     running_mean=str(bn.running_mean.dtype), stats_moved=not torch.equal(before, bn.running_mean))
        except RuntimeError as e:
            r["error"] = str(e).splitlines()[0]
        res[mode] = r
    with open(out, "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()


@pytest.mark.slow
def test_deepspeed_engine_from_our_bf16_config_trains_a_batchnorm_model_on_cpu(tmp_path):
    """The real DeepSpeed engine (CPU accelerator, where torch autocast works in bf16): our config keeps
    every parameter and buffer fp32, the forward runs in bf16 inside the engine, and a ZeRO-2 step
    succeeds; DeepSpeed's own bf16 mode reproduces the defect (bf16 weights, fp32 running statistics)."""
    import json
    import subprocess
    import sys

    out = str(tmp_path / "dtypes.json")
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "engine-dtypes", out], capture_output=True,
                       text=True, timeout=600, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    with open(out) as f:
        res = json.load(f)
    ours, theirs = res["ours"], res["deepspeed_bf16_mode"]
    assert ours["not_fp32"] == [] and ours["out_dtype"] == "torch.bfloat16" and ours["stepped"], ours
    assert ours["param_dtypes"] == ["torch.float32"] and ours["running_mean"] == "torch.float32", ours
    assert ours["stats_moved"], ours
    assert theirs["not_fp32"] and "BFloat16" in theirs.get("error", ""), theirs



# -- loader workers from the CPUs a rank is granted (slurm/train.sbatch asks for 8 per task) ---------------

def test_auto_num_workers_follow_the_granted_cpus():
    from stackgan_dist.config import load_config
    from stackgan_dist.distributed.env import auto_num_workers, granted_cpus, resolve_num_workers

    assert granted_cpus({}, set(range(12))) == 12
    assert granted_cpus({"SLURM_CPUS_PER_TASK": "8"}, set(range(64))) == 8  # no task binding: whole node visible
    assert granted_cpus({"SLURM_CPUS_PER_TASK": "8"}, {0, 1}) == 2  # bound tighter than asked
    assert granted_cpus({"SLURM_CPUS_PER_TASK": "x"}, {0, 1, 2}) == 3
    assert [auto_num_workers(n) for n in (1, 2, 8, 64)] == [0, 1, 7, 16]
    cfg = load_config(None, ["data.num_workers=auto"])  # resolved at start, on the node that runs
    resolved = resolve_num_workers(cfg.data.num_workers)
    assert resolved == auto_num_workers(granted_cpus()) and isinstance(resolved, int)
    assert load_config(None, ["data.num_workers=3"]).data.num_workers == 3


def test_sbatch_asks_for_cpus_and_sizes_workers_from_them(tmp_path):
    """slurm/train.sbatch with a stand-in srun that records its command line: 8 CPUs per task requested,
    data.num_workers=auto added unless the command line sets it."""
    import subprocess
    import sys

    with open(os.path.join(REPO, "slurm", "train.sbatch")) as f:
        assert "#SBATCH --cpus-per-task=8\n" in f.read()
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$SRUN_ARGS"\n')
    (fake / "srun").chmod(0o755)
    for extra, want in (((), "data.num_workers=auto"), (("data.num_workers=3",), "data.num_workers=3")):
        rec = tmp_path / "args"
        env = dict(os.environ, PATH=f"{fake}:/usr/bin:/bin", SRUN_ARGS=str(rec), STACKGAN_PYTHON=sys.executable,
                   STACKGAN_ROOT=REPO, STACKGAN_SITE_ENV=str(tmp_path / "none.env"), SLURM_JOB_ID="1")
        p = subprocess.run(["bash", os.path.join(REPO, "slurm", "train.sbatch"), "configs/demo/stage1.yaml", *extra],
                           capture_output=True, text=True, timeout=60, env=env, cwd=str(tmp_path))
        assert p.returncode == 0, p.stdout + p.stderr
        args = rec.read_text().split()
        assert args[-1] == want and sum(a.startswith("data.num_workers=") for a in args) == 1, args

if __name__ == "__main__":
    import sys

    sys.path.insert(0, REPO)
    if sys.argv[1] == "engine-dtypes":
        _engine_dtype_worker(sys.argv[2])

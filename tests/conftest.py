import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


def run_cli(*args, timeout=600, env=None, check=False, cwd=REPO):
    """Runs `python -m stackgan_dist ARGS` in a real process; returns CompletedProcess."""
    e = dict(os.environ)
    e.setdefault("OMP_NUM_THREADS", "1")
    e.update(env or {})
    p = subprocess.run([PY, "-m", "stackgan_dist", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env=e, cwd=cwd)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nSTDOUT:\n{p.stdout[-3000:]}\nSTDERR:\n{p.stderr[-3000:]}")
    return p


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    """A small synthetic dataset (train 96 / test 24 samples, 3 train shards)."""
    out = tmp_path_factory.mktemp("synth")
    from stackgan_dist.data.synthetic import prepare_synthetic

    prepare_synthetic(str(out), n_train=96, n_test=24, seed=0, text_dim=64, samples_per_shard=32)
    return out


TINY = ["model.gf_dim=16", "model.df_dim=8", "model.condition_dim=16", "model.z_dim=16", "model.text_dim=64",
        "model.res_blocks=1", "train.batch_size=4", "data.num_workers=0", "log.progress=false",
        "log.every_steps=2", "log.sample_every=1000", "checkpoint.every_steps=1000"]


def tiny_overrides(data, run_dir, stage=1, steps=4, extra=()):
    o = [f"run.dir={run_dir}", f"data.train={data}/train", f"data.test={data}/test", f"model.stage={stage}",
         f"train.max_steps={steps}", *TINY]
    return o + list(extra)

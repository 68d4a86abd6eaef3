"""The shipped configs mean what they say: every file under configs/ loads and validates; birds and flowers are
the paper's recipe (plain all-reduce, a global batch of 64, 600 epochs, lr 2e-4 halved every 100 epochs,
fp32, unscaled lr); each PowerSGD variant differs from its base in the gradient all-reduce alone, as its
header says; COCO follows the authors' COCO settings. In-process: no subprocess, no torch start-up."""
from __future__ import annotations

import glob
import os

import pytest
import yaml

from conftest import REPO
from stackgan_dist.config import load_config, preset_overrides

CONFIGS = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"),
                                                             recursive=True))
PRESETS = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "stackgan_dist", "presets", "*.yaml")))
SWEEPS = [p for p in CONFIGS if p.startswith(os.path.join("configs", "sweeps") + os.sep)]  # sweep files, not configs
FULL = [p for p in CONFIGS if p not in SWEEPS]
PAPER = [f"configs/{ds}/stage{s}.yaml" for ds in ("birds", "flowers") for s in (1, 2)]


def test_the_configs_this_file_describes_exist():
    assert set(PAPER) | {"configs/coco/stage1.yaml", "configs/coco/stage2.yaml"} <= set(FULL), FULL
    assert PRESETS, CONFIGS


@pytest.mark.parametrize("path", FULL)
def test_every_config_loads_and_validates(path):
    cfg = load_config(os.path.join(REPO, path))
    assert cfg.model.stage in (1, 2) and cfg.run.dir


@pytest.mark.parametrize("name", [os.path.splitext(os.path.basename(p))[0] for p in PRESETS])
def test_every_preset_applies_over_the_paper_configs(name):
    for path in PAPER:
        load_config(os.path.join(REPO, path), preset_overrides(name))


@pytest.mark.parametrize("path", PAPER)
def test_birds_and_flowers_are_the_papers_recipe(path):
    cfg = load_config(os.path.join(REPO, path))
    t = cfg.train
    assert cfg.distributed.comm_hook == "none"  # plain all-reduce: no PowerSGD, no compression
    assert (t.global_batch, t.lr_scaling, t.lr_warmup_epochs) == (64, "none", 0)
    assert (t.max_epochs, t.lr_g, t.lr_d, t.lr_decay_epochs, t.lr_decay_factor) == (600, 2e-4, 2e-4, 100, 0.5)
    assert (t.beta1, t.beta2, t.precision) == (0.5, 0.999, "fp32")
    raw = open(os.path.join(REPO, path)).read()
    assert "powersgd" not in yaml.safe_load(raw).get("distributed", {}).get("comm_hook", "none")
    assert "precision: fp32" in raw and "bf16" in raw.split("run:")[0]  # stated, and the header explains bf16


def flat(d: dict, pre: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{pre}{k}.") if isinstance(v, dict) else {f"{pre}{k}": v})
    return out


@pytest.mark.parametrize("path", [p for p in FULL if p.endswith("-powersgd.yaml")])
def test_powersgd_variants_change_only_the_all_reduce(path):
    base = path.replace("-powersgd.yaml", ".yaml")
    a, b = flat(load_config(os.path.join(REPO, path)).to_dict()), flat(load_config(os.path.join(REPO, base)).to_dict())
    changed = {k for k in a if a[k] != b[k]}
    assert changed and all(k.startswith("distributed.") for k in changed), changed
    assert a["distributed.comm_hook"] == "powersgd"
    header = open(os.path.join(REPO, path)).read().split("run:")[0]
    assert "UNVALIDATED" in header and "never" in header and os.path.basename(base) in header


def test_every_paper_config_has_a_powersgd_variant():
    assert {p.replace(".yaml", "-powersgd.yaml") for p in PAPER} <= set(FULL)


@pytest.mark.parametrize("stage,batch", [(1, 128), (2, 40)])
def test_coco_follows_the_authors_coco_settings(stage, batch):
    cfg = load_config(os.path.join(REPO, f"configs/coco/stage{stage}.yaml"))
    t, m = cfg.train, cfg.model
    assert (m.stage, m.gf_dim, m.df_dim, t.global_batch, t.max_epochs, t.lr_decay_epochs) == (stage, 192, 96, batch,
                                                                                               120, 20)
    assert (cfg.data.train, cfg.distributed.comm_hook, t.precision) == ("data/coco/train", "none", "fp32")
    if stage == 2:
        assert m.stage1_checkpoint == "runs/coco/stage1"

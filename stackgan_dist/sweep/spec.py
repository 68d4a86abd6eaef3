"""The sweep file and its expansion into trials (pure: no training, no processes, no I/O beyond the file).

A sweep file (docs/sweeps.md) names a base config per stage, a grid and/or random space over config keys,
seeds and a trial count. ``expand`` turns it into an ordered list of ``Trial``s; random draws come from
``random.Random(sweep seed)`` in trial order, so the same file always expands to the same trials (a rerun
must find the trials it started, and three launchers must train the same ones).
"""
from __future__ import annotations

import itertools
import json
import math
import os
import random
from dataclasses import dataclass, field
from typing import Any

from ..config import ConfigError, load_config, parse_override
from ..config_parse import yaml_load as _yaml_load

TOP_KEYS = ("name", "base", "stage", "dir", "overrides", "grid", "random", "seeds", "trials", "seed", "metric",
            "early_stop")
METRIC_KEYS = ("name", "mode", "data", "num_samples", "eval_seed")
EARLY_KEYS = ("rungs", "eta")
DISTRIBUTIONS = ("choice", "uniform", "loguniform")
# keys the sweep itself sets for every trial: a space over them would make trials share a run directory
RESERVED = ("run.dir", "model.stage", "model.stage1_checkpoint")
STAGE_PREFIXES = ("stage1.", "stage2.")


class SweepError(ConfigError):
    """A sweep file or command line the sweep cannot run (exit 2, one line)."""


@dataclass(frozen=True)
class Metric:
    name: str = "color_accuracy"  # a key of `stackgan eval`'s JSON (caption metric: color/shape/size_accuracy)
    mode: str = "max"  # max | min
    data: str = ""  # held-out split to score on (default: the trial's data.test)
    num_samples: int = 0  # 0: one image per held-out sample
    eval_seed: int = 0


@dataclass(frozen=True)
class EarlyStop:
    rungs: tuple[int, ...]  # steps (of the last stage) where a trial outside the top 1/eta stops
    eta: int = 2


@dataclass
class Trial:
    index: int
    changes: dict[str, Any]  # what this trial sets, as the sweep file names the keys (stage prefixes kept)

    @property
    def name(self) -> str:
        return f"t{self.index:03d}"


@dataclass
class Sweep:
    path: str
    name: str
    bases: dict[int, str]  # stage -> base config path
    stages: tuple[int, ...]  # (1,), (2,) or (1, 2)
    dir: str
    overrides: list[str]  # the file's fixed overrides, then the command line's (these win)
    trials: list[Trial] = field(default_factory=list)
    metric: Metric | None = None
    early_stop: EarlyStop | None = None
    seed: int = 0

    def stage_overrides(self, trial: Trial, stage: int) -> list[str]:
        """The ``key=value`` list (before run.dir and the Stage-I link) of ``trial``'s ``stage`` run: keys
        without a prefix apply to every stage, ``stageN.key`` to stage N only."""
        out = []
        for text in self.overrides + [_fmt(k, v) for k, v in trial.changes.items()]:
            key, _, value = text.partition("=")
            for s in (1, 2):
                if key.startswith(f"stage{s}."):
                    if s == stage:
                        out.append(f"{key[len('stageN.'):]}={value}")
                    break
            else:
                out.append(text)
        return out


def _fmt(key: str, value: Any) -> str:
    """``key=value`` that parse_override reads back as ``value`` (JSON is YAML, floats keep their digits)."""
    return f"{key}={json.dumps(value)}"


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise SweepError(msg)


def _num(v, what: str) -> float:
    _need(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), f"{what} must be a finite number, got {v!r}")
    return float(v)


def _check_key(key: Any, where: str, stages: tuple[int, ...]) -> None:
    _need(isinstance(key, str) and key, f"sweep file: {where} keys must be dotted config keys, got {key!r}")
    bare = key
    if key.startswith(STAGE_PREFIXES):
        _need(len(stages) == 2, f"sweep file: {where} key '{key}' has a stage prefix; only a 'stage: both' sweep takes one")
        bare = key.split(".", 1)[1]
    _need(bare not in RESERVED, f"sweep file: {where} key '{key}' is set by the sweep for each trial; it cannot be swept")


def _distribution(key: str, spec: Any) -> tuple[str, list]:
    _need(isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS,
          f"sweep file: random.{key} must be one of {{choice: [..]}}, {{uniform: [lo, hi]}}, {{loguniform: [lo, hi]}}, "
          f"got {spec!r}")
    kind, args = next(iter(spec.items()))
    _need(isinstance(args, list) and args, f"sweep file: random.{key}.{kind} needs a non-empty list, got {args!r}")
    if kind != "choice":
        _need(len(args) == 2, f"sweep file: random.{key}.{kind} needs [lo, hi], got {args!r}")
        lo, hi = (_num(a, f"random.{key}.{kind} bound") for a in args)
        _need(lo < hi, f"sweep file: random.{key}.{kind} needs lo < hi, got {args!r}")
        _need(kind == "uniform" or lo > 0, f"sweep file: random.{key}.loguniform needs lo > 0, got {args!r}")
        return kind, [lo, hi]
    return kind, list(args)


def draw(kind: str, args: list, rng: random.Random):
    if kind == "choice":
        return args[rng.randrange(len(args))]
    if kind == "uniform":
        return rng.uniform(args[0], args[1])
    return math.exp(rng.uniform(math.log(args[0]), math.log(args[1])))


def parse_sweep(data: Any, path: str = "<sweep>", cli_overrides: list[str] | tuple = ()) -> Sweep:
    """A loaded sweep mapping -> Sweep with its trials expanded (every check that needs no config file)."""
    _need(isinstance(data, dict), f"sweep file {path} must hold a mapping")
    unknown = [k for k in data if k not in TOP_KEYS]
    _need(not unknown, f"sweep file {path}: unknown key '{unknown[0] if unknown else ''}' (known: {', '.join(TOP_KEYS)})")
    stage = data.get("stage", 1)
    _need(stage in (1, 2, "both"), f"sweep file {path}: stage must be 1, 2 or both, got {stage!r}")
    stages = (1, 2) if stage == "both" else (int(stage),)
    base = data.get("base")
    if len(stages) == 2:
        _need(isinstance(base, dict) and set(base) == {"stage1", "stage2"},
              f"sweep file {path}: a 'stage: both' sweep needs base: {{stage1: CONFIG, stage2: CONFIG}}")
        bases = {1: base["stage1"], 2: base["stage2"]}
    else:
        _need(isinstance(base, str) and base, f"sweep file {path}: base must be a config path, got {base!r}")
        bases = {stages[0]: base}
    _need(all(isinstance(b, str) and b for b in bases.values()), f"sweep file {path}: base paths must be strings")
    sdir = data.get("dir")
    _need(isinstance(sdir, str) and sdir.strip(), f"sweep file {path}: dir (the sweep directory) is required")
    fixed = data.get("overrides", []) or []
    _need(isinstance(fixed, list) and all(isinstance(x, str) for x in fixed),
          f"sweep file {path}: overrides must be a list of 'key=value' strings")
    overrides = list(fixed) + list(cli_overrides)
    for text in overrides:
        key, _ = parse_override(text)
        _check_key(key, "overrides", stages)
    grid = data.get("grid", {}) or {}
    _need(isinstance(grid, dict), f"sweep file {path}: grid must map config keys to lists of values")
    for k, vals in grid.items():
        _check_key(k, "grid", stages)
        _need(isinstance(vals, list) and vals, f"sweep file {path}: grid.{k} must be a non-empty list")
    space = data.get("random", {}) or {}
    _need(isinstance(space, dict), f"sweep file {path}: random must map config keys to distributions")
    dists = {}
    for k, spec in space.items():
        _check_key(k, "random", stages)
        _need(k not in grid, f"sweep file {path}: '{k}' is in both grid and random")
        dists[k] = _distribution(k, spec)
    seeds = data.get("seeds", [None])
    _need(isinstance(seeds, list) and seeds and all(s is None or (isinstance(s, int) and not isinstance(s, bool)
                                                                  and s >= 0) for s in seeds),
          f"sweep file {path}: seeds must be a non-empty list of integers >= 0")
    _need("train.seed" not in grid and "train.seed" not in dists or seeds == [None],
          f"sweep file {path}: give seeds either as 'seeds' or as train.seed in the space, not both")
    n = data.get("trials", 1)
    _need(isinstance(n, int) and not isinstance(n, bool) and n >= 1, f"sweep file {path}: trials must be an integer >= 1")
    _need(n == 1 or dists, f"sweep file {path}: trials > 1 repeats random draws; add a random space (or use seeds)")
    seed = data.get("seed", 0)
    _need(isinstance(seed, int) and not isinstance(seed, bool), f"sweep file {path}: seed must be an integer")
    sweep = Sweep(path, str(data.get("name") or os.path.splitext(os.path.basename(path))[0]), bases, stages,
                  os.path.abspath(sdir), overrides, metric=_metric(data.get("metric"), path),
                  early_stop=_early(data.get("early_stop"), path), seed=seed)
    sweep.trials = expand(grid, dists, seeds, n, seed)
    _need(len(sweep.trials) <= 10000, f"sweep file {path}: {len(sweep.trials)} trials; at most 10000")
    _need(sweep.early_stop is None or sweep.metric is not None,
          f"sweep file {path}: early_stop needs a metric to compare trials on")
    return sweep


def _metric(m: Any, path: str) -> Metric | None:
    if m is None:
        return None
    _need(isinstance(m, dict), f"sweep file {path}: metric must be a mapping ({', '.join(METRIC_KEYS)})")
    bad = [k for k in m if k not in METRIC_KEYS]
    _need(not bad, f"sweep file {path}: unknown metric key '{bad[0] if bad else ''}' (known: {', '.join(METRIC_KEYS)})")
    out = Metric(**m)
    _need(isinstance(out.name, str) and out.name, f"sweep file {path}: metric.name must be a name")
    _need(out.mode in ("max", "min"), f"sweep file {path}: metric.mode must be max or min, got {out.mode!r}")
    _need(isinstance(out.num_samples, int) and out.num_samples >= 0, f"sweep file {path}: metric.num_samples must be >= 0")
    return out


def _early(e: Any, path: str) -> EarlyStop | None:
    if e is None:
        return None
    _need(isinstance(e, dict) and not [k for k in e if k not in EARLY_KEYS],
          f"sweep file {path}: early_stop must be a mapping with {', '.join(EARLY_KEYS)}")
    rungs, eta = e.get("rungs"), e.get("eta", 2)
    _need(isinstance(rungs, list) and rungs and all(isinstance(r, int) and r > 0 for r in rungs)
          and rungs == sorted(set(rungs)), f"sweep file {path}: early_stop.rungs must be increasing steps > 0")
    _need(isinstance(eta, int) and eta >= 2, f"sweep file {path}: early_stop.eta must be an integer >= 2")
    return EarlyStop(tuple(rungs), eta)


def expand(grid: dict, dists: dict, seeds: list, n: int, seed: int) -> list[Trial]:
    """Trials in a fixed order: random draw (n), then grid point (last key fastest), then seed."""
    rng = random.Random(seed)
    keys = list(grid)
    trials = []
    for _ in range(n):
        for point in itertools.product(*(grid[k] for k in keys)):
            drawn = {k: draw(kind, args, rng) for k, (kind, args) in dists.items()}
            for s in seeds:
                changes = dict(zip(keys, point)) | drawn
                if s is not None:
                    changes["train.seed"] = s
                trials.append(Trial(len(trials), changes))
    return trials


def load_sweep(path: str, cli_overrides: list[str] | tuple = (), check_configs: bool = True) -> Sweep:
    """Read and expand a sweep file; with ``check_configs`` every trial's config of every stage is loaded and
    validated by the config's own rules (unknown keys, types, ranges): a bad key fails here, in one line."""
    if not os.path.isfile(path):
        raise SweepError(f"sweep file not found: {path}")
    try:
        with open(path, "rb") as f:
            data = _yaml_load(f)
    except ConfigError as e:
        raise SweepError(f"sweep file {path}: {e}") from None
    except Exception as e:  # noqa: BLE001 -- yaml errors: the first line names the place
        raise SweepError(f"sweep file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    sweep = parse_sweep(data, path, cli_overrides)
    if check_configs:
        for trial in sweep.trials:
            for stage in sweep.stages:
                try:
                    load_config(sweep.bases[stage], sweep.stage_overrides(trial, stage) + [f"model.stage={stage}"])
                except ConfigError as e:
                    raise SweepError(f"trial {trial.name} stage {stage}: {e}") from None
    return sweep


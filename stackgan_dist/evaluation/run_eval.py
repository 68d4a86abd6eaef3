"""``stackgan eval``: generate from held-out captions and score the images (caption consistency, IS, FID).

Protocol (the paper's, scaled by ``--num-samples``): image i is generated from test caption i mod T (the
first caption of each test sample, in file order) with noise z_i drawn from a generator seeded by
(seed, i), and the CA epsilon at 0 (its mean). So the images do not depend on how many ranks share the
work: under torchrun rank r generates the contiguous range [r n / W, (r+1) n / W) and scores the real
test images [r T / W, (r+1) T / W); torchmetrics gathers the features at ``compute()``.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch
from tqdm import tqdm

from ..data.read.index import resolve_dataset
from ..data.text.device_text import caption_embedder
from ..data.read.reader import read_samples
from ..data.format import CROP_SIZES
from ..checkpoint.files import check_entry, write_atomic
from ..errors import UserError
from ..inference import generate, load_run
from ..observability.images import to_uint8
from .caption import caption_scores, size_word

METRICS = ("caption", "fid", "is")
IS_SPLITS = 10


def _parse_metrics(metrics: str) -> list[str]:
    names = [m.strip() for m in metrics.split(",") if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise UserError(f"unknown metric(s) {unknown or metrics!r}; choose from {', '.join(METRICS)}")
    return names


def _test_stream(info, stage: int, start: int, embedded_later: bool = False):
    """Test samples in file order, forever (cycling), starting at global index ``start``."""
    return read_samples(info, stage, start % info.num_samples, cycle=True, embedded_later=embedded_later)


def _noise(seed: int, lo: int, hi: int, dim: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.random.default_rng([seed, i]).standard_normal(dim, dtype=np.float32)
                                      for i in range(lo, hi)]))


def _caption_counts(images: np.ndarray, batch: list[dict]) -> list[float]:
    """-> [colour hits, shape hits, images, size hits, captions naming a size] for (B, H, W, 3) uint8 images
    generated from (or showing) the batch's first captions. Size is scored on the captions that name one."""
    sc = caption_scores(images, [b["cls"] for b in batch], [size_word(b.get("caption", "")) for b in batch])
    n = len(batch)
    return [sc["color_accuracy"] * n, sc["shape_accuracy"] * n, n, sc["size_accuracy"] * sc["num_sized"],
            sc["num_sized"]]


def _share(n: int, rank: int, world: int) -> tuple[int, int]:
    return n * rank // world, n * (rank + 1) // world


def _all_sum(values: list[float], env) -> list[float]:
    if not env.distributed:
        return values
    from ..distributed.collectives import all_reduce_sum_

    return all_reduce_sum_(torch.tensor(values, dtype=torch.float64, device=env.device), env).tolist()


def evaluate(run_path: str, data: str, metrics: str, num_samples: int = 0, inception_weights: str = "",
             out: str = "", batch_size: int = 50, stage: int = 0, seed: int = 0) -> dict | None:
    """Scores a run or checkpoint; returns the result on rank 0 (None on the others)."""
    from ..distributed.env import init_distributed, teardown

    names = _parse_metrics(metrics)
    if num_samples < 0 or batch_size <= 0:
        raise UserError("--num-samples must be >= 0 and --batch-size positive")
    if "is" in names and 0 < num_samples < IS_SPLITS:
        raise UserError(f"--num-samples {num_samples} is smaller than the {IS_SPLITS} Inception Score splits")
    inception_weights = inception_weights or os.environ.get("STACKGAN_INCEPTION_WEIGHTS", "")
    info = resolve_dataset(data)
    run = load_run(run_path)
    targets = eval_targets(run.path, out)  # unwritable targets are refused before anything is computed
    if stage and run.stage != stage:
        raise UserError(f"{run.path} is a Stage-{run.stage} checkpoint, not Stage-{stage} "
                        f"(--stage {stage}); pass the Stage-{stage} run")
    if info.text_dim != run.model_config.text_dim:
        raise UserError(f"data {data} has text_dim {info.text_dim}, the checkpoint's model has "
                        f"{run.model_config.text_dim}: it was trained on another text encoder")
    enc_data = (info.manifest.get("text_encoder") or {}).get("name")
    enc_run = (run.text_encoder or {}).get("name")
    if enc_data and enc_run and enc_data != enc_run:
        raise UserError(f"data {data} was encoded with {enc_data}, the checkpoint was trained on {enc_run}")
    store = int(info.manifest.get("image_size", 0) or 0)
    if store and store < CROP_SIZES[run.stage]:
        raise UserError(f"data {data} stores {store}px images; Stage-{run.stage} is scored at "
                        f"{CROP_SIZES[run.stage]}px")
    if "caption" in names and "synthetic" not in info.manifest:
        raise UserError(f"the caption metric scores the colour and shape labels of the synthetic dataset, and "
                        f"{data} ('{info.manifest.get('source', 'unknown')}') has none: use --metrics fid,is "
                        "(with --inception-weights)")
    n = num_samples or info.num_samples
    if "is" in names and n < IS_SPLITS:
        raise UserError(f"{n} samples are fewer than the {IS_SPLITS} Inception Score splits (raise --num-samples)")

    env = init_distributed("auto")
    try:
        return _evaluate(env, run, info, names, n, inception_weights, targets, batch_size, seed, data)
    finally:
        teardown(env)


def eval_targets(ck: str, out: str) -> list[str]:
    """Where the JSON goes: ``--out`` and RUN/eval.json when the checkpoint lives in RUN/checkpoints (a step
    folder kept on its own gets only ``--out``). Each is checked writable now, before any image is made."""
    from ..inference import check_output_path, run_dir_of

    targets = [check_output_path(out, "--out")] if out else []
    run_dir = run_dir_of(ck)
    if run_dir is not None:
        check_entry(os.path.join(run_dir, "eval.json"))  # a link or FIFO there: refused before any work
        targets.append(check_output_path(os.path.join(run_dir, "eval.json"), "the run's eval.json"))
    return targets


def _evaluate(env, run, info, names, n, weights, targets, batch_size, seed, data) -> dict | None:
    dev = env.device
    run.G.to(dev)
    if run.G1 is not None:
        run.G1.to(dev)
    scorer = None
    if "fid" in names or "is" in names:
        from .inception import InceptionMetrics

        scorer = InceptionMetrics([m for m in names if m != "caption"], weights, dev, splits=IS_SPLITS)
    zdim = run.model_config.z_dim if run.stage == 1 else run.G1.z_dim
    lo, hi = _share(n, env.rank, env.world_size)
    counts = np.zeros(5)  # colour hits, shape hits, images, size hits, captions naming a size (caption metric)
    # captions embedded on the device (indexed shards, sentence encoder): the dataset's encoder, as in training
    embed = caption_embedder(info.manifest, dev)
    it = _test_stream(info, run.stage, lo, embedded_later=embed is not None)
    with tqdm(total=hi - lo, desc=f"eval rank{env.rank}", unit="img", leave=False, disable=not env.is_main) as bar:
        i = lo
        while i < hi:
            j = min(i + batch_size, hi)
            batch = [next(it) for _ in range(j - i)]
            text = embed([b["caption"] for b in batch]) if embed is not None else \
                torch.stack([b["text"] for b in batch]).to(dev)
            s1, s2 = generate(run, text, _noise(seed, i, j, zdim).to(dev))
            fake = s2 if s2 is not None else s1  # (B, 3, H, W) in [-1, 1]
            if scorer is not None:
                scorer.update(((fake.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8), real=False)
            if "caption" in names:
                counts += _caption_counts(to_uint8(fake), batch)
            bar.update(j - i)
            i = j
    real_counts = np.zeros(5)
    if (scorer is not None and "fid" in names) or "caption" in names:
        rlo, rhi = _share(info.num_samples, env.rank, env.world_size)
        it = _test_stream(info, run.stage, rlo, embedded_later=True)  # only images and classes are read
        i = rlo
        while i < rhi:
            j = min(i + batch_size, rhi)
            batch = [next(it) for _ in range(j - i)]
            real = torch.stack([b["image"] for b in batch])  # uint8 (B, 3, H, W)
            if scorer is not None and "fid" in names:
                scorer.update(real, real=True)
            if "caption" in names:
                real_counts += _caption_counts(real.permute(0, 2, 3, 1).numpy(), batch)
            i = j
    res = {"checkpoint": run.path, "step": run.step, "stage": run.stage, "data": data, "num_samples": n,
           "num_real": info.num_samples, "world_size": env.world_size, "seed": seed}
    if "caption" in names:
        c = _all_sum(list(counts) + list(real_counts), env)
        res.update({"num_images": int(c[2]), "color_accuracy": c[0] / c[2], "shape_accuracy": c[1] / c[2],
                    "size_accuracy": c[3] / max(c[4], 1), "num_sized": int(c[4]),
                    "real_color_accuracy": c[5] / c[7], "real_shape_accuracy": c[6] / c[7],
                    "real_size_accuracy": c[8] / max(c[9], 1)})
    if scorer is not None:
        res.update(scorer.compute(seed))  # collective: every rank
        res["inception_weights"] = os.path.abspath(weights)
        res["inception_classes"] = scorer.classes
    if not env.is_main:
        return None
    for t in targets:  # whole-file writes, no link followed (--out too: its .tmp is ours to create)
        os.makedirs(os.path.dirname(os.path.abspath(t)), exist_ok=True)
        write_atomic(t, json.dumps(res, indent=1), "evaluation result")
    return res

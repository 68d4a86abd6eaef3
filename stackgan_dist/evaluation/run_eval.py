"""``stackgan eval``: generate from held-out captions and score the images."""
from __future__ import annotations

import json
import os

import numpy as np
import torch
from tqdm import tqdm

from ..data.loader import make_loader, resolve_dataset
from ..errors import UserError
from ..inference import generate, load_run
from ..observability.images import to_uint8
from .caption import caption_scores


def evaluate(run_path: str, data: str, metrics: str, num_samples: int = 0, inception_weights: str = "",
             out: str = "", batch_size: int = 50) -> dict:
    names = [m.strip() for m in metrics.split(",") if m.strip()]
    unknown = [m for m in names if m not in ("caption", "fid", "is")]
    if unknown:
        raise UserError(f"unknown metric(s) {unknown}; choose from caption, fid, is")
    run = load_run(run_path)
    info = resolve_dataset(data)
    if info.text_dim != run.model_config.text_dim:
        raise UserError(f"data {data} has text_dim {info.text_dim}, the checkpoint's model has "
                        f"{run.model_config.text_dim}")
    n = num_samples or info.num_samples
    ds, _ = make_loader(info, run.stage, 1, 0, num_workers=0, shuffle_buffer=1, train=False)
    ds.batch_size, ds.batches_per_slot = 1, info.num_samples
    g = torch.Generator().manual_seed(1234)
    zdim = run.model_config.z_dim if run.stage == 1 else run.G1.z_dim
    gen_imgs, classes, real_imgs = [], [], []
    it = ds.slot_batches(0, 0)
    with tqdm(total=n, desc="eval", unit="img", leave=False) as bar:
        while len(classes) < n:
            batch = [next(it) for _ in range(min(batch_size, n - len(classes)))]
            text = torch.cat([b["text"] for b in batch])
            z = torch.randn(text.shape[0], zdim, generator=g)
            s1, s2 = generate(run, text, z)
            gen_imgs.append(to_uint8(s2 if s2 is not None else s1))
            real_imgs.append(torch.cat([b["image"] for b in batch]).permute(0, 2, 3, 1).numpy())
            classes += [int(b["cls"][0]) for b in batch]
            bar.update(len(batch))
    fake = np.concatenate(gen_imgs)
    real = np.concatenate(real_imgs)
    res = {"checkpoint": run.path, "step": run.step, "stage": run.stage, "num_samples": len(classes)}
    if "caption" in names:
        if min(classes) < 0:
            raise UserError(f"the caption metric needs the synthetic dataset's classes; {data} has none")
        res.update(caption_scores(fake, classes))
        res["real_" + "color_accuracy"] = caption_scores(real, classes)["color_accuracy"]
    if "fid" in names or "is" in names:
        from .inception import fid_is  # IS/FID through a maintained library

        res.update(fid_is(fake, real, names, inception_weights))
    targets = [out] if out else []
    targets.append(os.path.join(os.path.dirname(os.path.dirname(run.path)), "eval.json"))
    for t in targets:
        os.makedirs(os.path.dirname(os.path.abspath(t)), exist_ok=True)
        with open(t, "w") as f:
            json.dump(res, f, indent=1)
    return res

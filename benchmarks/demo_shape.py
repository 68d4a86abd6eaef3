"""Cheap measurements for "why does the demo not learn shape" (docs/demo-shape.md). No training.

1. The caption metric on real held-out images at Stage-I size (64), Stage-II size (256) and 64 upscaled to
   256: colour, shape and the new size metric, and the extent distribution of small and large shapes.
2. Is the shape word in the text embedding, and after a CA layer? Linear probes (least squares, one-hot
   targets, fitted on train captions, scored on the held-out ones) for colour, shape and size on the
   hashing embedding, and on mu of a randomly initialised CA layer (with and without the authors' ReLU)
   at the demo's condition_dim; and the share of mu's variance each attribute explains.
3. Wrong pairs: how often a wrong pair differs only in shape (same colour), per wrong-pair mode, over
   batches of the demo's size.

    python benchmarks/demo_shape.py --data data/synthetic [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from stackgan_dist.data.loader import decode  # noqa: E402
from stackgan_dist.data.synthetic import CLASSES, COLORS, SHAPES, SIZE_WORDS  # noqa: E402
from stackgan_dist.evaluation.caption import caption_scores, extent, size_word  # noqa: E402
from stackgan_dist.losses import mismatched_conditions  # noqa: E402
from stackgan_dist.models.conditioning import CondAugment  # noqa: E402


def read_split(split_dir: str, limit: int = 0) -> list[dict]:
    """Samples of a prepared split in file order: jpg bytes, embeddings, captions, class."""
    import tarfile

    man = json.load(open(os.path.join(split_dir, "dataset.json")))
    out: dict = {}
    order = []
    for sh in man["shards"]:
        path = os.path.join(split_dir, os.path.basename(sh["path"]))  # a file name of this split
        with tarfile.open(path) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                if key not in out:
                    out[key] = {"__key__": key}
                    order.append(key)
                out[key][ext] = tf.extractfile(m).read()
        if limit and len(order) >= limit:
            break
    return [out[k] for k in order[:limit or None]]


def real_metric(samples: list[dict]) -> dict:
    res = {}
    rng = np.random.default_rng(0)
    imgs = {64: [], 256: []}
    for s in samples:
        for load, crop in ((76, 64), (304, 256)):
            imgs[crop].append(decode(s, load, crop, rng, 256, train=False)[0].transpose(1, 2, 0))
    classes = [int(s["cls"]) for s in samples]
    caps = [json.loads(s["txt.json"])[0] for s in samples]
    sizes = [size_word(c) for c in caps]
    up = [np.asarray(torch.nn.functional.interpolate(torch.from_numpy(i).permute(2, 0, 1)[None].float(),
                                                     size=256, mode="nearest")[0].permute(1, 2, 0).byte())
          for i in imgs[64]]
    for name, batch in (("real_64", imgs[64]), ("real_256", imgs[256]), ("real_64_up_256", up)):
        res[name] = caption_scores(np.stack(batch), classes, sizes)
    # the extent of every shape, by the size it was drawn at (all captions, named or not: recover it from
    # the drawing seed is not possible here, so use the captions that name it)
    ext = {w: [extent(i) for i, s in zip(imgs[64], sizes) if s == w] for w in SIZE_WORDS}
    res["extent_64"] = {w: {"min": float(np.min(v)), "max": float(np.max(v)), "n": len(v)} for w, v in ext.items()}
    return res


def attributes(caption: str) -> tuple[str, str, str | None]:
    words = caption.lower().split()
    colour = next(w for w in words if w in COLORS)  # the shape's colour comes before the shape word
    shape = next(w for w in words if w in SHAPES)
    return colour, shape, size_word(caption)


def probe(x_tr, y_tr, x_te, y_te) -> float:
    """Least-squares one-hot linear probe (with bias): held-out accuracy."""
    labels = sorted(set(y_tr))
    t = np.array([[y == lab for lab in labels] for y in y_tr], np.float64)
    a = np.hstack([x_tr, np.ones((len(x_tr), 1))])
    w, *_ = np.linalg.lstsq(a, t, rcond=None)
    pred = np.hstack([x_te, np.ones((len(x_te), 1))]) @ w
    return float(np.mean([labels[i] == y for i, y in zip(pred.argmax(1), y_te)]))


def explained(x: np.ndarray, y: list) -> float:
    """Share of the total variance of x explained by the group means of y (between-group / total)."""
    x = x - x.mean(0)
    tot = (x ** 2).sum()
    between = sum(((x[[i for i, v in enumerate(y) if v == g]].mean(0)) ** 2).sum() * y.count(g) for g in set(y))
    return float(between / tot)


def text_probes(train: list[dict], test: list[dict], cond_dim: int) -> dict:
    def caps_emb(samples):
        caps, embs = [], []
        for s in samples:
            c = json.loads(s["txt.json"])
            e = np.load(__import__("io").BytesIO(s["emb.npy"]))
            caps += c
            embs.append(e)
        return caps, np.concatenate(embs)

    cap_tr, e_tr = caps_emb(train)
    cap_te, e_te = caps_emb(test)
    a_tr, a_te = [attributes(c) for c in cap_tr], [attributes(c) for c in cap_te]
    out = {"num_train_captions": len(cap_tr), "num_test_captions": len(cap_te)}
    torch.manual_seed(0)
    spaces = {"hashing_embedding": (e_tr, e_te)}
    for relu in (False, True):
        ca = CondAugment(e_tr.shape[1], cond_dim, relu)
        torch.nn.init.normal_(ca.fc.weight, 0.0, 0.02)  # the project's init (models/layers.init_weights)
        torch.nn.init.zeros_(ca.fc.bias)
        with torch.no_grad():
            mu_tr = ca(torch.from_numpy(e_tr), torch.zeros(len(e_tr), cond_dim))[1].numpy()
            mu_te = ca(torch.from_numpy(e_te), torch.zeros(len(e_te), cond_dim))[1].numpy()
        spaces[f"ca_mu_init{'_relu' if relu else ''}_{cond_dim}d"] = (mu_tr, mu_te)
    for name, (xtr, xte) in spaces.items():
        row = {}
        for k, attr in enumerate(("colour", "shape", "size")):
            keep_tr = [i for i, a in enumerate(a_tr) if a[k] is not None]
            keep_te = [i for i, a in enumerate(a_te) if a[k] is not None]
            row[f"{attr}_probe_acc"] = probe(xtr[keep_tr], [a_tr[i][k] for i in keep_tr], xte[keep_te],
                                             [a_te[i][k] for i in keep_te])
            row[f"{attr}_variance_share"] = explained(xte[keep_te], [a_te[i][k] for i in keep_te])
        out[name] = row
    return out


def wrong_pairs(samples: list[dict], batch: int, trials: int = 2000) -> dict:
    cls = np.array([int(s["cls"]) for s in samples])
    rng = np.random.default_rng(0)
    res = {}
    for mode in ("other_class", "shift"):
        n = same_class = shape_only = colour_only = 0
        for _ in range(trials):
            c = torch.from_numpy(rng.choice(cls, batch))
            w = mismatched_conditions(c[:, None].float(), c, mode)[:, 0].long()
            r = c[:len(w)]
            for a, b in zip(r.tolist(), w.tolist()):
                (ca, sa), (cb, sb) = CLASSES[a], CLASSES[b]
                n += 1
                same_class += a == b
                shape_only += ca == cb and sa != sb
                colour_only += ca != cb and sa == sb
        res[mode] = {"pairs": n, "same_class": same_class / n, "shape_only": shape_only / n,
                     "colour_only_same_shape": colour_only / n}
    return res


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="data/synthetic")
    p.add_argument("--condition-dim", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--json", default="")
    a = p.parse_args(argv)
    test = read_split(os.path.join(a.data, "test"))
    train = read_split(os.path.join(a.data, "train"), limit=800)
    out = {"data": a.data, "num_test": len(test), "metric_on_real": real_metric(test),
           "text": text_probes(train, test, a.condition_dim), "wrong_pairs": wrong_pairs(train, a.batch)}
    s = json.dumps(out, indent=1)
    print(s)
    if a.json:
        with open(a.json, "w") as f:
            f.write(s)
    return out


if __name__ == "__main__":
    main()

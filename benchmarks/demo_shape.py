"""Cheap measurements for "why does the demo not learn shape" (docs/demo.md). No training.

1. The caption metric on real held-out images at Stage-I size (64), Stage-II size (256) and 64 upscaled to
   256: colour, shape and the new size metric, and the extent distribution of small and large shapes.
2. Is the shape word in the text embedding, and after a CA layer? Linear probes (least squares, one-hot
   targets, fitted on train captions, scored on the held-out ones) for colour, shape and size on the
   hashing embedding, and on mu of a randomly initialised CA layer (with and without the authors' ReLU)
   at the demo's condition_dim; and the share of mu's variance each attribute explains.
3. Wrong pairs: how often a wrong pair differs only in shape (same colour), per wrong-pair mode, over
   batches of the demo's size.

With ``--run RUN`` (a trained Stage-I or Stage-II run or checkpoint), on that generator instead (seconds):

4. Does shape vary with z, and with the shape word? For held-out captions, several z each: the share of
   images classified as each shape, by the shape the caption names, and the continuous shape features the
   metric reads (box fill: a square fills its box; taper: an upright triangle's top third over its bottom
   third), so a partial shape signal shows before the accuracy moves.
5. Linear probes of the TRAINED CA mean (G.ca) per attribute, the variance share, and the KL per
   attribute direction (does the KL term collapse shape?).
6. Stage-II runs: Stage-I upscaled vs Stage-II on colour, shape, size, sharpness (gradient-weighted
   mean gradient of the grey image, both at 256; blur lowers it), total variation (mean gradient: blur
   does not lower it, ringing raises it) and fringes (the share of pixels near neither the background
   nor the foreground colour), and a frame along the image border (foreground near the border, the step
   between the outer pixel ring and the ring 3 px in).

    python benchmarks/demo_shape.py --data data/synthetic [--json out.json] [--run runs/demo/stage1]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from stackgan_dist.data.read.decode import decode  # noqa: E402
from stackgan_dist.data.prepare.synthetic import CLASSES, COLORS, SHAPES, SIZE_WORDS  # noqa: E402
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
            imgs[crop].append(decode(s, load, crop, rng, 256, train=False).image.transpose(1, 2, 0))
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
        out[name] = attribute_probes(xtr, xte, a_tr, a_te)
    return out


def _named(attrs, k: int) -> list[int]:
    """Indices of the captions that name attribute ``k`` (colour, shape, size)."""
    return [i for i, a in enumerate(attrs) if a[k] is not None]


def attribute_probes(xtr, xte, a_tr, a_te) -> dict:
    """Per attribute: a linear probe's held-out accuracy and the variance share its group means explain."""
    row = {}
    for k, attr in enumerate(("colour", "shape", "size")):
        keep_tr, keep_te = _named(a_tr, k), _named(a_te, k)
        row[f"{attr}_probe_acc"] = probe(xtr[keep_tr], [a_tr[i][k] for i in keep_tr], xte[keep_te],
                                         [a_te[i][k] for i in keep_te])
        row[f"{attr}_variance_share"] = explained(xte[keep_te], [a_te[i][k] for i in keep_te])
    return row


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


def shape_features(img: np.ndarray) -> tuple[float, float] | None:
    """(box fill, taper) of the foreground, as evaluation/caption.classify reads them; None: no foreground."""
    from stackgan_dist.evaluation.caption import _foreground

    fg = _foreground(img)
    if fg is None:
        return None
    mask = fg[0]
    ys, xs = np.nonzero(mask)
    y0, y1 = np.percentile(ys, [1, 99])
    x0, x1 = np.percentile(xs, [1, 99])
    box = mask[int(y0):int(y1) + 1, int(x0):int(x1) + 1]
    rows = box.sum(axis=1).astype(np.float32)
    third = max(len(rows) // 3, 1)
    return float(box.mean()), float(rows[:third].mean() / max(rows[-third:].mean(), 1.0))


def _grad(img: np.ndarray) -> np.ndarray:
    g = img.astype(np.float32).mean(axis=2)
    return np.hypot(np.diff(g, axis=0)[:, :-1], np.diff(g, axis=1)[:-1, :])


def total_variation(img: np.ndarray) -> float:
    """Mean gradient magnitude of the grey image (0-255 scale per pixel step), (H, W, 3) uint8. Blur leaves it
    (about) unchanged: across a monotone edge the gradients sum to the step height however wide the edge is;
    ringing, fringes and noise raise it."""
    return float(np.mean(_grad(img)))


def sharpness(img: np.ndarray) -> float:
    """Gradient-weighted mean gradient magnitude, E[g^2] / E[g] of the grey image: about the step height over
    the edge's width in pixels, so blur lowers it (0 on a flat image). (H, W, 3) uint8."""
    g = _grad(img)
    return float((g ** 2).mean() / max(g.mean(), 1e-12))


def off_colour_share(img: np.ndarray) -> float:
    """Share of the pixels near neither the background (border median) nor the foreground's median colour
    (RGB distance > 60 from both): blur bands and coloured fringes; a real image has only its anti-aliased
    outline there. (H, W, 3) uint8; 0 where no foreground is found."""
    from stackgan_dist.evaluation.caption import _foreground

    fg = _foreground(img)
    if fg is None:
        return 0.0
    a = img.astype(np.float32)
    h, w, _ = a.shape
    b = max(1, h // 32)
    border = np.concatenate([a[:b].reshape(-1, 3), a[-b:].reshape(-1, 3), a[:, :b].reshape(-1, 3),
                             a[:, -b:].reshape(-1, 3)])
    far_bg = np.linalg.norm(a - np.median(border, axis=0), axis=2) > 60.0
    far_fg = np.linalg.norm(a - fg[1], axis=2) > 60.0
    return float(np.mean(far_bg & far_fg))


def border_frame(img: np.ndarray, band: int = 8) -> tuple[float, float]:
    """(share of the foreground within ``band`` px of the image border, mean |outer pixel ring - the ring 3 px
    in|): a frame drawn along the border shows in both; real images have about 0 of each. (H, W, 3) uint8."""
    from stackgan_dist.evaluation.caption import _foreground

    a = img.astype(np.float32)
    ring = float(np.mean([np.abs(a[0] - a[3]).mean(), np.abs(a[:, 0] - a[:, 3]).mean(),
                          np.abs(a[-1] - a[-4]).mean(), np.abs(a[:, -1] - a[:, -4]).mean()]))
    fg = _foreground(img)
    if fg is None:
        return 0.0, ring
    m = fg[0]
    inner = np.zeros_like(m)
    inner[band:-band, band:-band] = True
    return float(m[~inner].sum() / max(m.sum(), 1)), ring


def _mean(xs) -> float | None:
    """The mean, or None (JSON null) where there is nothing to average."""
    xs = list(xs)
    return float(np.mean(xs)) if xs else None


def _embeddings(samples: list[dict]) -> tuple[list[str], np.ndarray]:
    import io

    caps, embs = [], []
    for s in samples:
        caps += json.loads(s["txt.json"])
        embs.append(np.load(io.BytesIO(s["emb.npy"])))
    return caps, np.concatenate(embs).astype(np.float32)


@torch.no_grad()
def trained_run(run_path: str, train: list[dict], test: list[dict], per_caption: int = 8, captions: int = 60,
                seed: int = 0) -> dict:
    from stackgan_dist.evaluation.caption import classify, classify_size
    from stackgan_dist.inference import generate, load_run
    from stackgan_dist.observability.images import to_uint8

    torch.set_grad_enabled(False)
    run = load_run(run_path)
    out: dict = {"run": run.path, "step": run.step, "stage": run.stage}
    G1 = run.G if run.stage == 1 else run.G1
    zdim = G1.z_dim
    cap_te, e_te = _embeddings(test)
    # the first caption of each of the first `captions` test images, each with `per_caption` z
    first = [5 * i for i in range(min(captions, len(test)))]
    text = torch.from_numpy(e_te[first]).repeat_interleave(per_caption, 0)
    z = torch.from_numpy(np.random.default_rng(seed).standard_normal((len(text), zdim), dtype=np.float32))
    s1, s2 = generate(run, text, z)
    want = [attributes(cap_te[i]) for i in first for _ in range(per_caption)]
    views = {"stage1_64": to_uint8(s1)}
    if s2 is not None:
        up = torch.nn.functional.interpolate(s1, size=s2.shape[-1], mode="bilinear", align_corners=False)
        views.update({"stage1_up_256": to_uint8(up), "stage2_256": to_uint8(s2)})
    for name, imgs in views.items():
        got = [classify(im) for im in imgs]
        sizes = [classify_size(im) for im in imgs]
        feats = [shape_features(im) for im in imgs]
        row: dict = {"colour_acc": float(np.mean([g[0] == w[0] for g, w in zip(got, want)])),
                     "shape_acc": float(np.mean([g[1] == w[1] for g, w in zip(got, want)])),
                     "size_acc": _mean(s == w[2] for s, w in zip(sizes, want) if w[2] is not None),
                     "sharpness": float(np.mean([sharpness(im) for im in imgs])),
                     "total_variation": float(np.mean([total_variation(im) for im in imgs])),
                     "off_colour_share": float(np.mean([off_colour_share(im) for im in imgs]))}
        frames = [border_frame(im, max(1, im.shape[0] // 32)) for im in imgs]
        row["fg_near_border"] = float(np.mean([f[0] for f in frames]))
        row["border_ring_step"] = float(np.mean([f[1] for f in frames]))
        by_shape = {}
        for sh in SHAPES:
            idx = [k for k, w in enumerate(want) if w[1] == sh]
            f = [feats[k] for k in idx if feats[k] is not None]
            by_shape[sh] = {"classified_as": {t: _mean(got[k][1] == t for k in idx) for t in SHAPES},
                            "fill": _mean(a for a, _ in f), "taper": _mean(b for _, b in f)}
        row["by_named_shape"] = by_shape
        # z vs caption: how often two z of the same caption are classified as different shapes
        per = [[got[c * per_caption + k][1] for k in range(per_caption)] for c in range(len(first))]
        row["shape_varies_with_z"] = float(np.mean([len(set(p)) > 1 for p in per]))
        row["distinct_shapes_per_caption"] = float(np.mean([len(set(p)) for p in per]))
        out[name] = row
    # the trained CA mean of the generator that draws the shape (Stage-I's)
    cap_tr, e_tr = _embeddings(train)
    a_tr, a_te = [attributes(c) for c in cap_tr], [attributes(c) for c in cap_te]
    z_tr = torch.zeros(len(e_tr), G1.ca.cond_dim)
    _, mu_tr, lv_tr = G1.ca(torch.from_numpy(e_tr), z_tr)
    _, mu_te, lv_te = G1.ca(torch.from_numpy(e_te), torch.zeros(len(e_te), G1.ca.cond_dim))
    mu_tr, mu_te, lv_te = mu_tr.numpy(), mu_te.numpy(), lv_te.numpy()
    ca = {"kl_per_dim_mean": float(np.mean(0.5 * (mu_te ** 2 + np.exp(lv_te) - 1 - lv_te))),
          "sigma_mean": float(np.mean(np.exp(0.5 * lv_te)))}
    ca.update(attribute_probes(mu_tr, mu_te, a_tr, a_te))
    for k, attr in enumerate(("colour", "shape", "size")):
        keep_te = _named(a_te, k)
        # the group means' spread against the noise the CA adds (sigma): signal-to-noise per attribute
        groups = sorted({a_te[i][k] for i in keep_te})
        means = np.stack([mu_te[[i for i in keep_te if a_te[i][k] == g]].mean(0) for g in groups])
        ca[f"{attr}_mean_spread_over_sigma"] = float(np.linalg.norm(means - means.mean(0), axis=1).mean()
                                                     / np.sqrt(np.mean(np.exp(lv_te)) * mu_te.shape[1]))
    out["trained_ca_mu"] = ca
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="data/synthetic")
    p.add_argument("--condition-dim", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--json", default="")
    p.add_argument("--run", default="", help="a trained run or checkpoint: measurements 4-6 on it instead")
    p.add_argument("--per-caption", type=int, default=8, help="--run: z per caption")
    a = p.parse_args(argv)
    test = read_split(os.path.join(a.data, "test"))
    train = read_split(os.path.join(a.data, "train"), limit=800)
    if a.run:
        out = trained_run(a.run, train, test, a.per_caption)
    else:
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

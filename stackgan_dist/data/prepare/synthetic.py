"""The embedded default dataset: coloured shapes on coloured backgrounds, several captions each.

Closed vocabulary, so the hashing encoder suffices, and an exact evaluation exists: the caption names
the shape's colour, the shape and the background colour (see evaluation/caption.py).
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw

from ..text.text_encoders import HashingEncoder
from .writer import DEFAULT_SHARD_BYTES, make_sample, write_manifest, write_parallel

# Well separated in RGB so the dominant colour of a blurry generated image is still unambiguous.
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 190),
    "white": (245, 245, 245),
}
BACKGROUNDS = {
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "blue": (30, 60, 220),
    "green": (30, 170, 50),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle")
SIZE_WORDS = {"small": (0.28, 0.38), "large": (0.45, 0.6)}
PHRASINGS = (
    "a {size} {color} {shape} on a {bg} background",
    "a {color} {shape} in front of a {bg} background",
    "this picture shows a {size} {color} {shape} over {bg}",
    "{bg} background with a {color} {shape}",
    "the {color} {shape} sits on a {bg} backdrop",
    "there is one {size} {color} {shape} and the background is {bg}",
)
CLASSES = [(c, s) for c in COLORS for s in SHAPES]  # class id = colour x shape


def caption(color: str, shape: str, bg: str, size: str = "small", phrasing: int = 0) -> str:
    return PHRASINGS[phrasing % len(PHRASINGS)].format(color=color, shape=shape, bg=bg, size=size)


def draw(color: str, shape: str, bg: str, rng: np.random.Generator, size: int = 304, scale: tuple = (0.3, 0.5)):
    img = Image.new("RGB", (size, size), BACKGROUNDS[bg])
    d = ImageDraw.Draw(img)
    side = rng.uniform(*scale) * size
    # keep the whole shape inside the central 64/76 crop window with margin
    margin = size * 6 / 76
    cx = rng.uniform(margin + side / 2, size - margin - side / 2)
    cy = rng.uniform(margin + side / 2, size - margin - side / 2)
    box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    fill = COLORS[color]
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([(cx, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fill)
    return img


def sample_attributes(rng: np.random.Generator):
    color = list(COLORS)[rng.integers(len(COLORS))]
    bgs = [b for b in BACKGROUNDS if BACKGROUNDS[b] != COLORS[color]]
    bg = bgs[rng.integers(len(bgs))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    size = list(SIZE_WORDS)[rng.integers(len(SIZE_WORDS))]
    return color, shape, bg, size


def write_split(out_dir: str, n: int, seed: int, text_dim: int = 256, captions_per_image: int = 5,
                samples_per_shard: int = 1000, desc: str = "", workers: int = 1,
                max_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True) -> dict:
    enc = HashingEncoder(text_dim)

    def build(i: int) -> dict:
        rng = np.random.default_rng([seed, i])  # per sample: the same data whatever the number of workers
        color, shape, bg, size = sample_attributes(rng)
        img = draw(color, shape, bg, rng, scale=SIZE_WORDS[size])
        start = int(rng.integers(len(PHRASINGS)))
        caps = [caption(color, shape, bg, size, start + k) for k in range(captions_per_image)]
        cls = CLASSES.index((color, shape))
        return make_sample(f"{i:08d}", img, enc.encode(caps), caps, cls)

    shards, _ = write_parallel(out_dir, n, build, workers, samples_per_shard, max_bytes,
                               desc or f"synthetic {os.path.basename(out_dir)}", progress=progress)
    return write_manifest(out_dir, shards, enc.spec(), "synthetic",
                          {"synthetic": {"seed": seed, "colors": list(COLORS), "shapes": list(SHAPES),
                                         "backgrounds": list(BACKGROUNDS)}})


def prepare_synthetic(out: str, n_train: int = 2000, n_test: int = 200, seed: int = 0, text_dim: int = 256,
                      samples_per_shard: int = 500, workers: int = 1, max_bytes: int = DEFAULT_SHARD_BYTES,
                      progress: bool = True) -> dict:
    if n_train < 1 or n_test < 0 or samples_per_shard < 1:
        from ...errors import UserError

        raise UserError(f"prepare synthetic needs --train >= 1, --test >= 0 and samples per shard >= 1; got "
                        f"{n_train}, {n_test}, {samples_per_shard}")
    train = write_split(os.path.join(out, "train"), n_train, seed, text_dim, samples_per_shard=samples_per_shard,
                        desc="synthetic train", workers=workers, max_bytes=max_bytes, progress=progress)
    test = write_split(os.path.join(out, "test"), n_test, seed + 1_000_003, text_dim,
                       samples_per_shard=samples_per_shard, desc="synthetic test", workers=workers,
                       max_bytes=max_bytes, progress=progress)
    return {"train": train, "test": test}

"""Generates small fixtures in the layout of the StackGAN data releases (used by tests and the benchmark).

birds:   ROOT/{train,test}/{filenames,char-CNN-RNN-embeddings,class_info}.pickle,
         ROOT/CUB_200_2011/{images.txt,bounding_boxes.txt,images/<class>/<name>.jpg}, ROOT/text_c10/<name>.txt
flowers: ROOT/{train,test}/..., ROOT/jpg/image_NNNNN.jpg, ROOT/text_c10/class_NNNNN/image_NNNNN.txt
Pickles use protocol 2, as the Python-2 originals do.
"""
from __future__ import annotations

import os
import pickle

import numpy as np
from PIL import Image, ImageDraw


def _photo(rng, w, h, box=None) -> Image.Image:
    """A noisy full-size 'photo' (noise keeps JPEG sizes realistic) with an ellipse where the box is."""
    base = rng.integers(0, 256, 3)
    a = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(a)
    if box is not None:
        x, y, bw, bh = box
        ImageDraw.Draw(img).ellipse((x, y, x + bw, y + bh), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return img


def _dump(obj, path):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def make_birds(root: str, n_train: int = 6, n_test: int = 4, size=(500, 375), dim: int = 32, n_caps: int = 10,
               seed: int = 0, captions: bool = True, quality: int = 90) -> dict:
    rng = np.random.default_rng(seed)
    cub = os.path.join(root, "CUB_200_2011")
    os.makedirs(os.path.join(cub, "images"), exist_ok=True)
    lines_img, lines_box, splits = [], [], {"train": [], "test": []}
    boxes = {}
    for i in range(n_train + n_test):
        cls = 1 + i % 3
        cdir = f"{cls:03d}.Bird_{cls}"
        name = f"{cdir}/Bird_{cls}_{i:04d}"
        w, h = size
        bw, bh = int(rng.integers(w // 5, w // 2)), int(rng.integers(h // 5, h // 2))
        x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
        os.makedirs(os.path.join(cub, "images", cdir), exist_ok=True)
        _photo(rng, w, h, (x, y, bw, bh)).save(os.path.join(cub, "images", name + ".jpg"), quality=quality)
        lines_img.append(f"{i + 1} {name}.jpg")
        lines_box.append(f"{i + 1} {x}.0 {y}.0 {bw}.0 {bh}.0")
        boxes[name] = (x, y, bw, bh)
        splits["train" if i < n_train else "test"].append((name, cls))
        if captions:
            os.makedirs(os.path.join(root, "text_c10", cdir), exist_ok=True)
            with open(os.path.join(root, "text_c10", name + ".txt"), "w") as f:
                f.write("\n".join(f"bird {i} caption {k}" for k in range(n_caps)) + "\n")
    with open(os.path.join(cub, "images.txt"), "w") as f:
        f.write("\n".join(lines_img) + "\n")
    with open(os.path.join(cub, "bounding_boxes.txt"), "w") as f:
        f.write("\n".join(lines_box) + "\n")
    embs = {}
    for split, items in splits.items():
        d = os.path.join(root, split)
        os.makedirs(d, exist_ok=True)
        emb = rng.normal(size=(len(items), n_caps, dim)).astype(np.float32)
        embs[split] = emb
        _dump([n for n, _ in items], os.path.join(d, "filenames.pickle"))
        _dump(emb, os.path.join(d, "char-CNN-RNN-embeddings.pickle"))
        _dump([c for _, c in items], os.path.join(d, "class_info.pickle"))
    return {"boxes": boxes, "splits": splits, "emb": embs}


def make_flowers(root: str, n_train: int = 5, n_test: int = 3, size=(500, 400), dim: int = 32, n_caps: int = 10,
                 seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "jpg"), exist_ok=True)
    splits = {"train": [], "test": []}
    for i in range(n_train + n_test):
        cls = 1 + i % 2
        base = f"image_{i + 1:05d}"
        _photo(rng, *size).save(os.path.join(root, "jpg", base + ".jpg"), quality=90)
        tdir = os.path.join(root, "text_c10", f"class_{cls:05d}")
        os.makedirs(tdir, exist_ok=True)
        with open(os.path.join(tdir, base + ".txt"), "w") as f:
            f.write("\n".join(f"flower {i} caption {k}" for k in range(n_caps)) + "\n")
        splits["train" if i < n_train else "test"].append((f"jpg/{base}", cls))
    embs = {}
    for split, items in splits.items():
        d = os.path.join(root, split)
        os.makedirs(d, exist_ok=True)
        emb = rng.normal(size=(len(items), n_caps, dim)).astype(np.float32)
        embs[split] = emb
        _dump([n for n, _ in items], os.path.join(d, "filenames.pickle"))
        _dump(list(emb), os.path.join(d, "char-CNN-RNN-embeddings.pickle"))  # a list of arrays, as some copies are
        _dump([c for _, c in items], os.path.join(d, "class_info.pickle"))
    return {"splits": splits, "emb": embs}

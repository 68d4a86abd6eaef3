"""The size metric of the synthetic caption evaluation (evaluation/caption.py)."""
import numpy as np
from PIL import Image

from stackgan_dist.data.synthetic import SHAPES, SIZE_WORDS, caption, draw
from stackgan_dist.evaluation.caption import CLASSES, caption_scores, classify_size, size_word


def _stage1_view(img: Image.Image, crop: int = 64) -> np.ndarray:
    """As the test loader shows it: resized to 76/64 of the crop, centre crop."""
    load = crop * 76 // 64
    a = np.asarray(img.resize((load, load), Image.BICUBIC))
    o = (load - crop) // 2
    return a[o:o + crop, o:o + crop]


def test_size_words_in_captions():
    assert size_word(caption("red", "circle", "black", "small", 0)) == "small"
    assert size_word(caption("red", "circle", "black", "large", 2)) == "large"
    assert size_word(caption("red", "circle", "black", "large", 1)) is None  # a phrasing without a size
    assert size_word("a smallish circle") is None


def test_size_metric_on_drawn_shapes_at_both_stage_sizes():
    rng = np.random.default_rng(0)
    imgs, sizes, classes = {64: [], 256: []}, [], []
    for i in range(60):
        size = list(SIZE_WORDS)[i % 2]
        shape = SHAPES[i % 3]
        img = draw("green", shape, "gray", rng, scale=SIZE_WORDS[size])
        for crop in imgs:
            imgs[crop].append(_stage1_view(img, crop))
        sizes.append(size)
        classes.append(CLASSES.index(("green", shape)))
    for crop in imgs:
        assert [classify_size(a) for a in imgs[crop]] == sizes
        sc = caption_scores(np.stack(imgs[crop]), classes, sizes[:-10] + [None] * 10)
        assert (sc["size_accuracy"], sc["num_sized"], sc["shape_accuracy"]) == (1.0, 50, 1.0)
    # the wrong size everywhere scores 0; no sizes given: no size keys
    flipped = ["small" if s == "large" else "large" for s in sizes]
    assert caption_scores(np.stack(imgs[64]), classes, flipped)["size_accuracy"] == 0.0
    assert "size_accuracy" not in caption_scores(np.stack(imgs[64]), classes)

"""The size metric of the synthetic caption evaluation (evaluation/caption.py)."""
import numpy as np

from conftest import loader_view
from stackgan_dist.data.prepare.synthetic import SHAPES, SIZE_WORDS, caption, draw
from stackgan_dist.evaluation.caption import CLASSES, caption_scores, classify_size, size_word



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
            imgs[crop].append(loader_view(img, crop))
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


def test_eval_caption_counts_size_on_named_captions_only():
    """run_eval's per-batch counts: size hits over the captions that name a size, read from the caption."""
    from stackgan_dist.evaluation.run_eval import _caption_counts

    rng = np.random.default_rng(1)
    batch, imgs = [], []
    for i, (size, phrasing) in enumerate([("small", 0), ("large", 0), ("large", 1), ("small", 2)]):
        shape = SHAPES[i % 3]
        imgs.append(loader_view(draw("red", shape, "black", rng, scale=SIZE_WORDS[size])))
        batch.append({"cls": CLASSES.index(("red", shape)), "caption": caption("red", shape, "black", size, phrasing)})
    # phrasing 1 names no size: 3 sized captions, all drawn at the size they name
    assert _caption_counts(np.stack(imgs), batch) == [4, 4, 4, 3, 3]
    batch[0]["caption"] = caption("red", SHAPES[0], "black", "large", 0)  # the image is small
    assert _caption_counts(np.stack(imgs), batch) == [4, 4, 4, 2, 3]

"""The public sequential reader: a split's samples in file order, decoded for scoring (centre crop, first
caption). Evaluation and sample grids read data through this, not through the training loader."""
from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch

from ...errors import DataError
from ..format import CROP_SIZES, LOAD_SIZES
from .decode import BadSample, decode, sample_format
from .index import DatasetInfo
from .samples import iter_samples

log = logging.getLogger("stackgan_dist.data")


def read_samples(info: DatasetInfo, stage: int, start: int = 0, cycle: bool = False,
                 embedded_later: bool = False) -> Iterator[dict]:
    """Samples ``start``, ``start + 1``, ... of the split in file order (wrapping round when ``cycle``):
    ``{"image": uint8 (3, H, W), "text": float32 (text_dim,), "cls": int, "key": str, "index": int}``,
    H = W = the stage's crop. Samples before ``start`` are skipped without reading their data. A sample that
    does not decode raises DataError naming it (scores must not silently change their sample set).

    A dataset whose captions are embedded on the device (data/text/device_text.py) gives a zero ``text``: the
    caller embeds ``caption`` and says so with ``embedded_later``; otherwise it is refused."""
    n = info.num_samples
    if n <= 0:
        raise DataError("the split holds no samples")
    if not 0 <= start < n:
        raise ValueError(f"start {start} outside the split's {n} samples")
    load, crop = LOAD_SIZES[stage], CROP_SIZES[stage]
    fmt = sample_format(info.manifest)
    if fmt is not None and fmt.embed_on == "device" and not embedded_later:
        raise DataError(f"the dataset in {info.source or info.root} has its captions embedded on the training "
                        "device (sentence-transformers, index.embed_on 'device'); this reader's caller does not "
                        "embed them: use a dataset prepared with a hashing or stored encoder")
    i = start
    while True:
        pos = 0
        for shard in info.shards:
            if i >= pos + shard.samples:
                pos += shard.samples
                continue
            first = i - pos
            j = -1
            try:
                for j, sample in enumerate(iter_samples(shard.url, keep=lambda k, f=first: k >= f)):
                    if j < first:
                        continue
                    if j >= shard.samples:
                        break
                    try:
                        d = decode(sample, load, crop, None, info.text_dim, train=False, fmt=fmt)
                    except BadSample as e:
                        raise DataError(f"shard {shard.url}: sample '{sample['__key__']}' does not decode "
                                        f"({e})") from None
                    yield {"image": torch.from_numpy(d.image), "text": torch.from_numpy(d.text), "cls": d.cls,
                           "key": sample["__key__"], "index": pos + j, "caption": first_caption(sample, fmt)}
                    i += 1
            except DataError:
                raise
            except Exception as e:  # noqa: BLE001 - a damaged tar
                raise DataError(f"shard {shard.url} unreadable after {j + 1} samples ({e})") from None
            if j + 1 < shard.samples:
                raise DataError(f"shard {shard.url} ended after {j + 1} of {shard.samples} samples")
            pos += shard.samples
        if not cycle:
            return
        i = 0


def first_caption(sample: dict, fmt=None) -> str:
    """The caption the embedding ``text`` belongs to (the first one), as text; "" where the sample has none."""
    import json

    try:
        if fmt is not None:
            return fmt.captions(sample)[0]
        caps = json.loads(sample["txt.json"].decode("utf-8")) if "txt.json" in sample else []
        return str(caps[0]) if isinstance(caps, list) and caps else ""
    except (BadSample, ValueError, UnicodeDecodeError, KeyError):
        return ""


def read_batches(info: DatasetInfo, stage: int, batch_size: int, start: int = 0, cycle: bool = False,
                 embed=None):
    """``read_samples`` stacked into batches of ``batch_size`` (the last one may be smaller). ``embed``: the
    data/device_text.CaptionEmbedder for a dataset whose captions are embedded on the device (then each
    batch's ``text`` is ``embed(caption)``, on its device)."""
    buf: list[dict] = []
    for s in read_samples(info, stage, start, cycle, embedded_later=embed is not None):
        buf.append(s)
        if len(buf) == batch_size:
            yield _stack(buf, embed)
            buf = []
    if buf:
        yield _stack(buf, embed)


def _stack(samples: list[dict], embed=None) -> dict:
    b = {"image": torch.stack([s["image"] for s in samples]), "text": torch.stack([s["text"] for s in samples]),
            "cls": torch.tensor([s["cls"] for s in samples], dtype=torch.int64),
            "key": [s["key"] for s in samples], "index": np.array([s["index"] for s in samples]),
            "caption": [s["caption"] for s in samples]}
    if embed is not None:
        b["text"] = embed(b["caption"])
    return b

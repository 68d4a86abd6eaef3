"""Inception Score and FID through torchmetrics, on torch-fidelity's Inception-v3 port; weights from a local file only.

torchmetrics computes the statistics (FID from running feature sums, IS from logits with 10 splits) and
syncs them across ranks itself: under torchrun every rank feeds its own share of the images and
``compute()`` gathers. The network is torch-fidelity's ``FeatureExtractorInceptionV3`` (the TF-exact
port used for published FIDs), built from a file the user names; nothing is downloaded here.

Accepted weights: the standard FID Inception weights (``pt_inception-2015-12-05-6726825d.pth`` from
pytorch-fid, the same tensors as torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``), or a
fine-tuned classifier of the same architecture whose ``fc`` has K classes (e.g. the CUB model the paper's
IS uses, converted to this layout): its IS is then computed on its K-way logits.
"""
from __future__ import annotations

import importlib.util
import io
import os
import sys
import tempfile
import types
import warnings

import torch
from torch import nn

from ..errors import UserError

FID_FEATURE = "2048"
STANDARD_CLASSES = 1008  # the 2015-12-05 TF graph's classifier (1000 ImageNet classes + 8 unused)


def _inception_class():
    """torch-fidelity's FeatureExtractorInceptionV3, importable without torchvision.

    torch-fidelity 0.4's package ``__init__`` imports every feature extractor, some of which import
    torchvision, and no torchvision wheel matches our torch. The Inception module itself needs only torch,
    so when the normal import fails we register a bare package object (its ``__path__`` only) and import
    the submodule from it, skipping ``__init__``.
    """
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        spec = importlib.util.find_spec("torch_fidelity")
        if spec is None or not spec.submodule_search_locations:
            raise UserError("IS/FID need torch-fidelity: pip install --no-deps torch-fidelity==0.4.0") from None
        for k in [k for k in sys.modules if k == "torch_fidelity" or k.startswith("torch_fidelity.")]:
            del sys.modules[k]  # drop the half-imported package
        pkg = types.ModuleType("torch_fidelity")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["torch_fidelity"] = pkg
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    return FeatureExtractorInceptionV3


def _read_weights(path: str) -> dict:
    """Reads the file once, with ``weights_only=True`` (tensors only: it cannot run code), and checks it.
    torch-fidelity never opens the user's file (it would with ``weights_only=False``, and a file swapped
    between a check and a second read would run code): ``build_inception`` hands it these tensors."""
    if not path:
        raise UserError("IS/FID need --inception-weights PATH: a local Inception-v3 weights file, e.g. "
                        "pt_inception-2015-12-05-6726825d.pth (nothing is downloaded)")
    if not os.path.isfile(path):
        raise UserError(f"Inception weights file not found: {path}")
    try:
        with open(path, "rb") as f:
            data = f.read()  # once: what is checked here is what the network gets
        sd = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path} is not a readable Inception-v3 weights file (a state dict): {msg[:200]}") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path} is not an Inception-v3 weights file (expected a state dict of tensors)")
    fc = sd.get("fc.weight")
    if fc is None or fc.dim() != 2 or fc.shape[1] != 2048:
        raise UserError(f"{path} is not an Inception-v3 weights file: no fc.weight of shape (classes, 2048)")
    return sd


def build_inception(path: str, device: str | torch.device = "cpu") -> nn.Module:
    """The Inception-v3 feature extractor with the weights in ``path`` (shape-checked, strict).
    forward(uint8 (N, 3, H, W)) -> (pool features (N, 2048), logits (N, classes)). The standard weights give
    the bias-free 1008-way logits torch-fidelity and torchmetrics use for IS; a fine-tuned classifier its
    own K-way logits."""
    sd = _read_weights(path)
    base = _inception_class()
    classes = int(sd["fc.weight"].shape[0])
    features = [FID_FEATURE, "logits_unbiased" if classes == STANDARD_CLASSES else "logits"]
    checked = [sd]
    del sd

    class Inception(base):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            # torch-fidelity passes what it read from the placeholder file; the checked tensors go in instead
            if classes != STANDARD_CLASSES:  # a fine-tuned K-way classifier
                self.fc = nn.Linear(2048, classes)
            return super().load_state_dict(checked.pop(), strict=strict, assign=assign)

    # torch-fidelity's constructor insists on torch.load-ing a path (weights_only=False): give it an empty
    # state dict of our own, in a private temporary folder, never the user's file
    with tempfile.TemporaryDirectory(prefix="stackgan-inception-") as tmp:
        placeholder = os.path.join(tmp, "placeholder.pth")
        torch.save({}, placeholder)
        try:
            net = Inception("inception-v3-compat", features, feature_extractor_weights_path=placeholder)
        except RuntimeError as e:  # missing / unexpected keys, wrong shapes
            first = str(e).splitlines()
            raise UserError(f"{path}: these weights do not fit Inception-v3: {' '.join(first[:2])[:300]}") from None
    net.num_classes = classes
    return net.to(device)


def write_random_weights(path: str, seed: int = 0, classes: int = STANDARD_CLASSES) -> str:
    """A randomly initialised Inception-v3 of the right shapes (for tests where real weights are absent).
    Convolutions get He initialisation so activations neither vanish nor explode through the 90-odd layers."""
    base = _inception_class()

    class Blank(base):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            if classes != STANDARD_CLASSES:
                self.fc = nn.Linear(2048, classes)

    empty = path + ".empty"
    torch.save({}, empty)
    try:
        net = Blank("blank", ["logits"], feature_extractor_weights_path=empty)
    finally:
        os.remove(empty)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
        net.fc.weight.copy_(torch.randn(net.fc.weight.shape, generator=g) * (1.0 / 2048) ** 0.5)
        net.fc.bias.zero_()
    torch.save(net.state_dict(), path)
    return path


class _Select(nn.Module):
    """One output of the multi-output extractor, as torchmetrics' ``feature=`` module expects (N, d)."""

    def __init__(self, net: nn.Module, index: int, dim: int):
        super().__init__()
        self.net, self.index, self.num_features = net, index, dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[self.index]


class _Cached(nn.Module):
    """Runs the network once per batch for both metrics: FID and IS read different outputs of one pass."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self._out = None

    def reset(self) -> None:
        """Called before every new batch (a new tensor may reuse the old one's memory: no pointer keys)."""
        self._out = None

    def forward(self, x: torch.Tensor):
        if self._out is None:
            with torch.no_grad():
                self._out = self.net(x)
        return self._out


class InceptionMetrics:
    """Feed uint8 (N, 3, H, W) images: fake ones to both metrics, real ones to FID. ``compute()`` syncs ranks.

    ``feature`` replaces Inception (an nn.Module returning (fid features, logits)); tests use it to check
    the statistics on known inputs.
    """

    def __init__(self, names: list[str], weights: str = "", device: str | torch.device = "cpu", splits: int = 10,
                 feature: nn.Module | None = None):
        _inception_class()  # first: torchmetrics imports torch_fidelity at import time (see its docstring)
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.inception import InceptionScore

        self.names, self.splits, self.device = list(names), splits, torch.device(device)
        if feature is None:
            net = build_inception(weights, self.device)
            dims = [2048, net.num_classes]
        else:
            net = feature.to(self.device)
            with torch.no_grad():  # output widths, from one tiny image
                dims = [int(o.shape[-1]) for o in net(torch.zeros(1, 3, 8, 8, dtype=torch.uint8, device=self.device))]
        self.classes = dims[1]
        self.shared = _Cached(net)
        self.fid = self.isc = None
        if "fid" in self.names:
            self.fid = FrechetInceptionDistance(feature=_Select(self.shared, 0, dims[0])).to(self.device)
        if "is" in self.names:
            warnings.filterwarnings("ignore", message=".*will save all extracted features", category=UserWarning)
            self.isc = InceptionScore(feature=_Select(self.shared, 1, dims[1]), splits=splits).to(self.device)

    @torch.no_grad()
    def update(self, images: torch.Tensor, real: bool) -> None:
        images = images.to(self.device)
        self.shared.reset()
        if self.fid is not None:
            self.fid.update(images, real=real)
        if self.isc is not None and not real:
            self.isc.update(images)

    def compute(self, seed: int = 0) -> dict:
        """Collective when a process group is formed: every rank must call it."""
        from ..distributed.collectives import all_reduce_sum_group, group_active

        out = {}
        if self.fid is not None:
            out["fid"] = float(self.fid.compute())
        if self.isc is not None:
            n = sum(int(f.shape[0]) for f in self.isc.features)
            if group_active():  # torchmetrics syncs its states then: count over the same group
                n = int(all_reduce_sum_group(torch.tensor([n], device=self.device)).item())
            if n < self.splits:
                raise UserError(f"Inception Score over {self.splits} splits needs at least {self.splits} images; "
                                f"got {n} (raise --num-samples)")
            with torch.random.fork_rng(devices=[]):  # torchmetrics shuffles before splitting: make it repeatable
                torch.manual_seed(seed)
                with warnings.catch_warnings():  # one split: std of one value, undefined; reported as 0
                    warnings.filterwarnings("ignore", message=".*degrees of freedom", category=UserWarning)
                    mean, std = self.isc.compute()
            out.update({"is_mean": float(mean), "is_std": float(std) if self.splits > 1 else 0.0,
                        "is_splits": self.splits})
        return out


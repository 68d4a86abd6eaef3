"""StackGAN networks. Single-device code: nothing here knows of process groups or launchers."""
from .build import build_models, Models  # noqa: F401

"""The one factory that turns a ModelConfig into networks (Stage-II's frozen Stage-I generator comes from a
checkpoint: models/frozen.py)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .layers import init_weights
from .stage1 import Stage1Discriminator, Stage1Generator
from .stage2 import Stage2Discriminator, Stage2Generator


@dataclass
class Models:
    G: nn.Module
    D: nn.Module


def build_stage1_generator(m) -> Stage1Generator:
    g = Stage1Generator(m.text_dim, m.condition_dim, m.z_dim, m.gf_dim, m.ca_relu, m.cond_reinject)
    g.apply(init_weights)
    return g


def build_models(m) -> Models:
    """``m`` is a ModelConfig -> G and D of its stage, freshly initialised."""
    if m.text_dim is None:  # the trainer resolves it from the dataset first (data.read.loader.dataset_text_dim)
        raise ValueError("model.text_dim is unset: resolve it from the dataset before building the models")
    if m.stage == 1:
        G = build_stage1_generator(m)
        D = Stage1Discriminator(m.text_dim, m.condition_dim, m.df_dim, m.d_condition)
    else:
        G = Stage2Generator(m.text_dim, m.condition_dim, m.gf_dim, m.res_blocks, m.ca_relu, m.g_padding)
        D = Stage2Discriminator(m.text_dim, m.condition_dim, m.df_dim, m.d_condition)
    G.apply(init_weights)
    D.apply(init_weights)
    return Models(G=G, D=D)

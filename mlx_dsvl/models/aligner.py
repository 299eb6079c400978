"""The ``MlpProjector`` aligner: vision features -> LLM embeddings (every Linear has a bias).

- ``mlp_gelu`` (1.3B): ``layers = [Linear(in, n), GELU, Linear(n, n), ...]`` -> keys
  ``layers.0``, ``layers.2``.
- ``low_high_hybrid_split_mlp_gelu`` (7B): ``high_up_proj`` (SAM) and ``low_up_proj`` (SigLIP)
  to n/2 each, concatenated **high first**, then ``[GELU, Linear(n, n), ...]`` -> ``layers.1``.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..config import AlignerConfig
from .cpu_math import GELU

Features = mx.array | tuple[mx.array, mx.array]


class MlpProjector(nn.Module):
    def __init__(self, cfg: AlignerConfig):
        super().__init__()
        self.config = cfg
        t = cfg.projector_type
        if t == "identity":
            self.layers = []
        elif t == "linear":
            self.layers = nn.Linear(cfg.input_dim, cfg.n_embed)
        elif t == "mlp_gelu":
            self.layers = [nn.Linear(cfg.input_dim, cfg.n_embed)]
            for _ in range(1, cfg.depth):
                self.layers += [GELU(), nn.Linear(cfg.n_embed, cfg.n_embed)]
        elif t == "low_high_hybrid_split_mlp_gelu":
            self.high_up_proj = nn.Linear(cfg.input_dim, cfg.n_embed // 2)
            self.low_up_proj = nn.Linear(cfg.input_dim, cfg.n_embed // 2)
            self.layers = []
            for _ in range(1, cfg.depth):
                self.layers += [GELU(), nn.Linear(cfg.n_embed, cfg.n_embed)]
        else:  # config.py validates, this guards direct construction
            raise ValueError(f"unknown projector_type {t!r}")

    def __call__(self, x: Features) -> mx.array:
        # x: [B, T, in] or (high [B, T, in], low [B, T, in]) -> [B, T, n_embed]
        if isinstance(x, tuple):
            high, low = x
            x = mx.concatenate([self.high_up_proj(high), self.low_up_proj(low)], axis=-1)
        if isinstance(self.layers, nn.Module):
            return self.layers(x)
        for layer in self.layers:
            x = layer(x)
        return x

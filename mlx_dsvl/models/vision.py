"""Vision towers: ``CLIPVisionTower`` (1.3B, SigLIP only) and ``HybridVisionTower`` (7B).

Pixels arrive NCHW in [0, 1] (the processor never normalizes).  Each tower normalizes its own
input inside the model, as the reference does; the hybrid tower also makes the 384 SigLIP input
from the 1024 image with an antialiased bilinear resize, on the un-normalized float32 tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import mlx.nn as nn

from ..config import VisionConfig
from .resize import antialias_bilinear_resize
from .sam import SAMEncoder
from .siglip import SigLIPViT


def normalize(x: mx.array, mean: Sequence[float] | None, std: Sequence[float] | None):
    """Per-channel (x - mean) / std on an NHWC tensor; identity when mean/std is None."""
    if mean is None or std is None:
        return x
    m = mx.array(mean, dtype=x.dtype)
    s = mx.array(std, dtype=x.dtype)
    return (x - m) / s


class CLIPVisionTower(nn.Module):
    """Key prefix ``vision_tower``: [B, S, S, 3] in -> [B, T, width] SigLIP features."""

    def __init__(self, cfg: VisionConfig, mean=None, std=None):
        super().__init__()
        self.mean, self.std = mean, std
        self.vision_tower = SigLIPViT(cfg.low)

    def __call__(self, x: mx.array) -> mx.array:
        return self.vision_tower(normalize(x, self.mean, self.std))


class SAMVisionTower(nn.Module):
    """Key prefix ``vision_tower`` (SAM): [B, S, S, 3] -> [B, T, C] flattened row-major."""

    def __init__(self, cfg: VisionConfig, mean=None, std=None):
        super().__init__()
        self.mean, self.std = mean, std
        self.vision_tower = SAMEncoder(cfg.high, resize_to=4 * cfg.low.grid)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.vision_tower(normalize(x, self.mean, self.std))
        return x.reshape(x.shape[0], -1, x.shape[-1])


class HybridVisionTower(nn.Module):
    """[B, S, S, 3] in [0,1] -> (high [B, T, C], low [B, T, C]); token i of both = same cell."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.low_res_size = cfg.low.image_size
        self.vision_tower_high = SAMVisionTower(cfg, cfg.high_mean, cfg.high_std)
        self.vision_tower_low = CLIPVisionTower(cfg, cfg.low_mean, cfg.low_std)

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array]:
        low = antialias_bilinear_resize(x.astype(mx.float32), self.low_res_size).astype(x.dtype)
        return self.vision_tower_high(x), self.vision_tower_low(low)


VisionTower = CLIPVisionTower | HybridVisionTower


def build_vision_tower(cfg: VisionConfig) -> VisionTower:
    if cfg.hybrid:
        return HybridVisionTower(cfg)
    return CLIPVisionTower(cfg, cfg.low_mean, cfg.low_std)

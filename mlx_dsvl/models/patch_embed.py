"""The patch embedding of both vision towers (timm's ``PatchEmbed`` in SigLIP, SAM's own).

One stride-``patch_size`` convolution; the attribute name ``proj`` mirrors both towers'
checkpoint keys (``...patch_embed.proj.{weight,bias}``).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        return self.proj(x)  # [B, H, W, 3] -> [B, H/p, W/p, width]

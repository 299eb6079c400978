"""SigLIP ViT (timm ``VisionTransformer`` as built by DeepSeek-VL's ``create_siglip_vit``).

Attribute names mirror the checkpoint keys under ``vision_tower``: ``patch_embed.proj``,
``pos_embed``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``.
No class token, no pre-norm, exact (erf) GELU, LayerNorm eps 1e-6, the final ``norm`` applied,
no pooling head (``attn_pool.*`` is dropped by ``mlx_dsvl.model_folder.sanitize``).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..config import SigLIPConfig
from .attention import attention
from .cpu_math import GELU
from .patch_embed import PatchEmbed


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        B, L, D = x.shape
        # [B, L, 3D] -> 3 x [B, heads, L, head_dim]
        qkv = self.qkv(x).reshape(B, L, 3, self.num_heads, -1).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        o = attention(q, k, v, self.scale)
        return self.proj(o.transpose(0, 2, 1, 3).reshape(B, L, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=True)
        self.act = GELU()  # exact erf GELU, as timm's nn.GELU default
        self.fc2 = nn.Linear(hidden, dim, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: SigLIPConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.attn = Attention(cfg.width, cfg.heads)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = Mlp(cfg.width, cfg.mlp_dim)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SigLIPViT(nn.Module):
    """[B, S, S, 3] normalized pixels (NHWC) -> [B, grid*grid, width] features."""

    def __init__(self, cfg: SigLIPConfig):
        super().__init__()
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.width)
        self.pos_embed = mx.zeros((1, cfg.grid * cfg.grid, cfg.width))
        self.blocks = [Block(cfg) for _ in range(cfg.num_layers)]
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.eps)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.patch_embed(x)  # [B, grid, grid, width] -> [B, grid*grid, width], row-major
        x = x.reshape(x.shape[0], -1, x.shape[-1]) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

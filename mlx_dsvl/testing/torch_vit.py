"""SigLIP ViT in PyTorch computed the way timm's ``VisionTransformer`` computes it (DeepSeek-VL's
reference code runs SigLIP-L through timm). timm cannot be installed next to a CPU-only PyTorch
from PyPI (its torchvision wheels are built for CUDA), so this module, built from
``transformers``' ``SiglipVisionModel`` weights and tested equal to it, stands in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _Block(nn.Module):
    def __init__(self, layer, heads: int):
        super().__init__()
        att = layer.self_attn
        self.heads = heads
        self.norm1, self.norm2 = layer.layer_norm1, layer.layer_norm2
        dim = att.q_proj.in_features
        self.qkv = nn.Linear(dim, 3 * dim)
        with torch.no_grad():
            self.qkv.weight.copy_(torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]))
            self.qkv.bias.copy_(torch.cat([att.q_proj.bias, att.k_proj.bias, att.v_proj.bias]))
        self.qkv.to(att.q_proj.weight.dtype)
        self.proj, self.fc1, self.fc2 = att.out_proj, layer.mlp.fc1, layer.mlp.fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(a.transpose(1, 2).reshape(B, N, C))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TimmStyleSigLIP(nn.Module):
    """[B, 3, S, S] normalized pixels -> [B, (S/p)^2, width] features."""

    def __init__(self, hf_siglip):
        super().__init__()
        vt = getattr(hf_siglip, "vision_model", hf_siglip)
        heads = vt.config.num_attention_heads
        self.patch_embed = vt.embeddings.patch_embedding
        self.pos_embed = nn.Parameter(vt.embeddings.position_embedding.weight.detach()[None].clone())
        self.blocks = nn.ModuleList(_Block(layer, heads) for layer in vt.encoder.layers)
        self.norm = vt.post_layernorm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x.to(self.pos_embed.dtype)).flatten(2).transpose(1, 2) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

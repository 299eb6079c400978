"""SAM-B ViTDet image encoder with DeepSeek-VL's ``sam_b_downsample`` head (7B high-res tower).

Attribute names mirror the checkpoint keys under ``vision_tower_high.vision_tower``:
``patch_embed.proj``, ``pos_embed``, ``blocks.N.{norm1,attn.{qkv,proj,rel_pos_h,rel_pos_w},norm2,
mlp.{lin1,lin2}}``, ``neck.{0,1,2,3}``, ``neck_hd.{0,1,2,3}``, ``downsamples.{0,1}``,
``hd_alpha_downsamples``.  Everything runs NHWC.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..config import SAMConfig
from .attention import attention
from .cpu_math import GELU
from .patch_embed import PatchEmbed
from .resize import bilinear_resize


def rel_pos_table(size: int, rel_pos: mx.array) -> mx.array:
    """[2*size-1, C] table -> [size(q), size(k), C] embeddings of the offsets q - k."""
    idx = mx.arange(size)[:, None] - mx.arange(size)[None, :] + (size - 1)
    return rel_pos[idx]


def decomposed_rel_pos(q: mx.array, table_h: mx.array, table_w: mx.array) -> tuple[mx.array, mx.array]:
    """MViTv2 decomposed relative position bias, as its two factors.

    q: [B, heads, h*W, C] *unscaled* queries of h rows of the grid; table_h: [h, kH, C] (those
    rows of :func:`rel_pos_table`), table_w: [W, kW, C] -> (rel_h [B, heads, h, W, kH],
    rel_w [B, heads, h, W, kW]); the bias of query (y, x) and key (ky, kx) is
    rel_h[.., y, x, ky] + rel_w[.., y, x, kx] (:func:`attention.decomposed_bias`).
    """
    B, N, _, C = q.shape
    h, W = table_h.shape[0], table_w.shape[0]
    rq = q.reshape(B, N, h, W, C)
    return mx.einsum("bnhwc,hkc->bnhwk", rq, table_h), mx.einsum("bnhwc,wkc->bnhwk", rq, table_w)


# Queries per attention call in a global block: the rel-pos bias and the scores of 4096 x 4096
# positions x 12 heads are 0.8 GB each in float32; blocks of 512 query rows keep that to 1/8.
QUERY_BLOCK = 512


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, input_size: int):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)
        self.rel_pos_h = mx.zeros((2 * input_size - 1, head_dim))
        self.rel_pos_w = mx.zeros((2 * input_size - 1, head_dim))

    def __call__(self, x: mx.array) -> mx.array:
        B, H, W, D = x.shape
        # [B, H*W, 3D] -> 3 x [B, heads, H*W, head_dim]
        qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        table_h = rel_pos_table(H, self.rel_pos_h)  # [H, kH, hd]
        table_w = rel_pos_table(W, self.rel_pos_w)  # [W, kW, hd]
        rows = max(1, QUERY_BLOCK // W)
        outs = []
        for r in range(0, H, rows):
            qr = q[:, :, r * W : (r + rows) * W]  # [B, heads, rows*W, hd]
            if outs:  # one block after the other, so that only one block's bias and scores live
                qr = mx.depends(qr, outs[-1])
            rel = decomposed_rel_pos(qr, table_h[r : r + rows], table_w)
            outs.append(attention(qr, k, v, self.scale, rel=rel))
        o = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)  # [B, heads, H*W, hd]
        return self.proj(o.transpose(0, 2, 1, 3).reshape(B, H, W, D))


class MLPBlock(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.act = GELU()
        self.lin2 = nn.Linear(hidden, dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.lin2(self.act(self.lin1(x)))


def window_partition(x: mx.array, window: int) -> tuple[mx.array, tuple[int, int]]:
    """[B, H, W, C] -> [B*nW, window, window, C], zero-padding bottom/right (no mask later)."""
    B, H, W, C = x.shape
    ph, pw = (-H) % window, (-W) % window
    if ph or pw:
        x = mx.pad(x, [(0, 0), (0, ph), (0, pw), (0, 0)])
    Hp, Wp = H + ph, W + pw
    x = x.reshape(B, Hp // window, window, Wp // window, window, C).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window, window, C), (Hp, Wp)


def window_unpartition(
    windows: mx.array, window: int, pad_hw: tuple[int, int], hw: tuple[int, int]
) -> mx.array:
    """[B*nW, window, window, C] -> [B, H, W, C], cropping the padding."""
    Hp, Wp = pad_hw
    H, W = hw
    B = windows.shape[0] // ((Hp // window) * (Wp // window))
    x = windows.reshape(B, Hp // window, Wp // window, window, window, -1)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, -1)
    return x[:, :H, :W, :]


class Block(nn.Module):
    def __init__(self, cfg: SAMConfig, window_size: int):
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.attn = Attention(cfg.width, cfg.heads, window_size or cfg.grid)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = MLPBlock(cfg.width, int(cfg.width * cfg.mlp_ratio))

    def __call__(self, x: mx.array) -> mx.array:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            H, W = x.shape[1:3]
            x, pad_hw = window_partition(x, self.window_size)
            x = window_unpartition(self.attn(x), self.window_size, pad_hw, (H, W))
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


def make_neck(width: int, out: int, eps: float) -> list:
    """Conv1x1 -> LayerNorm2d -> Conv3x3 -> LayerNorm2d (LayerNorm2d = last-axis LN in NHWC)."""
    return [
        nn.Conv2d(width, out, kernel_size=1, bias=False),
        nn.LayerNorm(out, eps=eps),
        nn.Conv2d(out, out, kernel_size=3, padding=1, bias=False),
        nn.LayerNorm(out, eps=eps),
    ]


def _seq(layers: list, x: mx.array) -> mx.array:
    for layer in layers:
        x = layer(x)
    return x


class SAMEncoder(nn.Module):
    """[B, S, S, 3] normalized pixels -> [B, out_grid, out_grid, downsample_channels[-1]].

    ``resize_to`` is the size the neck output is bilinearly resized to before the two stride-2
    ``downsamples`` (96 in DeepSeek-VL: 4 x the 24x24 SigLIP grid).
    """

    def __init__(self, cfg: SAMConfig, resize_to: int = 96):
        super().__init__()
        self.config = cfg
        self.resize_to = resize_to
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.width)
        self.pos_embed = mx.zeros((1, cfg.grid, cfg.grid, cfg.width))
        self.blocks = [
            Block(cfg, 0 if i in cfg.global_attn_indexes else cfg.window_size)
            for i in range(cfg.layers)
        ]
        self.neck = make_neck(cfg.width, cfg.prompt_embed_dim, cfg.eps)
        self.neck_hd = make_neck(cfg.width, cfg.prompt_embed_dim, cfg.eps)
        chans = (cfg.prompt_embed_dim,) + tuple(cfg.downsample_channels)
        self.downsamples = [
            nn.Conv2d(i, o, kernel_size=3, stride=2, padding=1, bias=False)
            for i, o in zip(chans[:-1], chans[1:])
        ]
        self.hd_alpha_downsamples = mx.zeros((1,))
        self.first_global = min(cfg.global_attn_indexes) if cfg.global_attn_indexes else None

    def _head(self, neck: list, x: mx.array) -> mx.array:
        x = bilinear_resize(_seq(neck, x), self.resize_to)
        return _seq(self.downsamples, x)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.patch_embed(x) + self.pos_embed
        first_global: mx.array | None = None
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i == self.first_global:
                first_global = x
        out = self._head(self.neck, x)
        if first_global is not None:
            out = out + self._head(self.neck_hd, first_global) * self.hd_alpha_downsamples
        return out

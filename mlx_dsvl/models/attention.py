"""Scaled dot-product attention for the vision towers (SigLIP-L, SAM-B).

On a GPU (Metal, CUDA) this is ``mx.fast.scaled_dot_product_attention``.  MLX's CPU backend
evaluates ``exp`` one element at a time, and the towers' softmaxes are large (one SAM-B global
block: 12 x 4096 x 4096 scores; SigLIP-L: 24 x 16 x 577 x 577), so there the scores are made in
base-2 units (``log2 e`` folded into the query scale) and the softmax numerators come from
:func:`cpu_math.exp2_shifted`: one pass for the max, one for the numerators, one for the sum.
SAM's decomposed relative-position bias is added in one pass as the broadcast sum of its two
small factors, never written out in full.  The softmax is computed in float32 whatever the
inputs' dtype.
"""

from __future__ import annotations

from typing import Optional, Tuple

import mlx.core as mx

from .cpu_math import LOG2E, exp2_shifted


def exp_from_max(x: mx.array, axis: int = -1) -> Tuple[mx.array, mx.array]:
    """``(exp(x - m), m)`` with ``m`` the maximum along ``axis`` (kept, no gradient), computed
    as ``2 ** ((x - m) log2 e)`` (:func:`cpu_math.exp2_shifted`): the same values, several times
    faster than ``exp`` on MLX's CPU backend.  Softmax numerators of the training loss."""
    m = mx.stop_gradient(x.max(axis=axis, keepdims=True))
    return exp2_shifted(x * LOG2E, m * LOG2E), m


def decomposed_bias(rel_h: mx.array, rel_w: mx.array) -> mx.array:
    """[B, N, h, W, kH] and [B, N, h, W, kW] -> the full additive bias [B, N, h*W, kH*kW]."""
    B, N, h, W, kH = rel_h.shape
    return (rel_h[..., :, None] + rel_w[..., None, :]).reshape(B, N, h * W, -1)


@mx.compile
def _add_rel(s: mx.array, rel_h: mx.array, rel_w: mx.array) -> mx.array:
    return s + (rel_h[..., :, None] + rel_w[..., None, :]) * LOG2E


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: Optional[mx.array] = None,
              rel: Optional[Tuple[mx.array, mx.array]] = None) -> mx.array:
    """q [B, heads, Lq, d], k/v [B, heads, Lk, d] -> [B, heads, Lq, d].

    mask: additive [.., Lq, Lk]; rel: SAM's decomposed bias ``(rel_h, rel_w)`` for queries on
    h x W grid positions and keys on kH x kW (see :func:`decomposed_bias`).
    """
    if mx.default_device() != mx.cpu:
        if rel is not None:
            bias = decomposed_bias(*rel).astype(q.dtype)
            mask = bias if mask is None else mask + bias
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    s = ((q * (scale * LOG2E)) @ k.swapaxes(-1, -2)).astype(mx.float32)  # [B, heads, Lq, Lk], log2 units
    if mask is not None:
        s = s + mask.astype(mx.float32) * LOG2E
    if rel is not None:
        rel_h, rel_w = rel
        B, N, h, W, kH = rel_h.shape
        s = _add_rel(s.reshape(B, N, h, W, kH, -1), rel_h.astype(mx.float32),
                     rel_w.astype(mx.float32)).reshape(s.shape)
    m = mx.stop_gradient(s.max(axis=-1, keepdims=True))
    p = exp2_shifted(s, m)
    return (p.astype(v.dtype) @ v) / p.sum(axis=-1, keepdims=True).astype(v.dtype)

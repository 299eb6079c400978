"""Scaled dot-product attention for the vision towers (SigLIP-L, SAM-B).

On a GPU (Metal, CUDA) this is ``mx.fast.scaled_dot_product_attention``.  MLX's CPU backend
evaluates ``exp`` one element at a time and the towers' softmaxes are large, so there the
softmax is written with ``2 ** x`` (faster on that backend) on scores in base-2 units (``log2 e``
folded into the query scale and the bias): the same values, differentiable and compilable
(docs/PERFORMANCE.md).  The softmax is computed in float32 whatever the inputs' dtype.
"""

from __future__ import annotations

import mlx.core as mx

from .cpu_math import LOG2E


def exp_from_max(x: mx.array, axis: int = -1) -> tuple[mx.array, mx.array]:
    """``(exp(x - m), m)`` with ``m`` the maximum along ``axis`` (no gradient), the exponential
    as ``2 ** ((x - m) log2 e)`` (faster on MLX's CPU backend): the training loss's softmax."""
    m = mx.stop_gradient(x.max(axis=axis, keepdims=True))
    return mx.power(2.0, (x - m) * LOG2E), m


def decomposed_bias(rel_h: mx.array, rel_w: mx.array) -> mx.array:
    """[B, N, h, W, kH] and [B, N, h, W, kW] -> the full additive bias [B, N, h*W, kH*kW]."""
    B, N, h, W, kH = rel_h.shape
    return (rel_h[..., :, None] + rel_w[..., None, :]).reshape(B, N, h * W, -1)


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None = None,
              rel: tuple[mx.array, mx.array] | None = None) -> mx.array:
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
    if rel is not None:  # the factors are small: scale them, not the bias
        s = s + decomposed_bias(*(r.astype(mx.float32) * LOG2E for r in rel))
    p = mx.power(2.0, s - mx.stop_gradient(s.max(axis=-1, keepdims=True)))
    return (p.astype(v.dtype) @ v) / p.sum(axis=-1, keepdims=True).astype(v.dtype)

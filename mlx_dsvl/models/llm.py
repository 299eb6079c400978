"""The LLM: mlx-lm's llama, with two prefill paths of its own (the parameters are mlx-lm's).

On CUDA, ``mx.fast.scaled_dot_product_attention`` builds (and caches) one cuDNN graph per new
(query length, key length); a chat meets a new shape every turn and would pay that build before
its first token.  So a prefill of at most :data:`UNFUSED_MAX_QUERIES` tokens on a GPU runs
MLX's own fallback math from ordinary kernels, which need no per-shape build; decoding and long
prefills keep the fused kernels.  On the CPU, where ``mx.quantized_matmul`` is slow, a prefill
onto a quantized KV cache dequantizes the layer's keys and values and multiplies in float;
decoding keeps mlx-lm's quantized path (docs/PERFORMANCE.md).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.models import llama

UNFUSED_MAX_QUERIES = 512  # scores of 512 queries x 4096 keys x 32 heads: 128 MB in bf16


def unfused_prefill(length: int, cache: Any) -> bool:
    """Whether a prefill of ``length`` tokens onto ``cache`` takes :func:`unfused_attention`:
    short ones on a GPU, and on the CPU those onto a quantized cache (dequantized first)."""
    if length <= 1 or cache is None:
        return False
    if hasattr(cache, "bits"):
        return mx.default_device() == mx.cpu
    return length <= UNFUSED_MAX_QUERIES and mx.default_device() == mx.gpu


def unfused_attention(q: mx.array, k: mx.array, v: mx.array, scale: float,
                      mask: None | str | mx.array) -> mx.array:
    """MLX's fallback for ``mx.fast.scaled_dot_product_attention``, op for op.

    q [B, H, L, D], k/v [B, H, S, D] (as many key as query heads);
    ``mask`` None, ``"causal"`` (the last L of S positions are the queries) or an array.
    """
    scores = (q * mx.array(scale, q.dtype)) @ k.swapaxes(-1, -2)
    if isinstance(mask, str):
        L, S = scores.shape[-2:]
        mask = mx.arange(S - L, S)[:, None] >= mx.arange(S)[None]
    if mask is not None:
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, mx.array(mx.finfo(scores.dtype).min, scores.dtype))
        else:
            scores = scores + mask
    return mx.softmax(scores, axis=-1, precise=True) @ v


class Attention(llama.Attention):
    """mlx-lm's llama attention (same parameters); short GPU prefills go unfused."""

    def __call__(self, x: mx.array, mask: mx.array | None = None, cache: Any | None = None) -> mx.array:
        B, L, _ = x.shape
        if self.n_heads != self.n_kv_heads or not unfused_prefill(L, cache):
            return super().__call__(x, mask, cache)  # (grouped queries: not in DeepSeek-VL)
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        q, k = self.rope(q, offset=cache.offset), self.rope(k, offset=cache.offset)
        k, v = cache.update_and_fetch(k, v)
        if hasattr(cache, "bits"):  # packed (weights, scales, biases)
            k, v = (mx.dequantize(*t, group_size=cache.group_size, bits=cache.bits) for t in (k, v))
        out = unfused_attention(q, k, v, self.scale, mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


def build_language_model(config: dict) -> llama.Model:
    """mlx-lm's llama ``Model`` from the ``language_config`` dict, with :class:`Attention`."""
    args = llama.ModelArgs.from_dict(config)
    model = llama.Model(args)
    for layer in model.model.layers:
        layer.self_attn = Attention(args)
    return model

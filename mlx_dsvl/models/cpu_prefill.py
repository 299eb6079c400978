"""The LLM's prompt pass (prefill) on MLX's CPU backend.

mlx-lm's Llama layers, run with the CPU formulations of :mod:`cpu_math`: the MLP's SwiGLU in one
pass instead of MLX's element-at-a-time ``sigmoid``, and attention with base-2 softmax numerators
(:func:`attention.attention`) instead of ``mx.fast.scaled_dot_product_attention``'s CPU fallback.
Same weights, same KV cache updates, same result to float32 rounding (tested against mlx-lm's
forward).  Anything else -- a GPU, decoding single tokens, quantized, batched or rotating KV
caches, grouped-query attention, sliding windows -- runs mlx-lm's own forward.
"""

from __future__ import annotations

from typing import Any, List, Optional

import mlx.core as mx
from mlx_lm.models import llama
from mlx_lm.models.cache import KVCache

from .attention import attention
from .cpu_math import swiglu


def _fast_path(lm, tokens: int, cache: Optional[List[Any]]) -> bool:
    if mx.default_device() != mx.cpu or tokens < 2 or getattr(lm, "swa_idx", None) is not None:
        return False
    if cache is not None and any(type(c) is not KVCache for c in cache):
        return False
    return all(type(layer) is llama.TransformerBlock
               and layer.self_attn.n_kv_heads == layer.self_attn.n_heads for layer in lm.layers)


def _block(layer, x: mx.array, mask: mx.array, cache) -> mx.array:
    """``llama.TransformerBlock.__call__`` with the CPU attention and SwiGLU."""
    a, m = layer.self_attn, layer.mlp
    h = layer.input_layernorm(x)
    B, L, _ = h.shape
    q, k, v = (p(h).reshape(B, L, a.n_heads, -1).transpose(0, 2, 1, 3)
               for p in (a.q_proj, a.k_proj, a.v_proj))
    offset = cache.offset if cache is not None else 0
    q, k = a.rope(q, offset=offset), a.rope(k, offset=offset)
    if cache is not None:
        k, v = cache.update_and_fetch(k, v)
    o = attention(q, k, v, a.scale, mask)
    x = x + a.o_proj(o.transpose(0, 2, 1, 3).reshape(B, L, -1))
    h = layer.post_attention_layernorm(x)
    return x + m.down_proj(swiglu(m.gate_proj(h), m.up_proj(h)))


def prefill_hidden(language_model, ids: mx.array, cache: Optional[List[Any]] = None,
                   input_embeddings: Optional[mx.array] = None) -> mx.array:
    """``language_model.model(ids, cache, input_embeddings)``: final-norm hidden states [B, T, D],
    through the CPU formulations when they apply (see the module docstring)."""
    lm = language_model.model
    tokens = ids.shape[1]
    if not _fast_path(lm, tokens, cache):
        return lm(ids, cache, input_embeddings)
    h = lm.embed_tokens(ids) if input_embeddings is None else input_embeddings
    offset = cache[0].offset if cache else 0
    # causal: query i (position offset + i) sees keys 0 .. offset + i
    allowed = mx.arange(offset + tokens)[None, :] <= (mx.arange(tokens) + offset)[:, None]
    mask = mx.where(allowed, 0.0, -mx.inf).astype(mx.float32)
    for i, layer in enumerate(lm.layers):
        h = _block(layer, h, mask, cache[i] if cache else None)
    return lm.norm(h)

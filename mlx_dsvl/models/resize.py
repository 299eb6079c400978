"""Image resizing as pure MLX matrix products (differentiable, compilable, any device).

Both resizes are separable: out = Wh @ x @ Wwᵀ along the two spatial axes, with small [out, in]
weight matrices built from ``mx.arange`` (no numpy in a forward pass).

- ``bilinear_resize``: ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``
  without antialias (used by SAM's 64 -> 96 upsampling).
- ``antialias_bilinear_resize``: the same with ``antialias=True`` (torchvision ``Resize``): a
  triangle filter widened by the downscale factor, rows renormalized at the borders.
"""

from __future__ import annotations

import mlx.core as mx


def bilinear_weights(in_size: int, out_size: int) -> mx.array:
    """[out, in] interpolation matrix for align_corners=False bilinear resizing."""
    scale = in_size / out_size
    src = mx.maximum((mx.arange(out_size, dtype=mx.float32) + 0.5) * scale - 0.5, 0.0)
    i0 = mx.floor(src)
    frac = src - i0
    i0 = i0.astype(mx.int32)
    i1 = mx.minimum(i0 + 1, in_size - 1)
    cols = mx.arange(in_size)[None, :]
    w = (1.0 - frac)[:, None] * (cols == i0[:, None]) + frac[:, None] * (cols == i1[:, None])
    return w.astype(mx.float32)


def antialias_weights(in_size: int, out_size: int) -> mx.array:
    """[out, in] matrix of the antialiased (triangle) filter used by torch's ``antialias=True``."""
    scale = in_size / out_size
    support = max(scale, 1.0)
    centers = (mx.arange(out_size, dtype=mx.float32) + 0.5) * scale  # [out]
    taps = mx.arange(in_size, dtype=mx.float32) + 0.5  # [in]
    w = mx.maximum(1.0 - mx.abs(taps[None, :] - centers[:, None]) / support, 0.0)
    return w / w.sum(axis=1, keepdims=True)


def _apply(x: mx.array, wh: mx.array, ww: mx.array) -> mx.array:
    # x: [B, H, W, C]; wh: [Ho, H]; ww: [Wo, W] -> [B, Ho, Wo, C]
    x = mx.einsum("oh,bhwc->bowc", wh, x)
    return mx.einsum("pw,bowc->bopc", ww, x)


def bilinear_resize(x: mx.array, size: int) -> mx.array:
    """[B, H, W, C] -> [B, size, size, C], computed in float32, returned in x's dtype."""
    dtype = x.dtype
    H, W = x.shape[1:3]
    out = _apply(x.astype(mx.float32), bilinear_weights(H, size), bilinear_weights(W, size))
    return out.astype(dtype)


def antialias_bilinear_resize(x: mx.array, size: int) -> mx.array:
    """[B, H, W, C] -> [B, size, size, C] antialiased, computed in float32."""
    dtype = x.dtype
    H, W = x.shape[1:3]
    wh = antialias_weights(H, size) if size < H else bilinear_weights(H, size)
    ww = antialias_weights(W, size) if size < W else bilinear_weights(W, size)
    return _apply(x.astype(mx.float32), wh, ww).astype(dtype)

"""Image resizing as pure MLX matrix products (differentiable, compilable, any device).

Both resizes are separable: out = Wh @ x @ Wwᵀ along the two spatial axes, with small [out, in]
weight matrices that depend only on the static sizes (no numpy in a forward pass).

- ``bilinear_resize``: ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``
  without antialias (used by SAM's 64 -> 96 upsampling).
- ``antialias_bilinear_resize``: the same with ``antialias=True`` (torchvision ``Resize``): a
  triangle filter widened by the downscale factor, rows renormalized at the borders.
"""

from __future__ import annotations

import functools
import struct

import mlx.core as mx


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


@functools.lru_cache(maxsize=16)
def bilinear_weights(in_size: int, out_size: int) -> mx.array:
    """[out, in] interpolation matrix for align_corners=False bilinear resizing.

    Matches PyTorch's CPU kernel: a float32 ``scale = in / out`` and a source coordinate
    ``scale * (i + 0.5) - 0.5`` rounded once (fused multiply-add), clamped at 0.  The weights
    depend only on the static sizes, so they are plain-Python constants.
    """
    scale = _f32(in_size / out_size)
    rows = []
    for i in range(out_size):
        src = max(_f32(scale * (i + 0.5) - 0.5), 0.0)
        i0 = int(src)
        frac = _f32(src - i0)
        i1 = min(i0 + 1, in_size - 1)
        row = [0.0] * in_size
        row[i0] += 1.0 - frac
        row[i1] += frac
        rows.append(row)
    return mx.array(rows, dtype=mx.float32)


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

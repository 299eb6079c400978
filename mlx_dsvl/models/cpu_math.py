"""Math written for MLX's CPU backend, where some of MLX's own kernels are slow.

On Linux x86, MLX's CPU ``erf``, ``exp`` and ``sigmoid`` evaluate one element at a time through
the C library, where a multiply-add vectorizes (docs/PERFORMANCE.md).  So the exact (erf) GELU
of SigLIP, SAM-B and the aligner is built here from multiplies, adds and one divide (a rational
``erf``), compiled into one pass, with a hand-written gradient.  GPUs keep ``nn.gelu``.

MLX's CPU ``quantized_matmul`` multiplies one row at a time, far below BLAS's GEMM.  So a
quantized layer given many rows on the CPU (a prefill, training) dequantizes its weight, a
transient of that one layer, and multiplies through BLAS; few rows (decoding) and GPUs keep
``quantized_matmul``.  :func:`blas_quantized` gives a model's quantized layers that path.
"""

from __future__ import annotations

import functools
import math

import mlx.core as mx
import mlx.nn as nn

# Rows from which a CPU quantized layer dequantizes and multiplies through BLAS: the crossover
# measured by ``benchmarks/quant_prefill.py --crossover-only`` (docs/PERFORMANCE.md).
BLAS_MIN_ROWS = 8

# erf(x) ~= x P(x^2) / Q(x^2) on |x| <= 4 (|erf| > 1 - 2e-8 beyond: clamped).  Coefficients from a
# least-squares fit of x P - erf(x) Q = 0 on 20000 Chebyshev points of [0, 4], reweighted by 1/Q
# until the relative error settled (Loeb's method): 7.4e-8 in exact arithmetic, 4.3e-7 at most
# when evaluated in float32 (MLX's own float32 erf: 4.5e-7).
ERF_P = (1.1283791432976924, 0.20371281601622518, 0.051059550972642864, 0.003840709927763287,
         1.4338813039989205e-04, -1.922063587678641e-06, 1.909934514514091e-08)
ERF_Q = (1.0, 0.5138678292501607, 0.11654752638950566, 0.01465801001311505,
         9.837859043195251e-04)
SQRT1_2 = 1.0 / math.sqrt(2.0)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
LOG2E = 1.4426950408889634


def _horner(coeffs, t: mx.array) -> mx.array:
    acc = coeffs[-1]
    for c in coeffs[-2::-1]:
        acc = acc * t + c
    return acc


def erf(x: mx.array) -> mx.array:
    """float32 ``erf`` from multiplies and adds (the fit and its error: see ``ERF_P``)."""
    x = mx.clip(x, -4.0, 4.0)
    t = x * x
    return x * _horner(ERF_P, t) / _horner(ERF_Q, t)


@mx.compile
def _gelu(x: mx.array) -> mx.array:
    return x * (0.5 + 0.5 * erf(x * SQRT1_2))


@mx.compile
def _gelu_grad(x: mx.array, g: mx.array) -> mx.array:
    # d/dx x Phi(x) = Phi(x) + x phi(x); phi's exp as 2 ** (x log2 e), faster than exp on the CPU
    phi = mx.power(2.0, (-0.5 * LOG2E) * x * x) * INV_SQRT_2PI
    return g * ((0.5 + 0.5 * erf(x * SQRT1_2)) + x * phi)


@mx.custom_function
def gelu_cpu(x: mx.array) -> mx.array:
    """Exact GELU, ``x Phi(x)``, for MLX's CPU backend (one compiled pass, no ``erf`` call)."""
    return _gelu(x)


@gelu_cpu.vjp
def _gelu_cpu_vjp(x, cotangent, output):  # one input: x and the cotangent come unwrapped
    return _gelu_grad(x, cotangent)


def gelu(x: mx.array) -> mx.array:
    """Exact GELU: :func:`gelu_cpu` on the CPU backend, ``nn.gelu`` elsewhere."""
    if mx.default_device() == mx.cpu:
        return gelu_cpu(x)
    return nn.gelu(x)


class GELU(nn.Module):
    """``nn.GELU()`` (exact) with the CPU formulation above; no parameters."""

    def __call__(self, x: mx.array) -> mx.array:
        return gelu(x)


# -- quantized layers -------------------------------------------------------------------------
def quantized_matmul(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array | None, *,
                     group_size: int, bits: int, mode: str) -> mx.array:
    """``x @ dequantize(w).T``: through BLAS on the CPU backend from :data:`BLAS_MIN_ROWS` rows
    (the weight dequantized in ``x``'s dtype), else ``mx.quantized_matmul``."""
    if mx.default_device() == mx.cpu and x.size >= BLAS_MIN_ROWS * x.shape[-1]:
        w = mx.depends(w, x)  # dequantized once x is computed: one layer's dense weight at a time
        dense = dequantize(w, scales, biases, group_size=group_size, bits=bits, mode=mode, dtype=x.dtype)
        return x @ mx.stop_gradient(dense).T  # frozen: gradients flow to x only
    return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits, mode=mode)


def dequantize(w: mx.array, scales: mx.array, biases: mx.array | None, *, group_size: int, bits: int,
               mode: str, dtype: mx.Dtype) -> mx.array:
    """``mx.dequantize``, the same values; affine 4- and 8-bit as one compiled elementwise pass
    over the packed words (MLX's CPU ``dequantize`` is slower than the GEMM it feeds)."""
    if mode != "affine" or bits not in (4, 8) or biases is None:
        return mx.dequantize(w, scales, biases, group_size=group_size, bits=bits, mode=mode, dtype=dtype)
    return _affine_dequantizer(bits, group_size, dtype)(w, scales, biases)


@functools.cache
def _affine_dequantizer(bits: int, group_size: int, dtype: mx.Dtype):
    per_word = 32 // bits  # element j of a uint32 sits at bits j * bits (MLX's packing)

    def dequantize(w: mx.array, scales: mx.array, biases: mx.array) -> mx.array:
        words = w.reshape(*w.shape[:-1], -1, group_size // per_word, 1)  # [..., groups, words, 1]
        q = (words >> mx.arange(0, 32, bits, dtype=mx.uint32)) & (2**bits - 1)  # one fused pass
        dense = q.astype(scales.dtype) * scales[..., None, None] + biases[..., None, None]
        return dense.astype(dtype).reshape(*w.shape[:-1], -1)

    return mx.compile(dequantize)


class QuantizedLinear(nn.QuantizedLinear):
    """``nn.QuantizedLinear`` (the same parameters) multiplying through :func:`quantized_matmul`."""

    def __call__(self, x: mx.array) -> mx.array:
        y = quantized_matmul(x, self["weight"], self["scales"], self.get("biases"),
                             group_size=self.group_size, bits=self.bits, mode=self.mode)
        return y + self["bias"] if "bias" in self else y


class QuantizedEmbedding(nn.QuantizedEmbedding):
    """``nn.QuantizedEmbedding`` whose ``as_linear`` (a tied output head) is :func:`quantized_matmul`."""

    def as_linear(self, x: mx.array) -> mx.array:
        return quantized_matmul(x, self["weight"], self["scales"], self.get("biases"),
                                group_size=self.group_size, bits=self.bits, mode=self.mode)


BLAS_CLASSES = {nn.QuantizedLinear: QuantizedLinear, nn.QuantizedEmbedding: QuantizedEmbedding}


def blas_quantized(model: nn.Module) -> int:
    """Give every ``nn.QuantizedLinear`` / ``nn.QuantizedEmbedding`` of ``model`` the subclass
    above, in place (same object and parameters: only the class changes).  Returns how many."""
    n = 0
    for _, m in model.named_modules():
        sub = BLAS_CLASSES.get(type(m))
        if sub is not None:
            m.__class__ = sub
            n += 1
    return n

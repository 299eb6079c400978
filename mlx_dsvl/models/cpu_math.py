"""Elementwise functions written for MLX's CPU backend, where transcendental ops are slow.

On Linux x86, MLX's CPU ``erf``, ``exp``, ``power`` and ``sigmoid`` evaluate one element at a
time through the C library (``erf`` and ``exp`` tens of ns per element, against about 1 ns for
a multiply-add, which vectorizes).  Here they are built from multiplies and adds, compiled into
one pass: the exact (erf) GELU of SigLIP, SAM-B and the aligner from a rational approximation of
``erf``; softmax numerators from a polynomial ``2 ** f`` times an exponent written into the float's
bits.  Both have hand-written gradients.  The GPU backends keep ``nn.gelu`` and fused attention.
"""

from __future__ import annotations

import math
from functools import partial

import mlx.core as mx
import mlx.nn as nn

# erf(x) ~= x P(x^2) / Q(x^2) on |x| <= 4 (|erf| > 1 - 2e-8 beyond: clamped).  Coefficients from a
# least-squares fit of x P - erf(x) Q = 0 on 20000 Chebyshev points of [0, 4], reweighted by 1/Q
# until the relative error settled (Loeb's method): 7.4e-8 in exact arithmetic, 4.3e-7 at most
# when evaluated in float32 (MLX's own float32 erf: 4.5e-7).
ERF_P = (1.1283791432976924, 0.20371281601622518, 0.051059550972642864, 0.003840709927763287,
         1.4338813039989205e-04, -1.922063587678641e-06, 1.909934514514091e-08)
ERF_Q = (1.0, 0.5138678292501607, 0.11654752638950566, 0.01465801001311505,
         9.837859043195251e-04)
# tanh(x) ~= x P(x^2) / Q(x^2) on |x| <= 9 (clamped beyond: |tanh| > 1 - 3e-8), fitted the same
# way on [0, 9]: 4.6e-7 at most in float32 (Q >= 1 there: no poles).
TANH_P = (0.9999999956722653, -0.15887316948085706, 0.03142074136629115, 0.00795379014056033,
          2.2610838588281928e-04, 1.3428456674653299e-06, 8.520829313120984e-10)
TANH_Q = (1.0, 0.17446005456126756, -0.04375894349696093, 0.02407406735865589,
          0.00163134439130955, 2.143996568453031e-05, 5.0255229669127996e-08)
SQRT1_2 = 1.0 / math.sqrt(2.0)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
LOG2E = 1.4426950408889634
# 2 ** f on |f| <= 1/2: degree-6 least-squares fit in relative error (1.9e-9; 1e-7 in float32).
EXP2_P = (1.0000000005921676, 0.693147205605892, 0.24022646608040946, 0.05550328985744369,
          0.009618519562863836, 0.0013399865143554916, 1.533758093729086e-04)
ROUND = 12582912.0  # 1.5 * 2 ** 23: t + ROUND rounds t to an integer, kept in the low mantissa bits


def _horner(coeffs, t: mx.array) -> mx.array:
    acc = coeffs[-1]
    for c in coeffs[-2::-1]:
        acc = acc * t + c
    return acc


def erf(x: mx.array) -> mx.array:
    """float32 ``erf`` from multiplies and adds (see ``ERF_P``); within 4.3e-7 of the exact one."""
    x = mx.clip(x, -4.0, 4.0)
    t = x * x
    return x * _horner(ERF_P, t) / _horner(ERF_Q, t)


def tanh(x: mx.array) -> mx.array:
    """float32 ``tanh`` from multiplies and adds (see ``TANH_P``); within 4.6e-7 of the exact one."""
    x = mx.clip(x, -9.0, 9.0)
    t = x * x
    return x * _horner(TANH_P, t) / _horner(TANH_Q, t)


@partial(mx.compile, shapeless=True)
def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """``silu(gate) * up`` (the Llama MLP's activation) for MLX's CPU backend, one pass:
    ``sigmoid(g) = (1 + tanh(g / 2)) / 2``.  Inference only (no hand-written gradient)."""
    return gate * (0.5 + 0.5 * tanh(0.5 * gate)) * up


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


@mx.compile
def _exp2_parts(x: mx.array, shift: mx.array):
    t = mx.clip(x - shift, -126.0, 126.0)
    r = t + ROUND
    return _horner(EXP2_P, t - (r - ROUND)), r


@mx.custom_function
def exp2_shifted(x: mx.array, shift: mx.array) -> mx.array:
    """``2 ** (x - shift)`` for finite float32 inputs (clamped to 2 ** +-126: ``-inf`` gives
    1e-38, not 0), within 1e-7 relative.  ``shift`` (a softmax's maximum) gets no gradient."""
    poly, r = _exp2_parts(x, shift)
    exponent = mx.view(r, mx.int32) - (0x4B400000 - 127)  # round(t) + 127, from r's low bits
    return poly * mx.view(mx.left_shift(exponent, 23), mx.float32)


@exp2_shifted.vjp
def _exp2_shifted_vjp(primals, cotangent, output):
    x, shift = primals
    return cotangent * output * math.log(2.0), mx.zeros_like(shift)

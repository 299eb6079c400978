"""mlx_dsvl.models.cpu_math and the towers' CPU attention: values and gradients against exact
references (the C library's erf, PyTorch's GELU, MLX's softmax and fused attention)."""

from __future__ import annotations

import math

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from mlx_dsvl.models import cpu_math  # noqa: E402
from mlx_dsvl.models.attention import attention, decomposed_bias, exp_from_max  # noqa: E402


@pytest.fixture(autouse=True)
def _cpu():
    before = mx.default_device()
    mx.set_default_device(mx.cpu)  # the paths under test are the CPU ones, also on a GPU machine
    yield
    mx.set_default_device(before)


def test_erf_is_within_float32_reach_of_the_exact_one():
    x = np.linspace(-7, 7, 200001, dtype=np.float32)
    exact = np.array([math.erf(v) for v in x.astype(np.float64)])
    ours = np.array(cpu_math.erf(mx.array(x)), dtype=np.float64)
    assert np.abs(ours - exact).max() < 5e-7
    small = np.abs(x) < 1e-3  # relative accuracy near 0 too (where erf(x) ~ 1.128 x)
    assert (np.abs(ours - exact)[small] / np.abs(exact[small]).clip(1e-30)).max() < 1e-6


def test_gelu_values_and_gradient_equal_pytorchs_exact_gelu():
    torch = pytest.importorskip("torch")
    x = np.concatenate([np.linspace(-9, 9, 20001), [0.0, -1e-4, 3e-5]]).astype(np.float32)
    xt = torch.from_numpy(x).double().requires_grad_()
    ref = torch.nn.functional.gelu(xt)  # exact (erf) GELU, in float64
    ref.sum().backward()
    ours = np.array(cpu_math.gelu_cpu(mx.array(x)))
    grad = np.array(mx.grad(lambda a: cpu_math.gelu_cpu(a).sum())(mx.array(x)))
    assert np.abs(ours - ref.detach().numpy()).max() < 2e-6  # float32 ulp at |x| = 9: 1e-6
    assert np.abs(grad - xt.grad.numpy()).max() < 1e-6
    layer = cpu_math.GELU()
    assert mx.array_equal(layer(mx.array(x)), cpu_math.gelu_cpu(mx.array(x))).item()


def test_exp_from_max_is_the_softmax_numerator_with_its_gradient():
    x = mx.random.normal((4, 1000), key=mx.random.key(1)) * 8
    p, m = exp_from_max(x)
    assert mx.allclose(p / p.sum(-1, keepdims=True), mx.softmax(x, axis=-1), atol=1e-7, rtol=1e-5).item()
    assert mx.array_equal(m, x.max(-1, keepdims=True)).item()
    lse = lambda a: (lambda p, m: (m[:, 0] + mx.log(p.sum(-1))).sum())(*exp_from_max(a))  # noqa: E731
    assert mx.allclose(mx.grad(lse)(x), mx.softmax(x, axis=-1), atol=1e-7, rtol=1e-5).item()


def test_attention_with_the_decomposed_bias_equals_fused_attention_with_the_full_bias():
    """SAM's rel-pos bias added as two broadcast factors on the CPU == the full bias in
    mx.fast's attention; values and gradients (stage 3 never trains SAM, SigLIP has no bias)."""
    keys = iter(mx.random.split(mx.random.key(3), 6))
    B, N, h, W, kH, kW, d = 2, 3, 2, 5, 4, 5, 8
    q = mx.random.normal((B, N, h * W, d), key=next(keys))
    k, v = (mx.random.normal((B, N, kH * kW, d), key=next(keys)) for _ in range(2))
    rel_h = mx.random.normal((B, N, h, W, kH), key=next(keys))
    rel_w = mx.random.normal((B, N, h, W, kW), key=next(keys))
    bias = decomposed_bias(rel_h, rel_w)
    assert bias.shape == (B, N, h * W, kH * kW)
    assert bias[1, 2, 1 * W + 3, 2 * kW + 4].item() == pytest.approx(
        (rel_h[1, 2, 1, 3, 2] + rel_w[1, 2, 1, 3, 4]).item())
    ours = attention(q, k, v, 0.3, rel=(rel_h, rel_w))
    ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3, mask=bias)
    assert mx.allclose(ours, ref, atol=1e-5).item()
    f_ours = lambda *a: (attention(*a[:3], 0.3, rel=a[3:]) ** 2).sum()  # noqa: E731
    f_ref = lambda *a: (mx.fast.scaled_dot_product_attention(  # noqa: E731
        *a[:3], scale=0.3, mask=decomposed_bias(*a[3:])) ** 2).sum()
    args = (q, k, v, rel_h, rel_w)
    for a, b in zip(mx.grad(f_ours, argnums=tuple(range(5)))(*args),
                    mx.grad(f_ref, argnums=tuple(range(5)))(*args)):
        assert mx.allclose(a, b, atol=1e-4).item()


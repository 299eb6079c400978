"""mlx_dsvl.models.cpu_math and the towers' CPU attention: values and gradients against exact
references (the C library's erf, float64 numpy, PyTorch's GELU, MLX's fused attention)."""

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


def test_exp2_shifted_values_and_gradients():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(6, 300)) * 30).astype(np.float32)
    m = x.max(axis=-1, keepdims=True)
    exact = 2.0 ** (x - m).astype(np.float64)  # of the float32 difference, as computed
    ours = np.array(cpu_math.exp2_shifted(mx.array(x), mx.array(m)), dtype=np.float64)
    normal = exact > 2.0 ** -126
    assert (np.abs(ours - exact)[normal] / exact[normal]).max() < 3e-7
    assert ours[~normal].max(initial=0.0) <= 2.0 ** -125  # clamped, not wrapped around
    w = mx.array(rng.normal(size=x.shape).astype(np.float32))
    g = mx.grad(lambda a: (cpu_math.exp2_shifted(a, mx.array(m)) * w).sum())(mx.array(x))
    expected = np.array(w, dtype=np.float64) * exact * math.log(2.0)
    assert np.abs(np.array(g) - expected).max() < 1e-6 * np.abs(expected).max()


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


def test_tanh_and_swiglu_against_exact_references():
    x = np.linspace(-12, 12, 100001, dtype=np.float32)
    assert np.abs(np.array(cpu_math.tanh(mx.array(x)), dtype=np.float64) - np.tanh(x.astype(np.float64))).max() < 5e-7
    g = mx.array(x)
    u = mx.array(np.cos(x).astype(np.float32))
    exact = x.astype(np.float64) / (1 + np.exp(-x.astype(np.float64))) * np.cos(x).astype(np.float64)
    assert np.abs(np.array(cpu_math.swiglu(g, u), dtype=np.float64) - exact).max() < 3e-6  # |x| <= 12


def _tiny_llama():
    from mlx_lm.models import llama

    args = llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=96,
                           num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-6,
                           vocab_size=300, tie_word_embeddings=False)
    mx.random.seed(4)
    model = llama.Model(args)
    model.update(__import__("mlx.utils", fromlist=["tree_map"]).tree_map(
        lambda p: p * 4, model.parameters()))  # larger activations: SwiGLU's tails and peaked softmaxes
    return model


def test_cpu_prefill_equals_mlx_lm_forward_and_fills_the_same_cache():
    """The CPU prompt pass (SwiGLU, attention) == mlx-lm's forward: a first turn, then a second
    one on top of its KV cache (offset > 0), hidden states and cached keys/values alike."""
    from mlx_dsvl.models.cpu_prefill import prefill_hidden

    model = _tiny_llama()
    ids = [mx.random.randint(0, 300, (1, 23), key=mx.random.key(7)),
           mx.random.randint(0, 300, (1, 9), key=mx.random.key(8))]
    ours_cache, ref_cache = model.make_cache(), model.make_cache()
    for turn in ids:
        ours = prefill_hidden(model, turn, ours_cache)
        ref = model.model(turn, ref_cache)
        scale = float(mx.abs(ref).max())
        assert float(mx.abs(ours - ref).max()) <= 1e-5 * scale, "hidden states"
        for a, b in zip(ours_cache, ref_cache):
            assert a.offset == b.offset
            for x, y in zip(a.state, b.state):
                assert float(mx.abs(x - y).max()) <= 1e-5 * float(mx.abs(y).max()), "KV cache"
    # without a cache (training-style full pass) and with input embeddings
    emb = model.model.embed_tokens(ids[0]) * 1.5
    assert mx.allclose(prefill_hidden(model, ids[0], None, emb), model.model(ids[0], None, emb),
                       atol=1e-5 * float(mx.abs(emb).max()) * 10).item()

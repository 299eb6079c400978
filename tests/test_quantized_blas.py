"""Quantized layers on MLX's CPU backend (``models/cpu_math.py``): given many rows they dequantize
their weight and multiply through BLAS, given few they keep ``mx.quantized_matmul``.  Both compute
the same dequantized product, so they agree to float32 rounding: elementwise within
``ROUNDING * sum_k |x_k w_k|`` (a few float32 ulps of the sum of magnitudes), checked against the
float64 product of the same dequantized weight; whole tiny models (both families) agree to the
rounding carried through their layers and give the same greedy tokens."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from PIL import Image

mx = pytest.importorskip("mlx.core")
nn = pytest.importorskip("mlx.nn")

from mlx.utils import tree_flatten  # noqa: E402

import mlx_dsvl  # noqa: E402
from mlx_dsvl.adapters import fuse_adapters, wrap_linear  # noqa: E402
from mlx_dsvl.convert.to_mlx import convert_to_mlx  # noqa: E402
from mlx_dsvl.models import cpu_math  # noqa: E402

ROUNDING = 1e-6  # float32's epsilon is 1.2e-7
PROMPT = [{"role": "user", "content": "<image_placeholder>Describe this image in detail, please."}]


@pytest.fixture(autouse=True)
def _cpu():
    before = mx.default_device()
    mx.set_default_device(mx.cpu)  # the path under test is the CPU one, also on a GPU machine
    yield
    mx.set_default_device(before)


@pytest.fixture
def matmuls(monkeypatch):
    """Counts the calls of ``mx.quantized_matmul`` (MLX's layers and ours look it up at call time)."""
    calls = []
    real = mx.quantized_matmul

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(mx, "quantized_matmul", spy)
    return calls


def force_off(monkeypatch):
    """Every quantized layer on ``mx.quantized_matmul``: the path before this one."""
    monkeypatch.setattr(cpu_math, "BLAS_MIN_ROWS", sys.maxsize)


def dense(layer) -> np.ndarray:
    w = mx.dequantize(layer.weight, layer.scales, layer.biases, group_size=layer.group_size, bits=layer.bits)
    return np.array(w, dtype=np.float64)


def rounding_bound(x: mx.array, w: np.ndarray) -> np.ndarray:
    return ROUNDING * (np.abs(np.array(x, dtype=np.float64)) @ np.abs(w).T)


def layer_of(in_dims: int, out_dims: int, bits: int) -> nn.QuantizedLinear:
    layer = nn.QuantizedLinear(in_dims, out_dims, bias=True, group_size=64, bits=bits)
    layer.bias = mx.random.normal((out_dims,))
    assert cpu_math.blas_quantized(layer) == 1
    return layer


@pytest.mark.parametrize("bits", [4, 8])
def test_blas_path_equals_quantized_matmul_to_float32_rounding(bits, monkeypatch, matmuls):
    mx.random.seed(bits)
    layer = layer_of(512, 192, bits)
    assert type(layer) is cpu_math.QuantizedLinear
    x = mx.random.normal((3, 40, 512))
    w = dense(layer)
    ref = np.array(x, dtype=np.float64) @ w.T + np.array(layer.bias)
    fast = np.array(layer(x))
    assert matmuls == []  # 120 rows: dequantized, through BLAS
    force_off(monkeypatch)
    slow = np.array(layer(x))
    assert len(matmuls) == 1
    bound = rounding_bound(x, w)
    assert (np.abs(fast - ref) <= bound).all() and (np.abs(slow - ref) <= bound).all()
    assert (np.abs(fast - slow) <= bound).all()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("bits", [4, 8])
def test_dequantize_equals_mlxs(bits, dtype):
    dtype = getattr(mx, dtype)
    for group_size in (32, 64, 128):
        w = (mx.random.normal((96, 384)) * 0.05).astype(dtype)
        wq, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
        ours = cpu_math.dequantize(wq, scales, biases, group_size=group_size, bits=bits, mode="affine", dtype=dtype)
        theirs = mx.dequantize(wq, scales, biases, group_size=group_size, bits=bits, dtype=dtype)
        assert ours.dtype == dtype and ours.shape == theirs.shape
        assert np.array_equal(np.array(ours.astype(mx.float32)), np.array(theirs.astype(mx.float32)))


def test_few_rows_keep_the_quantized_matmul(matmuls):
    layer = layer_of(256, 64, 4)
    for rows in range(1, cpu_math.BLAS_MIN_ROWS):
        mx.eval(layer(mx.random.normal((1, rows, 256))))
    assert len(matmuls) == cpu_math.BLAS_MIN_ROWS - 1  # decoding: MLX's quantized GEMV
    mx.eval(layer(mx.random.normal((cpu_math.BLAS_MIN_ROWS, 256))))
    assert len(matmuls) == cpu_math.BLAS_MIN_ROWS - 1


def stack_peak(depth: int, dims: int = 1024) -> float:
    """Peak memory above the weights of ``depth`` quantized layers given 64 rows, in dense
    float32 weights."""
    stack = nn.Sequential(*[nn.QuantizedLinear(dims, dims, bias=False, group_size=64, bits=4) for _ in range(depth)])
    cpu_math.blas_quantized(stack)
    x = mx.random.normal((64, dims))
    mx.eval(stack.parameters(), x)
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(stack(x))
    return (mx.get_peak_memory() - before) / (dims * dims * 4)


def test_dense_weights_are_transients_of_one_layer_at_a_time():
    """Dequantized weights are made as the layers are reached, not all first: the peak does not
    grow with the depth (it did, by one dense weight per layer, before)."""
    assert stack_peak(48) <= stack_peak(16) + 1  # measured 10.7 and 10.7 (19 and 41 before)


def test_tied_head_as_linear_takes_the_blas_path(monkeypatch, matmuls):
    emb = nn.Embedding(320, 128)
    emb.weight = mx.random.normal((320, 128))
    q = nn.QuantizedEmbedding.from_embedding(emb, group_size=64, bits=4)
    cpu_math.blas_quantized(q)
    h = mx.random.normal((1, 30, 128))
    fast = np.array(q.as_linear(h))
    assert matmuls == []
    force_off(monkeypatch)
    slow = np.array(q.as_linear(h))
    assert len(matmuls) == 1
    assert (np.abs(fast - slow) <= rounding_bound(h, dense(q))).all()
    assert np.array_equal(np.array(q(mx.array([[3, 7]]))), np.array(nn.QuantizedEmbedding.__call__(q, mx.array([[3, 7]]))))


def lora_grads(lora, x):
    def loss(m, x):
        return (m(x) ** 2).sum()

    _, grads = nn.value_and_grad(lora, loss)(lora, x)
    gx = mx.grad(lambda x: loss(lora, x))(x)
    return grads, gx


def test_qlora_gradients_and_fuse(monkeypatch):
    """A LoRA on a quantized layer: the input's and the adapter's gradients are those of the
    quantized_matmul path, the frozen base gets none; fusing gives a quantized layer on the BLAS
    path again (or a plain one with dequantize)."""
    mx.random.seed(3)
    lora = wrap_linear(layer_of(256, 96, 4), "lora", rank=4, scale=2.0, dropout=0.0)
    lora.lora_b = mx.random.normal(lora.lora_b.shape) * 0.1
    x = mx.random.normal((2, 24, 256))
    grads, gx = lora_grads(lora, x)
    assert sorted(k for k, _ in tree_flatten(grads)) == ["lora_a", "lora_b"]
    with monkeypatch.context() as m:
        force_off(m)
        grads_off, gx_off = lora_grads(lora, x)
    for a, b in ((grads["lora_a"], grads_off["lora_a"]), (grads["lora_b"], grads_off["lora_b"]), (gx, gx_off)):
        assert np.allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-4 * float(mx.abs(b).max()))
    y = np.array(lora(x))
    plain = fuse_adapters(nn.Sequential(wrap_linear(lora.linear, "lora", rank=4, scale=2.0, dropout=0.0)), dequantize=True)
    assert type(plain.layers[0]) is nn.Linear
    held = nn.Sequential(lora)
    fuse_adapters(held)
    fused = held.layers[0]
    assert type(fused) is cpu_math.QuantizedLinear and fused.bits == 4
    assert np.abs(np.array(fused(x)) - y).max() < 0.05 * np.abs(y).max()  # 4-bit re-quantization


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["tiny_dir", "tiny_hybrid_dir"])
def test_tiny_models_prefill_and_greedy_tokens_match_the_quantized_matmul_path(arch, request, monkeypatch, matmuls):
    loaded = mlx_dsvl.load(request.getfixturevalue(arch), dtype="float32", quantize=4)
    model, processor = loaded
    kinds = {type(m) for _, m in model.language_model.named_modules() if isinstance(m, nn.QuantizedLinear)}
    assert kinds == {cpu_math.QuantizedLinear}  # every linear layer, lm_head included
    assert type(model.language_model.model.embed_tokens) is cpu_math.QuantizedEmbedding
    image = Image.fromarray(np.random.default_rng(5).integers(0, 255, (60, 80, 3), dtype=np.uint8))
    batch = processor(PROMPT, [image])

    def run():
        logits = model(batch["input_ids"], pixel_values=batch["pixel_values"])
        chunks = mlx_dsvl.stream_generate(model, processor, PROMPT, [image], max_tokens=12, temperature=0.0)
        return np.array(logits, dtype=np.float64), [c.token for c in chunks if c.token is not None]

    fast, tokens = run()
    prefill_calls = [s for s in matmuls if s[-2] != 1]
    assert prefill_calls == [] and matmuls  # prefill through BLAS, decoding on the quantized GEMV
    force_off(monkeypatch)
    slow, tokens_off = run()
    print(f"\n{arch}: {len(tokens)} greedy tokens, logits differ by {np.abs(fast - slow).max() / np.abs(slow).max():.1e}"
          " of their largest")
    assert tokens == tokens_off and tokens
    assert np.abs(fast - slow).max() <= 1e-5 * np.abs(slow).max()


def test_converted_folder_loads_onto_the_blas_path(tiny_hybrid_dir, tmp_path):
    """A ``convert --quantize`` folder (vision quantized too) is rebuilt by ``quantize_like``."""
    out = convert_to_mlx(str(tiny_hybrid_dir), str(tmp_path / "q8"), quantize=True, q_bits=8, q_group_size=32,
                         quantize_vision=True, progress=lambda s: None)
    model, _ = mlx_dsvl.load(out)
    kinds = {p.split(".")[0]: type(m) for p, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)}
    assert kinds == dict.fromkeys(("language_model", "vision_model", "aligner"), cpu_math.QuantizedLinear)

"""Quantized vision (``--quantize-vision 8|4``): the towers' and the aligner's linear layers with
bits of their own, through the converter, ``load(quantize_vision=)`` and the entry points."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

import mlx_dsvl
from mlx_dsvl.convert.to_mlx import convert_to_mlx

QUANTIZED = (nn.QuantizedLinear, nn.QuantizedEmbedding)


def quantized_bits(model) -> dict[str, int]:
    """Each quantized layer of ``model`` -> its bits."""
    return {p: m.bits for p, m in model.named_modules() if isinstance(m, QUANTIZED)}


def linear_layers(model, prefixes: tuple[str, ...]) -> set[str]:
    return {p for p, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding)) and p.startswith(prefixes)}


def convert(src, out, bits, vision_bits, group=32):
    return convert_to_mlx(str(src), str(out), quantize=bits is not None, q_bits=bits or 4, q_group_size=group,
                          quantize_vision=vision_bits, progress=lambda _: None)


def assert_same_parameters(a, b) -> None:
    pa, pb = dict(tree_flatten(a.parameters())), dict(tree_flatten(b.parameters()))
    assert sorted(pa) == sorted(pb)
    for k in pa:
        assert pa[k].dtype == pb[k].dtype and mx.array_equal(pa[k], pb[k]).item(), k


# -- load-time quantization == converted folder ------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("arch,bits,vision_bits", [("tiny", None, 8), ("tiny", 4, 4),
                                                   ("tiny-hybrid", 4, 8), ("tiny-hybrid", None, 4)])
def test_quantize_vision_on_load_equals_convert_then_load(tiny_dir, tiny_hybrid_dir, tmp_path, arch, bits,
                                                          vision_bits):
    """``load(quantize=, quantize_vision=)`` gives bit for bit what loading the converted folder
    gives, with each group's own bits; with groups of 32 every tiny vision linear layer is quantized."""
    src = tiny_dir if arch == "tiny" else tiny_hybrid_dir
    converted, _ = mlx_dsvl.load(convert(src, tmp_path / "q", bits, vision_bits), dtype="float32")
    on_load, _ = mlx_dsvl.load(src, dtype="float32", quantize=bits, quantize_vision=vision_bits, q_group_size=32)
    plain = mlx_dsvl.load(src, dtype="float32")[0]
    vision = linear_layers(plain, ("vision_model.", "aligner."))
    language = linear_layers(plain, ("language_model.",)) if bits else set()
    expected = {**dict.fromkeys(vision, vision_bits), **dict.fromkeys(language, bits)}
    assert quantized_bits(converted) == quantized_bits(on_load) == expected
    assert_same_parameters(converted, on_load)


# -- the entry points ----------------------------------------------------------------------------
def test_entry_points_pass_quantize_vision_to_load(monkeypatch):
    """generate, the server and eval parse ``--quantize-vision {4,8}`` and hand it to ``load``."""
    from mlx_dsvl import loading
    from mlx_dsvl.eval.__main__ import build_parser as eval_parser
    from mlx_dsvl.generate import build_parser as generate_parser
    from mlx_dsvl.model_options import load_from_args
    from mlx_dsvl.server.__main__ import build_parser as server_parser

    calls = []
    monkeypatch.setattr(loading, "load", lambda *a, **kw: calls.append(kw))
    for parser, extra in ((generate_parser(), ["--prompt", "hi"]), (server_parser(), []),
                          (eval_parser(), ["--data", "x.tsv"])):
        load_from_args(parser.parse_args(["--quantize-vision", "8", "--quantize", "4", *extra]))
        assert parser.parse_args(extra).quantize_vision is None  # the default: unquantized vision
        with pytest.raises(SystemExit):
            parser.parse_args(["--quantize-vision", "3", *extra])
    assert [(c["quantize"], c["quantize_vision"]) for c in calls] == [(4, 8)] * 3


@pytest.mark.slow
def test_bench_quantize_vision(tmp_path):
    """``python -m mlx_dsvl.bench --quantize-vision 8``: the vision's resident bytes shrink, the
    LLM's do not; the JSON records the bits."""
    import json
    import os
    import subprocess
    import sys

    from mlx_dsvl.bench_chat import weights_by_part
    from mlx_dsvl.random_checkpoint import cached_checkpoint

    out = tmp_path / "bench.json"
    env = {**os.environ, "MLX_DSVL_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "mlx_dsvl.bench", "--arch", "tiny", "--max-tokens", "2", "--warmup", "0",
                        "--quantize-vision", "8", "--json", str(out)], capture_output=True, text=True, timeout=600,
                       env=env)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    model = mlx_dsvl.load(cached_checkpoint("tiny"), dtype="float32")[0]
    plain = weights_by_part(model)
    assert res["quantize_vision"] == 8 and res["quantize"] is None
    # each vision linear weight [out, in] (all widths divide by 64 in tiny): 4 bytes a weight in
    # float32 -> 1 byte a weight + a float32 scale and bias per group of 64
    saved = sum(m.weight.size * 4 - (m.weight.size + 2 * 4 * m.weight.size // 64)
                for p, m in model.named_modules() if p in linear_layers(model, ("vision_model.", "aligner.")))
    assert res["weights_vision_gb"] == pytest.approx(plain["weights_vision_gb"] - saved / 1e9)
    assert res["weights_llm_gb"] == pytest.approx(plain["weights_llm_gb"])

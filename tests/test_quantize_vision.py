"""Quantized vision (``--quantize-vision 8|4``): the towers' and the aligner's linear layers with
bits of their own, through the converter, ``load(quantize_vision=)`` and the entry points."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

import mlx_dsvl
from mlx_dsvl.convert.__main__ import main as convert_main
from mlx_dsvl.convert.files import ConvertError
from mlx_dsvl.convert.to_mlx import convert_to_mlx
from mlx_dsvl.convert.to_original import convert_to_original
from mlx_dsvl.loading import ModelLoadError
from mlx_dsvl.mlx_format import MARKER
from mlx_dsvl.testing.synthetic import draw

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
    from mlx_dsvl import loading, memory_budget
    from mlx_dsvl.eval.__main__ import build_parser as eval_parser
    from mlx_dsvl.generate import build_parser as generate_parser
    from mlx_dsvl.model_options import load_from_args
    from mlx_dsvl.server.__main__ import build_parser as server_parser

    calls = []
    monkeypatch.setattr(loading, "load", lambda *a, **kw: calls.append(kw))
    monkeypatch.setattr(memory_budget, "apply_budget", lambda *a: None)  # (no model folder to read)
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


# -- the converter -------------------------------------------------------------------------------
def pixels(model_dir, seed: int = 0) -> mx.array:
    """One synthetic picture, preprocessed for ``model_dir``'s towers: [1, 3, S, S]."""
    import numpy as np

    from mlx_dsvl.processing.image import ImageProcessor

    proc = ImageProcessor.from_pretrained(model_dir)
    return mx.array(proc([draw("red", "circle", "blue", np.random.default_rng(seed), size=512)]))


def features(model, px: mx.array) -> mx.array:
    return model.encode_images(px).astype(mx.float32)


def rel_error(a: mx.array, ref: mx.array) -> float:
    return (mx.linalg.norm((a - ref).reshape(-1)) / mx.linalg.norm(ref.reshape(-1))).item()


def record(folder) -> dict:
    return json.loads((folder / "config.json").read_text())[MARKER]


def write_record(folder, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg[MARKER] = {**cfg[MARKER], **changes}
    (folder / "config.json").write_text(json.dumps(cfg))


def test_convert_cli_vision_bits(tiny_dir, tmp_path, capsys):
    """``--quantize-vision BITS`` alone or beside ``--quantize``; a bare ``--quantize-vision``
    takes ``--q-bits`` as before; the record says each group's bits."""
    base = ["--model", str(tiny_dir), "--q-group-size", "32"]
    assert convert_main([*base, "--out", str(tmp_path / "v4"), "--quantize-vision", "4"]) == 0
    assert record(tmp_path / "v4")["quantization"] == {"bits": None, "group_size": 32, "mode": "affine",
                                                       "vision": True, "vision_bits": 4}
    assert record(tmp_path / "v4")["format_version"] == 2  # a version-1 reader would misread it
    assert convert_main([*base, "--out", str(tmp_path / "same"), "--quantize", "--q-bits", "8",
                         "--quantize-vision"]) == 0
    q = record(tmp_path / "same")
    assert (q["quantization"]["bits"], q["quantization"]["vision_bits"], q["format_version"]) == (8, 8, 1)
    assert convert_main([*base, "--out", str(tmp_path / "mixed"), "--quantize", "--quantize-vision", "8"]) == 0
    assert "LLM 4-bit, vision 8-bit, groups of 32" in capsys.readouterr().err
    model, _ = mlx_dsvl.load(tmp_path / "mixed")
    assert set(quantized_bits(model).values()) == {4, 8}
    assert {b for p, b in quantized_bits(model).items() if p.startswith(("vision_model.", "aligner."))} == {8}
    for bad, message in ((["--q-bits", "8", "--quantize-vision", "4"], "--q-bits needs --quantize"),
                         (["--quantize-vision", "3"], "invalid choice: 3")):
        with pytest.raises(SystemExit):
            convert_main(["--model", str(tiny_dir), "--out", str(tmp_path / "bad"), *bad])
        assert message in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["tiny", "tiny-hybrid"])
def test_quantized_vision_features_and_round_trip(tiny_dir, tiny_hybrid_dir, tmp_path, arch):
    """Features of 8- and 4-bit towers stay near the unquantized ones, 4-bit about 17 times
    farther (its rounding step is (2^8 - 1) / (2^4 - 1) = 17 times 8-bit's); a mixed folder (LLM
    4-bit, vision 8-bit) goes back to the original layout with each layer dequantized at its own
    bits: the original-layout folder computes what the quantized one computes.

    Tolerances: affine rounding with groups of 32 leaves a weight error of about step / sqrt(12),
    0.5% of the weights' scale at 8 bits, 8% at 4 bits, per layer; through the tiny towers'
    few layers the features' error measured 1.5% and 19-25% (benchmarks/vision_quant_error.py's
    tiny rows): the bounds below leave a factor of 2.
    """
    src = tiny_dir if arch == "tiny" else tiny_hybrid_dir
    px = pixels(src)
    ref = features(mlx_dsvl.load(src, dtype="float32")[0], px)
    errors = {bits: rel_error(features(mlx_dsvl.load(src, dtype="float32", quantize_vision=bits,
                                                     q_group_size=32)[0], px), ref) for bits in (8, 4)}
    assert 0 < errors[8] < 0.03 and errors[4] < 0.5, errors
    assert 8 < errors[4] / errors[8] < 35, errors

    mixed = convert(src, tmp_path / "mixed", 4, 8)
    quantized = mlx_dsvl.load(mixed, dtype="float32")[0]
    back = convert_to_original(str(mixed), str(tmp_path / "orig"), progress=lambda _: None)
    assert MARKER not in json.loads((back / "config.json").read_text())
    restored = mlx_dsvl.load(back, dtype="float32")[0]
    assert not quantized_bits(restored)
    got, want = features(restored, px), features(quantized, px)
    assert rel_error(got, want) < 1e-5  # float rounding only (a wrong bit width would be far off)


@pytest.mark.slow
def test_simulated_quantization_is_the_quantized_layers(tiny_hybrid_dir):
    """benchmarks/vision_quant_error.py runs float matmuls with the dequantized weights: on the
    tiny hybrid they give the quantized towers' features to float rounding."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "benchmarks"))
    import vision_quant_error as vq

    from mlx_dsvl.mlx_format import quantize_policy

    px = pixels(tiny_hybrid_dir)
    model, stored = vq.load_parts(tiny_hybrid_dir, ("vision_model.", "aligner."))
    policy = quantize_policy(model, {"vision": 4}, 32)
    vq.swap(model, vq.quantized_weights(model, policy, stored, 32))
    real = mlx_dsvl.load(tiny_hybrid_dir, dtype="float32", quantize_vision=4, q_group_size=32)[0]
    assert rel_error(model._encode(px), real._encode(px)) < 1e-5


@pytest.mark.slow
def test_simulated_quantization_with_the_llm_quantized(tiny_hybrid_dir):
    """``--llm-bits 4``: the benchmark's model has the LLM quantized as ``load(quantize=4)`` does
    and only it; with its vision weights swapped for 8-bit ones, the LLM's logits after the image
    are the ones of ``load(quantize=4, quantize_vision=8)`` to float rounding."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "benchmarks"))
    import vision_quant_error as vq

    from mlx_dsvl.mlx_format import quantize_policy

    px = pixels(tiny_hybrid_dir)
    model, stored = vq.load_parts(tiny_hybrid_dir, ("vision_model.", "aligner.", "language_model."), 4, 32)
    bits = quantized_bits(model)
    assert bits and set(bits.values()) == {4} and all(p.startswith("language_model.") for p in bits)
    vq.swap(model, vq.quantized_weights(model, quantize_policy(model, {"vision": 8}, 32), stored, 32))
    real = mlx_dsvl.load(tiny_hybrid_dir, dtype="float32", quantize=4, quantize_vision=8, q_group_size=32)[0]
    ids = mx.array([[1, 2, 3] + [model.image_token_id] * 576 + [4, 5, 6]])

    def logits(m):
        return m.lm_head(m.hidden_states(ids, image_embeds=m._encode(px)[None])[0, -3:])

    assert rel_error(logits(model), logits(real)) < 1e-5


# -- records: old, mismatched, quantizing again ----------------------------------------------------
def test_old_record_still_loads_the_same(tiny_hybrid_dir, tmp_path):
    """A folder written before vision bits of their own (``"vision": true``, one ``bits``, no
    ``vision_bits``) loads as it did: the vision at the LLM's bits."""
    new = convert(tiny_hybrid_dir, tmp_path / "new", 8, 8)
    old = tmp_path / "old"
    shutil.copytree(new, old)
    write_record(old, format_version=1, quantization={"bits": 8, "group_size": 32, "mode": "affine", "vision": True})
    a, b = mlx_dsvl.load(new)[0], mlx_dsvl.load(old)[0]
    assert set(quantized_bits(b).values()) == {8} and quantized_bits(a) == quantized_bits(b)
    assert any(p.startswith("vision_model.") for p in quantized_bits(b))
    assert_same_parameters(a, b)


def test_a_record_that_does_not_match_the_tensors_is_refused(tiny_hybrid_dir, tmp_path):
    mixed = convert(tiny_hybrid_dir, tmp_path / "mixed", 4, 8)
    bad = tmp_path / "bad"
    shutil.copytree(mixed, bad)
    q = record(mixed)["quantization"]
    for changes, message in (({"vision_bits": 4}, "weight is packed as 8-bit but config.json records 4-bit vision"),
                             ({"vision_bits": None, "vision": False},
                              "is stored quantized but config.json records the vision layers unquantized"),
                             ({"bits": 8}, "weight is packed as 4-bit but config.json records 8-bit LLM")):
        write_record(bad, quantization={**q, **changes})
        with pytest.raises(ModelLoadError, match=message):
            mlx_dsvl.load(bad)
        with pytest.raises(ConvertError, match=message):  # --to-original reads the same record
            convert_to_original(str(bad), str(tmp_path / "out"), progress=lambda _: None)


@pytest.mark.slow
def test_mismatched_record_is_one_line_from_generate(tiny_hybrid_dir, tmp_path):
    bad = convert(tiny_hybrid_dir, tmp_path / "bad", 4, 8)
    write_record(bad, quantization={**record(bad)["quantization"], "vision_bits": 4})
    r = subprocess.run([sys.executable, "-m", "mlx_dsvl.generate", "--model", str(bad), "--prompt", "hi"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error: ") and "packed as 8-bit but config.json records 4-bit vision" in r.stderr


def test_quantizing_a_quantized_group_again_is_refused(tiny_dir, tmp_path):
    """``quantize_vision`` on a folder whose vision is stored quantized: refused, as ``quantize``
    on a quantized LLM; the other group may still be quantized while loading, bit for bit as if
    converted with both."""
    vision = convert(tiny_dir, tmp_path / "v8", None, 8)
    with pytest.raises(ModelLoadError, match=r"already quantized \(vision 8-bit, groups of 32\); load it "
                                             "without quantize_vision again"):
        mlx_dsvl.load(vision, quantize_vision=4)
    llm = convert(tiny_dir, tmp_path / "l4", 4, None)
    with pytest.raises(ModelLoadError, match="without quantize again"):
        mlx_dsvl.load(llm, quantize=8)
    both = mlx_dsvl.load(convert(tiny_dir, tmp_path / "both", 4, 8))[0]
    assert_same_parameters(mlx_dsvl.load(llm, quantize_vision=8, q_group_size=32)[0], both)
    assert_same_parameters(mlx_dsvl.load(vision, quantize=4, q_group_size=32)[0], both)
    with pytest.raises(ValueError, match="quantize_vision must be one of"):
        mlx_dsvl.load(tiny_dir, quantize_vision=3)


def test_fingerprint_layout_names_the_vision_bits_only_when_they_differ():
    """Adapters record their base's layout: folders written before vision bits of their own keep
    their name (``q4/64``), a mixed folder is told apart."""
    from mlx_dsvl.mlx_format import quantization_record
    from mlx_dsvl.model_folder import quant_tags

    old = {"bits": 4, "group_size": 64, "mode": "affine", "vision": True}
    assert quant_tags(old) == quant_tags(quantization_record(4, None, 64)) == ["q4/64"]
    assert quant_tags(quantization_record(4, 8, 64)) == ["q4/64", "vision q8"]
    assert quant_tags(quantization_record(None, 8, 64)) == ["q-/64", "vision q8"]
    assert quant_tags(None) == []

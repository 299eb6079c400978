"""``mlx_dsvl.load``: both layouts through the public API, and every kind of bad folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import mlx_dsvl
from mlx_dsvl.loading import ModelLoadError


def listing(path: Path):
    return sorted((p.relative_to(path).as_posix(), p.stat().st_size) for p in path.rglob("*"))


def broken_copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def expect_error(path: Path, *fragments: str):
    before = listing(path) if path.exists() else None
    with pytest.raises(ModelLoadError) as e:
        mlx_dsvl.load(path)
    msg = str(e.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, msg
    if before is not None:
        assert listing(path) == before  # nothing written or removed
    return msg


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_hybrid_model"])
def test_load_both_layouts(fixture, request):
    model, processor = request.getfixturevalue(fixture)
    assert model.language_model.model.norm.weight.dtype == mx.float32
    assert processor.image_token_id == model.image_token_id == 100015
    batch = processor([{"role": "user", "content": "<image_placeholder> hi"}], [_img()])
    logits = model(batch["input_ids"], pixel_values=batch["pixel_values"])
    assert logits.shape == (1, batch["input_ids"].shape[1], 102400)
    assert bool(mx.isfinite(logits).all())


def _img():
    from PIL import Image

    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))


def test_default_dtype_follows_device(tiny_dir):
    """float32 on the CPU backend, bfloat16 on a GPU."""
    from mlx_dsvl.loading import default_dtype

    model, _ = mlx_dsvl.load(tiny_dir)
    want = mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16
    assert default_dtype() == want == model.language_model.model.norm.weight.dtype


def test_dtype_option(tiny_dir):
    model, _ = mlx_dsvl.load(tiny_dir, dtype="bfloat16")
    assert model.aligner.layers[0].weight.dtype == mx.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        mlx_dsvl.load(tiny_dir, dtype="int3")


def test_not_a_model_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    expect_error(tmp_path, str(tmp_path / "config.json"), "missing config.json")


def test_missing_folder(tmp_path):
    expect_error(tmp_path / "nope", "no such model folder")


def test_missing_weights(tiny_dir, tmp_path):
    d = broken_copy(tiny_dir, tmp_path)
    (d / "model.safetensors").unlink()
    expect_error(d, "no model.safetensors")


def test_missing_tokenizer(tiny_dir, tmp_path):
    d = broken_copy(tiny_dir, tmp_path)
    (d / "tokenizer.json").unlink()
    expect_error(d, "tokenizer")


def test_invalid_config_json(tiny_dir, tmp_path):
    d = broken_copy(tiny_dir, tmp_path)
    (d / "config.json").write_text("{not json")
    expect_error(d, "config.json", "invalid JSON")


def _edit_config(d: Path, fn):
    cfg = json.loads((d / "config.json").read_text())
    fn(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


def test_unknown_vision_cls(tiny_dir, tmp_path):
    d = broken_copy(tiny_dir, tmp_path)
    _edit_config(d, lambda c: c["vision_config"].update(cls="FancyTower"))
    expect_error(d, "unknown vision_config.cls 'FancyTower'")


def test_unknown_projector_type(tiny_dir, tmp_path):
    d = broken_copy(tiny_dir, tmp_path)
    _edit_config(d, lambda c: c["aligner_config"]["params"].update(projector_type="mlp_relu"))
    expect_error(d, "unknown aligner projector_type 'mlp_relu'")


def _edit_weights(d: Path, fn):
    w = load_file(str(d / "model.safetensors"))
    fn(w)
    save_file(w, str(d / "model.safetensors"))


def test_misshaped_weight(tiny_dir, tmp_path):
    d = broken_copy(tiny_dir, tmp_path)
    key = "aligner.layers.2.weight"
    _edit_weights(d, lambda w: w.update({key: w[key][:, :10]}))
    expect_error(d, f"weight {key} has shape (64, 10), expected (64, 64)")


def test_missing_and_unexpected_weight(tiny_dir, tmp_path):
    d = broken_copy(tiny_dir, tmp_path)
    _edit_weights(d, lambda w: w.pop("language_model.lm_head.weight"))
    expect_error(d, "missing weight language_model.lm_head.weight")
    _edit_weights(d, lambda w: w.update({"language_model.lm_head.weight": np.zeros((102400, 64), np.float32),
                                         "aligner.extra.weight": np.zeros((2, 2), np.float32)}))
    expect_error(d, "unexpected weight aligner.extra.weight")


def test_truncated_safetensors(tiny_dir, tmp_path):
    d = broken_copy(tiny_dir, tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    expect_error(d, "model.safetensors", "cannot read safetensors file")


def _shard(d: Path):
    """Split model.safetensors into two shards with an index, as the 7B release is stored."""
    w = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    keys = sorted(w)
    half = len(keys) // 2
    index = {}
    for i, part in enumerate([keys[:half], keys[half:]]):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: w[k] for k in part}, str(d / name))
        index.update({k: name for k in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    return index


def test_sharded_checkpoint_loads_identically(tiny_dir, tiny_model, tmp_path):
    d = broken_copy(tiny_dir, tmp_path)
    _shard(d)
    model, processor = mlx_dsvl.load(d)
    ids = mx.array([[100000, 5, 6, 7]])
    assert mx.array_equal(model(ids), tiny_model[0](ids))


def test_missing_shard_and_missing_tensor(tiny_dir, tmp_path):
    d = broken_copy(tiny_dir, tmp_path)
    index = _shard(d)
    (d / "model-00002-of-00002.safetensors").rename(d / "elsewhere.bin")
    expect_error(d, "missing shard file(s) model-00002-of-00002.safetensors")
    (d / "elsewhere.bin").rename(d / "model-00002-of-00002.safetensors")
    index["language_model.model.ghost.weight"] = "model-00001-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    expect_error(d, "tensor language_model.model.ghost.weight is not in model-00001-of-00002.safetensors")


# -- quantizing while loading -------------------------------------------------------------------
@pytest.mark.parametrize("stored,dtype,bits,group", [("float32", "float32", 4, 32), ("float16", "bfloat16", 4, 64),
                                                     ("float16", "float32", 8, 32)])
def test_quantize_on_load_equals_convert_then_load(tiny_dir, tmp_path, stored, dtype, bits, group):
    """``load(quantize=)`` gives bit for bit the model that ``python -m convert --quantize`` + load
    gives: the same layers quantized, the same packed weights, scales and biases."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from mlx_dsvl.convert.to_mlx import convert_to_mlx
    from mlx_dsvl.random_checkpoint import make_checkpoint

    src = tiny_dir if stored == "float32" else make_checkpoint("tiny", tmp_path / "src16", seed=1, dtype=stored)
    folder = convert_to_mlx(str(src), str(tmp_path / "q"), quantize=True, q_bits=bits, q_group_size=group,
                            progress=lambda _: None)
    converted, _ = mlx_dsvl.load(folder, dtype=dtype)
    on_load, _ = mlx_dsvl.load(src, dtype=dtype, quantize=bits, q_group_size=group)

    def quantized(m):
        return sorted(p for p, x in m.named_modules() if isinstance(x, (nn.QuantizedLinear, nn.QuantizedEmbedding)))

    assert quantized(on_load) == quantized(converted) and "language_model.lm_head" in quantized(on_load)
    a, b = dict(tree_flatten(converted.parameters())), dict(tree_flatten(on_load.parameters()))
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and mx.array_equal(a[k], b[k]).item(), k
    assert a["language_model.lm_head.scales"].dtype == getattr(mx, dtype)


def test_quantize_on_load_options(tiny_dir, tmp_path):
    from mlx_dsvl.convert.to_mlx import convert_to_mlx

    with pytest.raises(ValueError, match="quantize must be one of"):
        mlx_dsvl.load(tiny_dir, quantize=3)
    with pytest.raises(ValueError, match="q_group_size"):
        mlx_dsvl.load(tiny_dir, quantize=4, q_group_size=48)
    folder = convert_to_mlx(str(tiny_dir), str(tmp_path / "q"), quantize=True, q_group_size=32,
                            progress=lambda _: None)
    with pytest.raises(ModelLoadError, match="already quantized"):
        mlx_dsvl.load(folder, quantize=4)


# -- the entry points' model options ----------------------------------------------------------
def test_load_applies_an_adapter_folder(tiny_dir, tmp_path):
    """``load(..., adapter_path=)``: the model that loading and then ``load_adapters`` give."""
    from mlx.utils import tree_flatten

    from mlx_dsvl.adapters import load_adapters
    from mlx_dsvl.testing.adapters import write_mlx_lm_adapter

    run = write_mlx_lm_adapter(tiny_dir, tmp_path / "run")
    model, _ = mlx_dsvl.load(tiny_dir, adapter_path=run)
    expected = load_adapters(mlx_dsvl.load(tiny_dir)[0], run)
    got, want = dict(tree_flatten(model.parameters())), dict(tree_flatten(expected.parameters()))
    assert any(k.endswith("lora_a") for k in got) and got.keys() == want.keys()
    assert all(mx.array_equal(got[k], want[k]).item() for k in want)


def test_entry_points_share_the_model_options():
    """generate, the server and eval offer the same --model, --dtype and --device; the module
    that declares them imports no MLX (entry points import it before the BLAS re-execution)."""
    import subprocess
    import sys

    from mlx_dsvl.device import DEVICES
    from mlx_dsvl.eval.__main__ import build_parser as eval_parser
    from mlx_dsvl.generate import build_parser as generate_parser
    from mlx_dsvl.loading import DTYPES
    from mlx_dsvl.model_options import DEFAULT_MODEL, add_model_arguments
    from mlx_dsvl.server.__main__ import build_parser as server_parser

    for parser in (generate_parser(), server_parser(), eval_parser()):
        options = {a.dest: a for a in parser._actions}
        assert options["model"].default == DEFAULT_MODEL
        assert options["dtype"].choices == list(DTYPES) and options["device"].choices == list(DEVICES)
    with pytest.raises(ValueError, match="no model option"):
        add_model_arguments(generate_parser(), "modle")
    code = "import sys, mlx_dsvl.model_options; assert 'mlx.core' not in sys.modules"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr

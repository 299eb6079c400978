"""Adapters: load_adapters, python -m mlx_dsvl.fuse (original layout), QLoRA."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from PIL import Image

import mlx_dsvl
from mlx_dsvl.fuse import main as fuse_main
from mlx_dsvl.testing.synthetic import QUESTION, write_shapes_dataset
from mlx_dsvl.train import AdapterError, TrainConfig, load_adapters, train
from mlx_dsvl.train.stages import StageError


def cfg(**kw):
    base = dict(batch_size=2, steps_per_report=1, save_every=0, quiet=True, plot=False, warmup=0)
    base.update(kw)
    return TrainConfig(**base)


def logits_for(model, processor, image):
    batch = processor([{"role": "user", "content": QUESTION}], [image])
    out = model(batch["input_ids"], pixel_values=batch["pixel_values"])
    mx.eval(out)
    return np.array(out)


@pytest.mark.slow
@pytest.mark.parametrize("arch,method,train_set", [
    ("hybrid", "lora", "aligner,llm,siglip,sam-neck"),
    ("tiny", "dora", None),
])
def test_fused_model_equals_base_plus_adapters(arch, method, train_set, tiny_dir, tiny_hybrid_dir,
                                               tmp_path, capsys):
    base_dir = tiny_hybrid_dir if arch == "hybrid" else tiny_dir
    size = 256 if arch == "hybrid" else 384
    data = write_shapes_dataset(tmp_path / "d", 4, seed=4, size=size)
    run = tmp_path / "run"
    train(cfg(stage=3, model=str(base_dir), data=str(data["chat"]), out=str(run), iters=3, lr=2e-2,
              method=method, train=train_set, lora_targets="attn,mlp,lm_head"))
    fused_dir = tmp_path / "fused"
    assert fuse_main(["--model", str(base_dir), "--adapter", str(run), "--out", str(fused_dir)]) == 0
    assert "fused" in capsys.readouterr().out

    image = Image.open(data["chat"].parent / "images" / "4-00000.png")
    plain, processor = mlx_dsvl.load(base_dir)
    ref_plain = logits_for(plain, processor, image)
    adapted, _ = mlx_dsvl.load(base_dir)
    load_adapters(adapted, run)
    ref = logits_for(adapted, processor, image)
    fused, fproc = mlx_dsvl.load(fused_dir)  # strict load: names, shapes, original layout
    got = logits_for(fused, fproc, image)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(got, ref, atol=2e-5 * scale, rtol=0)
    assert np.abs(ref - ref_plain).max() > 1e-2 * scale  # the adapters do change the model

    # Original deepseek-ai layout: PyTorch conv weights, unused tensors kept, configs copied.
    w = mx.load(str(fused_dir / "model.safetensors"))
    base_w = {}
    for f in Path(base_dir).glob("*.safetensors"):
        base_w.update(mx.load(str(f)))
    assert set(w) == set(base_w)
    assert all(w[k].shape == base_w[k].shape for k in w)
    assert any("attn_pool" in k for k in w)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
                 "processor_config.json"):
        assert (fused_dir / name).is_file()
    assert json.loads((fused_dir / "config.json").read_text())["vision_config"] == \
        json.loads((Path(base_dir) / "config.json").read_text())["vision_config"]


def test_load_adapters_errors(tiny_dir, tiny_hybrid_dir, tmp_path):
    data = write_shapes_dataset(tmp_path / "d", 2, seed=5)
    run = tmp_path / "run"
    train(cfg(stage=3, model=str(tiny_dir), data=str(data["chat"]), out=str(run), iters=1))
    other, _ = mlx_dsvl.load(tiny_hybrid_dir)
    with pytest.raises(AdapterError, match="different model architecture"):
        load_adapters(other, run)
    with pytest.raises(AdapterError, match="not an adapter folder"):
        load_adapters(other, tmp_path)
    rc = fuse_main(["--model", str(tiny_dir), "--adapter", str(run), "--out", str(run)])
    assert rc == 1  # refuses to overwrite an existing folder


@pytest.mark.slow
def test_qlora_trains_adapters_on_a_quantized_llm(tiny_dir, tmp_path):
    data = write_shapes_dataset(tmp_path / "d", 4, seed=6)
    model, processor = mlx_dsvl.load(tiny_dir)
    nn.quantize(model.language_model, group_size=32, bits=4)
    frozen = {k: np.array(v) for k, v in tree_flatten(model.language_model.parameters())}
    with pytest.raises(StageError, match="quantized"):
        train(cfg(stage=2, method="full", model=str(tiny_dir), data=str(data["pairs"]),
                  out=str(tmp_path / "full"), iters=1), loaded=(model, processor))
    run = tmp_path / "qlora"
    res = train(cfg(stage=3, model=str(tiny_dir), data=str(data["chat"]), out=str(run), iters=4, lr=5e-3),
                loaded=(model, processor))
    q = model.language_model.model.layers[0].self_attn.q_proj
    assert isinstance(q.linear, nn.QuantizedLinear)  # LoRA on top of the 4-bit layer
    after = {k.replace(".linear.", "."): np.array(v) for k, v in tree_flatten(model.language_model.parameters())
             if not k.endswith((".lora_a", ".lora_b"))}
    assert set(after) == set(frozen) and all(np.array_equal(after[k], frozen[k]) for k in frozen)
    losses = [r["loss"] for r in res.history]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    # The saved adapters reproduce the trained model on a freshly quantized base.
    image = Image.open(data["chat"].parent / "images" / "6-00000.png")
    model.eval()
    ref = logits_for(model, processor, image)
    fresh, _ = mlx_dsvl.load(tiny_dir)
    nn.quantize(fresh.language_model, group_size=32, bits=4)
    load_adapters(fresh, run)
    np.testing.assert_allclose(logits_for(fresh, processor, image), ref, atol=1e-4 * np.abs(ref).max())


@pytest.mark.slow
def test_qlora_on_a_quantized_mlx_folder_then_fuse(tiny_dir, tmp_path):
    """python -m convert --quantize -> QLoRA training from disk -> fuse to the original layout."""
    from mlx_dsvl.convert.__main__ import main as convert_main

    q4 = tmp_path / "tiny-q4"
    assert convert_main(["--model", str(tiny_dir), "--out", str(q4), "--quantize", "--q-bits", "4",
                         "--q-group-size", "32"]) == 0
    data = write_shapes_dataset(tmp_path / "d", 4, seed=8)
    run = tmp_path / "run"
    res = train(cfg(stage=3, model=str(q4), data=str(data["chat"]), out=str(run), iters=3, lr=2e-2,
                    lora_targets="attn,mlp,lm_head"))
    assert res.steps == 3
    model, processor = mlx_dsvl.load(q4)
    assert isinstance(model.language_model.model.layers[0].mlp.up_proj, nn.QuantizedLinear)
    image = Image.open(data["chat"].parent / "images" / "8-00001.png")
    plain = logits_for(model, processor, image)
    load_adapters(model, run)
    assert isinstance(model.language_model.model.layers[0].mlp.up_proj.linear, nn.QuantizedLinear)
    ref = logits_for(model, processor, image)
    assert np.abs(ref - plain).max() > 1e-2 * np.abs(ref).max()  # the adapters matter
    fused_dir = tmp_path / "fused"
    assert fuse_main(["--model", str(q4), "--adapter", str(run), "--out", str(fused_dir)]) == 0
    cfg_out = json.loads((fused_dir / "config.json").read_text())
    assert "mlx_dsvl" not in cfg_out and not (fused_dir / "original").exists()
    fused, fproc = mlx_dsvl.load(fused_dir)  # a plain (dequantized) original-layout folder
    assert isinstance(fused.language_model.model.layers[0].mlp.up_proj, nn.Linear)
    # float32 reassociation only: x @ (dequant(W) + s B A) against x @ dequant(W) + s (x A^T) B^T
    # (2.9e-5 to 1.5e-4 of the largest logit, depending on where the 3 steps at lr 2e-2 end; the
    # vision features agree to 5e-7); a wrong fusion is off by 1e-2 or more
    np.testing.assert_allclose(logits_for(fused, fproc, image), ref, atol=3e-4 * np.abs(ref).max())
    w = mx.load(str(fused_dir / "model.safetensors"))
    base_keys = set(mx.load(str(Path(tiny_dir) / "model.safetensors")))
    assert set(w) == base_keys  # the original names, unused tensors included


def test_an_adapter_applied_to_another_base_of_the_same_shape_warns(tiny_dir, tmp_path, capsys):
    """Training records the base's fingerprint; applying the adapter to a base whose weights differ
    (here one matrix: the norms and biases are the same, as in a fine-tuned variant) warns in one
    line naming the adapter and both bases.  The base itself, adapters without a recorded
    fingerprint and mlx-lm's adapters apply silently."""
    import shutil

    from mlx_dsvl.testing.adapters import write_mlx_lm_adapter

    data = write_shapes_dataset(tmp_path / "d", 2, seed=5)
    run = tmp_path / "run"
    train(cfg(stage=3, model=str(tiny_dir), data=str(data["chat"]), out=str(run), iters=1))
    recorded = json.loads((run / "adapter_config.json").read_text())["base_model"]
    assert recorded["path"] == str(tiny_dir) and recorded["fingerprint"]["folder"]["files"]
    variant = tmp_path / "variant"
    shutil.copytree(tiny_dir, variant)
    weights, meta = mx.load(str(variant / "model.safetensors"), return_metadata=True)
    name = next(k for k in weights if k.endswith("layers.0.self_attn.q_proj.weight"))
    weights[name] = weights[name] * 1.01
    mx.save_safetensors(str(variant / "model.safetensors"), weights, meta)
    capsys.readouterr()

    load_adapters(mlx_dsvl.load(tiny_dir)[0], run)
    assert capsys.readouterr().err == ""
    load_adapters(mlx_dsvl.load(variant)[0], run)
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(f"warning: adapter {run} was trained on "), err
    assert str(tiny_dir) in err and str(variant) in err, err
    # no recorded fingerprint (older adapters), mlx-lm's format: no warning
    config = json.loads((run / "adapter_config.json").read_text())
    config["base_model"]["fingerprint"] = None
    (run / "adapter_config.json").write_text(json.dumps(config))
    load_adapters(mlx_dsvl.load(variant)[0], run)
    write_mlx_lm_adapter(tiny_dir, tmp_path / "mlx_lm")
    load_adapters(mlx_dsvl.load(variant)[0], tmp_path / "mlx_lm")
    assert capsys.readouterr().err == ""

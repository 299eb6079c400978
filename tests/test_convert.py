"""``python -m convert``: original / transformers -> MLX (dtype, 4/8-bit) and back, and bad input.

Prove-it list of issue 4, on tiny random checkpoints (both layouts):
- original -> MLX -> original is bit-exact (every tensor's bytes and dtype) in float16 and float32;
- converted and unconverted folders give identical logits through ``mlx_dsvl.load``;
- a ``transformers``-format checkpoint converts to the same MLX weights as the original one;
- 8-bit / 4-bit: top-1 agreement and mean KL against the unquantized model on a fixed multimodal
  prompt (printed; 8-bit top-1 >= 0.95), generation runs, the quantization policy and skip rule;
- ``--to-original`` of quantized and LoRA-adapted models loads here and strictly in transformers;
- bad input through the CLI: one ``error:`` line, non-zero exit, nothing left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file, save_file

import mlx_dsvl
from mlx_dsvl.convert.files import ConvertError
from mlx_dsvl.convert.keymaps import original_to_hf
from mlx_dsvl.convert.to_mlx import convert_to_mlx
from mlx_dsvl.convert.to_original import convert_to_original
from mlx_dsvl.mlx_format import MARKER
from mlx_dsvl.model_folder import UNUSED_PREFIXES
from mlx_dsvl.random_checkpoint import make_checkpoint

QUIET = dict(progress=lambda s: None)
ROOT = Path(__file__).resolve().parents[1]
PROMPT = [{"role": "user", "content": "<image_placeholder>Describe this image in detail, please."}]


def to_mlx(src, out, **kw):
    return convert_to_mlx(str(src), str(out), **QUIET, **kw)


def to_orig(src, out, **kw):
    return convert_to_original(str(src), str(out), **QUIET, **kw)


def tensors(folder: Path) -> dict:
    """Every tensor of a folder's safetensors files (index-aware), as numpy arrays."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
             else sorted(p.name for p in folder.glob("*.safetensors")))
    out = {}
    for f in files:
        part = load_file(str(folder / f))
        assert not set(part) & set(out)
        out.update(part)
    return out


def assert_bit_exact(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k


def image(seed=0, size=(400, 300)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def logits(model_and_processor, img=None):
    model, processor = model_and_processor
    batch = processor(PROMPT, [img or image()])
    out = model(batch["input_ids"], pixel_values=batch["pixel_values"]).astype(mx.float32)
    mx.eval(out)
    return out


def listing(path: Path):
    return sorted(p.relative_to(path).as_posix() for p in Path(path).rglob("*"))


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tiny_dir, tiny_hybrid_dir):
    """Original-layout checkpoints: (arch, dtype) -> folder. The fp16 hybrid one is sharded."""
    root = tmp_path_factory.mktemp("convert_src")
    return {
        ("tiny", "float32"): tiny_dir,
        ("tiny-hybrid", "float32"): tiny_hybrid_dir,
        ("tiny", "float16"): make_checkpoint("tiny", root / "tiny16", seed=3, dtype="float16"),
        ("tiny-hybrid", "float16"): make_checkpoint("tiny-hybrid", root / "hyb16", seed=4, dtype="float16",
                                                    shard_gb=0.01),
    }


@pytest.fixture(scope="module")
def mlx32(tiny_dir, tmp_path_factory):
    return to_mlx(tiny_dir, tmp_path_factory.mktemp("mlx") / "tiny32", dtype="float32")


@pytest.fixture(scope="module")
def quantized(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    return {bits: to_mlx(tiny_dir, root / f"q{bits}", quantize=True, q_bits=bits, q_group_size=32)
            for bits in (8, 4)}


@pytest.fixture(scope="module")
def ref_logits(tiny_dir):
    """The unquantized float32 tiny model on the fixed multimodal prompt."""
    return logits(mlx_dsvl.load(tiny_dir, dtype="float32"))


@pytest.fixture(scope="module")
def q_logits(quantized):
    return {bits: logits(mlx_dsvl.load(folder)) for bits, folder in quantized.items()}


# -- round trips ------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["tiny", "tiny-hybrid"])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_bit_exact(ckpts, arch, dtype, tmp_path):
    src = ckpts[(arch, dtype)]
    mlx_dir = to_mlx(src, tmp_path / "mlx", dtype=dtype, shard_gb=0.004)  # several MLX shards
    back = to_orig(mlx_dir, tmp_path / "back")
    assert_bit_exact(tensors(src), tensors(back))  # the unused tensors too, via original/unused
    # MLX folder: several shards + index, marker, our layout (conv [O, kH, kW, I]), no unused tensors
    index = json.loads((mlx_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    cfg = json.loads((mlx_dir / "config.json").read_text())
    assert cfg[MARKER]["format"] == "mlx" and cfg[MARKER]["dtype"] == dtype
    assert cfg[MARKER]["quantization"] is None and cfg[MARKER]["source_format"] == "original"
    w = tensors(mlx_dir)
    assert not any("attn_pool." in k or k.startswith(UNUSED_PREFIXES) or "inv_freq" in k for k in w)
    patch = next(k for k in w if k.endswith("patch_embed.proj.weight"))
    assert w[patch].shape[-1] == 3  # [O, kH, kW, I]
    # original folder again: config without the marker, same processor/tokenizer files
    assert json.loads((back / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    for name in ("preprocessor_config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (back / name).read_bytes() == (src / name).read_bytes(), name
    assert (back / "model.safetensors.index.json").exists() == (len(list(back.glob("*.safetensors"))) > 1)


@pytest.mark.slow
def test_converted_and_unconverted_give_identical_logits(tiny_dir, tiny_hybrid_dir, mlx32, ref_logits,
                                                         tmp_path):
    assert mx.array_equal(ref_logits, logits(mlx_dsvl.load(mlx32, dtype="float32")))
    # a float16 folder vs the original loaded in float16: image embeddings and text logits
    # (float16 matmuls are slow on the CPU backend, so no 600-token prompt here)
    mlx16 = to_mlx(tiny_dir, tmp_path / "mlx16", dtype="float16")
    (a, proc), (b, _) = mlx_dsvl.load(tiny_dir, dtype="float16"), mlx_dsvl.load(mlx16, dtype="float16")
    px = proc(PROMPT, [image()])["pixel_values"]
    assert mx.array_equal(a.encode_images(px), b.encode_images(px))
    ids = mx.array([[100000, 5, 60, 7, 300, 9]])
    assert a(ids).dtype == mx.float16 and mx.array_equal(a(ids), b(ids))
    # the 7B layout, in float32
    hyb = to_mlx(tiny_hybrid_dir, tmp_path / "hyb")
    img = image(1, (500, 380))
    assert mx.array_equal(logits(mlx_dsvl.load(tiny_hybrid_dir), img), logits(mlx_dsvl.load(hyb), img))


def test_bfloat16_output(tiny_dir, tmp_path):
    out = to_mlx(tiny_dir, tmp_path / "bf16", dtype="bfloat16")
    w = mx.load(str(out / "model.safetensors"))
    src = mx.load(str(tiny_dir / "model.safetensors"))
    k = "language_model.model.layers.0.mlp.up_proj.weight"
    assert w[k].dtype == mx.bfloat16 and mx.array_equal(w[k], src[k].astype(mx.bfloat16))
    back = to_orig(out, tmp_path / "back")
    b = mx.load(str(back / "model.safetensors"))
    assert b[k].dtype == mx.bfloat16 and mx.array_equal(b[k].view(mx.uint16), w[k].view(mx.uint16))
    model, _ = mlx_dsvl.load(out, dtype="bfloat16")
    assert model(mx.array([[100000, 5, 6]])).dtype == mx.bfloat16


# -- transformers-format input ----------------------------------------------------------------
def _hf_folder(src: Path, out: Path, nested: bool) -> Path:
    """A transformers-format copy of ``src``: ``save_pretrained`` of the strictly loaded HF model
    (flat SigLIP names), or (nested) the older ``model.vision_model.vision_model.*`` names written
    as shards that split SigLIP's q/k/v across files; plus HF processor files and our tokenizer."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers", minversion="5.0")
    from transformers import DeepseekVLHybridImageProcessor, DeepseekVLImageProcessor

    from mlx_dsvl.testing import hf_reference as ref

    model = ref.build_hf_model(src)
    hybrid = "Hybrid" in json.loads((src / "config.json").read_text())["vision_config"]["cls"]
    if not nested:
        model.save_pretrained(out)
    else:
        model.config.save_pretrained(out)
        sd = original_to_hf(ref.original_state_dict(src), nested_siglip=True)
        keys = list(sd)
        q = next(i for i, k in enumerate(keys) if k.endswith("layers.0.self_attn.k_proj.weight"))
        index = {}
        for i, part in enumerate([keys[:q], keys[q:]]):  # q_proj in shard 1, k/v in shard 2
            name = f"model-{i + 1:05d}-of-00002.safetensors"
            save_file({k: np.ascontiguousarray(sd[k]) for k in part}, str(out / name), metadata={"format": "pt"})
            index.update({k: name for k in part})
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    (DeepseekVLHybridImageProcessor if hybrid else DeepseekVLImageProcessor)().save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(src / name, out / name)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("arch,nested", [("tiny", False), ("tiny-hybrid", False), ("tiny", True)])
def test_transformers_checkpoint_converts_to_the_same_mlx_weights(ckpts, arch, nested, tmp_path):
    src = ckpts[(arch, "float32")]
    hf = _hf_folder(src, tmp_path / "hf", nested)
    if not nested:
        assert json.loads((hf / "config.json").read_text())["model_type"].startswith("deepseek_vl")
    from_hf = to_mlx(hf, tmp_path / "from_hf")
    from_orig = to_mlx(src, tmp_path / "from_orig")
    assert_bit_exact(tensors(from_orig), tensors(from_hf))
    cfg = json.loads((from_hf / "config.json").read_text())
    assert cfg[MARKER]["source_format"] == "transformers"
    from mlx_dsvl.loading import load_config

    a, b = load_config(from_orig), load_config(from_hf)
    assert (a.vision, a.aligner, a.language, a.image_token_id) == (b.vision, b.aligner, b.language, b.image_token_id)
    assert (a.input_mean, a.input_std) == (b.input_mean, b.input_std)
    for name in ("preprocessor_config.json", "processor_config.json"):  # the original files, not HF's
        assert json.loads((from_hf / name).read_text()) == json.loads((src / name).read_text()), name
    if arch == "tiny":
        assert mx.array_equal(logits(mlx_dsvl.load(from_orig)), logits(mlx_dsvl.load(from_hf)))
    # and on to the original layout: the used tensors of the original file, bit for bit
    back = tensors(to_orig(from_hf, tmp_path / "back"))
    orig = {k: v for k, v in tensors(src).items() if k in back}
    assert_bit_exact(orig, back)
    assert_bit_exact(back, tensors(to_orig(hf, tmp_path / "direct")))  # transformers -> original directly


# -- quantization -----------------------------------------------------------------------------
def agreement(ref: mx.array, q: mx.array):
    """(top-1 agreement, mean KL(ref || q)) over every position."""
    top1 = (ref.argmax(-1) == q.argmax(-1)).astype(mx.float32).mean().item()
    lp = ref - mx.logsumexp(ref, -1, keepdims=True)
    lq = q - mx.logsumexp(q, -1, keepdims=True)
    kl = (mx.exp(lp) * (lp - lq)).sum(-1).mean().item()
    return top1, kl


@pytest.mark.slow
def test_quantized_agreement_with_unquantized(ref_logits, q_logits):
    ref = ref_logits
    figures = {}
    for bits, q in q_logits.items():
        figures[bits] = agreement(ref, q)
        print(f"\n{bits}-bit (groups of 32) vs unquantized, {ref.shape[1]} positions: "
              f"top-1 agreement {figures[bits][0]:.4f}, mean KL {figures[bits][1]:.3e}")
    assert figures[8][0] >= 0.95
    assert figures[8][1] < figures[4][1]  # more bits, closer
    assert figures[4][0] > 0.5


def test_quantized_model_runs_and_generates(quantized):
    model, processor = mlx_dsvl.load(quantized[4])
    lm = model.language_model
    assert isinstance(lm.model.embed_tokens, nn.QuantizedEmbedding)
    assert isinstance(lm.lm_head, nn.QuantizedLinear) and lm.lm_head.bits == 4
    assert isinstance(lm.model.layers[0].mlp.down_proj, nn.QuantizedLinear)
    assert isinstance(model.aligner.layers[0], nn.Linear) and not isinstance(model.aligner.layers[0], nn.QuantizedLinear)
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in model.vision_model.named_modules())
    text = mlx_dsvl.generate(model, processor, PROMPT, [image()], max_tokens=4, temperature=0.0)
    assert isinstance(text, str)
    cfg = json.loads((quantized[4] / "config.json").read_text())[MARKER]
    assert cfg["quantization"] == {"bits": 4, "group_size": 32, "mode": "affine", "vision": False, "vision_bits": None}
    assert cfg["format_version"] == 1  # older readers read it right
    # stored quantized: a packed weight, its scales and biases
    w = mx.load(str(quantized[4] / "model.safetensors"))
    assert w["language_model.lm_head.weight"].dtype == mx.uint32
    assert "language_model.lm_head.scales" in w and "language_model.lm_head.biases" in w


@pytest.mark.slow
def test_group_size_skip_rule_and_vision(tiny_dir, tiny_hybrid_dir, tmp_path):
    # groups of 128: the LLM's 64-wide inputs (attention, gate/up, embeddings, lm_head) cannot be
    # quantized; down_proj (input 128) is; vision stays in float unless --quantize-vision.
    out = to_mlx(tiny_dir, tmp_path / "g128", quantize=True, q_bits=8, q_group_size=128)
    model, _ = mlx_dsvl.load(out)
    layer = model.language_model.model.layers[0]
    assert isinstance(layer.mlp.down_proj, nn.QuantizedLinear)
    assert not isinstance(layer.mlp.up_proj, nn.QuantizedLinear)
    assert not isinstance(layer.self_attn.q_proj, nn.QuantizedLinear)
    assert not isinstance(model.language_model.model.embed_tokens, nn.QuantizedEmbedding)
    assert not isinstance(model.language_model.lm_head, nn.QuantizedLinear)
    out = to_mlx(tiny_dir, tmp_path / "g128v", quantize=True, q_bits=8, q_group_size=128, quantize_vision=True)
    model, _ = mlx_dsvl.load(out)
    quantized_vision = [p for p, m in model.vision_model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert quantized_vision and all(p.endswith("fc2") for p in quantized_vision), quantized_vision  # input 256
    # the 7B layout, vision quantized with groups of 32: SAM, SigLIP and the aligner run quantized
    out = to_mlx(tiny_hybrid_dir, tmp_path / "hyb", quantize=True, q_bits=8, q_group_size=32, quantize_vision=True)
    model, processor = mlx_dsvl.load(out)
    assert isinstance(model.aligner.high_up_proj, nn.QuantizedLinear)
    sam = [p for p, m in model.vision_model.named_modules() if isinstance(m, nn.QuantizedLinear) and "high" in p]
    assert sam
    ref = logits(mlx_dsvl.load(tiny_hybrid_dir), image(2))
    top1, kl = agreement(ref, logits((model, processor), image(2)))
    print(f"\n7B layout, 8-bit with vision quantized: top-1 {top1:.4f}, mean KL {kl:.3e}")
    assert top1 >= 0.9


@pytest.mark.slow
def test_quantized_to_original_dequantizes_and_loads_in_transformers(quantized, q_logits, tmp_path):
    back = to_orig(quantized[4], tmp_path / "back")
    w = tensors(back)
    assert w["language_model.lm_head.weight"].dtype == np.float32
    assert w["vision_model.vision_tower.patch_embed.proj.weight"].shape[1] == 3  # PyTorch [O, I, kH, kW]
    assert "config.json" in os.listdir(back) and MARKER not in json.loads((back / "config.json").read_text())
    # the same computation: quantized MLX model vs its dequantized original-layout folder
    a = q_logits[4]
    b = logits(mlx_dsvl.load(back))
    assert float(mx.abs(a - b).max()) <= 1e-4 * float(mx.abs(a).max())
    # and the transformers key map's strict load accepts it
    pytest.importorskip("torch")
    pytest.importorskip("transformers", minversion="5.0")
    from mlx_dsvl.testing import hf_reference as ref

    hf = ref.build_hf_model(back)  # original_to_hf + load_state_dict(strict=True)
    got = hf.lm_head.weight.detach().numpy()
    assert np.array_equal(got, w["language_model.lm_head.weight"])


# -- adapters ---------------------------------------------------------------------------------
def _make_adapter(base: Path, out: Path) -> Path:
    """An mlx-lm LoRA adapter on the LLM (random, non-zero lora_b) saved in mlx-lm's format."""
    from mlx_dsvl.testing.adapters import write_mlx_lm_adapter

    out.mkdir()
    return write_mlx_lm_adapter(base, out)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["float", "4-bit"])
def test_to_original_fuses_adapters(which, mlx32, quantized, ref_logits, q_logits, tmp_path):
    from mlx_lm.tuner.utils import load_adapters

    base = mlx32 if which == "float" else quantized[4]
    adapter = _make_adapter(base, tmp_path / "adapter")
    model, processor = mlx_dsvl.load(base)
    load_adapters(model.language_model, str(adapter))
    expected = logits((model, processor))
    plain = ref_logits if which == "float" else q_logits[4]
    assert float(mx.abs(expected - plain).max()) > 1e-3  # the adapter changes the output
    back = to_orig(base, tmp_path / "fused", adapter=str(adapter))
    got = logits(mlx_dsvl.load(back))
    assert float(mx.abs(got - expected).max()) <= 1e-4 * float(mx.abs(expected).max())


def _make_dsvl_adapter(base: Path, out: Path) -> Path:
    """An adapter in mlx-dsvl's own format (``python -m mlx_dsvl.train``): LoRA on LLM and SigLIP
    layers (full names in the model) plus a fully trained aligner tensor."""
    model, _ = mlx_dsvl.load(base)
    modules = dict(model.named_modules())
    adapted = ["language_model.model.layers.1.self_attn.q_proj", "language_model.model.layers.0.mlp.down_proj",
               "vision_model.vision_tower.blocks.1.attn.qkv"]
    rank, rng = 4, np.random.default_rng(1)
    weights = {}
    for path in adapted:
        out_dim, in_dim = modules[path].weight.shape
        weights[path + ".lora_a"] = mx.array(rng.normal(0, 0.05, (in_dim, rank)).astype(np.float32))
        weights[path + ".lora_b"] = mx.array(rng.normal(0, 0.05, (rank, out_dim)).astype(np.float32))
    weights["aligner.layers.0.bias"] = mx.array(rng.normal(0, 0.5, (64,)).astype(np.float32))
    out.mkdir()
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    (out / "adapter_config.json").write_text(json.dumps(
        {"format": "mlx-dsvl-adapters", "version": 1, "method": "lora", "rank": rank, "scale": 2.0,
         "dropout": 0.0, "adapted": adapted, "base_model": {"path": str(base), "fingerprint": None}}))
    return out


@pytest.mark.slow
def test_to_original_fuses_mlx_dsvl_adapters(mlx32, ref_logits, tmp_path):
    adapters = pytest.importorskip("mlx_dsvl.adapters")
    adapter = _make_dsvl_adapter(mlx32, tmp_path / "adapter")
    model, processor = mlx_dsvl.load(mlx32)
    adapters.load_adapters(model, adapter)
    expected = logits((model, processor))
    assert float(mx.abs(expected - ref_logits).max()) > 1e-3
    back = to_orig(mlx32, tmp_path / "fused", adapter=str(adapter))
    got = logits(mlx_dsvl.load(back))
    assert float(mx.abs(got - expected).max()) <= 1e-4 * float(mx.abs(expected).max())
    w = load_file(str(back / "model.safetensors"))
    assert np.array_equal(w["aligner.layers.0.bias"], np.asarray(load_file(str(adapter / "adapters.safetensors"))
                                                                ["aligner.layers.0.bias"]))


def test_adapter_errors(mlx32, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConvertError, match="no adapter_config.json"):
        to_orig(mlx32, tmp_path / "out", adapter=str(tmp_path / "empty"))
    (tmp_path / "empty" / "adapter_config.json").write_text(json.dumps({"something": 1}))
    with pytest.raises(ConvertError, match="unknown adapter format"):
        to_orig(mlx32, tmp_path / "out", adapter=str(tmp_path / "empty"))
    (tmp_path / "empty" / "adapter_config.json").write_text(json.dumps({"format": "mlx-dsvl-adapters"}))
    with pytest.raises(ConvertError, match="cannot load the adapters"):
        to_orig(mlx32, tmp_path / "out", adapter=str(tmp_path / "empty"))
    assert listing(tmp_path) == ["empty", "empty/adapter_config.json"]


# -- pickles ----------------------------------------------------------------------------------
def test_pickle_input_needs_allow_pickle(tiny_dir, tmp_path):
    torch = pytest.importorskip("torch")
    src = tmp_path / "pt"
    shutil.copytree(tiny_dir, src)
    sd = load_file(str(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, str(src / "pytorch_model.bin"))
    with pytest.raises(ConvertError, match="arbitrary code.*--allow-pickle"):
        to_mlx(src, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    out = to_mlx(src, tmp_path / "ok", allow_pickle=True)
    ref = to_mlx(tiny_dir, tmp_path / "ref")
    assert_bit_exact(tensors(ref), tensors(out))
    assert not (out / ".scratch").exists()


# -- output folder handling -------------------------------------------------------------------
def test_force_and_overlap(tiny_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConvertError, match="already exists"):
        to_mlx(tiny_dir, out)
    assert listing(out) == ["keep.txt"]
    to_mlx(tiny_dir, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folders left
    with pytest.raises(ConvertError, match="must not be"):
        to_mlx(tiny_dir, tiny_dir / "inside", force=True)
    with pytest.raises(ConvertError, match="must not be"):
        to_mlx(tiny_dir, tiny_dir, force=True)


# -- bad input through the CLI ----------------------------------------------------------------
def _bad_inputs(tiny_dir: Path, root: Path) -> dict:
    cases = {}

    def copy(name):
        d = root / name
        shutil.copytree(tiny_dir, d)
        return d

    d = root / "not_a_model"
    d.mkdir(parents=True)
    (d / "notes.txt").write_text("hello")
    cases["not_a_model"] = (d, [], "no config.json")

    def shard(d):
        w = load_file(str(d / "model.safetensors"))
        (d / "model.safetensors").unlink()
        keys = sorted(w)
        index = {}
        for i, part in enumerate([keys[: len(keys) // 2], keys[len(keys) // 2:]]):
            name = f"model-{i + 1:05d}-of-00002.safetensors"
            save_file({k: w[k] for k in part}, str(d / name))
            index.update({k: name for k in part})
        return index

    d = copy("missing_shard")
    index = shard(d)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    (d / "model-00002-of-00002.safetensors").unlink()
    cases["missing_shard"] = (d, [], "missing shard file(s) model-00002-of-00002.safetensors")

    d = copy("missing_tensor")
    index = shard(d)
    index["language_model.model.ghost.weight"] = "model-00001-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    cases["missing_tensor"] = (d, [], "tensor language_model.model.ghost.weight is not in model-00001-of-00002")

    d = copy("truncated")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    cases["truncated"] = (d, [], "cannot read safetensors file")

    d = copy("unknown_arch")
    (d / "config.json").write_text(json.dumps({"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"],
                                               "text_config": {}, "vision_config": {}}))
    cases["unknown_arch"] = (d, [], "unknown architecture (model_type 'llava')")

    d = copy("unknown_tower")
    cfg = json.loads((d / "config.json").read_text())
    cfg["vision_config"]["cls"] = "FancyTower"
    (d / "config.json").write_text(json.dumps(cfg))
    cases["unknown_tower"] = (d, [], "unknown vision_config.cls 'FancyTower'")

    d = copy("misshaped")
    w = load_file(str(d / "model.safetensors"))
    w["aligner.layers.2.weight"] = w["aligner.layers.2.weight"][:, :10]
    save_file(w, str(d / "model.safetensors"))
    cases["misshaped"] = (d, ["--quantize"], "weight aligner.layers.2.weight has shape (64, 10), expected (64, 64)")

    d = copy("pickle")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    cases["pickle"] = (d, [], "unpickling can run arbitrary code")
    return cases


IN_PROCESS = ("unknown_tower", "misshaped")  # beyond the list: checked without a subprocess


@pytest.mark.slow
def test_cli_bad_input(tiny_dir, tmp_path):
    """The issue's bad inputs (+ pickles, an existing --out) through ``python -m convert``, in parallel."""
    cases = {k: v for k, v in _bad_inputs(tiny_dir, tmp_path / "inputs").items() if k not in IN_PROCESS}
    outs = tmp_path / "outs"
    existing = outs / "existing" / "model"
    existing.mkdir(parents=True)
    (existing / "mine.txt").write_text("keep me")
    cases["existing"] = (tiny_dir, [], f"{existing}: already exists (use --force to replace it)")
    before = listing(outs)
    procs = {}
    for name, (src, extra, _) in cases.items():
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "convert", "--model", str(src), "--out", str(outs / name / "model"), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        lines = stderr.strip().splitlines()
        assert p.returncode == 1, (name, stderr)
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, stderr)
        assert cases[name][2] in lines[0], (name, lines[0])
        assert stdout == ""
    # nothing written: no output, no temporary folder, not even the parent folders made for --out
    assert listing(outs) == before
    assert (existing / "mine.txt").read_text() == "keep me"


@pytest.mark.parametrize("name", IN_PROCESS)
def test_cli_bad_input_in_process(name, tiny_dir, tmp_path, capsys):
    from mlx_dsvl.convert.__main__ import main

    src, extra, fragment = _bad_inputs(tiny_dir, tmp_path / "inputs")[name]
    out = tmp_path / "outs" / "model"
    assert main(["--model", str(src), "--out", str(out), *extra]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
    assert not (tmp_path / "outs").exists()


@pytest.mark.slow
def test_cli_converts(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "convert", "--model", str(tiny_dir), "--out", str(out),
           "--quantize", "--q-bits", "8", "--q-group-size", "32", "--dtype", "float16"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out)
    assert "[1/1] model.safetensors" in r.stderr and "8-bit" in r.stderr and "done:" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    from mlx_dsvl.convert.__main__ import main

    for argv, msg in [(["--q-bits", "8"], "--q-bits needs --quantize"),
                      (["--to-original", "--quantize"], "cannot be used with --to-original"),
                      (["--adapter", "x"], "--adapter is for --to-original")]:
        with pytest.raises(SystemExit) as e:
            main(["--model", str(tiny_dir), "--out", str(tmp_path / "x"), *argv])
        assert e.value.code == 2 and msg in capsys.readouterr().err


@pytest.mark.slow
def test_cli_prints_an_out_folder_whose_name_is_not_utf8(tiny_dir, tmp_path):
    """As typed in a Latin-1 terminal; stdout strict, as in a UTF-8 locale."""
    out = bytes(tmp_path) + b"/caf\xe9"
    r = subprocess.run([sys.executable, "-m", "convert", "--model", str(tiny_dir), "--out", out],
                       capture_output=True, cwd=ROOT, timeout=300, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stdout == out + b"\n"
    assert (Path(os.fsdecode(out)) / "config.json").is_file()


# -- loading MLX folders: strictness ----------------------------------------------------------
def test_load_rejects_inconsistent_mlx_folders(quantized, tmp_path):
    from mlx_dsvl.loading import ModelLoadError

    d = tmp_path / "q"
    shutil.copytree(quantized[8], d)
    cfg = json.loads((d / "config.json").read_text())

    def write(c):
        (d / "config.json").write_text(json.dumps(c))

    write({**cfg, MARKER: {**cfg[MARKER], "format_version": 99}})
    with pytest.raises(ModelLoadError, match="MLX format version 99 is newer"):
        mlx_dsvl.load(d)
    write({**cfg, MARKER: {**cfg[MARKER], "quantization": None}})
    with pytest.raises(ModelLoadError, match="records no quantization"):
        mlx_dsvl.load(d)
    write({**cfg, MARKER: {**cfg[MARKER], "quantization": {**cfg[MARKER]["quantization"], "bits": 4}}})
    with pytest.raises(ModelLoadError, match="lm_head.weight is packed as 8-bit but config.json records 4-bit LLM"):
        mlx_dsvl.load(d)
    write(cfg)
    w = dict(mx.load(str(d / "model.safetensors")))
    mx.eval(w)
    w.pop("language_model.lm_head.biases")
    mx.save_safetensors(str(d / "model.safetensors"), w)
    with pytest.raises(ModelLoadError, match="tensor language_model.lm_head.biases is not in model.safetensors"):
        mlx_dsvl.load(d)  # the index names it
    index = json.loads((d / "model.safetensors.index.json").read_text())
    del index["weight_map"]["language_model.lm_head.biases"]
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="missing weight language_model.lm_head.biases"):
        mlx_dsvl.load(d)  # the strict name check

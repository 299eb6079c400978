"""Random DeepSeek-VL checkpoints in the original deepseek-ai on-disk layout.

Real structure, PyTorch layouts, the unused tensors the real files carry, a tiny tokenizer with
DeepSeek's special ids and the processor configs. Every parameter is random (no zero
``hd_alpha_downsamples``, rel-pos or position tables), so every path matters.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from .config import CLIP_MEAN, CLIP_STD, ModelConfig
from .random_tokenizer import write_processor_configs, write_tokenizer

# The model's modules are imported where used: this module imports without MLX.

SIGLIP = {"model_name": "siglip_large_patch16_384", "image_size": 384, "select_feature": "same",
          "select_layer": -1}
SAM = {"model_name": "sam_b_downsample", "image_size": 1024, "select_feature": "same",
       "select_layer": -1}
TINY_SIGLIP = {"width": 64, "layers": 2, "heads": 4, "mlp_ratio": 4}
TINY_SAM = {"width": 32, "layers": 6, "heads": 2, "global_attn_indexes": [2, 5],
            "downsample_channels": [32, 64], "prompt_embed_dim": 16, "window_size": 14}
TINY_LLM = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
            "num_key_value_heads": 4, "num_hidden_layers": 2}


def clip_tower(siglip: dict) -> dict:
    return {"cls": "CLIPVisionTower", "model_type": "vision", "params": siglip}


def hybrid_tower(sam: dict, siglip: dict, out_dim: int) -> dict:
    high = {**sam, "output_dim": out_dim, "pixel_mean": list(CLIP_MEAN), "pixel_std": list(CLIP_STD)}
    low = {**siglip, "output_dim": out_dim, "pixel_mean": [0.5] * 3, "pixel_std": [0.5] * 3}
    return {"cls": "HybridVisionTower", "model_type": "vision",
            "params": {"concat_type": "tuple", "freeze_high": True, "freeze_low": True,
                       "high_res_cfg": high, "low_res_cfg": low}}


def aligner(kind: str, input_dim: int, n_embed: int) -> dict:
    return {"cls": "MlpProjector", "model_type": "aligner",
            "params": {"depth": 2, "input_dim": input_dim, "n_embed": n_embed, "projector_type": kind}}


def llm(**fields) -> dict:
    return {"model_type": "llama", "max_position_embeddings": 16384, "vocab_size": 102400,
            "torch_dtype": "float16", **fields}


# config.json, processor settings (image_size, mean/std, do_normalize) and default dtype per arch.
ARCHS = {
    "tiny": (
        {"vision_config": clip_tower({**SIGLIP, **TINY_SIGLIP}),
         "aligner_config": aligner("mlp_gelu", 64, 64), "language_config": llm(**TINY_LLM)},
        (384, [0.5] * 3, [0.5] * 3, True), "float32"),
    "tiny-hybrid": (
        {"vision_config": hybrid_tower({**SAM, **TINY_SAM}, {**SIGLIP, **TINY_SIGLIP}, 64),
         "aligner_config": aligner("low_high_hybrid_split_mlp_gelu", 64, 64),
         "language_config": llm(**TINY_LLM)},
        (1024, list(CLIP_MEAN), list(CLIP_STD), False), "float32"),
    "1.3b": (
        {"vision_config": clip_tower(dict(SIGLIP)),
         "aligner_config": aligner("mlp_gelu", 1024, 2048),
         "language_config": llm(hidden_size=2048, intermediate_size=5632, num_attention_heads=16,
                                num_key_value_heads=16, num_hidden_layers=24)},
        (384, [0.5] * 3, [0.5] * 3, True), "float16"),
    "7b": (
        {"vision_config": hybrid_tower(dict(SAM), dict(SIGLIP), 1024),
         "aligner_config": aligner("low_high_hybrid_split_mlp_gelu", 1024, 4096),
         "language_config": llm(num_hidden_layers=30)},  # sparse, as the real 7B config
        (1024, list(CLIP_MEAN), list(CLIP_STD), False), "float16"),
    # the 7B's SAM-B and SigLIP-L at real size with a small LLM (and so a small aligner output):
    # vision benchmarks in float32 on machines that cannot hold the 7B's 28 GB of float32 weights
    "7b-vision": (
        {"vision_config": hybrid_tower(dict(SAM), dict(SIGLIP), 1024),
         "aligner_config": aligner("low_high_hybrid_split_mlp_gelu", 1024, 256),
         "language_config": llm(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                                num_key_value_heads=4, num_hidden_layers=2)},
        (1024, list(CLIP_MEAN), list(CLIP_STD), False), "float16"),
}


def checkpoint_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of the original checkpoint, with its PyTorch shape, in key order."""
    from mlx.utils import tree_flatten

    from .model_folder import CONV_SUFFIXES
    from .models.deepseek_vl import DeepseekVL

    cfg = ModelConfig.from_dict(config)
    model = DeepseekVL(cfg)  # MLX arrays are lazy: building the 7B allocates nothing
    shapes = {}
    for k, v in tree_flatten(model.parameters()):
        s = tuple(v.shape)
        if k.endswith(CONV_SUFFIXES) and len(s) == 4:
            s = (s[0], s[3], s[1], s[2])  # MLX [O, kH, kW, I] -> PyTorch [O, I, kH, kW]
        shapes[k] = s
    # Tensors the released files carry and the model never uses.
    vision = cfg.vision
    siglip_prefix = "vision_model.vision_tower_low.vision_tower." if vision.hybrid else "vision_model.vision_tower."
    d = vision.low.width
    for name, s in [("latent", (1, 1, d)), ("q.weight", (d, d)), ("q.bias", (d,)),
                    ("kv.weight", (2 * d, d)), ("kv.bias", (2 * d,)), ("proj.weight", (d, d)),
                    ("proj.bias", (d,)), ("norm.weight", (d,)), ("norm.bias", (d,)),
                    ("mlp.fc1.weight", (vision.low.mlp_dim, d)), ("mlp.fc1.bias", (vision.low.mlp_dim,)),
                    ("mlp.fc2.weight", (d, vision.low.mlp_dim)), ("mlp.fc2.bias", (d,))]:
        shapes[siglip_prefix + "attn_pool." + name] = s
    if vision.hybrid:
        out_dim = config["vision_config"]["params"]["high_res_cfg"].get("output_dim", 1024)
        for side in ("high", "low"):
            for p in ("weight", "bias"):
                shapes[f"vision_model.{side}_layer_norm.{p}"] = (out_dim,)
    lang = cfg.language
    head_dim = lang["hidden_size"] // lang["num_attention_heads"]
    shapes["language_model.model.layers.0.self_attn.rotary_emb.inv_freq"] = (head_dim // 2,)
    return shapes


def tensor_rng(seed: int, name: str) -> np.random.Generator:
    """The random stream of one tensor: a function of the seed and the tensor's name only."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def random_tensor(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Random values at a scale that keeps activations sane, never zero tables."""
    if name.endswith("inv_freq"):
        return (1.0 / 10000 ** (np.arange(0, 2 * shape[0], 2) / (2 * shape[0]))).astype(np.float32)
    if name.endswith("hd_alpha_downsamples"):
        return rng.uniform(0.5, 1.5, size=shape).astype(np.float32)
    if name.endswith(("pos_embed", "rel_pos_h", "rel_pos_w", "latent")):
        return (0.2 * rng.standard_normal(shape)).astype(np.float32)
    if len(shape) == 1:
        if name.endswith(".weight"):  # LayerNorm / RMSNorm scales
            return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        return (0.1 * rng.standard_normal(shape)).astype(np.float32)
    if name.endswith("embed_tokens.weight"):
        return rng.standard_normal(shape, dtype=np.float32)
    fan_in = int(np.prod(shape[1:]))
    w = rng.standard_normal(shape, dtype=np.float32)
    w *= 1.0 / np.sqrt(fan_in)
    return w


def make_checkpoint(arch: str, out: str | Path, seed: int = 0, dtype: str | None = None,
                    shard_gb: float = 5.0, force: bool = False, verbose: bool = False) -> Path:
    """Write a random checkpoint of ``arch`` to ``out`` (via a temporary folder + rename)."""
    from .model_folder import plan_shards, shard_names

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)}")
    if not shard_gb > 0:
        raise ValueError(f"shard_gb must be positive, got {shard_gb}")
    config, (image_size, mean, std, do_norm), default_dtype = ARCHS[arch]
    config = copy.deepcopy(config)
    np_dtype = np.dtype(dtype or default_dtype)
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists (use force=True / --force to replace it)")
    ancestor = out.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{out}: {ancestor} is a file, not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        shapes = checkpoint_shapes(config)
        # tensor by tensor, as released checkpoints are cut (a module's weight and bias may
        # land in different shards), unlike the converter, which keeps modules together
        sizes = {k: int(np.prod(s)) * np_dtype.itemsize for k, s in shapes.items()}
        shards = plan_shards(sizes, int(shard_gb * 1e9), group=lambda k: k)
        names = shard_names(len(shards))
        weight_map, total = {}, 0

        def make(k: str) -> np.ndarray:
            return random_tensor(tensor_rng(seed, k), k, shapes[k]).astype(np_dtype)

        # numpy's generators release the GIL: tensors are drawn in parallel (a 7B in about a
        # minute on 16 cores), each from its own stream, so the result is independent of order
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            for fname, keys in zip(names, shards):
                tensors = dict(zip(keys, pool.map(make, keys)))
                for k, v in tensors.items():
                    weight_map[k] = fname
                    total += v.nbytes
                save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
                del tensors
            if verbose:
                print(f"wrote {fname} ({len(keys)} tensors)", file=sys.stderr)
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        config["language_config"]["torch_dtype"] = str(np_dtype)
        config.update({"model_type": "multi_modality", "torch_dtype": str(np_dtype)})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        write_tokenizer(tmp)
        write_processor_configs(tmp, image_size=image_size, image_mean=mean, image_std=std,
                                do_normalize=do_norm, num_image_tokens=576)
        tmp.chmod(0o755)  # mkdtemp makes it private; a checkpoint folder is an ordinary one
        for f in tmp.iterdir():
            f.chmod(0o644)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def with_language_config(src: str | Path, out: str | Path, **fields) -> Path:
    """A copy of ``src`` with ``language_config`` fields changed that reshape no tensor (e.g. heads
    of 32 for a tiny model: KV-cache quantization groups must divide the head size)."""
    out = Path(out)
    shutil.copytree(src, out)
    config = json.loads((out / "config.json").read_text())
    config["language_config"].update(fields)
    (out / "config.json").write_text(json.dumps(config))
    return out


def cached_checkpoint(arch: str, seed: int = 0, root: str | Path | None = None) -> Path:
    """A random checkpoint made once under ``$MLX_DSVL_CACHE`` or ``~/.cache/mlx_dsvl``."""
    root = Path(root or os.environ.get("MLX_DSVL_CACHE") or Path.home() / ".cache" / "mlx_dsvl")
    out = root / "checkpoints" / f"{arch}-seed{seed}"
    if not (out / "config.json").exists():
        print(f"making a random {arch} checkpoint in {out} (once) ...", file=sys.stderr)
        try:
            make_checkpoint(arch, out, seed=seed, verbose=True)
        except (FileExistsError, OSError):
            if not (out / "config.json").exists():  # not just a concurrent maker finishing first
                raise
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m mlx_dsvl.random_checkpoint",
                                description="Write a random DeepSeek-VL checkpoint in the original layout.")
    p.add_argument("--arch", required=True, choices=sorted(ARCHS))
    p.add_argument("--out", required=True, help="output folder (must not exist unless --force)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float16", "float32"], default=None,
                   help="weights dtype (default: float32 for tiny archs, float16 for real sizes)")
    p.add_argument("--shard-gb", type=float, default=5.0, help="maximum shard size in GB (default 5)")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")
    a = p.parse_args(argv)
    if a.seed < 0 or not a.shard_gb > 0:
        print("error: --seed must be >= 0 and --shard-gb positive", file=sys.stderr)
        return 2
    try:
        path = make_checkpoint(a.arch, a.out, a.seed, a.dtype, a.shard_gb, a.force, verbose=True)
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # an unwritable --out, a full disk
        print(f"error: {a.out}: cannot write there ({e.strerror or e})", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

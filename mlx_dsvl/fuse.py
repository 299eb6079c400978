"""``python -m mlx_dsvl.fuse``: fold trained adapters into a full model in the original layout.

    python -m mlx_dsvl.fuse --model BASE --adapter RUN_DIR --out FUSED [--dtype float16]

Loads ``BASE`` (an original or MLX folder -- quantized too -- or a hub id) in float32, applies ``RUN_DIR``'s ``adapters.safetensors``
(LoRA/DoRA folded into the weights; fully trained tensors such as the aligner replace the base
ones), dequantizes a quantized base, and writes ``FUSED`` in the original deepseek-ai layout:
``config.json``, ``model.safetensors`` (or shards + index) with PyTorch conv layouts
``[O, I, kH, kW]`` and the base's unused tensors passed through, plus the tokenizer and
processor files.  ``mlx_dsvl.load(FUSED)`` loads it like any released checkpoint, and so does
the original PyTorch code.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

WEIGHT_SUFFIXES = (".safetensors",)
SKIP_FILES = {"model.safetensors.index.json"}


def to_original_layout(weights: Dict, conv_suffixes) -> Dict:
    """Invert ``DeepseekVL.sanitize``'s conv transposes: MLX [O, kH, kW, I] -> [O, I, kH, kW]."""
    out = {}
    for k, v in weights.items():
        if k.endswith(conv_suffixes) and v.ndim == 4:
            v = v.transpose(0, 3, 1, 2)
        out[k] = v
    return out


def unused_base_tensors(base: Path, config: Dict) -> Dict:
    """Tensors the released files carry and the model drops (attn_pool.*, ...), passed through.

    An original folder has them in its safetensors; an MLX folder (``python -m convert``) keeps
    them in ``original/unused.safetensors`` when it kept them at all.
    """
    import mlx.core as mx

    from .loading import read_weights
    from .mlx_format import MARKER, UNUSED_FILE

    if config.get(MARKER):
        f = base / UNUSED_FILE
        return dict(mx.load(str(f))) if f.is_file() else {}
    from .models.deepseek_vl import UNUSED_PARTS, UNUSED_PREFIXES

    try:
        weights = read_weights(base)
    except Exception:
        return {}
    return {k: v for k, v in weights.items()
            if k.startswith(UNUSED_PREFIXES) or any(p in k for p in UNUSED_PARTS)}


def base_dtype(config: Dict) -> str:
    marker = config.get("mlx_dsvl") or {}
    for d in (marker.get("dtype"), config.get("torch_dtype"),
              (config.get("language_config") or {}).get("torch_dtype")):
        if d in ("float16", "bfloat16", "float32"):
            return d
    return "float16"


def write_safetensors(folder: Path, weights: Dict, shard_bytes: int) -> List[str]:
    import mlx.core as mx

    shards: List[Dict] = [{}]
    size = 0
    for k in sorted(weights):
        n = weights[k].nbytes
        if shards[-1] and size + n > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = weights[k]
        size += n
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map, total = {}, 0
    for name, shard in zip(names, shards):
        mx.save_safetensors(str(folder / name), shard, metadata={"format": "pt"})
        for k, v in shard.items():
            weight_map[k] = name
            total += v.nbytes
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names


def fuse(model_path: str, adapter_dir: str, out: str, dtype: Optional[str] = None,
         shard_gb: float = 5.0, force: bool = False, verbose: bool = True) -> Path:
    """Fuse ``adapter_dir`` into ``model_path`` and write the original layout to ``out``."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from .loading import DTYPES, load, resolve_model_path
    from .models.deepseek_vl import CONV_SUFFIXES
    from .train.adapters import dequantize, fuse_adapters, load_adapters

    out_path = Path(out)
    if out_path.exists() and not force:
        raise FileExistsError(f"{out_path} exists (use --force to replace it)")
    base = resolve_model_path(model_path)
    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    dtype = dtype or base_dtype(config)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}")
    model, _ = load(base, dtype="float32")
    load_adapters(model, adapter_dir)
    fuse_adapters(model, dequantize=True)
    dequantize(model)
    weights = dict(tree_flatten(model.parameters()))
    weights = to_original_layout(weights, CONV_SUFFIXES)
    for k, v in unused_base_tensors(base, config).items():
        weights.setdefault(k, v)
    target = DTYPES[dtype]
    weights = {k: (v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v) for k, v in weights.items()}
    mx.eval(weights)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", dir=out_path.parent))
    try:
        names = write_safetensors(tmp, weights, int(shard_gb * 1e9))
        for f in base.iterdir():
            if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and f.name not in SKIP_FILES \
                    and f.name != "config.json":
                shutil.copy2(f, tmp / f.name)
        cfg = dict(config)
        for key in ("mlx_dsvl", "quantization", "quantization_config"):
            cfg.pop(key, None)
        cfg["torch_dtype"] = dtype
        if isinstance(cfg.get("language_config"), dict):
            cfg["language_config"] = {**cfg["language_config"], "torch_dtype": dtype}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        tmp.chmod(0o755)
        for f in tmp.iterdir():
            f.chmod(0o644)
        if out_path.exists():
            shutil.rmtree(out_path)
        tmp.rename(out_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if verbose:
        print(f"fused {adapter_dir} into {base} -> {out_path} ({', '.join(names)}, {dtype})")
    return out_path


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .blas import ensure_fast_blas

    ensure_fast_blas()
    p = argparse.ArgumentParser(
        prog="python -m mlx_dsvl.fuse",
        description="Fold trained adapters (python -m mlx_dsvl.train --out DIR) into a full model "
                    "written in the original deepseek-ai layout.",
    )
    p.add_argument("--model", required=True, help="the base model the adapters were trained on (folder or hub id)")
    p.add_argument("--adapter", required=True,
                   help="folder with adapters.safetensors + adapter_config.json (a run's --out or a checkpoint)")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --force)")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="weights dtype on disk (default: the base checkpoint's torch_dtype)")
    p.add_argument("--shard-gb", type=float, default=5.0, help="maximum shard size in GB (default 5)")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")
    a = p.parse_args(argv)
    from .loading import ModelLoadError
    from .train.adapters import AdapterError

    try:
        fuse(a.model, a.adapter, a.out, a.dtype, a.shard_gb, a.force)
    except (FileExistsError, ModelLoadError, AdapterError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""MLX folder (or any supported checkpoint) -> the original deepseek-ai layout.

Writes what the reference PyTorch code and ``transformers``' converter read: safetensors under
the original names with PyTorch conv layouts (``[O, I, kH, kW]``), the unused tensors the
released files carry when the MLX folder kept them, the original ``config.json`` (no MLX
marker), the tokenizer and processor files.  Quantized layers are dequantized
(``mx.dequantize``).  With ``adapter``, LoRA adapters are loaded onto the model and fused first.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Callable, Dict, Optional

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from ..mlx_format import dequantize_weights, quantize_like
from ..model_folder import check_weights, to_pytorch_layout
from ..models.deepseek_vl import DeepseekVL

from .files import ConvertError, log, write_shards
from .job import conversion
from .sources import Source, skeleton_parameters
from .to_mlx import DEFAULT_SHARD_GB, cast, dominant_dtype, set_torch_dtype


DSVL_ADAPTER_FORMAT = "mlx-dsvl-adapters"


def _apply_adapters(model: DeepseekVL, adapter: Path) -> str:
    """Load the adapters in ``adapter`` onto ``model``; returns how (for the progress line).

    Two formats: this package's (``"format": "mlx-dsvl-adapters"``, whole-model names, written
    by ``python -m mlx_dsvl.train``) through ``mlx_dsvl.train.adapters.load_adapters``, and
    mlx-lm's (``fine_tune_type`` / ``lora_parameters``, names inside the LLM) through
    ``mlx_lm.tuner.utils.load_adapters`` on ``model.language_model``.
    """
    cfg_file = adapter / "adapter_config.json"
    if not cfg_file.is_file():
        raise ConvertError(f"{adapter}: no adapter_config.json (not an adapter folder)")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"{cfg_file}: invalid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ConvertError(f"{cfg_file}: not a JSON object")
    if cfg.get("format") == DSVL_ADAPTER_FORMAT:
        try:
            from mlx_dsvl.train.adapters import load_adapters
        except ImportError as e:
            raise ConvertError(f"{adapter}: mlx-dsvl adapters need mlx_dsvl.train ({e})") from None
        target, how = model, "mlx_dsvl.train.adapters"
    elif "lora_parameters" in cfg or "fine_tune_type" in cfg:
        from mlx_lm.tuner.utils import load_adapters

        target, how = model.language_model, "mlx-lm adapters on the LLM"
    else:
        raise ConvertError(f"{cfg_file}: unknown adapter format (expected mlx-dsvl's or mlx-lm's)")
    try:
        load_adapters(target, str(adapter))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConvertError(f"{adapter}: cannot load the adapters ({' '.join(str(e).split())})") from None
    return how


def fuse_adapters(source: Source, adapter: Path, progress: Callable[[str], None]) -> Dict[str, mx.array]:
    """Load the model, apply the adapters in ``adapter`` and fuse LoRA/DoRA layers into plain
    (dequantized) Linear layers.  Returns the model's parameters; layers without an adapter may
    still be quantized (the caller dequantizes them)."""
    adapter = Path(adapter).expanduser()
    model = DeepseekVL(source.model_config)
    weights = source.weights
    if source.quantization:
        quantize_like(model, weights, {"quantization": source.quantization})
    check_weights(source.path, weights, skeleton_parameters(model))
    model.load_weights(list(weights.items()), strict=True)
    source.weights = weights = None
    mx.eval(model.parameters())
    how = _apply_adapters(model, adapter)
    fused = [(name, m.fuse(dequantize=True)) for name, m in model.named_modules() if hasattr(m, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    progress(f"  applied {adapter} ({how}): {len(fused)} LoRA/DoRA layer(s) fused")
    return dict(tree_flatten(model.parameters()))


def convert_to_original(
    model: str,
    out: str,
    dtype: Optional[str] = None,
    adapter: Optional[str] = None,
    force: bool = False,
    allow_pickle: bool = False,
    shard_gb: float = DEFAULT_SHARD_GB,
    progress: Callable[[str], None] = log,
) -> Path:
    """Write ``model`` (an MLX folder, or any supported checkpoint) in the original layout.

    dtype: None keeps each tensor's stored dtype (a dequantized layer takes its scales' dtype).
    """
    if adapter and not (Path(adapter).expanduser() / "adapter_config.json").is_file():
        raise ConvertError(f"{adapter}: no adapter_config.json (not an adapter folder)")  # before any work
    with conversion(model, out, dtype, force, allow_pickle, shard_gb, progress) as job:
        src, source, tmp, target = job.src, job.source, job.tmp, job.target
        progress(f"converting {src} ({source.describe()}) -> {job.out} (original layout"
                 + (f", {dtype}" if dtype else "") + (f", fusing {adapter}" if adapter else "") + ")")
        if adapter:
            weights = fuse_adapters(source, Path(adapter), progress)
        else:
            weights = source.weights
            source.weights = None
        if source.quantization:
            weights = dequantize_weights(weights, source.quantization)
        skeleton = skeleton_parameters(DeepseekVL(source.model_config))
        check_weights(src, weights, skeleton)
        tensors: Dict[str, mx.array] = {}
        for k in skeleton:  # the model's order, then the unused tensors kept verbatim
            tensors[k] = to_pytorch_layout(k, cast(weights.pop(k), target))
        del weights
        out_dtype = dominant_dtype(tensors)
        extras = source.extras or {}
        source.extras = None
        clash = sorted(set(extras) & set(tensors))
        if clash:
            raise ConvertError(f"{src}: unused tensor {clash[0]} clashes with a model weight")
        tensors.update(extras)
        for note in source.notes:
            progress(f"  note: {note}")

        write_shards(tmp, tensors, int(shard_gb * 1e9), {"format": "pt"}, always_index=False, progress=progress)
        config = copy.deepcopy(source.config)
        set_torch_dtype(config, out_dtype)
        job.write_configs(config)
    return job.out

"""MLX folder (or any supported checkpoint) -> the original deepseek-ai layout, what the reference
PyTorch code and ``transformers``' converter read: original names, PyTorch conv layouts, no MLX
marker in ``config.json``; quantized layers dequantized, adapters fused first.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from ..adapters import AdapterError, adapter_kind, adapter_layers, fuse_adapters, load_adapters, read_adapter_config
from ..mlx_format import dequantize_weights, quantize_like
from ..model_folder import check_weights, to_pytorch_layout
from ..models.deepseek_vl import DeepseekVL
from ..outputs import log
from .files import ConvertError, write_shards
from .job import conversion
from .sources import Source, skeleton_parameters
from .to_mlx import DEFAULT_SHARD_GB, cast, dominant_dtype, set_torch_dtype


def fused_weights(source: Source, adapter: Path, progress: Callable[[str], None]) -> dict[str, mx.array]:
    """The model's parameters with ``adapter`` (this package's or mlx-lm's) fused in; layers
    without an adapter may still be quantized."""
    adapter = Path(adapter).expanduser()
    model = DeepseekVL(source.model_config)
    weights = source.weights
    if source.quantization:
        quantize_like(model, weights, {"quantization": source.quantization})
    check_weights(source.path, weights, skeleton_parameters(model))
    model.load_weights(list(weights.items()), strict=True)
    source.weights = weights = None
    mx.eval(model.parameters())
    try:
        kind = adapter_kind(read_adapter_config(adapter))
        load_adapters(model, adapter)
    except (AdapterError, OSError, KeyError, TypeError) as e:
        raise ConvertError(f"{adapter}: cannot load the adapters ({' '.join(str(e).split())})") from None
    fused = len(adapter_layers(model))
    fuse_adapters(model, dequantize=True)
    how = "mlx-lm adapters on the LLM" if kind == "mlx-lm" else "mlx-dsvl adapters"
    progress(f"  applied {adapter} ({how}): {fused} LoRA/DoRA layer(s) fused")
    return dict(tree_flatten(model.parameters()))


def convert_to_original(
    model: str,
    out: str,
    dtype: str | None = None,
    adapter: str | None = None,
    force: bool = False,
    allow_pickle: bool = False,
    shard_gb: float = DEFAULT_SHARD_GB,
    progress: Callable[[str], None] = log,
) -> Path:
    """``dtype`` None keeps each tensor's (a dequantized layer takes its scales' dtype)."""
    if adapter:  # before any work: an adapter folder of a known format
        try:
            read_adapter_config(adapter)
        except AdapterError as e:
            raise ConvertError(str(e)) from None
    with conversion(model, out, dtype=dtype, force=force, allow_pickle=allow_pickle, shard_gb=shard_gb,
                    progress=progress) as job:
        src, source, tmp, target = job.src, job.source, job.tmp, job.target
        progress(f"converting {src} ({source.describe()}) -> {job.out} (original layout"
                 + (f", {dtype}" if dtype else "") + (f", fusing {adapter}" if adapter else "") + ")")
        if adapter:
            weights = fused_weights(source, Path(adapter), progress)
        else:
            weights = source.weights
            source.weights = None
        if source.quantization:
            weights = dequantize_weights(weights, source.quantization)
        skeleton = skeleton_parameters(DeepseekVL(source.model_config))
        check_weights(src, weights, skeleton)
        tensors: dict[str, mx.array] = {}
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

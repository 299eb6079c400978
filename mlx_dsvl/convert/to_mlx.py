"""PyTorch-layout checkpoint (original deepseek-ai or ``transformers``) -> MLX folder.

Everything is lazy until written shard by shard, so memory holds about one tensor, never a copy
of the model.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx

from ..loading import DTYPES
from ..mlx_format import (
    FORMAT,
    MARKER,
    QUANT_BITS,
    QUANT_GROUP_SIZES,
    UNUSED_FILE,
    dequantize_weights,
    describe_quantization,
    quantization_record,
    quantize_policy,
    quantize_structure,
    quantize_weights,
    record_version,
)
from ..model_folder import check_weights
from ..models.deepseek_vl import DeepseekVL
from ..outputs import log
from .files import ConvertError, write_safetensors, write_shards
from .job import conversion
from .sources import skeleton_parameters

DEFAULT_SHARD_GB = 5.0


def dtype_name(dtype: mx.Dtype) -> str:
    return {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype).replace("mlx.core.", ""))


def dominant_dtype(tensors: dict[str, mx.array]) -> str | None:
    """The floating dtype holding the most bytes (what ``torch_dtype`` should say)."""
    count: Counter = Counter()
    for v in tensors.values():
        if mx.issubdtype(v.dtype, mx.floating):
            count[v.dtype] += v.nbytes
    return dtype_name(count.most_common(1)[0][0]) if count else None


def cast(v: mx.array, dtype: mx.Dtype | None) -> mx.array:
    if dtype is None or not mx.issubdtype(v.dtype, mx.floating) or v.dtype == dtype:
        return v
    return v.astype(dtype)


def set_torch_dtype(config: dict, dtype: str | None) -> None:
    if dtype is None:
        return
    config["torch_dtype"] = dtype
    lang = config.get("language_config")
    if isinstance(lang, dict) and "torch_dtype" in lang:
        lang["torch_dtype"] = dtype


def convert_to_mlx(
    model: str,
    out: str,
    dtype: str | None = None,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    quantize_vision: bool | int | None = None,
    force: bool = False,
    allow_pickle: bool = False,
    shard_gb: float = DEFAULT_SHARD_GB,
    progress: Callable[[str], None] = log,
) -> Path:
    """Convert ``model`` (folder or hub id) into an MLX folder at ``out``. ``dtype`` None keeps
    each tensor's; ``quantize``: the LLM to ``q_bits``; ``quantize_vision``: the towers and the
    aligner to these bits (True: ``q_bits``), with or without the LLM; layers whose input size
    does not divide by ``q_group_size`` stay unquantized."""
    bits = q_bits if quantize else None
    vision_bits = q_bits if quantize_vision is True else (quantize_vision or None)
    for flag, b in (("--q-bits", bits), ("--quantize-vision", vision_bits)):
        if b is not None and b not in QUANT_BITS:
            raise ConvertError(f"{flag} must be one of {QUANT_BITS}, got {b}")
    qinfo = quantization_record(bits, vision_bits, q_group_size)
    if qinfo and q_group_size not in QUANT_GROUP_SIZES:
        raise ConvertError(f"--q-group-size must be one of {QUANT_GROUP_SIZES}, got {q_group_size}")
    with conversion(model, out, dtype=dtype, force=force, allow_pickle=allow_pickle, shard_gb=shard_gb,
                    progress=progress) as job:
        src, source, tmp, target = job.src, job.source, job.tmp, job.target
        weights = source.weights
        if source.quantization:  # an MLX folder converted again: start from its dequantized weights
            weights = dequantize_weights(weights, source.quantization)
            source.notes.append(f"dequantized the source's {source.quantization['bits']}-bit weights first")

        skeleton = DeepseekVL(source.model_config)
        check_weights(src, weights, skeleton_parameters(skeleton))
        policy = {"language": bits, "vision": vision_bits}
        # (groups of 1: every layer the policy covers, whatever its width)
        n_skipped = len(quantize_policy(skeleton, policy, 1)) - len(quantize_policy(skeleton, policy, q_group_size))
        qpaths = quantize_structure(skeleton, bits, q_group_size, vision_bits)
        expected = skeleton_parameters(skeleton)

        # Lazy graph per output tensor, in the model's order; nothing is read yet.
        tensors = quantize_weights({k: cast(v, target) for k, v in weights.items()}, qpaths, q_group_size)
        del weights
        check_weights(src, tensors, expected)  # the quantized layout too, before writing anything
        tensors = {k: tensors[k] for k in expected}
        out_dtype = dominant_dtype(tensors)
        extras = dict(source.extras)
        source.weights = source.extras = None  # only the lazy graph keeps the inputs now

        progress(f"converting {src} ({source.describe()}) -> {job.out} (MLX, "
                 f"{out_dtype or 'as stored'}"
                 + (f", {describe_quantization(qinfo)}: {len(qpaths)} layers quantized"
                    + (f", {n_skipped} left unquantized (input size not a multiple of {q_group_size})"
                       if n_skipped else "") if qinfo else "")
                 + ")")
        for note in source.notes:
            progress(f"  note: {note}")

        write_shards(tmp, tensors, int(shard_gb * 1e9), {"format": FORMAT}, always_index=True, progress=progress)
        if extras:
            (tmp / UNUSED_FILE).parent.mkdir(parents=True, exist_ok=True)
            write_safetensors(tmp / UNUSED_FILE, extras, {"format": "pt"})

        config = copy.deepcopy(source.config)
        set_torch_dtype(config, out_dtype)
        config[MARKER] = {
            "format": FORMAT,
            "format_version": record_version(qinfo),
            "dtype": out_dtype,
            "quantization": qinfo,
            "source_format": source.kind,
            "unused_tensors": UNUSED_FILE if (tmp / UNUSED_FILE).exists() else None,
        }
        job.write_configs(config)
    return job.out


"""``load()``: a local folder or a hub id -> (model, processor), strictly.

The weights are cast and materialized one tensor at a time, so no second full copy is held;
``quantize`` quantizes each LLM weight as it is read (the unquantized LLM never exists in memory),
``quantize_vision`` the towers' and the aligner's, bit for bit what loading a ``convert --quantize``
(``--quantize-vision``) folder gives.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .adapters import load_adapters
from .config import ModelConfig
from .mlx_format import (
    QUANT_BITS,
    QUANT_GROUP_SIZES,
    describe_quantization,
    group_bits,
    mlx_format_info,
    quantize_like,
    quantize_structure,
    quantize_weights,
)
from .model_folder import (  # noqa: F401 -- ModelLoadError .. read_weights: this module's API too
    ModelLoadError,
    check_weights,
    is_hub_id,
    load_config,
    read_json,
    read_weights,
    resolve_model_path,
    sanitize,
    weight_files,
)
from .models.deepseek_vl import DeepseekVL
from .processing.chat import ChatProcessor

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def default_dtype() -> mx.Dtype:
    """float32 on the CPU backend (half-precision matmuls are slow there), bfloat16 on a GPU."""
    return mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16


def resolve_dtype(dtype: None | str | mx.Dtype) -> mx.Dtype:
    if dtype is None:
        return default_dtype()
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    return dtype


def check_quantize(quantize: int | None, group_size: int, quantize_vision: int | None = None) -> None:
    for name, bits in (("quantize", quantize), ("quantize_vision", quantize_vision)):
        if bits is not None and (isinstance(bits, bool) or bits not in QUANT_BITS):
            raise ValueError(f"{name} must be one of {QUANT_BITS} (bits), got {bits}")
    if (quantize or quantize_vision) is not None and group_size not in QUANT_GROUP_SIZES:
        raise ValueError(f"q_group_size must be one of {QUANT_GROUP_SIZES}, got {group_size}")


def load_model(path: Path, dtype: None | str | mx.Dtype = None, config: ModelConfig | None = None,
               quantize: int | None = None, q_group_size: int = 64, *,
               quantize_vision: int | None = None) -> DeepseekVL:
    """Build the model from ``path`` and load its weights strictly (names and shapes); quantize
    the LLM to ``quantize`` bits and the towers and aligner to ``quantize_vision`` bits while loading."""
    dtype = resolve_dtype(dtype)
    check_quantize(quantize, q_group_size, quantize_vision)
    config = config or load_config(path)
    model = DeepseekVL(config)
    try:
        mlx_info = mlx_format_info(config.raw)
    except ValueError as e:
        raise ModelLoadError(f"{path / 'config.json'}: {e}") from None
    if mlx_info is None:  # original deepseek-ai layout
        weights = sanitize(read_weights(path))
    else:  # MLX format: already in our layout; rebuild the layers stored quantized
        weights = read_weights(path)
        try:
            quantize_like(model, weights, mlx_info)
        except ValueError as e:
            raise ModelLoadError(f"{path / 'config.json'}: {e}") from None
    if quantize is not None or quantize_vision is not None:
        check_not_quantized(path, (mlx_info or {}).get("quantization"), quantize, quantize_vision)
        weights = quantize_weights(weights, quantize_structure(model, quantize, q_group_size, quantize_vision),
                                   q_group_size)
    expected = dict(tree_flatten(model.parameters()))
    check_weights(path, weights, expected)
    del expected
    weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    model.load_weights(list(weights.items()), strict=True)
    del weights
    materialize(model)
    model.eval()
    model.source_folder = path  # what adapters record as their base (its fingerprint)
    return model


def check_not_quantized(path: Path, record: dict | None, quantize: int | None, quantize_vision: int | None) -> None:
    """Refuse to quantize again a group (the LLM, the vision) that the folder stores quantized."""
    stored = group_bits(record)
    for group, asked, flag in (("language", quantize, "quantize"), ("vision", quantize_vision, "quantize_vision")):
        if asked is not None and stored[group] is not None:
            raise ModelLoadError(f"{path}: already quantized ({describe_quantization(record)}); "
                                 f"load it without {flag} again")


def materialize(model: DeepseekVL) -> None:
    """Evaluate the parameters one tensor at a time, so each weight read before its cast or
    quantization is freed before the next is read (tensors evaluated together are read together)."""
    for _, v in tree_flatten(model.parameters()):
        mx.eval(v)


def load(path_or_repo: str | Path, dtype: None | str | mx.Dtype = None, quantize: int | None = None,
         q_group_size: int = 64, adapter_path: str | os.PathLike | None = None, *,
         quantize_vision: int | None = None) -> tuple[DeepseekVL, ChatProcessor]:
    """Load a DeepSeek-VL model and its chat processor from a folder or a hub id; ``quantize`` (4
    or 8) the LLM and ``quantize_vision`` (4 or 8) the vision towers and the aligner while
    loading; ``adapter_path``: a training output folder applied afterwards."""
    check_quantize(quantize, q_group_size, quantize_vision)
    path = resolve_model_path(path_or_repo)
    config = load_config(path)  # cheap checks first, the weights last
    try:
        processor = ChatProcessor.from_pretrained(path)
    except ModelLoadError:
        raise
    except (OSError, ValueError) as e:  # the message names the file when it knows which
        raise ModelLoadError(str(e) if str(path) in str(e) else f"{path}: cannot load the tokenizer/processor ({e})") from None
    model = load_model(path, dtype, config, quantize, q_group_size, quantize_vision=quantize_vision)
    model.image_token_id = image_token_id(path, config, processor)
    if adapter_path:
        load_adapters(model, adapter_path)
    return model, processor


def image_token_id(path: Path, config: ModelConfig, processor: ChatProcessor) -> int:
    """The tokenizer's id of the image tag: the reference processor places images by it, so a
    disagreeing ``image_token_id`` in ``config.json`` is ignored with a warning."""
    tokenizer_id = processor.image_token_id
    if config.image_token_id is not None and config.image_token_id != tokenizer_id:
        warnings.warn(
            f"{path / 'config.json'}: image_token_id {config.image_token_id} differs from the "
            f"tokenizer's id {tokenizer_id} of {processor.image_tag!r}; using the tokenizer's",
            stacklevel=3,
        )
    return tokenizer_id

"""``load()``: a local folder or a hub id -> (model, processor), strictly.

A folder in the original deepseek-ai layout holds ``config.json``, ``model.safetensors`` (or
shards with ``model.safetensors.index.json``), the tokenizer and the processor configs.  Weights
are read lazily (``mx.load`` on safetensors), converted once in ``DeepseekVL.sanitize``, cast to
the target dtype and materialized one tensor at a time, so no second full copy is held.

``quantize=4|8`` quantizes the LLM while loading, with the converter's policy: each weight is
quantized as it is read, so the unquantized LLM never exists in memory, and the result is bit
for bit what loading a ``python -m convert --quantize`` folder gives.

A folder written by ``python -m convert`` (MLX format, see :mod:`mlx_dsvl.mlx_format`) has the
same files with weights already in this package's layout: they skip ``sanitize``, and its
quantized layers are rebuilt as recorded before the same strict name and shape checks.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import mlx.core as mx
from mlx.utils import tree_flatten

from .config import ConfigError, ModelConfig
from .mlx_format import (
    QUANT_BITS, QUANT_GROUP_SIZES, mlx_format_info, quantize_like, quantize_structure, quantize_weights,
)
from .models.deepseek_vl import DeepseekVL

DEFAULT_MODEL = "deepseek-ai/deepseek-vl-1.3b-chat"  # the entry points' default --model
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


class ModelLoadError(ValueError):
    """A model folder or hub id that cannot be loaded; the message says what and where."""


def default_dtype() -> mx.Dtype:
    """float32 on the CPU backend (half-precision matmuls are slow there), bfloat16 on a GPU."""
    return mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16


def resolve_dtype(dtype: Union[None, str, mx.Dtype]) -> mx.Dtype:
    if dtype is None:
        return default_dtype()
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    return dtype


def is_hub_id(text: str) -> bool:
    """``owner/name`` that is not a local path: what :func:`resolve_model_path` downloads."""
    text = str(text)
    return not (Path(text).expanduser().exists() or text.startswith((".", "/", "~")) or text.count("/") != 1)


def resolve_model_path(path_or_repo: Union[str, Path]) -> Path:
    """A local folder as is; otherwise a hub id fetched once into the standard HF cache."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_repo)
    if not is_hub_id(text):
        raise ModelLoadError(f"{text}: no such model folder")
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]
        try:  # offline first: a cached model never touches the network
            return Path(snapshot_download(text, allow_patterns=patterns, local_files_only=True))
        except Exception:
            return Path(snapshot_download(text, allow_patterns=patterns))
    except Exception as e:  # network down, unknown repo, gated, ...
        raise ModelLoadError(
            f"could not download {text!r} from the Hugging Face hub and it is not in the local "
            f"cache ({type(e).__name__}); download it elsewhere and pass its folder instead, "
            "e.g. --model /path/to/deepseek-vl-1.3b-chat"
        ) from None


def read_json(path: Path, what: str) -> Dict:
    if not path.is_file():
        raise ModelLoadError(f"{path}: missing {what}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: invalid JSON in {what} ({e})") from None


def load_config(path: Path) -> ModelConfig:
    config = read_json(path / "config.json", "config.json (not a model folder?)")
    prep_file = path / "preprocessor_config.json"
    prep = read_json(prep_file, "preprocessor_config.json") if prep_file.exists() else {}
    try:
        mlx_format_info(config)  # an MLX folder's marker must be one we can read
    except ValueError as e:
        raise ModelLoadError(f"{path / 'config.json'}: {e}") from None
    try:
        return ModelConfig.from_dict(config, prep)
    except ConfigError as e:
        raise ModelLoadError(f"{path / 'config.json'}: {e}") from None


def weight_files(path: Path) -> Dict[str, Path]:
    """Map tensor name -> safetensors file, checking that every named shard exists."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index, "weight index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index}: no weight_map")
        missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if missing:
            raise ModelLoadError(f"{index}: missing shard file(s) {', '.join(missing)}")
        return {k: path / f for k, f in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path}: no model.safetensors (or shards with an index) found")
    return {"": f for f in files}


def read_weights(path: Path) -> Dict[str, mx.array]:
    """Lazily read all tensors named by the folder's safetensors files (or its index)."""
    files = weight_files(path)
    weights: Dict[str, mx.array] = {}
    for f in sorted(set(files.values())):
        try:
            weights.update(mx.load(str(f)))
        except Exception as e:
            raise ModelLoadError(f"{f}: cannot read safetensors file ({e})") from None
    if "" not in files:
        absent = sorted(k for k in files if k not in weights)
        if absent:
            raise ModelLoadError(
                f"{path / 'model.safetensors.index.json'}: tensor {absent[0]} is not in "
                f"{files[absent[0]].name}" + (f" (and {len(absent) - 1} more)" if len(absent) > 1 else "")
            )
    return weights


def check_quantize(quantize: Optional[int], group_size: int) -> None:
    if quantize is not None and quantize not in QUANT_BITS:
        raise ValueError(f"quantize must be one of {QUANT_BITS} (bits), got {quantize}")
    if quantize is not None and group_size not in QUANT_GROUP_SIZES:
        raise ValueError(f"q_group_size must be one of {QUANT_GROUP_SIZES}, got {group_size}")


def load_model(path: Path, dtype=None, config: Optional[ModelConfig] = None,
               quantize: Optional[int] = None, q_group_size: int = 64) -> DeepseekVL:
    """Build the model from ``path`` and load its weights strictly (names and shapes);
    ``quantize`` (bits): quantize the LLM as it loads (see the module's docstring)."""
    dtype = resolve_dtype(dtype)
    check_quantize(quantize, q_group_size)
    config = config or load_config(path)
    model = DeepseekVL(config)
    try:
        mlx_info = mlx_format_info(config.raw)
    except ValueError as e:
        raise ModelLoadError(f"{path / 'config.json'}: {e}") from None
    if mlx_info is None:  # original deepseek-ai layout
        weights = DeepseekVL.sanitize(read_weights(path))
    else:  # MLX format: already in our layout; rebuild the layers stored quantized
        weights = read_weights(path)
        try:
            quantize_like(model, weights, mlx_info)
        except ValueError as e:
            raise ModelLoadError(f"{path / 'config.json'}: {e}") from None
    if quantize is not None:
        if mlx_info is not None and mlx_info.get("quantization"):
            raise ModelLoadError(f"{path}: already quantized ({mlx_info['quantization']['bits']}-bit); "
                                 "load it without quantizing again")
        weights = quantize_weights(weights, quantize_structure(model, quantize, q_group_size), quantize,
                                   q_group_size)
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing:
        raise ModelLoadError(
            f"{path}: missing weight {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    if unexpected:
        raise ModelLoadError(
            f"{path}: unexpected weight {unexpected[0]}"
            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
        )
    for k, v in weights.items():
        if v.shape != expected[k].shape:
            raise ModelLoadError(
                f"{path}: weight {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}"
            )
    del expected
    weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    model.load_weights(list(weights.items()), strict=True)
    del weights
    materialize(model)
    model.eval()
    return model


def materialize(model: DeepseekVL) -> None:
    """Evaluate the (lazily read, cast, quantized) parameters one tensor at a time, in the model's
    order: a tensor read from disk and not kept as it is (a weight before its cast or its
    quantization) is freed before the next one is read.  (Several tensors evaluated together
    are read together: batches of 128 MB of 4-bit output held ~450 MB of half-precision input.)"""
    for _, v in tree_flatten(model.parameters()):
        mx.eval(v)


def load(path_or_repo: Union[str, Path], dtype: Union[None, str, mx.Dtype] = None,
         quantize: Optional[int] = None, q_group_size: int = 64) -> Tuple[DeepseekVL, "ChatProcessor"]:
    """Load a DeepSeek-VL model and its chat processor from a folder or a hub id.

    dtype: None (float32 on CPU, bfloat16 on GPU), "float32", "float16" or "bfloat16".
    quantize: None, 4 or 8 -- quantize the LLM's linear layers and embeddings while loading, in
    groups of ``q_group_size`` (the same weights as ``python -m convert --quantize``).
    """
    from .processing.chat import ChatProcessor

    check_quantize(quantize, q_group_size)
    path = resolve_model_path(path_or_repo)
    config = load_config(path)  # cheap checks first, the weights last
    try:
        processor = ChatProcessor.from_pretrained(path)
    except ModelLoadError:
        raise
    except (OSError, ValueError) as e:  # the message names the file when it knows which
        raise ModelLoadError(str(e) if str(path) in str(e) else f"{path}: cannot load the tokenizer/processor ({e})") from None
    model = load_model(path, dtype, config, quantize, q_group_size)
    model.image_token_id = image_token_id(path, config, processor)
    return model, processor


def image_token_id(path: Path, config: ModelConfig, processor) -> int:
    """The id that marks image positions: the tokenizer's id of the image tag.

    The reference processor finds image positions with the tokenizer's id and the model merges
    wherever the processor put them, so the tokenizer is the one source.  ``config.json`` may
    name an ``image_token_id`` too (transformers checkpoints do); when it disagrees it is
    ignored, with a warning: a model that looked for another id would never see the images.
    """
    tokenizer_id = processor.image_token_id
    if config.image_token_id is not None and config.image_token_id != tokenizer_id:
        warnings.warn(
            f"{path / 'config.json'}: image_token_id {config.image_token_id} differs from the "
            f"tokenizer's id {tokenizer_id} of {processor.image_tag!r}; using the tokenizer's",
            stacklevel=3,
        )
    return tokenizer_id

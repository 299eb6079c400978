"""The MLX-format model folder: what ``python -m mlx_dsvl.convert`` writes and ``mlx_dsvl.load`` reads.

The original deepseek-ai folder with its weights already converted:

- ``config.json``: the original config plus a marker block::

      "mlx_dsvl": {"format": "mlx", "format_version": 1, "dtype": "float16",
                   "quantization": null | {"bits": 4, "group_size": 64, "mode": "affine",
                                           "vision": false},
                   "source_format": "original" | "transformers" | "mlx",
                   "unused_tensors": null | "original/unused.safetensors"}

- ``model*.safetensors`` + index: this package's parameter names and layouts (conv weights
  ``[O, kH, kW, I]``); a quantized layer as ``weight`` (packed), ``scales`` and ``biases``;
- ``original/unused.safetensors`` (optional): the released tensors no model uses, kept verbatim
  so that ``--to-original`` gives back the original files bit for bit (never loaded);
- the tokenizer and processor files.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .models.cpu_math import blas_quantized

MARKER = "mlx_dsvl"
FORMAT = "mlx"
FORMAT_VERSION = 1
UNUSED_FILE = "original/unused.safetensors"
QUANT_BITS = (4, 8)
QUANT_GROUP_SIZES = (32, 64, 128)
# Layers quantized by default: the LLM's (linear layers, embeddings, the untied lm_head).
LLM_PREFIX = "language_model."
VISION_PREFIXES = ("vision_model.", "aligner.")


def mlx_format_info(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The marker block of an MLX-format ``config.json`` (validated), or None for other folders.

    Raises ``ValueError`` (message without the path) for a marker this version cannot read.
    """
    info = config.get(MARKER) if isinstance(config, Mapping) else None
    if info is None:
        return None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ValueError(f"malformed {MARKER!r} block (expected \"format\": \"{FORMAT}\")")
    version = info.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"MLX format version {version!r} is newer than this mlx-dsvl reads ({FORMAT_VERSION}); "
            "upgrade mlx-dsvl"
        )
    q = info.get("quantization")
    if q is not None:
        if not isinstance(q, dict):
            raise ValueError("malformed quantization block")
        bits, group = q.get("bits"), q.get("group_size")
        if not isinstance(bits, int) or not isinstance(group, int) or bits <= 0 or group <= 0:
            raise ValueError(f"quantization needs integer bits and group_size, got {q}")
        if q.get("mode", "affine") != "affine":
            raise ValueError(f"unsupported quantization mode {q.get('mode')!r}")
    return info


def strip_marker(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config.json`` without the MLX marker: the original deepseek-ai config."""
    return {k: v for k, v in config.items() if k != MARKER}


def quantized_paths(weights: Mapping[str, Any]) -> set:
    """Module paths stored quantized: those with a ``scales`` tensor."""
    return {k[: -len(".scales")] for k in weights if k.endswith(".scales")}


def quantize_like(model: nn.Module, weights: Mapping[str, Any], info: Mapping[str, Any]) -> int:
    """Turn exactly the layers stored quantized in ``weights`` into quantized layers.

    Uses the recorded bits / group size; nothing is computed (the module's own weights are
    replaced by the loaded ones afterwards).  A ``scales`` tensor for a layer that cannot be
    quantized is left for the caller's strict name check to report.  Returns the layer count.
    """
    paths = quantized_paths(weights)
    if not paths:
        return 0
    q = info.get("quantization")
    if q is None:
        raise ValueError("the weights hold quantized layers (*.scales) but config.json records no quantization")
    chosen = []

    def predicate(path: str, module: nn.Module) -> bool:
        ok = path in paths and hasattr(module, "to_quantized")
        if ok:
            chosen.append(path)
        return ok

    quantize_modules(model, predicate, bits=q["bits"], group_size=q["group_size"], mode=q.get("mode", "affine"))
    return len(chosen)


def quantize_predicate(group_size: int, vision: bool = False) -> Callable[[str, nn.Module], bool]:
    """The converter's policy: which layers ``nn.quantize`` turns into quantized ones.

    The LLM's linear layers and embeddings (``lm_head`` included); with ``vision`` also the
    towers' and the aligner's linear layers.  A layer whose input size (the last weight axis)
    does not divide by ``group_size`` stays unquantized; conv layers never are.
    """
    prefixes = (LLM_PREFIX, *VISION_PREFIXES) if vision else (LLM_PREFIX,)

    def predicate(path: str, module: nn.Module) -> bool:
        if not path.startswith(prefixes) or not hasattr(module, "to_quantized"):
            return False
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            return False
        w = module.weight
        return w.ndim == 2 and w.shape[-1] % group_size == 0

    return predicate


def quantize_structure(model: nn.Module, bits: int = 4, group_size: int = 64, vision: bool = False) -> set:
    """Turn the layers the converter's policy (:func:`quantize_predicate`) picks into quantized
    layers -- structure only: their weights are meant to be replaced.  Returns their paths."""
    quantize_modules(model, quantize_predicate(group_size, vision), bits=bits, group_size=group_size)
    return {p for p, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))}


def quantize_modules(model: nn.Module, predicate: Callable[[str, nn.Module], bool], *, bits: int,
                     group_size: int, mode: str = "affine") -> None:
    """``nn.quantize`` of the layers ``predicate`` picks, each then given the CPU backend's BLAS
    path for many rows (``models/cpu_math.py``; the parameters stay ``nn.QuantizedLinear``'s)."""
    nn.quantize(model, group_size=group_size, bits=bits, mode=mode, class_predicate=predicate)
    blas_quantized(model)


def quantize_weights(weights: dict[str, mx.array], paths: set, bits: int, group_size: int) -> dict[str, mx.array]:
    """``<path>.weight`` of each layer in ``paths`` -> its packed ``weight``, ``scales`` and
    ``biases`` (lazily, in the weight's own dtype); other tensors pass through.  The input dict
    is emptied as it is read.  The converter writes these tensors; loading with ``quantize``
    computes the same ones."""
    out: dict[str, mx.array] = {}
    for k in list(weights):
        v = weights.pop(k)
        base, _, leaf = k.rpartition(".")
        if leaf == "weight" and base in paths:
            wq, scales, biases = mx.quantize(v, group_size=group_size, bits=bits)
            out.update({k: wq, base + ".scales": scales, base + ".biases": biases})
        else:
            out[k] = v
    return out


def dequantize_weights(weights: dict[str, mx.array], quantization: Mapping[str, Any]) -> dict[str, mx.array]:
    """(weight, scales, biases) triples -> plain ``weight`` in the scales' dtype (lazily).

    Other tensors pass through; the input dict is emptied as it is read (so that nothing keeps
    the packed tensors alive once their dequantized version is evaluated).
    """
    paths = quantized_paths(weights)
    out: dict[str, mx.array] = {}
    for k in list(weights):
        if k not in weights:
            continue
        base, _, leaf = k.rpartition(".")
        if base in paths and leaf in ("weight", "scales", "biases"):
            w, s = weights.pop(base + ".weight"), weights.pop(base + ".scales")
            b = weights.pop(base + ".biases", None)
            out[base + ".weight"] = mx.dequantize(
                w, s, b, group_size=quantization["group_size"], bits=quantization["bits"],
                mode=quantization.get("mode", "affine"),
            )
        else:
            out[k] = weights.pop(k)
    return out

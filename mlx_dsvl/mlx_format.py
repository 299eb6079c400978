"""The MLX-format model folder: what ``python -m mlx_dsvl.convert`` writes and ``mlx_dsvl.load`` reads.

The original deepseek-ai folder with its weights already converted:

- ``config.json``: the original config plus a marker block::

      "mlx_dsvl": {"format": "mlx", "format_version": 1 | 2, "dtype": "float16",
                   "quantization": null | {"bits": 4 | null, "group_size": 64, "mode": "affine",
                                           "vision": false, "vision_bits": 8 | null},
                   "source_format": "original" | "transformers" | "mlx",
                   "unused_tensors": null | "original/unused.safetensors"}

  ``bits`` are the LLM's (null: not quantized), ``vision_bits`` the towers' and the aligner's;
  a folder without ``vision_bits`` (written before it) has the LLM's bits in the vision when
  ``vision`` is true.  Version 2 marks a record that older readers would misread (vision bits
  other than the LLM's).
- ``model*.safetensors`` + index: this package's parameter names and layouts (conv weights
  ``[O, kH, kW, I]``); a quantized layer as ``weight`` (packed), ``scales`` and ``biases``;
- ``original/unused.safetensors`` (optional): the released tensors no model uses, kept verbatim
  so that ``--to-original`` gives back the original files bit for bit (never loaded);
- the tokenizer and processor files.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .models.cpu_math import blas_quantized

MARKER = "mlx_dsvl"
FORMAT = "mlx"
FORMAT_VERSION = 2
UNUSED_FILE = "original/unused.safetensors"
QUANT_BITS = (4, 8)
QUANT_GROUP_SIZES = (32, 64, 128)
# Layers quantized by default: the LLM's (linear layers, embeddings, the untied lm_head).
LLM_PREFIX = "language_model."
VISION_PREFIXES = ("vision_model.", "aligner.")
# The groups of layers quantized with their own bits, by path prefix.
GROUPS = {"language": (LLM_PREFIX,), "vision": VISION_PREFIXES}
GROUP_NAMES = {"language": "LLM", "vision": "vision"}  # in messages


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
        group = q.get("group_size")
        bits = [b for b in group_bits(q).values() if b is not None]
        if not bits or not all(isinstance(b, int) and b > 0 for b in bits) or not isinstance(group, int) \
                or group <= 0:
            raise ValueError(f"quantization needs integer bits and group_size, got {q}")
        if q.get("mode", "affine") != "affine":
            raise ValueError(f"unsupported quantization mode {q.get('mode')!r}")
    return info


def group_bits(q: Mapping[str, Any] | None) -> dict[str, int | None]:
    """A quantization record -> each group's bits (None: that group is not quantized)."""
    if not q:
        return dict.fromkeys(GROUPS)
    vision = q["vision_bits"] if "vision_bits" in q else (q.get("bits") if q.get("vision") else None)
    return {"language": q.get("bits"), "vision": vision}


def quantization_record(bits: int | None, vision_bits: int | None, group_size: int) -> dict[str, Any] | None:
    """What ``config.json`` records for an LLM quantized to ``bits`` and the vision to ``vision_bits``."""
    if bits is None and vision_bits is None:
        return None
    return {"bits": bits, "group_size": group_size, "mode": "affine", "vision": vision_bits is not None,
            "vision_bits": vision_bits}


def record_version(q: Mapping[str, Any] | None) -> int:
    """1 where a reader of version 1 reads the record right, else 2 (vision bits of their own)."""
    bits = group_bits(q)
    return 1 if bits["vision"] is None or bits["vision"] == bits["language"] else 2


def describe_quantization(q: Mapping[str, Any] | None) -> str:
    """``LLM 4-bit, vision 8-bit, groups of 64`` (``unquantized`` for none)."""
    parts = [f"{GROUP_NAMES[g]} {b}-bit" for g, b in group_bits(q).items() if b is not None]
    return f"{', '.join(parts)}, groups of {q['group_size']}" if parts else "unquantized"


def layer_group(path: str) -> str | None:
    """The group (``language`` or ``vision``) a module path belongs to."""
    return next((g for g, prefixes in GROUPS.items() if path.startswith(prefixes)), None)


def strip_marker(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config.json`` without the MLX marker: the original deepseek-ai config."""
    return {k: v for k, v in config.items() if k != MARKER}


def quantized_paths(weights: Mapping[str, Any]) -> set:
    """Module paths stored quantized: those with a ``scales`` tensor."""
    return {k[: -len(".scales")] for k in weights if k.endswith(".scales")}


def stored_bits(weights: Mapping[str, Any], q: Mapping[str, Any] | None) -> dict[str, int]:
    """Each layer stored quantized in ``weights`` -> its bits, from the record ``q``.

    Raises ``ValueError`` (one line) where the tensors do not match the record: a quantized
    layer in a group recorded unquantized, or a packed weight whose width is not the recorded
    bits' (``in * bits / 32`` words a row, ``in`` being ``group_size`` times the scales' width).
    """
    paths = quantized_paths(weights)
    if paths and q is None:
        raise ValueError("the weights hold quantized layers (*.scales) but config.json records no quantization")
    groups = group_bits(q)
    out: dict[str, int] = {}
    for path in sorted(paths):
        group = layer_group(path)
        bits = groups.get(group)
        if bits is None:
            raise ValueError(f"{path} is stored quantized but config.json records the "
                             f"{GROUP_NAMES.get(group, 'other')} layers unquantized")
        w, scales = weights.get(path + ".weight"), weights[path + ".scales"]
        if w is not None and w.shape[-1] * 32 != scales.shape[-1] * q["group_size"] * bits:
            packed = w.shape[-1] * 32 / (scales.shape[-1] * q["group_size"])
            raise ValueError(f"{path}.weight is packed as {packed:g}-bit but config.json records "
                             f"{bits}-bit {GROUP_NAMES[group]} layers")
        out[path] = bits
    return out


def quantize_like(model: nn.Module, weights: Mapping[str, Any], info: Mapping[str, Any]) -> int:
    """Turn exactly the layers stored quantized in ``weights`` into quantized layers.

    Uses the recorded bits (per group, checked against the packed shapes by :func:`stored_bits`)
    and group size; nothing is computed (the module's own weights are replaced by the loaded
    ones afterwards).  A ``scales`` tensor for a layer that cannot be quantized is left for the
    caller's strict name check to report.  Returns the layer count.
    """
    q = info.get("quantization")
    bits = stored_bits(weights, q)
    if not bits:
        return 0
    return len(quantize_layers(model, bits, q["group_size"], q.get("mode", "affine")))


def quantize_layers(model: nn.Module, bits: Mapping[str, int], group_size: int, mode: str = "affine") -> dict[str, int]:
    """Turn the layers named in ``bits`` (path -> bits) that can be quantized into quantized
    layers (structure only); returns those turned, with their bits."""
    chosen: dict[str, int] = {}

    def predicate(path: str, module: nn.Module) -> bool | dict:
        if path not in bits or not hasattr(module, "to_quantized"):
            return False
        chosen[path] = bits[path]
        return {"group_size": group_size, "bits": bits[path], "mode": mode}

    nn.quantize(model, class_predicate=predicate)
    blas_quantized(model)  # the CPU backend's BLAS path for many rows (models/cpu_math.py)
    return chosen


def quantize_policy(model: nn.Module, bits: Mapping[str, int | None], group_size: int) -> dict[str, int]:
    """The converter's policy: the layers to quantize (path -> bits), for each group's ``bits``
    (``{"language": 4, "vision": 8}``; None or absent: that group stays as it is).

    The LLM's linear layers and embeddings (``lm_head`` included); the vision towers' and the
    aligner's linear layers.  A layer whose input size (the last weight axis) does not divide by
    ``group_size`` stays unquantized; conv layers (patch embeddings, SAM's neck) never are, nor
    are norms and position embeddings (not layers with ``to_quantized``, or not in the groups).
    """
    out: dict[str, int] = {}
    for path, module in model.named_modules():
        b = bits.get(layer_group(path) or "")
        if b is None or not isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        if module.weight.ndim == 2 and module.weight.shape[-1] % group_size == 0:
            out[path] = b
    return out


def quantize_structure(model: nn.Module, bits: int | None = 4, group_size: int = 64,
                       vision_bits: int | None = None) -> dict[str, int]:
    """Turn the layers the converter's policy (:func:`quantize_policy`) picks for the LLM's
    ``bits`` and the vision's ``vision_bits`` into quantized layers -- structure only: their
    weights are meant to be replaced.  Returns the layers turned (path -> bits)."""
    policy = quantize_policy(model, {"language": bits, "vision": vision_bits}, group_size)
    return quantize_layers(model, policy, group_size)


def quantize_weights(weights: dict[str, mx.array], bits: Mapping[str, int], group_size: int) -> dict[str, mx.array]:
    """``<path>.weight`` of each layer in ``bits`` (path -> bits) -> its packed ``weight``,
    ``scales`` and ``biases`` (lazily, in the weight's own dtype); other tensors pass through.
    The input dict is emptied as it is read.  The converter writes these tensors; loading with
    ``quantize`` computes the same ones."""
    out: dict[str, mx.array] = {}
    for k in list(weights):
        v = weights.pop(k)
        base, _, leaf = k.rpartition(".")
        if leaf == "weight" and base in bits:
            wq, scales, biases = mx.quantize(v, group_size=group_size, bits=bits[base])
            out.update({k: wq, base + ".scales": scales, base + ".biases": biases})
        else:
            out[k] = v
    return out


def dequantize_weights(weights: dict[str, mx.array], quantization: Mapping[str, Any]) -> dict[str, mx.array]:
    """(weight, scales, biases) triples -> plain ``weight`` in the scales' dtype (lazily).

    Each layer's bits are its group's (:func:`stored_bits`, which raises ``ValueError`` where the
    tensors do not match the record).  Other tensors pass through; the input dict is emptied as it
    is read (so that nothing keeps the packed tensors alive once their dequantized version is
    evaluated).
    """
    paths = stored_bits(weights, quantization)
    out: dict[str, mx.array] = {}
    for k in list(weights):
        if k not in weights:
            continue
        base, _, leaf = k.rpartition(".")
        if base in paths and leaf in ("weight", "scales", "biases"):
            w, s = weights.pop(base + ".weight"), weights.pop(base + ".scales")
            b = weights.pop(base + ".biases", None)
            out[base + ".weight"] = mx.dequantize(
                w, s, b, group_size=quantization["group_size"], bits=paths[base],
                mode=quantization.get("mode", "affine"),
            )
        else:
            out[k] = weights.pop(k)
    return out

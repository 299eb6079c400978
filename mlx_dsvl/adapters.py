"""Adapters: the folder format, wrapping layers, loading onto a model, fusing into the weights.

This package's ``adapters.safetensors`` keeps every trained tensor under its full name in the
model (LoRA/DoRA factors and fully trained weights such as the aligner's); ``adapter_config.json``
(``"format": "mlx-dsvl-adapters"``) lists the adapted Linear layers, rank, scale, the training
spec and the base model's fingerprint. mlx-lm's folders load too, onto ``model.language_model``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.utils import load_adapters as mlx_lm_load_adapters

from .model_folder import folder_fingerprint
from .models.cpu_math import blas_quantized

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapters.safetensors"
FORMAT = "mlx-dsvl-adapters"
ADAPTER_TYPES = (LoRALinear, DoRALinear)  # what this package's training wraps Linear layers in


class AdapterError(ValueError):
    """An adapter folder that cannot be applied to this model; the message says why."""


# -- wrapping ---------------------------------------------------------------------------------
def wrap_linear(module: nn.Module, method: str, rank: int, scale: float, dropout: float) -> nn.Module:
    cls = DoRALinear if method == "dora" else LoRALinear
    if isinstance(module, ADAPTER_TYPES):
        raise AdapterError("layer already has an adapter")
    if not isinstance(module, (nn.Linear, nn.QuantizedLinear)):
        raise AdapterError(f"cannot put a {method} adapter on a {type(module).__name__}")
    return cls.from_base(module, r=rank, dropout=dropout, scale=scale)


def adapt_modules(model: nn.Module, paths: Iterable[str], method: str, rank: int, scale: float, dropout: float) -> None:
    """Wrap the Linear layers at ``paths`` (full dotted names in ``model``) with adapters."""
    modules = dict(model.named_modules())
    updates = []
    for p in paths:
        if p not in modules:
            raise AdapterError(f"no module {p!r} in this model")
        updates.append((p, wrap_linear(modules[p], method, rank, scale, dropout)))
    if updates:
        model.update_modules(tree_unflatten(updates))


def adapter_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every layer that can fold an adapter into itself (mlx-lm's ``fuse``)."""
    return [(name, m) for name, m in model.named_modules() if hasattr(m, "fuse")]


def fuse_adapters(model: nn.Module, dequantize: bool = False):
    """Fold every adapter (this package's or mlx-lm's) into a plain layer; a quantized base is
    re-quantized unless ``dequantize`` (and keeps the CPU's BLAS path for many rows)."""
    fused = [(name, m.fuse(dequantize=dequantize)) for name, m in adapter_layers(model)]
    if fused:
        model.update_modules(tree_unflatten(fused))
        blas_quantized(model)
    return model


# -- the format -------------------------------------------------------------------------------
def model_fingerprint(model: nn.Module) -> dict:
    """A base model's identity. ``weights`` hashes rounded statistics of the 1-D tensors (never
    quantized), so the same model in another dtype or quantization matches; ``folder`` tells apart
    variants whose norms are the same (adapters fused in)."""
    arch = hashlib.sha256()
    stats = hashlib.sha256()
    params = dict(tree_flatten(model.parameters()))
    # Base weights only: adapter factors do not identify the base.
    names = sorted(k for k in params if not k.endswith((".lora_a", ".lora_b", ".m")))
    for k in names:
        v = params[k]
        base = k.replace(".linear.", ".")
        if base.endswith((".scales", ".biases")) and v.ndim >= 2:
            continue  # quantization side tensors
        arch.update(base.encode())
        if v.ndim == 1:
            arch.update(str(tuple(v.shape)).encode())
            s = float(mx.sum(v.astype(mx.float32)).item())
            q = float(mx.sum(mx.abs(v.astype(mx.float32))).item())
            stats.update(f"{base}:{s:.3e}:{q:.3e}".encode())
    fingerprint = {"arch": arch.hexdigest()[:16], "weights": stats.hexdigest()[:16]}
    folder = getattr(model, "source_folder", None)
    if folder is not None:
        fingerprint["folder"] = folder_fingerprint(folder)
    return fingerprint


def trained_weights(model: nn.Module) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


def adapted_paths(model: nn.Module) -> list:
    return [name for name, m in model.named_modules() if isinstance(m, ADAPTER_TYPES)]


def adapter_config(model: nn.Module, spec, base_path: str | None, fingerprint: dict | None) -> dict:
    """The ``adapter_config.json`` of ``model`` trained with ``spec``."""
    return {
        "format": FORMAT,
        "version": 1,
        "method": spec.method,
        "rank": spec.rank,
        "scale": spec.scale,
        "dropout": spec.dropout,
        "adapted": adapted_paths(model),
        "spec": spec.to_dict(),
        "base_model": {"path": base_path, "fingerprint": fingerprint},
    }


def adapter_kind(cfg: dict) -> str | None:
    """``"mlx-dsvl"``, ``"mlx-lm"`` or None (unknown) for an ``adapter_config.json``."""
    if cfg.get("format") == FORMAT:
        return "mlx-dsvl"
    if "lora_parameters" in cfg or "fine_tune_type" in cfg:
        return "mlx-lm"
    return None


def read_adapter_config(folder: str | os.PathLike) -> dict:
    """The folder's ``adapter_config.json``, checked to be this package's or mlx-lm's."""
    folder = Path(folder).expanduser()
    cfg_file = folder / ADAPTER_CONFIG
    if not folder.is_dir():
        raise AdapterError(f"{folder}: no such adapter folder")
    if not cfg_file.is_file():
        raise AdapterError(f"{folder}: no {ADAPTER_CONFIG} (not an adapter folder)")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{cfg_file}: invalid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{cfg_file}: not a JSON object")
    if adapter_kind(cfg) is None:
        raise AdapterError(f"{cfg_file}: unknown adapter format (expected mlx-dsvl's or mlx-lm's; "
                           f"format {cfg.get('format')!r})")
    return cfg


# -- loading ----------------------------------------------------------------------------------
def load_adapters(model: nn.Module, adapter_dir: str | os.PathLike, check_base: bool = True):
    """Apply the adapters and fully trained weights in ``adapter_dir`` to ``model`` in place (eval
    mode), strictly by name and shape; returns ``model``."""
    folder = Path(adapter_dir).expanduser()
    cfg = read_adapter_config(folder)
    if adapter_kind(cfg) == "mlx-lm":
        try:
            mlx_lm_load_adapters(model.language_model, str(folder))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise AdapterError(f"{folder}: mlx-lm adapters: {' '.join(str(e).split())}") from None
        model.eval()
        return model
    weights = _read_weights(folder)
    if check_base:
        _check_base(model, folder, cfg)
    method = cfg.get("method", "lora")
    adapted = cfg.get("adapted", [])
    if adapted:
        if method not in ("lora", "dora"):
            raise AdapterError(f"{folder}: unknown adapter method {method!r}")
        try:
            adapt_modules(model, adapted, method, int(cfg["rank"]), float(cfg["scale"]), 0.0)
        except (AdapterError, KeyError, TypeError, ValueError) as e:
            raise AdapterError(f"{folder}: {e}") from None
    params = dict(tree_flatten(model.parameters()))
    errors = []
    for name, w in weights.items():
        if name not in params:
            errors.append(f"{name}: not a parameter of this model")
        elif tuple(w.shape) != tuple(params[name].shape):
            errors.append(f"{name}: shape {tuple(w.shape)}, the model has {tuple(params[name].shape)}")
    if errors:
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise AdapterError(f"{folder / ADAPTER_WEIGHTS}: incompatible tensors: " + "; ".join(errors[:5]) + more)
    dtypes = {k: params[k].dtype for k in weights}
    model.load_weights([(k, v.astype(dtypes[k])) for k, v in weights.items()], strict=False)
    mx.eval(model.parameters())
    model.eval()
    return model


def _read_weights(folder: Path) -> dict[str, mx.array]:
    wfile = folder / ADAPTER_WEIGHTS
    if not wfile.is_file():
        raise AdapterError(f"{folder}: missing {ADAPTER_WEIGHTS}")
    try:
        return mx.load(str(wfile))
    except Exception as e:
        raise AdapterError(f"{wfile}: cannot read safetensors file ({e})") from None


def _check_base(model: nn.Module, folder: Path, cfg: dict) -> None:
    """Refuse another architecture; warn in one line on other base weights (a fine-tuned variant
    of the same shape may be meant).  Adapters that recorded no fingerprint are not checked."""
    fp = (cfg.get("base_model") or {}).get("fingerprint") or {}
    if not fp:
        return
    here = model_fingerprint(model)
    base = cfg["base_model"].get("path")
    if fp.get("arch") and fp["arch"] != here["arch"]:
        raise AdapterError(f"{folder}: these adapters were trained on a different model architecture "
                           f"(base {base!r})")
    was, now = fp.get("folder") or {}, here.get("folder") or {}
    if (fp.get("weights") and fp["weights"] != here["weights"]) or (
            was.get("layout") == now.get("layout") and None not in (was.get("files"), now.get("files"))
            and was["files"] != now["files"]):
        this = getattr(model, "source_folder", None) or "this model"
        print(f"warning: adapter {folder} was trained on base {base} ({fp.get('weights')}/{was.get('files')}), "
              f"not on {this} ({here['weights']}/{now.get('files')}): its weights differ; results may be off",
              file=sys.stderr, flush=True)

"""Adapters on disk: ``adapters.safetensors`` + ``adapter_config.json``.

``adapters.safetensors`` holds every trained tensor under its full name in the model (the same
names as the model's parameters): LoRA/DoRA factors (``...q_proj.lora_a``, ``.lora_b``, DoRA's
``.m``) and fully trained weights (e.g. ``aligner.layers.0.weight``).  ``adapter_config.json``
says which Linear layers carry an adapter and with which rank/scale, plus the training spec and
the base model's fingerprint::

    {"format": "mlx-dsvl-adapters", "version": 1, "method": "lora", "rank": 8, "scale": 20.0,
     "dropout": 0.0, "adapted": ["language_model.model.layers.0.self_attn.q_proj", ...],
     "spec": {...}, "base_model": {"path": ..., "fingerprint": {...}}}

``load_adapters(model, folder)`` applies them to a freshly loaded base model;
``fuse_adapters(model)`` folds LoRA/DoRA into plain Linear layers.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Dict, Optional

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from .files import replace_atomic, save_arrays, write_text_atomic
from .stages import ADAPTER_TYPES, adapt_modules

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapters.safetensors"
FORMAT = "mlx-dsvl-adapters"


class AdapterError(ValueError):
    """An adapter folder that cannot be applied to this model; the message says why."""


def model_fingerprint(model) -> Dict:
    """Identify a base model: its architecture and a digest of some of its weights.

    ``arch`` hashes every parameter's name and (unquantized) shape; ``weights`` hashes rounded
    statistics of the 1-D tensors (norms and biases, never quantized), so the same model loaded
    in another dtype matches while a different checkpoint does not.
    """
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
    return {"arch": arch.hexdigest()[:16], "weights": stats.hexdigest()[:16]}


def trained_weights(model) -> Dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


def adapted_paths(model) -> list:
    return [name for name, m in model.named_modules() if isinstance(m, ADAPTER_TYPES)]


def adapter_config(model, spec, base_path: Optional[str], fingerprint: Optional[Dict]) -> Dict:
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


def save_adapters(folder: str | os.PathLike, model, config: Dict) -> None:
    """Write ``adapters.safetensors`` and ``adapter_config.json`` into an existing folder; each
    file replaces an earlier one in one step."""
    folder = Path(folder)
    weights = trained_weights(model)
    replace_atomic(folder / ADAPTER_WEIGHTS, lambda tmp: save_arrays(tmp, weights, {"format": "mlx"}))
    write_text_atomic(folder / ADAPTER_CONFIG, json.dumps(config, indent=2))


def read_adapter_config(folder: str | os.PathLike) -> Dict:
    folder = Path(folder)
    cfg_file = folder / ADAPTER_CONFIG
    if not folder.is_dir():
        raise AdapterError(f"{folder}: no such adapter folder")
    if not cfg_file.is_file():
        raise AdapterError(f"{folder}: missing {ADAPTER_CONFIG} (not an adapter folder)")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AdapterError(f"{cfg_file}: invalid JSON ({e})") from None
    if cfg.get("format") != FORMAT:
        raise AdapterError(f"{cfg_file}: not an mlx-dsvl adapter config (format {cfg.get('format')!r})")
    return cfg


def load_adapters(model, adapter_dir: str | os.PathLike, check_base: bool = True):
    """Apply the adapters (and fully trained weights) saved in ``adapter_dir`` to ``model``.

    ``model`` is a base model from :func:`mlx_dsvl.load` (float or quantized).  The listed Linear
    layers are wrapped with LoRA/DoRA, then every saved tensor is loaded by name; a name the
    model lacks or a shape mismatch raises :class:`AdapterError`.  A base-model fingerprint
    that differs from the one the adapters were trained on gives a warning (``check_base``).
    Returns ``model`` (modified in place, in eval mode).
    """
    folder = Path(adapter_dir)
    cfg = read_adapter_config(folder)
    wfile = folder / ADAPTER_WEIGHTS
    if not wfile.is_file():
        raise AdapterError(f"{folder}: missing {ADAPTER_WEIGHTS}")
    try:
        weights = mx.load(str(wfile))
    except Exception as e:
        raise AdapterError(f"{wfile}: cannot read safetensors file ({e})") from None
    fp = (cfg.get("base_model") or {}).get("fingerprint") or {}
    if check_base and fp:
        here = model_fingerprint(model)
        if fp.get("arch") and fp["arch"] != here["arch"]:
            raise AdapterError(
                f"{folder}: these adapters were trained on a different model architecture "
                f"(base {cfg['base_model'].get('path')!r})"
            )
        if fp.get("weights") and fp["weights"] != here["weights"]:
            warnings.warn(
                f"{folder}: the base model differs from the one these adapters were trained on "
                f"({cfg['base_model'].get('path')!r}); results may be off", stacklevel=2,
            )
    method = cfg.get("method", "lora")
    adapted = cfg.get("adapted", [])
    if adapted:
        if method not in ("lora", "dora"):
            raise AdapterError(f"{folder}: unknown adapter method {method!r}")
        try:
            adapt_modules(model, adapted, method, int(cfg["rank"]), float(cfg["scale"]), 0.0)
        except ValueError as e:
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
        raise AdapterError(f"{wfile}: incompatible tensors: " + "; ".join(errors[:5]) + more)
    dtypes = {k: params[k].dtype for k in weights}
    model.load_weights([(k, v.astype(dtypes[k])) for k, v in weights.items()], strict=False)
    mx.eval(model.parameters())
    model.eval()
    return model


def fuse_adapters(model, dequantize: bool = False):
    """Replace every LoRA/DoRA layer by a plain (or re-quantized) Linear with the update folded in."""
    fused = [(name, m.fuse(dequantize=dequantize)) for name, m in model.named_modules()
             if isinstance(m, ADAPTER_TYPES)]
    if fused:
        model.update_modules(tree_unflatten(fused))
    return model

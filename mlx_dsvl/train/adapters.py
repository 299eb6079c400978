"""Writing a run's adapters (the format, loading and fusing are :mod:`mlx_dsvl.adapters`).

The names below it re-exports keep ``from mlx_dsvl.train.adapters import load_adapters`` and
friends working.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..adapters import (  # noqa: F401 -- re-exported
    ADAPTER_CONFIG,
    ADAPTER_TYPES,
    ADAPTER_WEIGHTS,
    FORMAT,
    AdapterError,
    adapted_paths,
    adapter_config,
    fuse_adapters,
    load_adapters,
    model_fingerprint,
    read_adapter_config,
    trained_weights,
)
from ..outputs import replace_atomic, save_arrays, write_text_atomic


def save_adapters(folder: str | os.PathLike, model, config: dict) -> None:
    """Write ``adapters.safetensors`` (the trainable parameters) and ``adapter_config.json``
    (``config``, from :func:`mlx_dsvl.adapters.adapter_config`) into an existing folder; each
    file replaces an earlier one in one step."""
    folder = Path(folder)
    weights = trained_weights(model)
    replace_atomic(folder / ADAPTER_WEIGHTS, lambda tmp: save_arrays(tmp, weights, {"format": "mlx"}))
    write_text_atomic(folder / ADAPTER_CONFIG, json.dumps(config, indent=2))

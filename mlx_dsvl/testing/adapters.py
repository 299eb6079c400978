"""Test adapters: an mlx-lm LoRA adapter folder with random, non-zero factors."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np


def write_mlx_lm_adapter(base: Path, out: Path, num_layers: int = 2, rank: int = 4, scale: float = 2.0,
                         seed: int = 0) -> Path:
    """LoRA on the last ``num_layers`` blocks of ``base``'s LLM, saved as ``mlx_lm.lora`` saves it."""
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    import mlx_dsvl

    model, _ = mlx_dsvl.load(base)
    params = {"rank": rank, "scale": scale, "dropout": 0.0}
    linear_to_lora_layers(model.language_model, num_layers, params)
    rng = np.random.default_rng(seed)
    lora = {k: mx.array(rng.normal(0, 0.05, v.shape).astype(np.float32))
            for k, v in tree_flatten(model.language_model.parameters()) if k.endswith(("lora_a", "lora_b"))}
    out = Path(out)
    out.mkdir(exist_ok=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), lora)
    (out / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": num_layers, "lora_parameters": params}))
    return out

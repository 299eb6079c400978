"""``mlx_dsvl.adapters``: the one adapter-config reader and loader, for both folder formats.

Training's own format is exercised end to end in test_train_adapters.py (train -> load -> fuse);
here: the reader's errors, and mlx-lm's format through the same ``load_adapters`` compared with
mlx-lm's loader applied by hand.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlx_dsvl
from mlx_dsvl.adapters import AdapterError, adapter_kind, fuse_adapters, load_adapters, read_adapter_config


def test_reader_errors(tmp_path):
    with pytest.raises(AdapterError, match="no such adapter folder"):
        read_adapter_config(tmp_path / "nope")
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        read_adapter_config(tmp_path)
    cfg = tmp_path / "adapter_config.json"
    cfg.write_text("{")
    with pytest.raises(AdapterError, match="invalid JSON"):
        read_adapter_config(tmp_path)
    cfg.write_text("[1]")
    with pytest.raises(AdapterError, match="not a JSON object"):
        read_adapter_config(tmp_path)
    cfg.write_text(json.dumps({"something": 1}))
    with pytest.raises(AdapterError, match="unknown adapter format"):
        read_adapter_config(tmp_path)
    for obj, kind in [({"format": "mlx-dsvl-adapters"}, "mlx-dsvl"), ({"fine_tune_type": "lora"}, "mlx-lm")]:
        cfg.write_text(json.dumps(obj))
        assert adapter_kind(read_adapter_config(tmp_path)) == kind


def test_mlx_lm_adapters_load_onto_the_llm_and_fuse(tiny_dir, tmp_path):
    from mlx_lm.tuner.utils import load_adapters as mlx_lm_load

    from mlx_dsvl.testing.adapters import write_mlx_lm_adapter

    write_mlx_lm_adapter(tiny_dir, tmp_path)
    ids = mx.array([[1, 5, 9, 200, 7]])
    by_hand, _ = mlx_dsvl.load(tiny_dir)
    mlx_lm_load(by_hand.language_model, str(tmp_path))
    expected = by_hand(ids)
    ours, _ = mlx_dsvl.load(tiny_dir)
    plain = ours(ids)
    assert load_adapters(ours, tmp_path) is ours
    got = ours(ids)
    assert float(mx.abs(got - plain).max()) > 1e-3  # the adapter changes the output
    np.testing.assert_array_equal(np.array(got), np.array(expected))
    fuse_adapters(ours)
    assert not any(k.endswith(("lora_a", "lora_b")) for k, _ in tree_flatten(ours.parameters()))
    np.testing.assert_allclose(np.array(ours(ids)), np.array(expected), atol=1e-4 * float(mx.abs(expected).max()))

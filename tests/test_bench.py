"""``python -m mlx_dsvl.bench`` runs end to end on a tiny checkpoint and reports every figure."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_bench_reports_all_figures(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "MLX_DSVL_CACHE": str(tmp_path / "cache")}
    r = subprocess.run(
        [sys.executable, "-m", "mlx_dsvl.bench", "--arch", "tiny", "--max-tokens", "4",
         "--warmup", "0", "--compare", "--json", str(out)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    for key in ("preprocess_ms", "siglip_ms", "aligner_ms", "prefill_tps", "ttft_s", "decode_tps",
                "peak_memory_gb", "load_peak_memory_gb", "weights_memory_gb", "turn2_ttft_s", "decode_ratio", "decode_bound_tps",
                "torch_vision_prefill_s", "ours_vision_prefill_s", "vision_speedup"):
        assert isinstance(res[key], (int, float)) and res[key] > 0, key
    assert res["turn2_prompt_tokens"] < res["prompt_tokens"]
    assert (tmp_path / "cache" / "checkpoints" / "tiny-seed0" / "config.json").exists()



def test_pytorch_reference_timing_takes_the_faster_of_two_faithful_paths(tiny_hybrid_dir, tmp_path):
    """bench --compare's child (mlx_dsvl.testing.torch_timing), on the 7B layout: vision against
    the faster of transformers and timm-style SigLIP (which agree on the features), the prefill
    against transformers with logits_to_keep=1."""
    import numpy as np
    import pytest

    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from mlx_dsvl.testing import torch_timing

    rng = np.random.default_rng(0)
    inputs, out = tmp_path / "inputs.npz", tmp_path / "out.json"
    ids = np.array([[100000] + [100015] * 576 + [5, 6, 7]])
    np.savez(inputs, pixels=rng.uniform(size=(1, 3, 1024, 1024)).astype(np.float32), ids=ids)
    assert torch_timing.main([str(tiny_hybrid_dir), str(inputs), str(out)]) == 0
    res = json.loads(out.read_text())
    for key in ("torch_vision_transformers_ms", "torch_vision_timm_style_ms", "torch_prefill_s"):
        assert isinstance(res[key], (int, float)) and res[key] > 0, key
    assert res["torch_vision_aligner_ms"] == min(res["torch_vision_transformers_ms"],
                                                 res["torch_vision_timm_style_ms"])
    assert res["torch_vision_reference"] in ("transformers", "timm-style SigLIP")
    assert res["torch_vision_references_rel_diff"] < 1e-5
    assert res["torch_vision_prefill_s"] == pytest.approx(
        res["torch_vision_aligner_ms"] / 1e3 + res["torch_prefill_s"])

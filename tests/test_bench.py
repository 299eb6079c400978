"""``python -m mlx_dsvl.bench`` runs end to end on a tiny checkpoint and reports every figure."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

STAGES = ("images_ms", "format_tokenize_ms", "prefix_match_ms", "embed_merge_ms", "prefill_ms",
          "first_sample_ms", "ttft_ms")


def bench(tmp_path, *args):
    out = tmp_path / "bench.json"
    env = {**os.environ, "MLX_DSVL_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "mlx_dsvl.bench", "--max-tokens", "4", "--warmup", "0", *args,
                        "--json", str(out)], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(out.read_text()), r.stdout


def test_bench_reports_all_figures(tmp_path):
    res, printed = bench(tmp_path, "--arch", "tiny", "--compare", "--replay")
    for key in ("preprocess_ms", "siglip_ms", "aligner_ms", "prefill_tps", "ttft_s", "decode_tps",
                "peak_memory_gb", "load_peak_memory_gb", "weights_memory_gb", "weights_vision_gb", "weights_llm_gb",
                "turn2_ttft_s", "followup_max_over_turn1", "kv_cache_gb", "decode_ratio", "decode_penalty_ratio",
                "decode_bound_tps", "torch_vision_prefill_s", "ours_vision_prefill_s", "vision_speedup",
                "predicted_peak_gb"):
        assert isinstance(res[key], (int, float)) and res[key] > 0, key
    assert res["turn2_prompt_tokens"] < res["prompt_tokens"]
    assert [t["turn"] for t in res["turns"]] == [2, 3, 4, 5, 6]
    assert len({t["new_tokens"] for t in res["turns"]}) >= 4  # questions of different lengths
    for t in res["turns"]:
        assert 0 < t["new_tokens"] < res["prompt_tokens"] and t["ttft_s"] > 0
        assert abs(t["over_turn1"] - t["ttft_s"] / res["ttft_s"]) < 1e-9
    breakdown = res["followup_breakdown_ms"]
    for stage in STAGES:
        assert breakdown[stage] >= 0, stage
    assert 0 < breakdown["new_tokens"] < breakdown["cached_tokens"]
    assert sum(breakdown[s] for s in STAGES[:-1]) <= breakdown["ttft_ms"] * 1.05 + 1
    assert len(res["first_use_ms"]) == 6
    assert "followup_breakdown_ms: images_ms" in printed and "turns: turn 6, new_tokens" in printed
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


def test_bench_kv_bits_and_quantize_on_load(tiny_dir, tmp_path):
    """A model folder of head size 32 (KV groups of 32), quantized while loading, its conversation
    with an 8-bit KV cache, and the long-conversation comparison of KV settings."""
    from mlx_dsvl.random_checkpoint import with_language_config

    model = with_language_config(tiny_dir, tmp_path / "two-heads", num_attention_heads=2, num_key_value_heads=2)
    res, _ = bench(tmp_path, "--model", str(model), "--quantize", "4", "--kv-bits", "8", "--kv-group-size", "32",
                   "--kv-context", "1024", "--context", "1024", "--turns", "1")
    assert res["quantize"] == 4 and res["kv_bits"] == 8 and res["arch"] == str(model)
    assert 0.8 < res["predicted_over_measured"] < 1.5  # the memory budget's model of this run
    assert res["load_peak_memory_gb"] >= res["weights_memory_gb"] > 0
    assert 900 < res["kv_context_tokens"] <= 1024
    assert 900 < res["long_tokens"] <= 1024 + 32 and res["long_decode_tokens"] >= 1  # --context
    assert res["long_kv_cache_gb"] > res["kv_cache_gb"] and res["long_peak_gb"] >= res["weights_memory_gb"]
    assert 0.8 < res["long_predicted_over_measured"] < 1.5
    for name in ("kv16", "kv8", "kv4"):
        assert res[f"{name}_peak_gb"] > 0 and res[f"{name}_cache_gb"] > 0
    assert res["kv16_cache_gb"] > res["kv8_cache_gb"] > res["kv4_cache_gb"]
    assert 0 < res["kv8_max_logit_diff"] < res["kv4_max_logit_diff"] < res["kv_logit_scale"]
    bad = subprocess.run([sys.executable, "-m", "mlx_dsvl.bench", "--model", str(tiny_dir), "--kv-bits", "8"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and bad.stderr.strip().startswith("error: kv_group_size 64 does not divide")


def test_bench_draft_model_reports_drafted_tokens(tmp_path, tiny_dir, tiny_hybrid_dir):
    res, _ = bench(tmp_path, "--model", str(tiny_hybrid_dir), "--draft-model", str(tiny_dir), "--turns", "1")
    assert res["draft_model"] == str(tiny_dir)
    assert res["drafted"] > 0 and 0 <= res["accepted"] <= res["drafted"]
    plain, _ = bench(tmp_path, "--model", str(tiny_hybrid_dir), "--turns", "1")
    assert plain["drafted"] == 0

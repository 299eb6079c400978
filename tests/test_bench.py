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

"""Time to first token for turn 1 and a short turn 2 of the same conversation (cache reuse).

    python benchmarks/chat_bench.py [--arch 1.3b|7b|tiny|tiny-hybrid] [--dtype float32] [--json FILE]

Uses a random-weight checkpoint of the real size (made once, cached in ~/.cache/mlx_dsvl).
Target: turn-2 time to first token <= 15% of turn 1.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
from PIL import Image


def main():
    from mlx_dsvl.blas import ensure_fast_blas

    ensure_fast_blas()
    import mlx.core as mx

    import mlx_dsvl
    from mlx_dsvl.testing.make_checkpoint import cached_checkpoint

    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="1.3b")
    p.add_argument("--dtype", default=None)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--json", default=None)
    a = p.parse_args()

    path = cached_checkpoint(a.arch)
    t = time.perf_counter()
    model, processor = mlx_dsvl.load(path, dtype=a.dtype)
    load_s = time.perf_counter() - t
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8))
    chat = mlx_dsvl.ChatSession(model, processor)
    opts = dict(max_tokens=a.max_tokens, temperature=0.0, repetition_penalty=1.0)
    turns = []
    for text, images in [("<image_placeholder>Describe this image in detail.", [img]),
                         ("And what colour dominates?", [])]:
        last = None
        for last in chat.send(text, images, **opts):
            pass
        turns.append(last)
    t1, t2 = turns
    res = {
        "arch": a.arch, "dtype": str(model.language_model.model.norm.weight.dtype),
        "device": str(mx.default_device()), "machine": platform.processor() or platform.machine(),
        "load_s": round(load_s, 2),
        "turn1_prompt_tokens": t1.prompt_tokens, "turn1_ttft_s": round(t1.time_to_first_token, 3),
        "turn2_prompt_tokens": t2.prompt_tokens, "turn2_ttft_s": round(t2.time_to_first_token, 3),
        "turn2_over_turn1": round(t2.time_to_first_token / t1.time_to_first_token, 4),
        "decode_tps": round(t1.generation_tps, 2), "peak_memory_gb": round(t2.peak_memory, 2),
    }
    for k, v in res.items():
        print(f"{k:>22}: {v}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()

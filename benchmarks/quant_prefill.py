"""Quantized prefill and decoding on MLX's CPU backend against float32, side by side in one run.

    python benchmarks/quant_prefill.py --arch 1.3b --tokens 600 --json out.json

1. The crossover (``--crossover-only``: just this): for a 1.3B decoder layer's weight shapes, a
   quantized matmul through ``mx.quantized_matmul`` against dequantize + BLAS GEMM, by row count,
   and summed over the layer (what ``models/cpu_math.py``'s ``BLAS_MIN_ROWS`` is chosen from).
2. The model loaded in float32, then ``load(path, quantize=4)``, ``quantize=8``, float32 and
   4-bit again (one at a time, each freed before the next): load time, the prefill of one text prompt of
   ``--tokens`` random ids through the engine's ``prefill`` (best of ``--repeats``, fresh cache),
   its peak memory, and steady greedy decode tokens/s (``--decode`` tokens after a 16-token prompt).
   For 4-bit also the old path (every layer on ``mx.quantized_matmul``): a ``--short``-token
   prefill, extrapolated per token to ``--tokens``, and its decode rate.
Ratios are of the means of the two float32 and the two 4-bit runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time

# (out, in) of a 1.3B decoder layer's matmuls and how many: q/k/v/o, gate/up, down
LAYER = (((2048, 2048), 4), ((5632, 2048), 2), ((2048, 5632), 1))
ROWS = (1, 2, 4, 6, 8, 12, 16, 32)


def matmul_times(x, wq, scales, biases, *, bits: int, group_size: int) -> tuple[float, float]:
    """Seconds (best of 3) of ``mx.quantized_matmul`` and of dequantize + BLAS on ``x``."""
    import mlx.core as mx

    from mlx_dsvl.bench import timed
    from mlx_dsvl.models.cpu_math import dequantize

    kw = dict(group_size=group_size, bits=bits)
    _, q = timed(lambda: mx.quantized_matmul(x, wq, scales, biases, transpose=True, **kw), warmup=1, repeats=3)
    _, d = timed(lambda: x @ dequantize(wq, scales, biases, mode="affine", dtype=x.dtype, **kw).T, warmup=1, repeats=3)
    return q, d


def crossover(bits_list=(4, 8), group_size: int = 64) -> dict:
    """Seconds of both matmuls per (bits, shape, rows), their sums over a decoder layer
    (:data:`LAYER`), and the smallest row count from which dequantize + BLAS is faster for the
    layer at every larger count measured, for every bit width."""
    import mlx.core as mx

    out, layer, faster_from = {}, {}, 0
    for bits in bits_list:
        totals = {rows: [0.0, 0.0] for rows in ROWS}
        for (o, i), count in LAYER:
            wq, s, b = mx.quantize(mx.random.normal((o, i)) * 0.02, group_size=group_size, bits=bits)
            mx.eval(wq, s, b)
            for rows in ROWS:
                q, d = matmul_times(mx.random.normal((1, rows, i)), wq, s, b, bits=bits, group_size=group_size)
                out[f"{bits}bit {o}x{i} rows={rows}"] = {"quantized_matmul_s": q, "dequantize_blas_s": d}
                totals[rows][0] += count * q
                totals[rows][1] += count * d
                print(f"  {bits}-bit [{o}, {i}] {rows:3d} rows: quantized_matmul {q * 1e3:7.2f} ms, "
                      f"dequantize + BLAS {d * 1e3:7.2f} ms", flush=True)
        for rows, (q, d) in totals.items():
            layer[f"{bits}bit rows={rows}"] = {"quantized_matmul_s": q, "dequantize_blas_s": d}
            print(f"  {bits}-bit decoder layer, {rows:3d} rows: quantized_matmul {q * 1e3:7.1f} ms, "
                  f"dequantize + BLAS {d * 1e3:7.1f} ms", flush=True)
        slower = [rows for rows, (q, d) in totals.items() if q <= d]
        faster_from = max(faster_from, min((r for r in ROWS if r > max(slower, default=0)), default=0))
    return {"times": out, "layer": layer, "blas_faster_from_rows": faster_from}


def prefill_once(model, ids, n: int):
    """The engine's prefill of ``ids[:n]`` onto a fresh cache; its last logits (not evaluated)."""
    import mlx.core as mx

    from mlx_dsvl.streaming import prefill

    embeds = model.get_input_embeddings(ids[None, :n])[0]
    mx.eval(embeds)
    return prefill(model.language_model, ids[:n], lambda s, e: embeds[s:e], model.make_cache())


def measure(path, quantize: int | None, args, ids, *, old_path: bool) -> dict:
    import mlx.core as mx

    import mlx_dsvl
    from mlx_dsvl.bench import _our_decode_tps, timed
    from mlx_dsvl.models import cpu_math

    label = f"{quantize}-bit" if quantize else "float32"
    t = time.perf_counter()
    model, processor = mlx_dsvl.load(path, dtype="float32", quantize=quantize)
    res = {"load_s": time.perf_counter() - t, "resident_gb": mx.get_active_memory() / 1e9}
    mx.reset_peak_memory()
    _, res["prefill_s"] = timed(lambda: prefill_once(model, ids, args.tokens), repeats=args.repeats)
    res["prefill_peak_gb"] = mx.get_peak_memory() / 1e9
    res["prefill_tps"] = args.tokens / res["prefill_s"]
    res["decode_tps"] = _our_decode_tps(model, processor, ids[:16], args.decode)
    print(f"{label}: load {res['load_s']:.1f} s ({res['resident_gb']:.2f} GB), prefill of {args.tokens} "
          f"tokens {res['prefill_s']:.1f} s ({res['prefill_tps']:.1f} tokens/s, peak "
          f"{res['prefill_peak_gb']:.2f} GB), decode {res['decode_tps']:.2f} tokens/s", flush=True)
    if old_path:
        threshold, cpu_math.BLAS_MIN_ROWS = cpu_math.BLAS_MIN_ROWS, sys.maxsize  # mx.quantized_matmul everywhere
        try:
            _, short = timed(lambda: prefill_once(model, ids, args.short))
            res["old_prefill_short_s"] = short
            res["old_prefill_extrapolated_s"] = short / args.short * args.tokens
            res["old_decode_tps"] = _our_decode_tps(model, processor, ids[:16], args.decode)
        finally:
            cpu_math.BLAS_MIN_ROWS = threshold
        print(f"{label}, old path (quantized_matmul only): prefill of {args.short} tokens {short:.1f} s, "
              f"extrapolated to {args.tokens} tokens {res['old_prefill_extrapolated_s']:.0f} s; "
              f"decode {res['old_decode_tps']:.2f} tokens/s", flush=True)
    return res  # the model is freed with this frame


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="1.3b", help="a random checkpoint (1.3b, tiny, ...)")
    p.add_argument("--model", default=None, help="a model folder instead of --arch")
    p.add_argument("--tokens", type=int, default=600, help="prefill prompt length (random text ids)")
    p.add_argument("--short", type=int, default=32, help="prompt length for the old quantized path")
    p.add_argument("--decode", type=int, default=8, help="tokens decoded per rate")
    p.add_argument("--repeats", type=int, default=1, help="prefills per model (best is kept)")
    p.add_argument("--no-crossover", action="store_true")
    p.add_argument("--crossover-only", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from mlx_dsvl.blas import ensure_fast_blas

    ensure_fast_blas()
    import mlx.core as mx
    import numpy as np

    import mlx_dsvl
    from mlx_dsvl.models import cpu_math
    from mlx_dsvl.random_checkpoint import cached_checkpoint

    mx.set_default_device(mx.cpu)
    res = {"arch": args.model or args.arch, "machine": f"{platform.machine()} {platform.processor()}",
           "tokens": args.tokens, "short": args.short, "decode": args.decode, "prompt": "random text ids",
           "blas_min_rows": cpu_math.BLAS_MIN_ROWS, "code": mlx_dsvl.__file__}
    if not args.no_crossover:
        print("crossover (one layer, float32 input):", flush=True)
        res["crossover"] = crossover()
        print(f"dequantize + BLAS faster from {res['crossover']['blas_faster_from_rows']} rows "
              f"(BLAS_MIN_ROWS = {cpu_math.BLAS_MIN_ROWS})", flush=True)
    if args.crossover_only:
        return write(res, args.json)
    path = args.model or cached_checkpoint(args.arch)
    ids = mx.array(np.random.default_rng(1).integers(100, 30000, args.tokens), dtype=mx.int32)
    runs = {}
    for key, q in (("float32", None), ("4bit", 4), ("8bit", 8), ("float32_again", None), ("4bit_again", 4)):
        runs[key] = measure(path, q, args, ids, old_path=key == "4bit")
        gc.collect()
        mx.clear_cache()  # one model in memory at a time
    res["runs"] = runs
    def mean(keys, field):
        return sum(runs[k][field] for k in keys) / len(keys)

    f32, q4 = ("float32", "float32_again"), ("4bit", "4bit_again")
    res["ratios"] = {
        "4bit_prefill_over_float32": mean(q4, "prefill_s") / mean(f32, "prefill_s"),
        "8bit_prefill_over_float32": runs["8bit"]["prefill_s"] / mean(f32, "prefill_s"),
        "4bit_old_prefill_extrapolated_over_float32": runs["4bit"]["old_prefill_extrapolated_s"] / mean(f32, "prefill_s"),
        "4bit_decode_over_float32": mean(q4, "decode_tps") / mean(f32, "decode_tps"),
        "8bit_decode_over_float32": runs["8bit"]["decode_tps"] / mean(f32, "decode_tps"),
        "4bit_decode_over_old_path": runs["4bit"]["decode_tps"] / runs["4bit"]["old_decode_tps"],
    }
    for k, v in res["ratios"].items():
        print(f"{k}: {v:.2f}")
    return write(res, args.json)


def write(res: dict, path: str | None) -> int:
    if path:
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Our decoding against bare mlx-lm on the same weights, repeated: the ratio a change to the
generation engine must not lower.

    python benchmarks/decode_ratio.py --arch tiny-hybrid --repeats 7 --tokens 64 --json out.json

Each repeat is ``python -m mlx_dsvl.bench --compare``'s pair (greedy, 64-token prompt; ours and
bare mlx-lm in the order ours, bare, bare, ours, best of two), without and with the default
repetition penalty; prints the median and range of the ratios.  Run it on two commits on the same
machine (``PYTHONPATH=checkout``) to compare them.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="tiny-hybrid", help="a random checkpoint (tiny-hybrid, 1.3b, ...)")
    p.add_argument("--model", default=None, help="a model folder instead of --arch")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from mlx_dsvl.blas import ensure_fast_blas

    ensure_fast_blas()
    import mlx.core as mx
    import numpy as np

    import mlx_dsvl
    from mlx_dsvl.bench import _decode_pair
    from mlx_dsvl.random_checkpoint import cached_checkpoint
    from mlx_dsvl.sampling import DEFAULTS

    model, processor = mlx_dsvl.load(args.model or cached_checkpoint(args.arch), dtype="float32")
    prompt = mx.array(np.random.default_rng(1).integers(100, 30000, 64), dtype=mx.int32)
    res = {"arch": args.model or args.arch, "machine": f"{platform.machine()} {platform.processor()}",
           "tokens": args.tokens, "code": mlx_dsvl.__file__}
    for label, penalty in (("no_penalty", 1.0), ("penalty", DEFAULTS.repetition_penalty)):
        ratios = []
        for _ in range(args.repeats):
            ours, bare = _decode_pair(model, processor, prompt, args.tokens, penalty)
            ratios.append(ours / bare)
        res[label] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
                      "ratios": ratios}
        print(f"{res['arch']} {label}: ours / bare mlx-lm median {res[label]['median']:.3f} "
              f"({min(ratios):.2f}-{max(ratios):.2f}, {args.repeats} pairs of {args.tokens} tokens)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What quantizing the LLM costs in accuracy: the first-token logits of a short text prompt,
unquantized against ``load(..., quantize=8)`` and ``quantize=4`` (groups of 64), on the same
random weights.

    python benchmarks/llm_quant_logits.py --arch 1.3b --json out.json

Text only, about 30 prompt tokens: MLX's CPU quantized matmul makes a long quantized prefill
slow.  The memory budget (``mlx_dsvl/memory_budget.py``) ranks its choices by these figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys

PROMPT = "A quiet street, a red door, two bicycles and a cat."


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="1.3b", help="a random checkpoint (tiny, 1.3b, ...)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from mlx_dsvl.blas import ensure_fast_blas

    ensure_fast_blas()
    import mlx.core as mx

    import mlx_dsvl
    from mlx_dsvl.random_checkpoint import cached_checkpoint
    from mlx_dsvl.streaming import last_logits

    path = cached_checkpoint(args.arch)
    res: dict = {"arch": args.arch, "dtype": args.dtype, "machine": f"{platform.machine()}",
                 "mlx": mx.__version__}
    reference = None
    for bits in (None, 8, 4):
        model, processor = mlx_dsvl.load(path, dtype=args.dtype, quantize=bits)
        ids = mx.array(processor.tokenizer.encode(PROMPT))[None]
        logits = last_logits(model.language_model, ids, None).astype(mx.float32)[0]
        mx.eval(logits)
        res["prompt_tokens"] = int(ids.shape[1])
        if reference is None:
            reference = logits
            res["max_logit"] = float(mx.abs(logits).max())
        else:
            res[f"llm{bits}_max_logit_diff"] = float(mx.abs(logits - reference).max())
            res[f"llm{bits}_same_top1"] = bool(mx.argmax(logits).item() == mx.argmax(reference).item())
        del model, processor, logits
        gc.collect()
        mx.clear_cache()
    for k, v in res.items():
        print(f"{k:>24}: {round(v, 4) if isinstance(v, float) else v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

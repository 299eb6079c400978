"""The grammar mask's cost: decode time per token with a json_schema against none, 1 and 8 rows.

    python benchmarks/structured_cost.py --arch 1.3b --tokens 32 --repeats 3 --json out.json

A random checkpoint with a byte-level BPE tokenizer of the released one's size (about 100k
tokens, learned here from the Python sources installed): the mask's cost grows with the
vocabulary, which the tests' tiny tokenizer lacks.  Each configuration decodes ``--tokens``
tokens per row (temperature 1, so both sides take the sampling path) in one Batch of 1 or 8
rows; the schema's string has a minimum length, so no constrained row ends early.  Repeats run
in the order none, json, json, none, ...; the figure is the median of each side's per-step time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import sysconfig
import time
from pathlib import Path

SCHEMA = {"type": "object", "properties": {"note": {"type": "string", "minLength": 400}}, "required": ["note"]}
FORMAT = {"type": "json_schema", "json_schema": {"name": "note", "schema": SCHEMA}}


def python_sources(limit_mb: int = 100) -> list[str]:
    """Text to learn a large vocabulary from: the standard library's and site-packages' sources."""
    texts, total = [], 0
    roots = [Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])]
    for root in roots:
        for p in sorted(root.rglob("*.py")):
            try:
                t = p.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            texts.append(t)
            total += len(t)
            if total > limit_mb * 1e6:
                return texts
    return texts


def large_vocab_model(arch: str, work: Path) -> Path:
    """The random ``arch`` checkpoint with a ~100k-token tokenizer (built once under ``work``)."""
    from mlx_dsvl.random_checkpoint import cached_checkpoint
    from mlx_dsvl.random_tokenizer import BOS_ID, write_tokenizer

    src, out = cached_checkpoint(arch), work / f"{arch}-large-vocab"
    if not (out / "tokenizer.json").exists():
        out.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if not f.name.startswith(("tokenizer", "special_tokens")) and not (out / f.name).exists():
                os.symlink(f.resolve(), out / f.name)
        tic = time.perf_counter()
        write_tokenizer(out, corpus=python_sources(), merges=BOS_ID - 256 - 1000)
        print(f"learned a large vocabulary in {time.perf_counter() - tic:.0f}s", flush=True)
    return out


def decode(model, processor, rows: int, tokens: int, grammar) -> float:
    """Seconds per decode step of ``rows`` rows (the prefill and the first token excluded)."""
    from mlx_dsvl.sampling import PROCESSOR_CONTEXT, SamplingOptions
    from mlx_dsvl.streaming import Batch, Row, prefill

    opts = SamplingOptions(temperature=1.0, top_p=1.0, repetition_penalty=1.0, seed=0, max_tokens=tokens)
    lm = model.language_model
    batch = Batch(lm, processor.tokenizer.eos_token_id)
    for i in range(rows):
        inputs = processor([{"role": "user", "content": f"Write note {i} as JSON."}], None)
        ids = inputs["input_ids"]
        embeds = model.get_input_embeddings(ids, inputs["pixel_values"])[0]
        cache = model.make_cache()
        logits = prefill(lm, ids[0], lambda s, e, x=embeds: x[s:e], cache)
        batch.add(Row.start(processor, opts, ids[0, -PROCESSOR_CONTEXT:].tolist(), ignore_eos=True,
                            grammar=grammar), cache, logits)
    batch.step()  # the first tokens
    steps, tic = 0, time.perf_counter()
    while batch.rows:
        batch.step()
        steps += 1
    return (time.perf_counter() - tic) / steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="1.3b", help="a random checkpoint (1.3b, tiny, ...)")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    p.add_argument("--work", default="/tmp/mlx-dsvl-structured-cost")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from mlx_dsvl.blas import ensure_fast_blas

    ensure_fast_blas()
    import mlx_dsvl
    from mlx_dsvl.grammar import compile_format

    model, processor = mlx_dsvl.load(large_vocab_model(args.arch, Path(args.work)), dtype="float32")
    vocab = len(processor.tokenizer.get_vocab())
    tic = time.perf_counter()
    grammar = compile_format(processor, FORMAT)
    compile_s = time.perf_counter() - tic
    res = {"arch": args.arch, "tokenizer_tokens": vocab, "machine": f"{platform.machine()} {platform.processor()}",
           "cpus": os.cpu_count(), "tokens": args.tokens, "compile_s": compile_s, "code": mlx_dsvl.__file__}
    print(f"{args.arch}, tokenizer of {vocab} tokens; schema compiled in {compile_s * 1e3:.0f} ms", flush=True)
    for rows in args.rows:
        times = {"none": [], "json_schema": []}
        for r in range(args.repeats):
            for side in (("none", "json_schema") if r % 2 == 0 else ("json_schema", "none")):
                times[side].append(decode(model, processor, rows, args.tokens, grammar if side != "none" else None))
        none, js = statistics.median(times["none"]), statistics.median(times["json_schema"])
        res[f"rows_{rows}"] = {"none_s_per_step": none, "json_schema_s_per_step": js, "ratio": js / none,
                               "runs": times}
        print(f"{rows} row(s): {none * 1e3:.1f} ms/step without a format, {js * 1e3:.1f} ms with the json_schema: "
              f"x{js / none:.3f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

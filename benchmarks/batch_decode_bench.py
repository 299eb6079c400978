"""The server's batched decoding against the library's, side by side in one process.

    python benchmarks/batch_decode_bench.py --model /tmp/dsvl-1.3b --batch 1,4,8 --max-tokens 12

Per round: ``mlx_dsvl.stream_generate`` (one request), then the server's scheduler with B copies
of the same request submitted together (greedy, ``ignore_eos``).  Decode rate = tokens after
each row's first / time from the first text to the last; the same weights, prompt and machine
load for all, so the ratios are what to read (no HTTP involved).
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import time


def library_rate(model, processor, conv, n: int) -> float:
    import mlx_dsvl
    from mlx_dsvl.sampling import GREEDY

    first = None
    for _ in mlx_dsvl.stream_generate(model, processor, conv, sampling=GREEDY, max_tokens=n):
        first = first or time.perf_counter()
    return (n - 1) / (time.perf_counter() - first)


def scheduler_rate(model, processor, conv, n: int, batch: int) -> float:
    from mlx_dsvl.sampling import GREEDY
    from mlx_dsvl.server.scheduler import Delta, Finished, Job, Scheduler
    from mlx_dsvl.server.schema import SamplingParams

    ids = processor.tokenize(processor.format(conv)).tolist()
    events: queue.Queue = queue.Queue()
    sched = Scheduler(model, processor, max_batch=batch, cache_bytes=0)
    params = SamplingParams(**GREEDY.with_(max_tokens=n).as_dict(), ignore_eos=True)
    for i in range(batch):
        sched.submit(Job(str(i), ids, [], {}, params, lambda e: events.put((time.perf_counter(), e))))
    sched.start()
    first, done = None, 0
    while done < batch:
        t, e = events.get()
        first = first or (t if isinstance(e, Delta) else None)
        done += isinstance(e, Finished)
    sched.stop()
    return batch * (n - 1) / (t - first)


def main(argv=None) -> int:
    from mlx_dsvl.blas import ensure_fast_blas

    ensure_fast_blas()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--batch", default="1,4,8")
    p.add_argument("--max-tokens", type=int, default=12)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    import mlx_dsvl

    model, processor = mlx_dsvl.load(args.model)
    conv = [{"role": "user", "content": "Describe what you see in detail."}]
    rows = []
    for r in range(args.rounds):
        row = {"round": r, "library": library_rate(model, processor, conv, args.max_tokens)}
        for b in (int(x) for x in args.batch.split(",")):
            row[f"scheduler_b{b}"] = scheduler_rate(model, processor, conv, args.max_tokens, b)
        rows.append(row)
        print("  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
              "(decode tokens/s)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "max_tokens": args.max_tokens, "rounds": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

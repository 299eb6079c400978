"""Load test for ``python -m mlx_dsvl.server``: N concurrent streaming clients, N = 1, 4, 16.

    python benchmarks/server_bench.py --url http://127.0.0.1:8080 [--api-key KEY] --json out.json
    python benchmarks/server_bench.py --model /tmp/dsvl-1.3b --server-args "--max-batch 16"

With ``--model`` the script starts the server itself (on a free loopback port) and stops it
afterwards.  Every client sends ``--requests`` requests one after the other, each with its own
prompt (and, with ``--images``, its own random image), ``stream: true``, ``ignore_eos`` (so that
each reply is exactly ``--max-tokens`` tokens) and greedy decoding.  Per level it reports
requests/s and output tokens/s over the wall time of the level, and the p50/p95 time to first
token (request sent -> first text chunk), prints a table and writes JSON.  Before the levels,
one conversation alone (turn 1, then a turn 2 that repeats it) gives the TTFT of each turn and
the bytes its KV adds to the prefix cache; ``--kv-bits 8`` (with ``--model``) starts the server
with quantized KV caches, for a before/after.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

import numpy as np


def percentile(values, q):
    return float(np.percentile(values, q)) if values else float("nan")


def random_png(seed: int, size: int = 384) -> str:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def one_request(client, body) -> dict:
    """Send one streaming request; time to first text chunk, total time, output tokens, the
    reply, the prompt tokens taken from the prefix cache."""
    tic = time.perf_counter()
    ttft, tokens, text, cached = None, 0, "", 0
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            r.read()
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if ttft is None and any(c["delta"].get("content") for c in chunk["choices"]):
                ttft = time.perf_counter() - tic
            text += "".join(c["delta"].get("content") or "" for c in chunk["choices"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
                cached = (chunk["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return {"ttft": ttft, "seconds": time.perf_counter() - tic, "tokens": tokens, "text": text,
            "cached_tokens": cached}


def follow_up(args, h) -> dict:
    """One conversation alone: turn 1, then turn 2 repeating it (its prefix comes from the
    prefix cache).  TTFT of each turn, and the bytes the conversation's KV adds to the prefix
    cache (``/stats``; with --kv-bits, the quantized bytes)."""
    before = h.get("/stats").json()["prefix_cache"]["bytes"]
    body = body_for(args, 10 ** 6, 0)  # (a client id no level uses)
    first = one_request(h, body)
    turn2 = body["messages"] + [{"role": "assistant", "content": first["text"]},
                                {"role": "user", "content": "And what else is there?"}]
    second = one_request(h, {**body, "messages": turn2})
    stats = h.get("/stats").json()
    return {"kv_bits": stats.get("kv_bits"), "turn1_ttft_s": first["ttft"], "turn2_ttft_s": second["ttft"],
            "turn2_cached_tokens": second["cached_tokens"],
            "prefix_cache_bytes_added": stats["prefix_cache"]["bytes"] - before}


def body_for(args, client_id: int, i: int) -> dict:
    text = f"Client {client_id}, question {i}: describe what you see in detail."
    content = text if not args.images else [
        {"type": "image_url", "image_url": {"url": random_png(1000 * (client_id + 1) + i, args.image_size)}},
        {"type": "text", "text": text}]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": args.max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}


def run_level(args, n_clients: int) -> dict:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    results, errors = [], []
    bodies = [[body_for(args, c, i) for i in range(args.requests)] for c in range(n_clients)]
    barrier = threading.Barrier(n_clients + 1)

    def client(c):
        with httpx.Client(base_url=args.url, headers=headers, timeout=args.timeout) as h:
            barrier.wait()
            for body in bodies[c]:
                try:
                    results.append(one_request(h, body))
                except Exception as e:  # reported, not raised: the other clients go on
                    errors.append(str(e))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(n_clients)]
    for t in threads:
        t.start()
    barrier.wait()
    tic = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - tic
    ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
    tokens = sum(r["tokens"] for r in results)
    return {"clients": n_clients, "requests": len(results), "errors": errors[:5],
            "n_errors": len(errors), "wall_s": wall, "requests_per_s": len(results) / wall,
            "output_tokens": tokens, "output_tokens_per_s": tokens / wall,
            "ttft_p50_s": percentile(ttfts, 50), "ttft_p95_s": percentile(ttfts, 95),
            "per_request_tokens_per_s": float(np.mean([r["tokens"] / r["seconds"] for r in results]))
            if results else float("nan")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args):
    port = free_port()
    args.url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mlx_dsvl.server", "--model", args.model, "--port", str(port),
           "--log-level", "warning", *shlex.split(args.server_args)]
    for flag in ("kv_bits", "kv_group_size"):
        if getattr(args, flag) is not None:
            cmd += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    print("starting:", " ".join(cmd), file=sys.stderr)
    proc = subprocess.Popen(cmd)
    import httpx

    deadline = time.time() + args.start_timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"error: the server exited with code {proc.returncode}")
        try:
            if httpx.get(args.url + "/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit(f"error: the server did not start within {args.start_timeout} s")


def print_table(levels) -> None:
    head = f"{'clients':>7} {'req/s':>8} {'out tok/s':>10} {'x one':>6} {'TTFT p50':>9} {'TTFT p95':>9} {'errors':>6}"
    print(head)
    print("-" * len(head))
    one = levels[0]["output_tokens_per_s"] if levels else float("nan")
    for r in levels:
        print(f"{r['clients']:>7} {r['requests_per_s']:>8.3f} {r['output_tokens_per_s']:>10.1f} "
              f"{r['output_tokens_per_s'] / one:>6.2f} {r['ttft_p50_s']:>8.2f}s {r['ttft_p95_s']:>8.2f}s "
              f"{r['n_errors']:>6}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8080", help="a running server (default: %(default)s)")
    p.add_argument("--api-key", default=os.environ.get("MLX_DSVL_API_KEY"))
    p.add_argument("--model", default=None, help="start a server with this model instead of using --url")
    p.add_argument("--server-args", default="", help="extra arguments for the started server")
    p.add_argument("--kv-bits", type=int, default=None,
                   help="with --model: start the server with --kv-bits (quantized KV caches)")
    p.add_argument("--kv-group-size", type=int, default=None, help="with --model: its --kv-group-size")
    p.add_argument("--clients", default="1,4,16",
                   help="concurrency levels, '' for none (default: %(default)s)")
    p.add_argument("--requests", type=int, default=2, help="requests per client per level (default: 2)")
    p.add_argument("--max-tokens", type=int, default=64, help="reply length in tokens (default: 64)")
    p.add_argument("--images", action="store_true", help="one random image per request")
    p.add_argument("--image-size", type=int, default=384, help="side of the random images (default: 384)")
    p.add_argument("--timeout", type=float, default=1800, help="per-request timeout in s")
    p.add_argument("--start-timeout", type=float, default=600, help="server start-up timeout in s")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    levels = [int(x) for x in args.clients.split(",") if x.strip()]
    proc = start_server(args) if args.model else None
    try:
        import httpx

        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        with httpx.Client(base_url=args.url, headers=headers, timeout=args.timeout) as h:
            model = h.get("/v1/models").json()["data"][0]["id"]
            one_request(h, {**body_for(args, -1, 0), "max_tokens": 4})  # warm-up
            conversation = follow_up(args, h)
        print(f"follow-up: {conversation}", file=sys.stderr, flush=True)
        results = []
        for n in levels:
            print(f"{n} client(s) x {args.requests} request(s) ...", file=sys.stderr, flush=True)
            results.append(run_level(args, n))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
    if results:
        print_table(results)
    print("one conversation: TTFT turn 1 {turn1_ttft_s:.3f} s, turn 2 {turn2_ttft_s:.3f} s ({turn2_cached_tokens} "
          "prompt tokens cached), prefix cache +{prefix_cache_bytes_added} bytes (kv_bits {kv_bits})"
          .format(**conversation))
    if args.json:
        out = {"date": date.today().isoformat(), "machine": platform.platform(),
               "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
               "model": model, "args": {k: v for k, v in vars(args).items() if k != "api_key"},
               "follow_up": conversation, "levels": results}
        tmp = Path(args.json).with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=2))
        tmp.replace(args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    return 1 if any(r["n_errors"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())

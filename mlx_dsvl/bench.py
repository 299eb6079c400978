"""``python -m mlx_dsvl.bench``: where the time and memory go, on random checkpoints of real sizes.

    python -m mlx_dsvl.bench --arch 1.3b [--dtype float32] [--quantize 4] [--device auto] \
        [--json out.json] [--compare]

Random-weight checkpoints of the real sizes are made once and cached (``~/.cache/mlx_dsvl``).
Reports preprocessing, each vision tower, the aligner, prefill tokens/s, time to first token,
decode tokens/s, peak memory and the turn-2 time to first token with cache reuse.  ``--compare``
adds, in the same run on the same weights: decode against bare mlx-lm llama, vision + aligner and
the prefill against the faster PyTorch reference (``transformers`` or timm-style SigLIP, in a
process of its own; when torch is installed), and the decode bound (weight bytes read per token
/ measured memory bandwidth).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import date
from typing import Callable, Dict

import numpy as np

ARCHS = ("tiny", "tiny-hybrid", "1.3b", "7b", "7b-vision")  # 7b-vision: real-size towers, small LLM


def timed(fn: Callable, warmup: int = 0, repeats: int = 1):
    """(result, seconds): best of ``repeats`` after ``warmup`` runs; MLX results are evaluated."""
    import mlx.core as mx

    for _ in range(warmup):
        mx.eval(fn())
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        mx.eval(out)
        best = min(best, time.perf_counter() - t)
    return out, best


def memory_bandwidth_gbs(n_bytes: int = 1 << 30) -> float:
    """Achievable read bandwidth for decoding: a matrix-vector product over an n_bytes float32
    matrix (the operation decoding is made of), best of 3."""
    import mlx.core as mx

    cols = 8192
    w = mx.random.normal((n_bytes // 4 // cols, cols))  # [out, in], as a Linear's weight
    v = mx.random.normal((1, 1, cols))
    mx.eval(w, v)
    _, s = timed(lambda: v @ w.T, warmup=1, repeats=3)
    del w
    return n_bytes / s / 1e9


def llm_bytes_per_token(model) -> int:
    """Bytes of LLM weights read to decode one token (every layer, the norm and lm_head)."""
    from mlx.utils import tree_flatten

    return sum(v.nbytes for k, v in tree_flatten(model.language_model.parameters())
               if "embed_tokens" not in k)


def decode_tps(step_iter, n: int) -> float:
    """Tokens/s over tokens 2..n of a generate_step iterator (the first includes prefill)."""
    t = None
    for i, _ in enumerate(step_iter):
        if i == 0:
            t = time.perf_counter()
        if i == n - 1:
            break
    return (n - 1) / (time.perf_counter() - t)


def run(args) -> Dict:
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from PIL import Image

    from .device import describe_device, select_device
    from .loading import load
    from .session import ChatSession
    from .streaming import last_logits
    from .testing.make_checkpoint import cached_checkpoint

    select_device(args.device)
    path = cached_checkpoint(args.arch)
    res: Dict = {"date": date.today().isoformat(), "arch": args.arch, "device": describe_device(),
                 "machine": f"{platform.machine()} {os.cpu_count()} cores",
                 "blas": "openblas" if _openblas() else "bundled"}
    t = time.perf_counter()
    model, processor = load(path, dtype=args.dtype)
    res["load_s"] = time.perf_counter() - t
    if args.quantize:
        from .mlx_format import quantize_model

        quantize_model(model, args.quantize)
    res["dtype"] = str(model.language_model.model.norm.weight.dtype).replace("mlx.core.", "")
    res["quantize"] = args.quantize or None
    # Memory: what loading (and quantizing) took at its peak, what stays resident, and then the
    # peak of the run itself (resident weights + one image + the turns), as a user who loads a
    # ready-quantized folder would see it.
    mx.clear_cache()
    res["load_peak_memory_gb"] = mx.get_peak_memory() / 1e9
    res["weights_memory_gb"] = mx.get_active_memory() / 1e9
    mx.reset_peak_memory()

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8))
    conv = [{"role": "user", "content": "<image_placeholder>Describe this image in detail."}]
    batch, s = timed(lambda: processor(conv, [img])["pixel_values"])
    res["preprocess_ms"] = s * 1e3
    px = batch[0]  # [1, 3, S, S]
    w = args.warmup
    if model.vision_model.__class__.__name__ == "HybridVisionTower":
        from .models.resize import antialias_bilinear_resize

        x = px.transpose(0, 2, 3, 1).astype(model._dtype)
        feats_high, s = timed(lambda: model.vision_model.vision_tower_high(x), w)
        res["sam_ms"] = s * 1e3
        low_in = antialias_bilinear_resize(x.astype(mx.float32), model.vision_model.low_res_size).astype(x.dtype)
        feats_low, s = timed(lambda: model.vision_model.vision_tower_low(low_in), w)
        res["siglip_ms"] = s * 1e3
        feats = (feats_high, feats_low)
    else:
        feats, s = timed(lambda: model.vision_features(px), w)
        res["siglip_ms"] = s * 1e3
    _, s = timed(lambda: model.aligner(feats), w)
    res["aligner_ms"] = s * 1e3

    opts = dict(max_tokens=args.max_tokens, temperature=0.0, repetition_penalty=1.0)
    last = None
    if mx.default_device() == mx.gpu:
        # The first run on a machine JIT-compiles MLX's GPU kernels (cached on disk afterwards):
        # reported apart, then the figures below come from a second, fresh session.
        for last in ChatSession(model, processor, on_truncate=None).send(conv[0]["content"], [img], **opts):
            pass
        res["cold_ttft_s"] = last.time_to_first_token
    chat = ChatSession(model, processor, on_truncate=None)
    for last in chat.send(conv[0]["content"], [img], **opts):
        pass
    res.update(prompt_tokens=last.prompt_tokens, prefill_tps=last.prompt_tps,
               ttft_s=last.time_to_first_token, decode_tps=last.generation_tps,
               decode_tokens=last.generation_tokens)
    for last in chat.send("And which colour dominates?", [], **opts):
        pass
    res["turn2_prompt_tokens"] = last.prompt_tokens
    res["turn2_ttft_s"] = last.time_to_first_token
    res["turn2_over_turn1"] = res["turn2_ttft_s"] / res["ttft_s"]
    res["peak_memory_gb"] = mx.get_peak_memory() / 1e9

    if args.compare:
        n = args.max_tokens
        prompt = mx.array(np.random.default_rng(1).integers(100, 30000, 64), dtype=mx.int32)
        # a short untimed run of each, then each twice, alternating, best of two: neither
        # side pays for first-use kernel compilation or a busy moment alone
        _our_decode_tps(model, processor, prompt, 4)
        decode_tps(generate_step(prompt, model.language_model, max_tokens=4), 4)
        ours = bare = 0.0
        for _ in range(2):
            ours = max(ours, _our_decode_tps(model, processor, prompt, n))
            bare = max(bare, decode_tps(generate_step(prompt, model.language_model, max_tokens=n), n))
        res.update(decode_ours_tps=ours, decode_bare_mlx_lm_tps=bare, decode_ratio=ours / bare)
        bw = memory_bandwidth_gbs()
        per_tok = llm_bytes_per_token(model)
        res.update(bandwidth_gbs=bw, weight_gb_per_token=per_tok / 1e9,
                   decode_bound_tps=bw * 1e9 / per_tok, decode_fraction_of_bound=bare / (bw * 1e9 / per_tok))
        # ours first; then free our weights before transformers builds its own copy
        ids = processor(conv, [img])["input_ids"]
        gpu_warmup = 1 if mx.default_device() == mx.gpu else 0  # kernels compile on first use
        _, ours_vision = timed(lambda: model.encode_images(batch), gpu_warmup)
        embeds, _ = timed(lambda: model.get_input_embeddings(ids, batch))
        _, ours_prefill = timed(lambda: last_logits(  # like transformers' logits_to_keep=1
            model.language_model, ids, None, embeds), gpu_warmup)
        res.update(ours_vision_aligner_ms=ours_vision * 1e3, ours_prefill_s=ours_prefill,
                   ours_vision_prefill_s=ours_vision + ours_prefill)
        del embeds
        del model, chat, feats
        import gc

        gc.collect()
        mx.clear_cache()
        res.update(_torch_compare(path, px, ids, res, args))
    return res


def _our_decode_tps(model, processor, prompt, n) -> float:
    """Steady decode tokens/s through the streaming path the CLI and sessions use.

    Our first token comes straight from the prefill pass; mlx-lm's ``generate_step`` then works
    one step ahead, so the second token arrives after two steps (the pipeline filling: the
    reply's total time is unchanged, the first token is just earlier).  Counted like bare
    mlx-lm's rate, whose pipeline is full before its first token: from the first chunk after
    that refill to the last token's chunk.
    """
    from .streaming import stream_tokens

    embeds = model.get_input_embeddings(prompt[None])[0]
    stamps = []  # (time, tokens so far) at each chunk that carries a token
    for c in stream_tokens(model.language_model, processor, prompt, embeds, model.make_cache(),
                           max_tokens=n, temperature=0.0, repetition_penalty=1.0):
        if c.token is not None:
            stamps.append((time.perf_counter(), c.generation_tokens))
    steady = [s for s in stamps if s[1] >= 2]
    if len(steady) < 2:
        raise RuntimeError(f"too few streamed tokens to time decoding ({len(stamps)} of {n})")
    (t0, k0), (t1, k1) = steady[0], steady[-1]
    return (k1 - k0) / (t1 - t0)


def _torch_compare(path, px, ids, ours: Dict, args) -> Dict:
    """The PyTorch reference on the same weights and pixels (mlx_dsvl.testing.torch_timing):
    float32 on the CPU (all cores), or on CUDA in our dtype when MLX runs on a GPU.  It runs in
    a child process without the OpenBLAS preloaded for MLX, which would slow PyTorch down."""
    import subprocess
    import tempfile

    import mlx.core as mx

    from importlib.util import find_spec

    missing = [m for m in ("torch", "transformers") if find_spec(m) is None]
    if missing:
        return {"torch_compare": f"skipped ({missing[0]} not installed)"}
    if args.quantize:
        return {"torch_compare": "skipped (the reference is not quantized)"}
    if mx.default_device() == mx.gpu:
        import torch

        if not torch.cuda.is_available():
            return {"torch_compare": "skipped (MLX runs on a GPU, torch has no CUDA)"}
        device, dtype = "cuda", ours["dtype"]
    elif ours["dtype"] != "float32":
        return {"torch_compare": "skipped (on the CPU only float32 is compared)"}
    else:
        device, dtype = "cpu", "float32"
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "OPENBLAS_CORETYPE")}
    with tempfile.TemporaryDirectory() as tmp:
        inputs, out = os.path.join(tmp, "inputs.npz"), os.path.join(tmp, "out.json")
        np.savez(inputs, pixels=np.array(px.astype(mx.float32)), ids=np.array(ids))
        run = subprocess.run([sys.executable, "-m", "mlx_dsvl.testing.torch_timing", str(path), inputs,
                              out, "--device", device, "--dtype", dtype], env=env)
        if run.returncode != 0:
            return {"torch_compare": f"failed (exit {run.returncode})"}
        res = json.loads(open(out).read())
    res.update(vision_speedup=res["torch_vision_aligner_ms"] / ours["ours_vision_aligner_ms"],
               prefill_speedup=res["torch_prefill_s"] / ours["ours_prefill_s"],
               vision_prefill_speedup=res["torch_vision_prefill_s"] / ours["ours_vision_prefill_s"])
    return res


def _openblas() -> bool:
    from .blas import openblas_loaded

    return openblas_loaded()


def _check_args(args) -> None:
    from .device import select_device

    if args.max_tokens < 1 or args.warmup < 0:
        raise ValueError("--max-tokens must be >= 1 and --warmup >= 0")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        raise ValueError(f"--json {args.json}: no such folder {os.path.dirname(os.path.abspath(args.json))}")
    select_device(args.device)  # --device gpu without one


def main(argv=None) -> int:
    from .blas import ensure_fast_blas

    ensure_fast_blas()
    p = argparse.ArgumentParser(prog="python -m mlx_dsvl.bench", description=__doc__.split("\n")[0])
    p.add_argument("--arch", choices=ARCHS, default="tiny-hybrid")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="compute dtype (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--quantize", type=int, choices=[4, 8], default=None, help="quantize the LLM")
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens to decode (default 32)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up runs before timing a tower")
    p.add_argument("--compare", action="store_true", help="bare mlx-lm, PyTorch and bandwidth comparisons")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    try:
        _check_args(args)
    except ValueError as e:  # before minutes of work: one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    res = run(args)
    for k, v in res.items():
        print(f"{k:>28}: {round(v, 4) if isinstance(v, float) else v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

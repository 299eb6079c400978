"""``python -m mlx_dsvl.bench``: where the time and memory go, on random checkpoints of real sizes.

Random checkpoints are made once and cached (``~/.cache/mlx_dsvl``). ``--compare`` measures, in
the same run on the same weights, bare mlx-lm's decode, the PyTorch reference (in a process of its
own) and the decode bound (weight bytes per token / measured memory bandwidth).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import date
from importlib.util import find_spec
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from .blas import ensure_fast_blas, openblas_loaded
from .model_options import add_model_arguments, load_draft_from_args, load_from_args
from .random_checkpoint import cached_checkpoint
from .sampling import DEFAULTS, GREEDY

if TYPE_CHECKING:
    from .models.deepseek_vl import DeepseekVL
    from .processing.chat import ChatProcessor

# MLX is imported in the functions: main() may re-execute the process first (mlx_dsvl.blas).

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
    """Read bandwidth of a matrix-vector product (what decoding is made of), best of 3."""
    import mlx.core as mx

    cols = 8192
    w = mx.random.normal((n_bytes // 4 // cols, cols))  # [out, in], as a Linear's weight
    v = mx.random.normal((1, 1, cols))
    mx.eval(w, v)
    _, s = timed(lambda: v @ w.T, warmup=1, repeats=3)
    w = None  # frees the matrix (the lambda holds the name)
    return n_bytes / s / 1e9


def llm_bytes_per_token(model: DeepseekVL) -> int:
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


def run(args) -> dict:
    import mlx.core as mx

    from . import bench_chat
    from .device import describe_device, select_device
    from .generation import warm_up
    from .session import ChatSession
    from .streaming import kv_cache_options, last_logits

    select_device(args.device)
    gpu = mx.default_device() == mx.gpu
    path = args.model or cached_checkpoint(args.arch)
    res: dict = {"date": date.today().isoformat(), "arch": args.model or args.arch, "device": describe_device(),
                 "machine": f"{platform.machine()} {os.cpu_count()} cores",
                 "blas": "openblas" if openblas_loaded() else "bundled"}
    mx.clear_cache()
    mx.reset_peak_memory()
    t = time.perf_counter()
    model, processor = load_from_args(args, path)  # quantized while loading
    draft_model = load_draft_from_args(args, (model, processor), str(path))
    res["load_s"] = time.perf_counter() - t
    res["draft_model"] = getattr(args, "draft_model", None)
    res["dtype"] = str(model.language_model.model.norm.weight.dtype).replace("mlx.core.", "")
    res["quantize"] = args.quantize or None
    res["quantize_vision"] = args.quantize_vision or None
    # Memory: what loading (and quantizing) took at its peak, what stays resident, and then the
    # peak of the run itself (resident weights + one image + the turns).
    mx.clear_cache()
    res["load_peak_memory_gb"] = mx.get_peak_memory() / 1e9
    res["weights_memory_gb"] = mx.get_active_memory() / 1e9
    res.update(bench_chat.weights_by_part(model))
    if args.load_only:
        return res

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8))
    conv = [{"role": "user", "content": bench_chat.FIRST}]
    opts = GREEDY.with_(max_tokens=args.max_tokens).as_dict()
    if gpu:
        # The first forward of a process compiles MLX's GPU kernels (cached on disk for later
        # processes): reported apart, then a warm-up covers a conversation's other kernels.
        say = lambda m: print(f"[mlx-dsvl] {m}", file=sys.stderr)  # noqa: E731
        cold = ChatSession(model, processor, on_truncate=None, on_slow_start=say)
        res["cold_ttft_s"] = bench_chat.run_turn(cold, bench_chat.FIRST, [img], opts).time_to_first_token
        del cold
        res["warmup_s"] = warm_up(model, processor)
    mx.reset_peak_memory()
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

    kv = kv_cache_options(args.kv_bits, args.kv_group_size)
    res["kv_bits"] = args.kv_bits
    if args.turns:
        res.update(bench_chat.turn_rows(model, processor, img, opts, kv=kv and dict(
            kv_bits=args.kv_bits, kv_group_size=args.kv_group_size), replay=args.replay or gpu, n_turns=args.turns,
            draft_model=draft_model))
    res["peak_memory_gb"] = mx.get_peak_memory() / 1e9  # (towers only with --turns 0)
    res["predicted_peak_gb"] = predicted_peak(args, path, res) / 1e9
    res["predicted_over_measured"] = res["predicted_peak_gb"] / res["peak_memory_gb"]
    if args.context:
        res.update(bench_chat.context_rows(model, processor, img, args.context, opts, kv=kv and dict(
            kv_bits=args.kv_bits, kv_group_size=args.kv_group_size)))
        res["long_predicted_peak_gb"] = predicted_peak(args, path, res, context=res["long_tokens"]) / 1e9
        res["long_predicted_over_measured"] = res["long_predicted_peak_gb"] / res["long_peak_gb"]
    if args.kv_context:
        try:
            res.update(bench_chat.kv_rows(model, processor, img, args.kv_context, group_size=args.kv_group_size))
        except ValueError as e:  # groups that do not divide the head size (tiny test models)
            res["kv_compare"] = f"skipped ({e})"

    if args.compare:
        n = args.max_tokens
        prompt = mx.array(np.random.default_rng(1).integers(100, 30000, 64), dtype=mx.int32)
        ours, bare = _decode_pair(model, processor, prompt, n, 1.0)
        res.update(decode_ours_tps=ours, decode_bare_mlx_lm_tps=bare, decode_ratio=ours / bare)
        ours, bare = _decode_pair(model, processor, prompt, n, DEFAULTS.repetition_penalty)
        res.update(decode_penalty_ours_tps=ours, decode_penalty_bare_mlx_lm_tps=bare,
                   decode_penalty_ratio=ours / bare)
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
        del embeds, model, feats
        gc.collect()
        mx.clear_cache()
        res.update(_torch_compare(path, px, ids, res, args))
    return res


def predicted_peak(args, path, res: dict, context: int | None = None) -> int:
    """The memory budget's prediction of the run's peak: the loaded configuration, one image,
    the conversation's context or ``context`` (with ``--turns 0`` and no ``context``: the towers only)."""
    import mlx.core as mx

    from .loading import load_config, resolve_dtype, resolve_model_path
    from .memory_budget import Choice, MemoryModel, loaded_bits

    config = load_config(resolve_model_path(path))
    memory = MemoryModel(config, resolve_dtype(res["dtype"]), gpu=mx.default_device() == mx.gpu,
                         kv_group_size=args.kv_group_size)
    llm, vision = loaded_bits(config, args.quantize, getattr(args, "quantize_vision", None))
    if not (args.turns or context):
        return memory.weights(llm, vision) + memory.vision_peak()
    return memory.peak(Choice(llm, vision, args.kv_bits, context=context or res["context_tokens"]))


def _decode_pair(model: DeepseekVL, processor: ChatProcessor, prompt, n: int, penalty: float):
    """(ours, bare mlx-lm) steady decode tokens/s: after an untimed run of each, ours, bare, bare,
    ours, best of two, so neither side alone pays for compilation or a machine's drift."""
    from mlx_lm.generate import generate_step

    processors = GREEDY.with_(repetition_penalty=penalty).make_logits_processors()

    def bare(k):
        return decode_tps(generate_step(prompt, model.language_model, max_tokens=k,
                                        logits_processors=processors), k)

    _our_decode_tps(model, processor, prompt, 4, penalty)
    bare(4)
    ours = theirs = 0.0
    for ours_first in (True, False):
        for mine in (ours_first, not ours_first):
            if mine:
                ours = max(ours, _our_decode_tps(model, processor, prompt, n, penalty))
            else:
                theirs = max(theirs, bare(n))
    return ours, theirs


def _our_decode_tps(model: DeepseekVL, processor: ChatProcessor, prompt, n, penalty: float = 1.0) -> float:
    """Steady decode tokens/s through the engine. Its first token comes from the prefill and its
    pipeline then fills, so it is counted from the chunk after that, like bare mlx-lm's rate,
    whose pipeline is full before its first token.
    """
    from .streaming import Row, stream_tokens

    opts = GREEDY.with_(repetition_penalty=penalty, max_tokens=n)
    embeds = model.get_input_embeddings(prompt[None])[0]
    row = Row.start(processor, opts, prompt.tolist())
    stamps = []  # (time, tokens so far) at each chunk that carries a token
    for c in stream_tokens(model.language_model, processor, prompt, lambda s, e: embeds[s:e],
                           model.make_cache(), row=row):
        if c.token is not None:
            stamps.append((time.perf_counter(), c.generation_tokens))
    steady = [s for s in stamps if s[1] >= 2]
    if len(steady) < 2:
        raise RuntimeError(f"too few streamed tokens to time decoding ({len(stamps)} of {n})")
    (t0, k0), (t1, k1) = steady[0], steady[-1]
    return (k1 - k0) / (t1 - t0)


def _torch_compare(path, px, ids, ours: dict, args) -> dict:
    """The PyTorch reference on the same weights and pixels, in a child process without the
    OpenBLAS preloaded for MLX, which would slow PyTorch down."""
    import mlx.core as mx

    missing = [m for m in ("torch", "transformers") if find_spec(m) is None]
    if missing:
        return {"torch_compare": f"skipped ({missing[0]} not installed)"}
    if args.quantize or args.quantize_vision:
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


def _check_args(args) -> None:
    from .device import select_device

    if args.max_tokens < 1 or args.warmup < 0 or args.context < 0:
        raise ValueError("--max-tokens must be >= 1, --warmup and --context >= 0")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        raise ValueError(f"--json {args.json}: no such folder {os.path.dirname(os.path.abspath(args.json))}")
    select_device(args.device)  # --device gpu without one


def _fmt(v):
    return round(v, 4) if isinstance(v, float) else v


def main(argv=None) -> int:
    ensure_fast_blas()
    p = argparse.ArgumentParser(prog="python -m mlx_dsvl.bench", description=__doc__.split("\n")[0])
    p.add_argument("--arch", choices=ARCHS, default="tiny-hybrid")
    add_model_arguments(p, "model", "dtype", "quantize", "quantize_vision", "device",
                        model={"default": None, "help": "a model folder to measure instead of a random --arch one"})
    p.add_argument("--max-tokens", type=int, default=32, help="tokens to decode (default 32)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up runs before timing a tower")
    add_model_arguments(p, "kv_bits", "kv_group_size", "memory_limit", "draft_model")
    p.add_argument("--kv-context", type=int, default=0,
                   help="also compare plain, 8-bit and 4-bit KV caches over a conversation of this "
                        "many tokens (e.g. 4096; default: skipped)")
    p.add_argument("--context", type=int, default=0,
                   help="also run one conversation of this many tokens (one image, then filler turns) "
                        "with the loaded options and --kv-bits: its peak memory against the memory "
                        "budget's prediction, first-token time and decode rate (default: skipped)")
    p.add_argument("--turns", type=int, choices=range(7), default=6,
                   help="conversation turns to run (default 6; 1: turn 1 only; 0: towers only)")
    p.add_argument("--load-only", action="store_true", help="measure the load (time, peak, weights) and stop")
    p.add_argument("--replay", action="store_true",
                   help="run the conversation twice to show each turn's first-use time (default on a GPU)")
    p.add_argument("--compare", action="store_true", help="bare mlx-lm, PyTorch and bandwidth comparisons")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    try:
        _check_args(args)
    except ValueError as e:  # before minutes of work: one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        res = run(args)
    except ValueError as e:  # e.g. KV groups that do not divide the model's head size
        print(f"error: {e}", file=sys.stderr)
        return 1
    for k, v in res.items():
        if isinstance(v, list) and v and isinstance(v[0], dict):
            for row in v:
                print(f"{k:>28}: " + ", ".join(f"{a} {_fmt(b)}" for a, b in row.items()))
        elif isinstance(v, dict):
            print(f"{k:>28}: " + ", ".join(f"{a} {_fmt(b)}" for a, b in v.items()))
        else:
            print(f"{k:>28}: {_fmt(v)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

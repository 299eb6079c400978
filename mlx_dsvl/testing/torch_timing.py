"""The PyTorch reference's vision and prefill times, for ``python -m mlx_dsvl.bench --compare``.

It runs in a process of its own, without the OpenBLAS that mlx-dsvl preloads for MLX: preloaded,
OpenBLAS takes over PyTorch's ``sgemm_`` and its threads spin beside PyTorch's OpenMP threads
(docs/PERFORMANCE.md). Vision + aligner is timed as ``transformers`` and as timm computes SigLIP
(what DeepSeek-VL's reference code runs); the faster is the reference. INPUTS.npz holds
``pixels`` ([1, 3, S, S] in [0, 1]) and ``ids`` ([1, T]).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from .hf_reference import build_hf_model, is_hybrid, read_config, reference_inputs
from .torch_vit import TimmStyleSigLIP


def best_of(fn, runs: int, sync) -> tuple:
    """(seconds of the fastest of ``runs`` calls, the last result)."""
    best, out = float("inf"), None
    for _ in range(runs):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best, out


def measure(folder: Path, pixels: np.ndarray, ids: np.ndarray, device: str, dtype: torch.dtype,
            runs: int = 2, prefill: bool = True) -> dict:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.set_num_threads(os.cpu_count())
    hf = build_hf_model(folder, attn_implementation="sdpa", device=device, dtype=dtype)
    inputs = {k: v.to(device, dtype) for k, v in
              reference_inputs(torch.from_numpy(pixels).float(), folder).items()}
    vit = TimmStyleSigLIP(hf.model.vision_model)

    def timm_style():
        low = vit(inputs["pixel_values"])
        if not is_hybrid(folder):
            return hf.model.aligner(low)
        high = hf.model.get_high_res_image_features(inputs["high_res_pixel_values"]).last_hidden_state
        return hf.model.aligner(low, high)

    with torch.no_grad():
        t_hf, feats = best_of(lambda: hf.model.get_image_features(**inputs).pooler_output, runs, sync)
        t_timm, feats_timm = best_of(timm_style, runs, sync)
        if prefill:
            t_ids = torch.from_numpy(ids).long().to(device)
            embeds = hf.get_input_embeddings()(t_ids)
            image = t_ids == int(read_config(folder).get("image_token_id", 100015))
            embeds[image] = feats.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
            t_prefill, _ = best_of(lambda: hf(inputs_embeds=embeds, logits_to_keep=1).logits, runs, sync)
    diff = float((feats - feats_timm).abs().max() / feats.abs().max())
    vision = min(t_hf, t_timm)
    res = {"torch_device": f"{device} {str(dtype).replace('torch.', '')}",
           "torch_threads": torch.get_num_threads(),
           "torch_vision_transformers_ms": t_hf * 1e3, "torch_vision_timm_style_ms": t_timm * 1e3,
           "torch_vision_reference": "timm-style SigLIP" if t_timm < t_hf else "transformers",
           "torch_vision_references_rel_diff": diff, "torch_vision_aligner_ms": vision * 1e3}
    if prefill:
        res.update(torch_prefill_s=t_prefill, torch_vision_prefill_s=vision + t_prefill)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder", type=Path)
    p.add_argument("inputs", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--vision-only", action="store_true", help="skip the prefill")
    args = p.parse_args(argv)
    data = np.load(args.inputs)
    res = measure(args.folder, data["pixels"], data["ids"], args.device, getattr(torch, args.dtype),
                  prefill=not args.vision_only)
    args.out.write_text(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

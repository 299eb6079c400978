"""What quantizing the vision towers and the aligner (``--quantize-vision 8|4``) changes, on
real-size random weights, and what their weights take in memory per bit width.

    python benchmarks/vision_quant_error.py --arch 1.3b 7b --logits 1.3b --json out.json
    python benchmarks/vision_quant_error.py --arch 7b --logits 7b --llm-bits 4 --json out.json

Per architecture (``cached_checkpoint``: the float16 random checkpoint), the towers and the aligner
are loaded in float32 from the float16-stored weights: that is the reference (the half-precision
towers, computed in float32).  For each bit width the layers ``--quantize-vision`` quantizes
(``mlx_format.quantize_policy``: the same choice, groups of ``--group-size``) get the weights that
quantizing their float16 weights gives (``mx.quantize``, then dequantized with float32 scales and
biases: the values ``load(..., quantize_vision=, dtype="float32")`` computes with); the layers run
as float32 matmuls, since MLX's CPU quantized matmul is too slow for real-size towers here (the
tests check on tiny checkpoints that this agrees with the quantized layers to float rounding).
Printed: (a) the aligner output's relative error ``||q - ref|| / ||ref||`` and max abs difference
for one synthetic image with a natural image's 1/f spectrum; (b) with ``--logits ARCH`` (the whole
model in float32: the 1.3B fits; with ``--llm-bits`` the LLM quantized as ``load(quantize=)`` does,
in the reference and the quantized-vision runs alike: the 7B fits), the LLM's logits at the last position (the first reply token's)
and at every text position after the image: max abs difference relative to the largest logit,
top-1 agreement, mean KL(ref || q); (c) the resident bytes of each part's weights in a 16-bit
dtype unquantized, 8-bit and 4-bit (scales and biases in 16 bits), and the layers left in 16 bits.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

ARCHS = ("1.3b", "7b", "tiny", "tiny-hybrid")  # the tiny ones: a quick check of the script
PARTS = {"sam": "vision_model.vision_tower_high.", "siglip": ("vision_model.vision_tower_low.",
                                                                "vision_model.vision_tower."),
         "aligner": "aligner."}


def natural_image(size: int, seed: int = 0):
    """A colour image whose spectrum falls as 1/f like a photograph's, with a few hard edges."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    f = np.sqrt(np.fft.fftfreq(size)[:, None] ** 2 + np.fft.fftfreq(size)[None, :] ** 2)
    f[0, 0] = 1.0
    channels = []
    for _ in range(3):
        spectrum = (rng.standard_normal((size, size)) + 1j * rng.standard_normal((size, size))) / f
        c = np.real(np.fft.ifft2(spectrum))
        channels.append((c - c.min()) / (c.max() - c.min()))
    im = Image.fromarray((np.stack(channels, -1) * 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    for _ in range(4):
        x, y, r = rng.uniform(0.1, 0.9) * size, rng.uniform(0.1, 0.9) * size, rng.uniform(0.05, 0.2) * size
        d.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return im


def part_of(path: str) -> str:
    return next(name for name, prefix in PARTS.items() if path.startswith(prefix))


def load_parts(path, prefixes: tuple[str, ...], llm_bits: int | None = None, group_size: int = 64):
    """The model with only the tensors under ``prefixes`` loaded (float32, from the stored dtype);
    with ``llm_bits``, the whole model as ``load(dtype="float32", quantize=llm_bits)`` loads it."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_dsvl.loading import load_config, load_model, read_weights, sanitize
    from mlx_dsvl.models.deepseek_vl import DeepseekVL

    weights = {k: v for k, v in sanitize(read_weights(path)).items() if k.startswith(prefixes)}
    stored = {k: v.dtype for k, v in weights.items()}
    if llm_bits is not None:
        del weights
        return load_model(path, "float32", quantize=llm_bits, q_group_size=group_size), stored
    model = DeepseekVL(load_config(path))
    model.load_weights([(k, v.astype(mx.float32)) for k, v in weights.items()], strict=False)
    for k, v in tree_flatten(model.parameters()):
        if k.startswith(prefixes):
            mx.eval(v)
    model.eval()
    return model, stored


def sizes(model, stored: dict, group_size: int) -> dict:
    """Per part: bytes of its weights in 16 bits, 8-bit and 4-bit, and the layers left in 16 bits."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from mlx_dsvl.mlx_format import quantize_policy

    out: dict = {}
    policy = quantize_policy(model, {"vision": 8}, group_size)
    for k, v in tree_flatten(model.parameters()):
        if k not in stored or not k.startswith(tuple(_prefixes())):
            continue
        part = out.setdefault(part_of(k), {"bytes_16bit": 0, "bytes_8bit": 0, "bytes_4bit": 0, "bytes_left_16bit": 0})
        layer, _, leaf = k.rpartition(".")
        part["bytes_16bit"] += v.size * 2
        if not (leaf == "weight" and layer in policy):
            part["bytes_left_16bit"] += v.size * 2
        for bits in (8, 4):
            if leaf == "weight" and layer in policy:  # shapes only: nothing is computed
                wq, s, b = mx.quantize(mx.zeros(v.shape, mx.float16), group_size=group_size, bits=bits)
                part[f"bytes_{bits}bit"] += wq.nbytes + s.nbytes + b.nbytes
            else:
                part[f"bytes_{bits}bit"] += v.size * 2
    for p, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) and p.startswith(tuple(_prefixes())) and p not in policy:
            kind = "conv" if isinstance(m, nn.Conv2d) else f"linear, input {m.weight.shape[-1]}"
            out[part_of(p)].setdefault("left_16bit", {}).setdefault(kind, []).append(p)
    return out


def _prefixes():
    for prefix in PARTS.values():
        yield from (prefix,) if isinstance(prefix, str) else prefix


def quantized_weights(model, policy: dict, stored: dict, group_size: int, errors: list | None = None) -> dict:
    """The weights ``load(quantize_vision=, dtype=float32)`` computes with, per layer in ``policy``;
    ``errors`` gets each layer's ``||w_q - w|| / ||w||``."""
    import mlx.core as mx

    out = {}
    for path, bits in policy.items():
        w = _module(model, path).weight
        wq, s, b = mx.quantize(w.astype(stored[path + ".weight"]), group_size=group_size, bits=bits)
        out[path] = mx.dequantize(wq, s.astype(mx.float32), b.astype(mx.float32), group_size=group_size, bits=bits)
        if errors is not None:
            errors.append((mx.linalg.norm((out[path] - w).reshape(-1)) / mx.linalg.norm(w.reshape(-1))).item())
        mx.eval(out[path])
    return out


def _module(model, path: str):
    m = model
    for part in path.split("."):
        m = m[int(part)] if part.isdigit() else getattr(m, part)
    return m


def swap(model, weights: dict) -> dict:
    """Put ``weights`` (path -> weight) into the model; returns the ones they replace."""
    old = {}
    for path, w in weights.items():
        m = _module(model, path)
        old[path] = m.weight
        m.weight = w
    return old


def compare_features(ref, q) -> dict:
    import mlx.core as mx

    d = (q - ref).astype(mx.float32)
    return {"feature_rel_error": (mx.linalg.norm(d.reshape(-1)) / mx.linalg.norm(ref.reshape(-1))).item(),
            "feature_max_abs_diff": mx.abs(d).max().item(), "feature_max_abs": mx.abs(ref).max().item()}


def compare_logits(ref, q) -> dict:
    """``ref``, ``q``: [T, vocab] logits; the last row is the first reply token's."""
    import mlx.core as mx

    lr, lq = ref - mx.logsumexp(ref, axis=-1, keepdims=True), q - mx.logsumexp(q, axis=-1, keepdims=True)
    kl = (mx.exp(lr) * (lr - lq)).sum(axis=-1)
    scale = mx.abs(ref).max().item()
    return {"last_max_abs_diff": mx.abs(q[-1] - ref[-1]).max().item(),
            "last_rel_to_max_logit": mx.abs(q[-1] - ref[-1]).max().item() / mx.abs(ref[-1]).max().item(),
            "last_top1_same": bool(mx.argmax(q[-1]).item() == mx.argmax(ref[-1]).item()),
            "last_kl": kl[-1].item(),
            "positions": ref.shape[0],
            "max_abs_diff_rel_to_max_logit": mx.abs(q - ref).max().item() / scale,
            "top1_agreement": (mx.argmax(q, -1) == mx.argmax(ref, -1)).astype(mx.float32).mean().item(),
            "mean_kl": kl.mean().item()}


def run_arch(arch: str, bits_list, logits: bool, group_size: int, say, llm_bits: int | None = None) -> dict:
    """``llm_bits`` (with ``logits``): the LLM quantized to these bits in every run."""
    import mlx.core as mx

    from mlx_dsvl.mlx_format import quantize_policy
    from mlx_dsvl.processing.chat import ChatProcessor
    from mlx_dsvl.random_checkpoint import cached_checkpoint

    path = cached_checkpoint(arch)
    prefixes = ("vision_model.", "aligner.") + (("language_model.",) if logits else ())
    t = time.perf_counter()
    llm_bits = llm_bits if logits else None
    model, stored = load_parts(path, prefixes, llm_bits, group_size)
    llm = f", the LLM {llm_bits}-bit" if llm_bits else ""
    say(f"{arch}: loaded {'the whole model' if logits else 'the towers and the aligner'} in float32{llm} "
        f"({time.perf_counter() - t:.0f} s)")
    processor = ChatProcessor.from_pretrained(path)
    size = processor.image_processor.default_shape[-1]
    inputs = processor([{"role": "User", "content": "<image_placeholder>Describe this picture in detail."},
                        {"role": "Assistant", "content": ""}], [natural_image(size)])
    pixels = inputs["pixel_values"][0]
    ids = inputs["input_ids"]
    res: dict = {"arch": arch, "path": str(path), "image_px": size, "group_size": group_size, "llm_bits": llm_bits,
                 "weights": sizes(model, stored, group_size), "bits": {}}

    def features():
        f = model._encode(pixels)
        mx.eval(f)
        return f

    def text_logits(feats):
        h = model.hidden_states(ids, image_embeds=feats[None])
        after = int(mx.argmax((ids[0] == model.image_token_id).astype(mx.int32) * mx.arange(ids.shape[1])).item()) + 1
        out = model.lm_head(h[0, after:]).astype(mx.float32)
        mx.eval(out)
        return out

    t = time.perf_counter()
    ref = features()
    say(f"  reference features {tuple(ref.shape)} ({time.perf_counter() - t:.0f} s)")
    ref_logits = text_logits(ref) if logits else None
    for bits in bits_list:
        policy = quantize_policy(model, {"vision": bits}, group_size)
        errors: list = []
        old = swap(model, quantized_weights(model, policy, stored, group_size, errors))
        t = time.perf_counter()
        feats = features()
        row = {"layers_quantized": len(policy), "weight_rel_error_mean": sum(errors) / len(errors),
               **compare_features(ref, feats)}
        if logits:
            row.update(compare_logits(ref_logits, text_logits(feats)))
        swap(model, old)
        res["bits"][bits] = row
        say(f"  {bits}-bit: {json.dumps(row)} ({time.perf_counter() - t:.0f} s)")
    return res


def table(results: list[dict]) -> str:
    lines = ["| model | vision bits | weight rel. error (mean over layers) | feature rel. error | feature max abs diff (max abs) | first-token logits: max diff / max logit | top-1 same | KL | all text positions: top-1 agreement, mean KL |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for bits, row in r["bits"].items():
            lg = ("| {last_rel_to_max_logit:.2e} | {last_top1_same} | {last_kl:.2e} | {top1_agreement:.3f} over {positions}, "
                  "{mean_kl:.2e} |".format(**row) if "last_kl" in row else "| not measured | | | |")
            llm = f" (LLM {r['llm_bits']}-bit)" if r.get("llm_bits") else ""
            lines.append(f"| {r['arch']}{llm} | {bits} | {row['weight_rel_error_mean']:.2e} | {row['feature_rel_error']:.2e} | "
                         f"{row['feature_max_abs_diff']:.2e} ({row['feature_max_abs']:.2f}) {lg}")
    lines += ["", "| model | part | 16-bit MB | 8-bit MB | 4-bit MB | of which left in 16 bits: MB, layers |",
              "|---|---|---|---|---|---|"]
    for r in results:
        for part, s in r["weights"].items():
            left = "; ".join(f"{kind}: {len(paths)}" for kind, paths in s.get("left_16bit", {}).items()) or "-"
            lines.append(f"| {r['arch']} | {part} | {s['bytes_16bit'] / 1e6:.1f} | {s['bytes_8bit'] / 1e6:.1f} | "
                         f"{s['bytes_4bit'] / 1e6:.1f} | {s['bytes_left_16bit'] / 1e6:.1f}: {left} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", nargs="+", choices=ARCHS, default=["1.3b"])
    p.add_argument("--bits", nargs="+", type=int, choices=[8, 4], default=[8, 4])
    p.add_argument("--logits", nargs="*", choices=ARCHS, default=[],
                   help="also the LLM's logits for these archs (the whole model in float32)")
    p.add_argument("--llm-bits", type=int, choices=[8, 4], default=None,
                   help="with --logits: the LLM quantized to these bits in the reference and every run")
    p.add_argument("--group-size", type=int, choices=[32, 64, 128], default=64)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from mlx_dsvl.blas import ensure_fast_blas

    ensure_fast_blas()
    import mlx.core as mx

    mx.set_default_device(mx.cpu)

    def say(s):
        print(s, file=sys.stderr, flush=True)

    results = [run_arch(a, args.bits, a in args.logits, args.group_size, say, args.llm_bits) for a in args.arch]
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": f"{platform.machine()} {platform.processor()}", "mlx": mx.__version__,
                       "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m mlx_dsvl.convert``: DeepSeek-VL checkpoints -> MLX (dtype, 4/8-bit) and back.

Progress goes to stderr, the output path to stdout (for scripts); an error is one line, status 1,
and nothing is left behind.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..blas import ensure_fast_blas
from ..loading import ModelLoadError
from ..outputs import run_command
from ..utils import print_names
from .files import ConvertError
from .to_mlx import convert_to_mlx

DTYPE_CHOICES = ["float16", "bfloat16", "float32"]


def default_prog() -> str:
    """``mlx-dsvl-convert`` when run as the console script, else the ``python -m`` form."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return name if name and not name.endswith(".py") else "python -m mlx_dsvl.convert"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog or default_prog(),
        description="Convert DeepSeek-VL checkpoints (original deepseek-ai or transformers layout) to an "
                    "MLX folder (optionally 4/8-bit quantized), or an MLX folder back to the original layout.",
    )
    p.add_argument("--model", required=True, help="input folder or Hugging Face hub id")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --force)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                   help="cast floating tensors to this dtype (default: keep each tensor's stored dtype)")
    p.add_argument("--quantize", action="store_true",
                   help="quantize the LLM's linear layers and embeddings (lm_head included)")
    p.add_argument("--q-bits", type=int, choices=[4, 8], default=None, help="bits per weight (default 4)")
    p.add_argument("--q-group-size", type=int, choices=[32, 64, 128], default=None,
                   help="quantization group size (default 64); layers whose input size does not divide "
                        "by it stay unquantized")
    p.add_argument("--quantize-vision", type=int, choices=[4, 8], nargs="?", const=True, default=None,
                   metavar="BITS",
                   help="quantize the vision towers' and the aligner's linear layers to BITS (4 or 8; bare: "
                        "--q-bits), with or without --quantize; patch embeddings, SAM's neck, norms and "
                        "position embeddings stay unquantized")
    p.add_argument("--to-original", action="store_true",
                   help="write the original deepseek-ai layout (dequantizing quantized layers)")
    p.add_argument("--adapter", default=None,
                   help="with --to-original: a LoRA adapter folder to fuse into the weights first")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read PyTorch pickle weights (.bin/.pt); unpickling can run arbitrary code, so only "
                        "for files you trust (torch.load with weights_only=True is used)")
    p.add_argument("--shard-gb", type=float, default=5.0, help="maximum shard size in GB (default 5)")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    if argv is None:
        ensure_fast_blas()
    parser = build_parser(prog)
    a = parser.parse_args(argv)
    if a.to_original:
        bad = [flag for flag, on in (("--quantize", a.quantize), ("--q-bits", a.q_bits is not None),
                                     ("--q-group-size", a.q_group_size is not None),
                                     ("--quantize-vision", a.quantize_vision is not None)) if on]
        if bad:
            parser.error(f"{', '.join(bad)} cannot be used with --to-original")
    else:
        if a.adapter:
            parser.error("--adapter is for --to-original (adapters are fused into the original layout; "
                         "python -m mlx_dsvl.fuse does the same)")
        if a.q_group_size is not None and not a.quantize and a.quantize_vision is None:
            parser.error("--q-group-size needs --quantize or --quantize-vision")
        if a.q_bits is not None and not a.quantize and a.quantize_vision is not True:
            parser.error("--q-bits needs --quantize (the LLM's bits) or a bare --quantize-vision (the vision's)")
    status, out = run_command(lambda: _run(a), (ConvertError, ModelLoadError, OSError))
    if status == 0:
        print_names(str(out))
    return status


def _run(a: argparse.Namespace):
    if a.to_original:
        from .to_original import convert_to_original  # deferred: adapters bring mlx_lm.tuner (rich)

        return convert_to_original(a.model, a.out, dtype=a.dtype, adapter=a.adapter, force=a.force,
                                   allow_pickle=a.allow_pickle, shard_gb=a.shard_gb)
    return convert_to_mlx(a.model, a.out, dtype=a.dtype, quantize=a.quantize,
                          q_bits=a.q_bits or 4, q_group_size=a.q_group_size or 64,
                          quantize_vision=a.quantize_vision, force=a.force,
                          allow_pickle=a.allow_pickle, shard_gb=a.shard_gb)


if __name__ == "__main__":
    sys.exit(main())

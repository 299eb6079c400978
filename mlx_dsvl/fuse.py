"""``python -m mlx_dsvl.fuse``: fold trained adapters into a full model in the original layout.

The name the training docs use for ``python -m mlx_dsvl.convert --to-original --adapter``, which
does the work; ``FUSED`` then loads like any released checkpoint, in this package and in the
original PyTorch code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .blas import ensure_fast_blas
from .model_options import add_model_arguments
from .utils import print_names


def fuse(model_path: str, adapter_dir: str, out: str, dtype: str | None = None,
         shard_gb: float = 5.0, force: bool = False, verbose: bool = True) -> Path:
    """Fuse ``adapter_dir`` into ``model_path`` and write the original layout to ``out``."""
    from .convert.to_original import convert_to_original  # (MLX: imported after main's BLAS re-execution)
    from .outputs import log

    path = convert_to_original(model_path, out, dtype=dtype, adapter=adapter_dir, force=force,
                               shard_gb=shard_gb, progress=log if verbose else (lambda _msg: None))
    if verbose:
        print_names(f"fused {adapter_dir} into {model_path} -> {path}")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    ensure_fast_blas()
    p = argparse.ArgumentParser(
        prog="python -m mlx_dsvl.fuse",
        description="Fold trained adapters (python -m mlx_dsvl.train --out DIR) into a full model "
                    "written in the original deepseek-ai layout (python -m mlx_dsvl.convert "
                    "--to-original --adapter DIR does the same).",
    )
    add_model_arguments(
        p, "model", "adapter",
        model={"required": True, "default": None,
               "help": "the base model the adapters were trained on (folder or hub id)"},
        adapter={"required": True,
                 "help": "folder with adapters.safetensors + adapter_config.json (a run's --out or a checkpoint)"})
    p.add_argument("--out", required=True, help="output folder (must not exist unless --force)")
    add_model_arguments(p, "dtype", dtype={"help": "weights dtype on disk (default: as the base stores them)"})
    p.add_argument("--shard-gb", type=float, default=5.0, help="maximum shard size in GB (default 5)")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")
    a = p.parse_args(argv)
    from .outputs import run_command  # after ensure_fast_blas: it imports MLX

    return run_command(lambda: fuse(a.model, a.adapter, a.out, a.dtype, a.shard_gb, a.force))[0]


if __name__ == "__main__":
    sys.exit(main())

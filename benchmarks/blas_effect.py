"""The effect of preloading OpenBLAS on MLX's Linux CPU backend: one SigLIP-L/16@384 forward.

    python benchmarks/blas_effect.py            # runs both modes in subprocesses

Uses the cached random 1.3B checkpoint (real-size SigLIP-L); prints seconds per forward with
MLX's bundled BLAS (``MLX_DSVL_NO_BLAS_REEXEC=1``) and with the system OpenBLAS preloaded.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

CHILD = """
import time, mlx.core as mx
from mlx_dsvl.blas import openblas_loaded
from mlx_dsvl.loading import load_model
from mlx_dsvl.testing.make_checkpoint import cached_checkpoint
m = load_model(cached_checkpoint("1.3b"))
x = mx.random.uniform(shape=(1, 3, 384, 384))
t = time.perf_counter(); mx.eval(m.vision_features(x)); s = time.perf_counter() - t
print(f"openblas={openblas_loaded()} siglip_forward_s={s:.2f}")
"""


def main():
    for label, env in [("bundled BLAS", {"MLX_DSVL_NO_BLAS_REEXEC": "1", "LD_PRELOAD": ""}),
                       ("system OpenBLAS", {})]:
        e = {**os.environ, **env}
        if not env:
            e.pop("MLX_DSVL_NO_BLAS_REEXEC", None)
        code = "from mlx_dsvl.blas import ensure_fast_blas; ensure_fast_blas()\n" + CHILD
        t = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True)
        print(f"{label:16s} {out.stdout.strip() or out.stderr.strip()[-300:]} (process {time.perf_counter() - t:.0f} s)")


if __name__ == "__main__":
    main()

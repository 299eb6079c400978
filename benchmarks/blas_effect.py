"""MLX's Linux CPU backend on each BLAS this machine has: float32 matmul GFLOP/s and a SigLIP-L.

A large matmul (n x n) and the batched small ones of SigLIP-L's attention (16 heads of
577 x 64 x 577), so that both kinds of work the models do are seen.

    python benchmarks/blas_effect.py [--size 2048] [--siglip] [--json out.json]

Each row runs in a fresh process: MLX's bundled BLAS; the pip OpenBLAS (``ngsolve-openblas``)
and the system OpenBLAS, each with the core it picks itself and forced to each core it knows
(``Prescott`` is the generic core an OpenBLAS falls back to on a CPU it does not recognise);
then the library and core ``mlx_dsvl.blas.ensure_fast_blas`` chooses.  Two PyTorch rows show
what a preloaded OpenBLAS does to PyTorch in the same process (it takes over PyTorch's
``sgemm_``).  ``--siglip`` adds one real-size SigLIP-L/16@384 forward (random weights, no
checkpoint needed) per row: seconds with OpenBLAS, minutes with the bundled BLAS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlx_dsvl import blas  # noqa: E402

TIMER = """
def _best(fn, repeats):
    import time
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter(); fn(); best = min(best, time.perf_counter() - t)
    return best
"""

MLX_CHILD = TIMER + """
import json, sys
import mlx.core as mx
from mlx_dsvl.blas import loaded_core, loaded_openblas
n, siglip = int(sys.argv[1]), sys.argv[2] == "1"
mx.set_default_device(mx.cpu)
a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
mx.eval(a, b, a @ b)
q, k = mx.random.normal((16, 577, 64)), mx.random.normal((16, 64, 577))  # SigLIP-L attention
mx.eval(q, k, q @ k)
out = {"library": loaded_openblas(), "core": loaded_core(),
       "gflops": 2 * n ** 3 / _best(lambda: mx.eval(a @ b), 5) / 1e9,
       "gflops_16x577x64x577": 2 * 16 * 577 * 64 * 577 / _best(lambda: mx.eval(q @ k), 5) / 1e9}
if siglip:
    from mlx_dsvl.config import SigLIPConfig
    from mlx_dsvl.models.siglip import SigLIPViT
    model = SigLIPViT(SigLIPConfig())
    mx.eval(model.parameters())
    x = mx.random.uniform(shape=(1, 384, 384, 3))
    out["siglip_forward_s"] = _best(lambda: mx.eval(model(x)), 1)
print(json.dumps(out))
"""

TORCH_CHILD = TIMER + """
import json, os, sys
import torch
from mlx_dsvl.blas import loaded_core, loaded_openblas
n = int(sys.argv[1])
torch.set_num_threads(os.cpu_count())
a, b = torch.randn(n, n), torch.randn(n, n)
a @ b
print(json.dumps({"library": loaded_openblas(), "core": loaded_core(),
                  "gflops": 2 * n ** 3 / _best(lambda: a @ b, 5) / 1e9}))
"""


def run_child(code: str, args, preload=None, coretype=None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "OPENBLAS_CORETYPE", "MLX_DSVL_BLAS_REEXECUTED")}
    env.update(MLX_DSVL_NO_BLAS_REEXEC="1", PYTHONPATH=str(ROOT))
    if preload:
        env["LD_PRELOAD"] = preload
    if coretype:
        env["OPENBLAS_CORETYPE"] = coretype
    out = subprocess.run([sys.executable, "-c", code, str(args.size), "1" if args.siglip else "0"],
                         env=env, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip()[-300:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def rows(args):
    """(label, code, preload, coretype) for every measurement."""
    yield "MLX, bundled BLAS", MLX_CHILD, None, None
    libs = [("pip", blas.pip_openblas()), ("system", blas.system_openblas())]
    for name, lib in libs:
        if not lib or blas.library_core(lib) is None:
            continue
        yield f"MLX, {name} OpenBLAS, own core", MLX_CHILD, lib, None
        for core in ["Prescott"] + sorted(blas.known_cores(lib)):
            yield f"MLX, {name} OpenBLAS, {core}", MLX_CHILD, lib, core
    chosen = blas.find_openblas()
    if chosen:
        env = blas.preload_env(chosen)
        yield "MLX, as ensure_fast_blas chooses", MLX_CHILD, chosen, env.get("OPENBLAS_CORETYPE")
        if not args.no_torch:
            yield "PyTorch, its own BLAS (MKL)", TORCH_CHILD, None, None
            yield "PyTorch, OpenBLAS preloaded, Prescott", TORCH_CHILD, chosen, "Prescott"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=2048, help="n of the n x n float32 matmul")
    p.add_argument("--siglip", action="store_true", help="also time one real-size SigLIP-L forward")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch rows")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    flags = blas.cpu_flags()
    res = {"date": date.today().isoformat(), "machine": f"{platform.machine()} {os.cpu_count()} cores",
           "cpu": _cpu_name(), "cpu_level": ["generic", "AVX2+FMA", "AVX-512"][blas.cpu_level(flags)],
           "matmul": f"float32 {args.size}x{args.size}", "rows": []}
    print(f"{res['cpu']} ({res['machine']}, {res['cpu_level']}), {res['matmul']} matmul")
    for label, code, lib, core in rows(args):
        r = {"label": label, "forced_coretype": core, **run_child(code, args, lib, core)}
        res["rows"].append(r)
        extra = f", SigLIP-L forward {r['siglip_forward_s']:.2f} s" if "siglip_forward_s" in r else ""
        small = f", batched 16x577x64x577 {r['gflops_16x577x64x577']:5.1f}" if "gflops_16x577x64x577" in r else ""
        shown = r.get("error") or f"{r['gflops']:6.1f} GFLOP/s{small} (core {r['core']}){extra}"
        print(f"{label:44s} {shown}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())

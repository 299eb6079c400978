"""Vision + aligner, ours (MLX) against the PyTorch reference, alternating, on a busy machine.

    python benchmarks/vision_vs_torch.py --arch 7b-vision [--rounds 2] [--json out.json]

``bench --compare`` times the reference once, after everything else; on a machine shared with
other jobs the load can change in between.  Here each round runs our ``encode_images`` (MLX, with
the OpenBLAS that mlx-dsvl preloads) and then the PyTorch reference (``transformers`` and the
timm-style SigLIP, in a clean process: mlx_dsvl.testing.torch_timing) on the same random
checkpoint and pixels, each the best of two passes, and the ratio is taken per round.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OURS = """
import json, sys, time
import numpy as np, mlx.core as mx
from mlx_dsvl.blas import ensure_fast_blas, loaded_core
ensure_fast_blas()
from mlx_dsvl.loading import load_model
from pathlib import Path
model = load_model(Path(sys.argv[1]), dtype="float32")
px = mx.array(np.load(sys.argv[2])["pixels"])[None]
best = float("inf")
for _ in range(2):
    t = time.perf_counter(); mx.eval(model.encode_images(px)); best = min(best, time.perf_counter() - t)
print(json.dumps({"ours_vision_aligner_ms": best * 1e3, "openblas_core": loaded_core()}))
"""


def main(argv=None) -> int:
    from mlx_dsvl.random_checkpoint import cached_checkpoint

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="7b-vision", choices=["1.3b", "7b-vision", "tiny", "tiny-hybrid"])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    path = cached_checkpoint(args.arch)
    size = json.loads((path / "preprocessor_config.json").read_text()).get("image_size", 384)
    clean = {k: v for k, v in os.environ.items()
             if k not in ("LD_PRELOAD", "OPENBLAS_CORETYPE", "MLX_DSVL_BLAS_REEXECUTED")}
    clean["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), clean.get("PYTHONPATH")]))
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        inputs = os.path.join(tmp, "inputs.npz")
        rng = np.random.default_rng(0)
        np.savez(inputs, pixels=rng.uniform(size=(1, 3, size, size)).astype(np.float32),
                 ids=np.zeros((1, 0), dtype=np.int64))
        for r in range(args.rounds):
            ours = subprocess.run([sys.executable, "-c", OURS, str(path), inputs], env=clean,
                                  capture_output=True, text=True, check=True)
            res = json.loads(ours.stdout.strip().splitlines()[-1])
            out = os.path.join(tmp, "torch.json")
            subprocess.run([sys.executable, "-m", "mlx_dsvl.testing.torch_timing", str(path), inputs,
                            out, "--vision-only"], env=clean, check=True)
            res.update(json.loads(Path(out).read_text()))
            res["vision_speedup"] = res["torch_vision_aligner_ms"] / res["ours_vision_aligner_ms"]
            rounds.append(res)
            print(f"round {r + 1}: ours {res['ours_vision_aligner_ms'] / 1e3:.2f} s, transformers "
                  f"{res['torch_vision_transformers_ms'] / 1e3:.2f} s, timm-style "
                  f"{res['torch_vision_timm_style_ms'] / 1e3:.2f} s -> reference / ours "
                  f"{res['vision_speedup']:.2f}", flush=True)
    summary = {"arch": args.arch, "cpu": _cpu(), "cores": os.cpu_count(), "rounds": rounds,
               "best_vision_speedup": max(r["vision_speedup"] for r in rounds)}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


def _cpu() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())

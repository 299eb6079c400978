"""Converter figures for the real-size random checkpoints: 1.3B and 7B, 4 and 8 bits.

    python benchmarks/convert_bench.py [--arch 1.3b 7b] [--bits 4 8] [--group-size 64]
                                       [--work DIR] [--no-forward] [--json FILE]

For each (arch, bits): runs ``python -m mlx_dsvl.convert --quantize`` in a child process and reports its
wall time and peak memory (the child's max RSS: ``getrusage(RUSAGE_CHILDREN)`` in a small
launcher process that runs only that child), the output folder size, then ``mlx_dsvl.load`` time (its default dtype unless
``--load-dtype``: float32 on the CPU backend, where float16 quantized matmuls are very slow) and
peak memory in a fresh child, and (unless ``--no-forward``) the time of one 4-token text
forward pass.  The source folder (original layout, float16) is the baseline (its size, and for the 1.3B its load).
The random checkpoints are made once and cached in ~/.cache/mlx_dsvl (the 7B is 14.7 GB: it is
skipped, with the reason printed, when the disk has under 60 GB free); outputs go to a scratch
folder and are deleted after they are measured.  Timings depend on whatever else the machine runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NEED_FREE_GB = {"7b": 60.0, "1.3b": 15.0}

LOAD_SNIPPET = r"""
import json, sys, time
import mlx.core as mx
import mlx_dsvl
t = time.perf_counter()
model, processor = mlx_dsvl.load(sys.argv[1], dtype=sys.argv[3] if sys.argv[3] != "default" else None)
load_s = time.perf_counter() - t
fwd_s = None
if sys.argv[2] == "1":  # a short text forward pass: the quantized model runs
    ids = mx.array([[100000, 5, 6, 7]])
    t = time.perf_counter()
    out = model(ids)
    mx.eval(out)
    fwd_s = time.perf_counter() - t
    assert bool(mx.isfinite(out).all())
print(json.dumps({"load_s": load_s, "forward_s": fwd_s}))
"""


def folder_gb(path: Path) -> float:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 1e9


# A small launcher runs each measured command and reports getrusage(RUSAGE_CHILDREN).ru_maxrss.
# Measuring from this process instead would be wrong: Linux carries the parent's high-water RSS
# into a forked child's maxrss across execve, and this process may have grown (making a checkpoint).
LAUNCHER = r"""
import json, resource, subprocess, sys
rc = subprocess.call(sys.argv[1:])
print(json.dumps({"rc": rc, "maxrss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}), file=sys.stderr)
"""


def run_measured(cmd, **kw):
    """Run ``cmd`` under the launcher; return (returncode, stdout, stderr, wall s, child's max RSS in GB)."""
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", LAUNCHER, *cmd], capture_output=True, text=True, **kw)
    wall = time.perf_counter() - t
    *lines, last = p.stderr.rstrip("\n").split("\n")
    info = json.loads(last)
    return info["rc"], p.stdout, "\n".join(lines), wall, info["maxrss_kb"] * 1024 / 1e9


def measure_load(folder: Path, forward: bool, dtype: str) -> dict:
    rc, out, err, wall, rss = run_measured([sys.executable, "-c", LOAD_SNIPPET, str(folder), "1" if forward else "0",
                                            dtype], cwd=ROOT)
    if rc != 0:
        raise RuntimeError(f"loading {folder} failed:\n{err[-2000:]}")
    return {**json.loads(out.strip().splitlines()[-1]), "load_rss_gb": rss}


def main():
    from mlx_dsvl.blas import ensure_fast_blas

    ensure_fast_blas()  # children inherit the preloaded OpenBLAS
    from mlx_dsvl.random_checkpoint import cached_checkpoint

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", nargs="+", default=["1.3b", "7b"], choices=["1.3b", "7b", "tiny", "tiny-hybrid"])
    p.add_argument("--bits", nargs="+", type=int, default=[4, 8], choices=[4, 8])
    p.add_argument("--group-size", type=int, default=64, choices=[32, 64, 128])
    p.add_argument("--work", default=None, help="scratch folder for the outputs (default: a temp folder in ~)")
    p.add_argument("--load-dtype", default="default", choices=["default", "float16", "bfloat16", "float32"],
                   help="dtype for mlx_dsvl.load (default: its default, float32 on the CPU backend)")
    p.add_argument("--no-forward", action="store_true", help="skip the 4-token forward pass after loading")
    p.add_argument("--json", default=None)
    a = p.parse_args()

    work = Path(a.work or tempfile.mkdtemp(prefix="convert_bench.", dir=Path.home()))
    work.mkdir(parents=True, exist_ok=True)
    rows, skipped = [], {}
    try:
        for arch in a.arch:
            cache = Path(os.environ.get("MLX_DSVL_CACHE") or Path.home() / ".cache" / "mlx_dsvl")
            cached = (cache / "checkpoints" / f"{arch}-seed0" / "config.json").exists()
            free = shutil.disk_usage(Path.home()).free / 1e9
            need = NEED_FREE_GB.get(arch, 1.0)
            if not cached and free < need:
                skipped[arch] = f"only {free:.0f} GB free on {Path.home()} (need {need:.0f} GB to make it and convert)"
                print(f"skipping {arch}: {skipped[arch]}", file=sys.stderr)
                continue
            src = cached_checkpoint(arch)
            stored = json.loads((src / "config.json").read_text()).get("torch_dtype", "?")
            base = {"arch": arch, "variant": f"original, {stored}", "size_gb": folder_gb(src)}
            if arch != "7b":  # the 7B baseline load would need 15 GB (float16) or 29 GB (float32) of RAM
                base.update(measure_load(src, not a.no_forward, a.load_dtype))
            rows.append(base)
            print(json.dumps(base), file=sys.stderr)
            for bits in a.bits:
                out = work / f"{arch}-q{bits}"
                cmd = [sys.executable, "-m", "mlx_dsvl.convert", "--model", str(src), "--out", str(out), "--quantize",
                       "--q-bits", str(bits), "--q-group-size", str(a.group_size), "--force"]
                rc, _, err, wall, rss = run_measured(cmd, cwd=ROOT)
                if rc != 0:
                    raise RuntimeError(f"conversion failed:\n{err[-2000:]}")
                row = {"arch": arch, "variant": f"{bits}-bit g{a.group_size}", "size_gb": folder_gb(out),
                       "convert_s": wall, "convert_rss_gb": rss}
                row.update(measure_load(out, not a.no_forward, a.load_dtype))
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
                shutil.rmtree(out)
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    print(f"\nconvert_bench on {platform.machine()} ({os.cpu_count()} CPUs), group size {a.group_size}; "
          f"load dtype {a.load_dtype}; timings share the machine with whatever else runs\n")
    print("| model | weights | folder | convert time | convert peak RSS | load time | load peak RSS | 4-token forward |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arch']} | {r['variant']} | {r['size_gb']:.2f} GB | {f(r.get('convert_s'), '.1f')} s | "
              f"{f(r.get('convert_rss_gb'), '.2f')} GB | {f(r.get('load_s'), '.2f')} s | "
              f"{f(r.get('load_rss_gb'), '.2f')} GB | {f(r.get('forward_s'), '.2f')} s |")
    for arch, why in skipped.items():
        print(f"\n{arch}: skipped ({why})")
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "skipped": skipped}, indent=2))


if __name__ == "__main__":
    main()

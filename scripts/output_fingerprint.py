"""What training, resuming, fusing and converting write, as JSON: run it on two commits and diff.

    PYTHONPATH=CHECKOUT python scripts/output_fingerprint.py --out /tmp/after.json [--work /tmp/ofp]

A refactor of those paths proves itself by printing the same file before and after.  Through the
command lines a user types, on tiny random checkpoints of both families: stage 1, 2 (full) and
3 (LoRA with dropout) runs with checkpoints, a resume from the middle checkpoint into another
folder, a fuse of the stage-3 adapters, and the convert round trip (float16, 4- and 8-bit, back to
the original layout).  Each output file is hashed with its permission bits; in JSON files the
wall-clock fields (times, rates, memory) are dropped first.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

VOLATILE = {"time", "tokens_per_s", "steps_per_s", "peak_memory_gb", "elapsed_s", "seconds", "created"}


def _import(*paths: str):
    """The first of ``module:name`` that imports (the names moved between commits)."""
    for p in paths:
        mod, name = p.split(":")
        try:
            return getattr(__import__(mod, fromlist=[name]), name)
        except ImportError:
            continue
    raise ImportError(f"none of {paths}")


def _strip(x):
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if k not in VOLATILE}
    if isinstance(x, list):
        return [_strip(v) for v in x]
    return x


def digest(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix in (".json", ".jsonl"):
        lines = [json.loads(s) for s in data.decode().splitlines() if s.strip()] if path.suffix == ".jsonl" \
            else [json.loads(data)]
        data = json.dumps(_strip(lines), sort_keys=True).encode()
    return f"{oct(path.stat().st_mode & 0o777)} {hashlib.sha256(data).hexdigest()[:16]}"


def folder(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): digest(p) for p in sorted(root.rglob("*")) if p.is_file()}


def run(*args: str) -> None:
    cpu = ["--device", "cpu"] if args[0] == "mlx_dsvl.train" else []
    r = subprocess.run([sys.executable, "-m", *args, *cpu], capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{' '.join(args)} failed ({r.returncode}):\n{r.stderr[-3000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--work", default="/tmp/output-fingerprint")
    a = p.parse_args()
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    os.chdir(work)  # relative paths: the run configs hold what was typed
    make = _import("mlx_dsvl.random_checkpoint:make_checkpoint", "mlx_dsvl.testing.make_checkpoint:make_checkpoint")
    shapes = _import("mlx_dsvl.testing.synthetic:write_shapes_dataset", "mlx_dsvl.train.synthetic:write_shapes_dataset")
    shapes("data", 12, seed=0)
    result: dict[str, dict[str, str]] = {}
    for arch in ("tiny", "tiny-hybrid"):
        make(arch, Path(arch), seed=1)
        common = ["--model", arch, "--iters", "6", "--save-every", "3", "--batch-size", "2", "--no-plot", "--quiet"]
        s1, s2, s3 = f"{arch}-s1", f"{arch}-s2", f"{arch}-s3"
        run("mlx_dsvl.train", "--stage", "1", "--data", "data/pairs.jsonl", "--out", s1, *common)
        run("mlx_dsvl.train", "--stage", "2", "--method", "full", "--data", "data/chat.jsonl", "--out", s2, *common)
        run("mlx_dsvl.train", "--stage", "3", "--lora-dropout", "0.1", "--data", "data/chat.jsonl", "--out", s3,
            *common)
        run("mlx_dsvl.train", "--resume", f"{s3}/checkpoints/step-0000003", "--out", f"{arch}-s3-resumed", "--quiet")
        run("mlx_dsvl.fuse", "--model", arch, "--adapter", s3, "--out", f"{arch}-fused")
        run("mlx_dsvl.convert", "--model", arch, "--out", f"{arch}-f16", "--dtype", "float16")
        run("mlx_dsvl.convert", "--model", arch, "--out", f"{arch}-q4", "--quantize", "--q-group-size", "32")
        run("mlx_dsvl.convert", "--model", arch, "--out", f"{arch}-q8v", "--quantize", "--q-bits", "8",
            "--q-group-size", "32", "--quantize-vision")
        run("mlx_dsvl.convert", "--to-original", "--model", f"{arch}-q4", "--out", f"{arch}-q4-orig")
        run("mlx_dsvl.convert", "--to-original", "--model", f"{arch}-f16", "--out", f"{arch}-f16-orig",
            "--adapter", s3)
        for d in sorted(Path().glob(f"{arch}-*")):
            result[str(d)] = folder(d)
    Path(a.out).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"{sum(map(len, result.values()))} files in {len(result)} folders -> {a.out}")


if __name__ == "__main__":
    main()

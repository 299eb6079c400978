"""Training benchmark: stage-1 step time with and without --cache-vision-features, and stage-3
LoRA tokens/s and peak memory, on random checkpoints (tiny-hybrid and the real 1.3B size).

    python benchmarks/train_bench.py [--arch tiny-hybrid 1.3b] [--ckpt-dir /tmp] [--out bench.json]

Checkpoints are built once with ``make_checkpoint`` under ``--ckpt-dir`` (``dsvl-<arch>``; the
1.3B one is 3.95 GB) and reused.  Each measurement is a real ``mlx_dsvl.train`` run on synthetic
images; step times come from the run's own metrics (one record per step) and exclude the first
step of a run (compilation).  Stage 1 runs two epochs over the same images: with the cache, the
first epoch encodes every image and the second reuses the features.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlx_dsvl.blas import ensure_fast_blas  # noqa: E402

PLAN = {  # arch -> (images, batch size, stage-3 steps)
    "tiny-hybrid": (8, 2, 6),
    "1.3b": (4, 1, 3),
}


def checkpoint(arch: str, folder: Path) -> Path:
    from mlx_dsvl.testing.make_checkpoint import make_checkpoint

    path = folder / f"dsvl-{arch}"
    if not (path / "config.json").is_file():
        print(f"building the random {arch} checkpoint in {path} (once) ...", flush=True)
        make_checkpoint(arch, path, seed=0, force=path.exists(), verbose=True)
    return path


def step_times(history, skip_first=1):
    """Seconds per step from per-step records (steps_per_report=1), first step(s) dropped."""
    recs = [r for r in history if r.get("type") == "train"]
    return [1.0 / r["steps_per_s"] for r in recs[skip_first:]]


def run(arch: str, ckpt: Path, work: Path) -> dict:
    import mlx.core as mx

    from mlx_dsvl.train import TrainConfig, train
    from mlx_dsvl.train.synthetic import write_shapes_dataset
    import json as _json

    n_images, batch, s3_steps = PLAN[arch]
    size = _json.loads((ckpt / "preprocessor_config.json").read_text())["image_size"]
    data = write_shapes_dataset(work / "data", n_images, seed=0, size=min(size, 512))
    per_epoch = -(-n_images // batch)
    common = dict(model=str(ckpt), batch_size=batch, steps_per_report=1, save_every=0, quiet=True,
                  plot=False, warmup=0)
    res = {"arch": arch, "images": n_images, "batch_size": batch}

    t = time.perf_counter()
    plain = train(TrainConfig(stage=1, data=str(data["pairs"]), out=str(work / "s1"), epochs=2, **common))
    times = step_times(plain.history)
    res["stage1_step_s"] = statistics.mean(times)
    res["stage1_wall_s"] = time.perf_counter() - t
    print(f"[{arch}] stage 1 without cache: {res['stage1_step_s']:.3f} s/step", flush=True)

    mx.reset_peak_memory()
    t = time.perf_counter()
    cached = train(TrainConfig(stage=1, data=str(data["pairs"]), out=str(work / "s1c"), epochs=2,
                               cache_vision_features=True, **common))
    times = step_times(cached.history, skip_first=0)
    first, second = times[1:per_epoch], times[per_epoch:]  # epoch 1 (minus compile) / epoch 2
    res["stage1_cached_first_epoch_step_s"] = statistics.mean(first) if first else float("nan")
    res["stage1_cached_step_s"] = statistics.mean(second)
    res["stage1_cached_wall_s"] = time.perf_counter() - t
    res["stage1_cache_speedup"] = res["stage1_step_s"] / res["stage1_cached_step_s"]
    print(f"[{arch}] stage 1 with cache: epoch 1 {res['stage1_cached_first_epoch_step_s']:.3f} s/step "
          f"(encoding), epoch 2 {res['stage1_cached_step_s']:.3f} s/step (cached) -> "
          f"{res['stage1_cache_speedup']:.2f}x", flush=True)

    mx.reset_peak_memory()
    t = time.perf_counter()
    s3 = train(TrainConfig(stage=3, data=str(data["chat"]), out=str(work / "s3"), iters=s3_steps,
                           method="lora", **common))
    recs = [r for r in s3.history if r["type"] == "train"][1:]
    res["stage3_lora_tokens_per_s"] = statistics.mean(r["tokens_per_s"] for r in recs)
    res["stage3_lora_step_s"] = statistics.mean(1.0 / r["steps_per_s"] for r in recs)
    res["stage3_peak_memory_gb"] = max(r["peak_memory_gb"] for r in s3.history if r["type"] == "train")
    res["stage3_tokens_per_step"] = statistics.mean(r["tokens"] for r in recs)
    res["stage3_wall_s"] = time.perf_counter() - t
    print(f"[{arch}] stage 3 LoRA: {res['stage3_lora_tokens_per_s']:.1f} tokens/s "
          f"({res['stage3_lora_step_s']:.2f} s/step of {res['stage3_tokens_per_step']:.0f} tokens), "
          f"peak memory {res['stage3_peak_memory_gb']:.2f} GB", flush=True)
    return res


def main(argv=None) -> int:
    ensure_fast_blas()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", default=["tiny-hybrid", "1.3b"], choices=sorted(PLAN))
    p.add_argument("--ckpt-dir", default="/tmp", help="where the random checkpoints live (default /tmp)")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    a = p.parse_args(argv)
    import mlx.core as mx

    results = []
    for arch in a.arch:
        ckpt = checkpoint(arch, Path(a.ckpt_dir))
        work = Path(tempfile.mkdtemp(prefix=f"dsvl-train-bench-{arch}-"))
        try:
            results.append(run(arch, ckpt, work))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    env = {"device": str(mx.default_device()), "mlx": mx.__version__, "machine": platform.machine(),
           "processor": platform.processor() or platform.machine()}
    print("\n| model | stage 1 s/step | stage 1 cached s/step | speed-up | stage 3 LoRA tokens/s | "
          "stage 3 s/step | peak memory |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['arch']} (batch {r['batch_size']}) | {r['stage1_step_s']:.2f} | "
              f"{r['stage1_cached_step_s']:.2f} | {r['stage1_cache_speedup']:.2f}x | "
              f"{r['stage3_lora_tokens_per_s']:.0f} | {r['stage3_lora_step_s']:.2f} | "
              f"{r['stage3_peak_memory_gb']:.2f} GB |")
    if a.out:
        Path(a.out).write_text(json.dumps({"env": env, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

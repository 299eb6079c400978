"""Training benchmark: stage-1 step time with and without --cache-vision-features, and stage-3
LoRA tokens/s and peak memory, on random checkpoints (tiny-hybrid and the real 1.3B size).

    python benchmarks/train_bench.py [--arch tiny-hybrid 1.3b] [--ckpt-dir /tmp] [--out bench.json]
    python benchmarks/train_bench.py --data-parallel [--arch tiny-hybrid] [--out dp.json]

``--data-parallel`` instead trains stage 3 (LoRA) through the command line on one process with
batch 2B and on two (``mlx.launch -n 2 --backend ring``, this machine) with batch B each, the
same global batches: tokens/s of each (all processes' tokens over rank 0's step time) and how
far the two runs' losses and adapters differ.

Checkpoints are built once with ``make_checkpoint`` under ``--ckpt-dir`` (``dsvl-<arch>``; the
1.3B one is 3.95 GB) and reused.  Each measurement is a real ``mlx_dsvl.train`` run on synthetic
images; step times come from the run's own metrics (one record per step) and exclude the first
step of a run (compilation).  Stage 1 runs two epochs over the same images: with the cache, the
first epoch encodes every image and the second reuses the features.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
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
    from mlx_dsvl.random_checkpoint import make_checkpoint

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
    import json as _json

    import mlx.core as mx

    from mlx_dsvl.testing.synthetic import write_shapes_dataset
    from mlx_dsvl.train import TrainConfig, train

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


def data_parallel(arch: str, ckpt: Path, work: Path) -> dict:
    """Stage-3 LoRA on one process (batch 2B) and on two (batch B each); tokens/s and equality."""
    import mlx.core as mx
    import numpy as np

    from mlx_dsvl.testing.synthetic import write_shapes_dataset
    from mlx_dsvl.train.distributed import launcher

    n_images, batch, steps = PLAN[arch]
    size = json.loads((ckpt / "preprocessor_config.json").read_text())["image_size"]
    data = write_shapes_dataset(work / "data", 2 * n_images, seed=0, size=min(size, 512))
    common = ["-m", "mlx_dsvl.train", "--stage", "3", "--model", str(ckpt), "--data", str(data["chat"]),
              "--iters", str(steps + 1), "--steps-per-report", "1", "--save-every", "0", "--warmup", "0",
              "--no-plot", "--quiet"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    # Two processes on one CPU share its cores: OpenBLAS threads of each, half of them.
    threads = max(1, (os.cpu_count() or 2) // 2)
    runs = {1: [sys.executable, *common, "--out", str(work / "one"), "--batch-size", str(2 * batch)],
            2: [*launcher(), "-n", "2", "--backend", "ring", "--env", f"OPENBLAS_NUM_THREADS={threads}", "--",
                sys.executable, *common, "--out", str(work / "two"), "--batch-size", str(batch)]}
    res = {"arch": arch, "global_batch": 2 * batch, "steps_measured": steps, "blas_threads_per_process": threads}
    recs = {}
    for n, cmd in runs.items():
        t = time.perf_counter()
        subprocess.run(cmd, env=env, check=True)
        out = work / ("one" if n == 1 else "two")
        recs[n] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        timed = recs[n][1:]  # the first step compiles
        res[f"tokens_per_s_{n}"] = sum(r["tokens"] for r in timed) / sum(1 / r["steps_per_s"] for r in timed)
        res[f"wall_s_{n}"] = time.perf_counter() - t
        print(f"[{arch}] {n} process(es): {res[f'tokens_per_s_{n}']:.0f} tokens/s", flush=True)
    res["speedup"] = res["tokens_per_s_2"] / res["tokens_per_s_1"]
    res["max_rel_loss_diff"] = max(abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(recs[1], recs[2]))
    wa, wb = (mx.load(str(work / d / "adapters.safetensors")) for d in ("one", "two"))
    res["max_weight_diff"] = max(float(np.abs(np.array(wa[k]) - np.array(wb[k])).max()) for k in wa)
    print(f"[{arch}] 2 vs 1 process: {res['speedup']:.2f}x; max relative loss difference "
          f"{res['max_rel_loss_diff']:.1e}, max adapter difference {res['max_weight_diff']:.1e}", flush=True)
    return res


def main(argv=None) -> int:
    ensure_fast_blas()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", default=["tiny-hybrid", "1.3b"], choices=sorted(PLAN))
    p.add_argument("--ckpt-dir", default="/tmp", help="where the random checkpoints live (default /tmp)")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    p.add_argument("--data-parallel", action="store_true",
                   help="measure one process against two (mlx.launch) instead")
    a = p.parse_args(argv)
    import mlx.core as mx

    results = []
    for arch in a.arch:
        ckpt = checkpoint(arch, Path(a.ckpt_dir))
        work = Path(tempfile.mkdtemp(prefix=f"dsvl-train-bench-{arch}-"))
        try:
            results.append((data_parallel if a.data_parallel else run)(arch, ckpt, work))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    env = {"device": str(mx.default_device()), "mlx": mx.__version__, "machine": platform.machine(),
           "processor": platform.processor() or platform.machine()}
    if a.data_parallel:
        print("\n| model | global batch | 1 process tokens/s | 2 processes tokens/s | speed-up | "
              "max rel. loss diff | max adapter diff |")
        print("|---|---|---|---|---|---|---|")
        for r in results:
            print(f"| {r['arch']} | {r['global_batch']} | {r['tokens_per_s_1']:.0f} | {r['tokens_per_s_2']:.0f} | "
                  f"{r['speedup']:.2f}x | {r['max_rel_loss_diff']:.1e} | {r['max_weight_diff']:.1e} |")
        if a.out:
            Path(a.out).write_text(json.dumps({"env": env, "results": results}, indent=2))
        return 0
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

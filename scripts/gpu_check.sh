#!/usr/bin/env bash
# GPU check on a CUDA machine (aim: under 8 minutes).
#   1. installs MLX's CUDA backend (the cuda12 / cuda13 extra, from nvidia-smi's CUDA version);
#   2. makes the random 1.3B and 7B checkpoints (in the background, while 3 runs);
#   3. runs the parity tests with MLX's default device = the GPU (float32);
#   4. benchmarks the 1.3B and 7B in bfloat16 (with --compare: bare mlx-lm, transformers on CUDA,
#      the decode bound) and with a 4-bit LLM + bfloat16 vision (peak memory);
#   5. prints one summary table (logs and JSON in $OUT or ./gpu-check/).
#
# Usage: bash scripts/gpu_check.sh
#   CUDA_EXTRA=cuda13   force the extra
#   WHEELS=DIR          a machine without a package index: install mlx, mlx-cuda-N and mlx-lm from
#                       DIR's wheels without dependencies (torch, transformers and NVIDIA's CUDA
#                       libraries must already be installed, as on a PyTorch CUDA image)
#   ARCHS="1.3b 7b"     the benchmarked sizes;  STEP_TIMEOUT=300  seconds per step at most
#   DEVICE=cpu          rehearse the script on a machine without a GPU
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-gpu-check}"
mkdir -p "$OUT_DIR"
ARCHS="${ARCHS:-1.3b 7b}"
STEP_TIMEOUT="${STEP_TIMEOUT:-300}"
DEVICE="${DEVICE:-gpu}"
export MLX_DSVL_CACHE="${MLX_DSVL_CACHE:-$HOME/.cache/mlx_dsvl}"
export PYTHONUNBUFFERED=1
start=$(date +%s)
say() { echo "== [$(( $(date +%s) - start )) s] $*"; }

if [ -z "${CUDA_EXTRA:-}" ]; then
    major=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: \([0-9]*\).*/\1/p' | head -1)
    CUDA_EXTRA=$([ "${major:-12}" -ge 13 ] && echo cuda13 || echo cuda12)
fi
if [ -n "${WHEELS:-}" ]; then
    say "installing MLX from $WHEELS (offline, next to the system's torch and CUDA libraries)"
    PY=python3
    SITE="${SITE:-/tmp/mlx-dsvl-site}"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$WHEELS"/*.whl || exit 1
    # mlx-cuda's libmlx.so finds cuBLAS, cuDNN, NVRTC, ... at $ORIGIN/../../nvidia: point that
    # at the NVIDIA wheels PyTorch brought
    nv=$($PY -c "import nvidia, os; print(list(nvidia.__path__)[0])" 2>/dev/null) \
        && [ ! -e "$SITE/nvidia" ] && ln -s "$nv" "$SITE/nvidia"
    export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
    say "installing .[${CUDA_EXTRA},test]"
    python3 -m venv .gpu-venv
    # shellcheck disable=SC1091
    source .gpu-venv/bin/activate
    PY=python
    pip install -q --upgrade pip
    pip install -q -e ".[${CUDA_EXTRA},test]" || exit 1
fi
DEVICE=$DEVICE $PY - <<'PY' || exit 1
import os
import mlx.core as mx
gpu = os.environ["DEVICE"] == "gpu"
assert mx.is_available(mx.gpu) or not gpu, "MLX sees no GPU"
mx.set_default_device(mx.gpu if gpu else mx.cpu)
print("MLX", mx.__version__, mx.default_device(), mx.device_info())
a = mx.random.normal((256, 256))
print("matmul ok:", float((a @ a).sum()) == float((a @ a).sum()))
PY

say "making the random checkpoints ($ARCHS) in $MLX_DSVL_CACHE"
pids=()
for arch in $ARCHS; do
    $PY -c "from mlx_dsvl.testing.make_checkpoint import cached_checkpoint as c; c('$arch')" \
        > "$OUT_DIR/make-$arch.txt" 2>&1 &
    pids+=($!)
done

say "parity tests on the GPU (float32 without TF32)"
MLX_ENABLE_TF32=0 timeout "$STEP_TIMEOUT" $PY -m pytest -q -p no:cacheprovider tests/parity tests/test_model.py \
    tests/test_generate.py -k "not cli" > "$OUT_DIR/parity.txt" 2>&1
echo "parity exit $?: $(tail -1 "$OUT_DIR/parity.txt")"
for p in "${pids[@]}"; do wait "$p" || echo "checkpoint maker $p failed (see $OUT_DIR/make-*.txt)"; done

for arch in $ARCHS; do
    for q in 4 none; do
        args=(--arch "$arch" --device "$DEVICE" --dtype bfloat16 --max-tokens 64)
        if [ "$q" = 4 ]; then args+=(--quantize 4); else args+=(--compare); fi
        say "bench ${args[*]}"
        timeout "$STEP_TIMEOUT" $PY -m mlx_dsvl.bench "${args[@]}" --json "$OUT_DIR/bench-$arch-$q.json" \
            > "$OUT_DIR/bench-$arch-$q.txt" 2>&1 || { echo "failed:"; tail -5 "$OUT_DIR/bench-$arch-$q.txt"; }
    done
done

$PY - "$OUT_DIR" <<'PY'
import glob, json, sys
rows = [json.load(open(f)) for f in sorted(glob.glob(f"{sys.argv[1]}/bench-*.json"))]
cols = ["arch", "quantize", "dtype", "load_s", "sam_ms", "siglip_ms", "aligner_ms", "prompt_tokens",
        "prefill_tps", "cold_ttft_s", "ttft_s", "decode_tps", "turn2_over_turn1", "weights_memory_gb",
        "peak_memory_gb", "decode_ratio", "decode_fraction_of_bound", "ours_vision_aligner_ms",
        "torch_vision_aligner_ms", "ours_vision_prefill_s", "torch_vision_prefill_s"]
print(rows[0]["device"] if rows else "no benchmark finished")
print("| " + " | ".join(cols) + " |")
print("|" + "---|" * len(cols))
for r in rows:
    print("| " + " | ".join(f"{r.get(c):.3g}" if isinstance(r.get(c), float) else str(r.get(c, "-")) for c in cols) + " |")
PY
say "done"

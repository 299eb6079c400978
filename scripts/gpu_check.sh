#!/usr/bin/env bash
# GPU check on a CUDA machine (aim: under 6 minutes).
#   1. installs MLX's CUDA backend (the cuda12 / cuda13 extra, from nvidia-smi's CUDA version);
#   2. makes the random 1.3B and 7B checkpoints (in the background, while 3 runs);
#   3. runs the parity and session tests with MLX's default device = the GPU (float32);
#   4. benchmarks the 1.3B and 7B with a 4-bit LLM (quantized while loading) + bfloat16 vision
#      (first forward, warm-up, turns 1-6, the follow-up breakdown, first-use replay, load and run
#      peaks; the 1.3B also with an 8-bit KV cache and plain/8/4-bit KV over 4096 tokens) and in
#      bfloat16 (with --compare: bare mlx-lm decode, transformers on CUDA, the decode bound);
#      then the "what fits" peaks: 4-bit LLM, 8-bit vision (1.3B: 4-bit), 8-bit KV, one image
#      and a ~2048-token conversation (bench --context);
#   5. converts the 1.3B with --quantize and measures loading the folder;
#   6. prints the summary tables (logs and JSON in $OUT or ./gpu-check/).
#
# Usage: bash scripts/gpu_check.sh
#   CUDA_EXTRA=cuda13   force the extra
#   WHEELS=DIR          a machine without a package index: install mlx, mlx-cuda-N and mlx-lm from
#                       DIR's wheels without dependencies (torch, transformers and NVIDIA's CUDA
#                       libraries must already be installed, as on a PyTorch CUDA image)
#   NO_INSTALL=1        use the current Python environment as it is
#   ARCHS="1.3b 7b"     the benchmarked sizes;  STEP_TIMEOUT=300  seconds per step at most
#   DEVICE=cpu          rehearse the script on a machine without a GPU (with ARCHS=tiny-hybrid)
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
if [ -n "${NO_INSTALL:-}" ]; then
    PY=${PY:-python3}
elif [ -n "${WHEELS:-}" ]; then
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
    $PY -c "from mlx_dsvl.random_checkpoint import cached_checkpoint as c; c('$arch')" \
        > "$OUT_DIR/make-$arch.txt" 2>&1 &
    pids+=($!)
done

say "parity and session tests on the GPU (float32 without TF32)"
MLX_ENABLE_TF32=0 timeout "$STEP_TIMEOUT" $PY -m pytest -q -p no:cacheprovider tests/parity tests/test_model.py \
    tests/test_generate.py tests/test_session.py -k "not cli" > "$OUT_DIR/parity.txt" 2>&1
echo "parity exit $?: $(tail -1 "$OUT_DIR/parity.txt")"
for p in "${pids[@]}"; do wait "$p" || echo "checkpoint maker $p failed (see $OUT_DIR/make-*.txt)"; done

bench() {  # bench NAME ARGS...: one benchmark, its JSON and log in $OUT_DIR
    local name=$1
    shift
    say "bench $*"
    timeout "$STEP_TIMEOUT" $PY -m mlx_dsvl.bench --device "$DEVICE" --max-tokens 64 "$@" \
        --json "$OUT_DIR/bench-$name.json" > "$OUT_DIR/bench-$name.txt" 2>&1 \
        || { echo "failed:"; tail -5 "$OUT_DIR/bench-$name.txt"; }
}
kv=(--kv-context 4096)  # the first size only: plain, 8-bit and 4-bit KV over 4096 tokens
for arch in $ARCHS; do
    # 4-bit first: the first forward of the script compiles its kernels (cold_ttft_s)
    bench "$arch-4" --arch "$arch" --dtype bfloat16 --quantize 4 "${kv[@]}"
    kv=()
    bench "$arch-none" --arch "$arch" --dtype bfloat16 --compare
done
# The 8 GB targets: one image and a ~2048-token conversation (docs/PERFORMANCE.md, "what fits")
for arch in $ARCHS; do
    vision=8; [ "$arch" = 1.3b ] && vision=4
    bench "$arch-fit" --arch "$arch" --dtype bfloat16 --quantize 4 --quantize-vision "$vision" --kv-bits 8 \
        --turns 0 --context 2080 --max-tokens 8
done

arch=${ARCHS%% *}
say "convert --quantize ($arch), then load the folder"
timeout "$STEP_TIMEOUT" $PY -m mlx_dsvl.convert --model "$MLX_DSVL_CACHE/checkpoints/$arch-seed0" --out "$OUT_DIR/q4-$arch" \
    --quantize --force > "$OUT_DIR/convert-$arch.txt" 2>&1 \
    && DEVICE=$DEVICE timeout "$STEP_TIMEOUT" $PY - "$OUT_DIR/q4-$arch" > "$OUT_DIR/bench-$arch-converted.json" <<'PY' \
    || { echo "failed:"; tail -5 "$OUT_DIR/convert-$arch.txt" "$OUT_DIR/bench-$arch-converted.json"; }
import json, os, sys
import mlx.core as mx
from mlx_dsvl.device import describe_device, select_device
import mlx_dsvl
select_device(os.environ["DEVICE"])
model, _ = mlx_dsvl.load(sys.argv[1], dtype="bfloat16")
mx.clear_cache()
print(json.dumps({"device": describe_device(), "arch": sys.argv[1], "quantize": 4, "dtype": "bfloat16",
                  "load_peak_memory_gb": mx.get_peak_memory() / 1e9, "weights_memory_gb": mx.get_active_memory() / 1e9}))
PY
rm -rf "$OUT_DIR/q4-$arch"

$PY - "$OUT_DIR" <<'PY'
import glob, json, os, sys
rows = [(os.path.basename(f)[6:-5], json.load(open(f))) for f in sorted(glob.glob(f"{sys.argv[1]}/bench-*.json"))]
print(rows[0][1]["device"] if rows else "no benchmark finished")

def table(title, cols):
    print(f"\n{title}\n| run | " + " | ".join(cols) + " |\n|" + "---|" * (len(cols) + 1))
    for name, r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "-")
            if c == "turns" and isinstance(v, list):
                v = " ".join(f"{t['new_tokens']}:{t['over_turn1']:.2f}" for t in v)
            elif c == "first_use_ms" and isinstance(v, list):
                v = max(v[1:])
            elif c == "followup_breakdown_ms" and isinstance(v, dict):
                v = " ".join(f"{k[:-3]}={v[k]:.1f}" for k in v if k.endswith("_ms"))
            cells.append(f"{v:.3g}" if isinstance(v, float) else str(v))
        print(f"| {name} | " + " | ".join(cells) + " |")

table("Turns (time to first token; turns: new tokens:fraction of turn 1)",
      ["cold_ttft_s", "warmup_s", "prompt_tokens", "ttft_s", "turns", "followup_max_over_turn1", "first_use_ms"])
table("A follow-up turn, stage by stage (ms)", ["followup_breakdown_ms"])
table("Memory (GB)", ["load_s", "load_peak_memory_gb", "weights_memory_gb", "peak_memory_gb", "kv_cache_gb",
                      "kv16_peak_gb", "kv8_peak_gb", "kv4_peak_gb", "kv8_max_logit_diff", "kv4_max_logit_diff",
                      "kv_logit_scale"])
table("Fit: one image and a long conversation (GB)",
      ["quantize", "quantize_vision", "kv_bits", "long_tokens", "long_peak_gb", "long_predicted_peak_gb",
       "long_kv_cache_gb", "long_ttft_s", "long_decode_tps"])
table("Speed", ["sam_ms", "siglip_ms", "aligner_ms", "prefill_tps", "decode_tps", "decode_ratio",
                "decode_penalty_ratio", "decode_fraction_of_bound", "ours_vision_aligner_ms",
                "torch_vision_aligner_ms", "ours_vision_prefill_s", "torch_vision_prefill_s"])
PY
say "done"

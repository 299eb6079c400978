#!/usr/bin/env bash
# GPU check on a CUDA machine (aim: under 8 minutes).
#   1. installs the matching cuda extra (cuda12 / cuda13, from nvidia-smi's CUDA version);
#   2. runs the parity tests with MLX's default device = the GPU (float32);
#   3. benchmarks the 1.3B and 7B random checkpoints in bfloat16 and with a 4-bit LLM;
#   4. prints one summary table (JSON files in $OUT or ./gpu-check/).
# Usage: bash scripts/gpu_check.sh        (CUDA_EXTRA=cuda13 to force the extra)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-gpu-check}"
mkdir -p "$OUT_DIR"
start=$(date +%s)

if [ -z "${CUDA_EXTRA:-}" ]; then
    major=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: \([0-9]*\).*/\1/p' | head -1)
    CUDA_EXTRA=$([ "${major:-12}" -ge 13 ] && echo cuda13 || echo cuda12)
fi
echo "== installing .[${CUDA_EXTRA},test]"
python3 -m venv .gpu-venv
# shellcheck disable=SC1091
source .gpu-venv/bin/activate
pip install -q --upgrade pip
pip install -q -e ".[${CUDA_EXTRA},test]"
python - <<'PY'
import mlx.core as mx
assert mx.is_available(mx.gpu), "MLX sees no GPU"
mx.set_default_device(mx.gpu)
print("MLX device:", mx.default_device(), mx.device_info())
PY

echo "== parity tests on the GPU"
MLX_DSVL_CACHE="$PWD/$OUT_DIR/cache" python -m pytest -q tests/parity tests/test_model.py \
    tests/test_generate.py -k "not cli" 2>&1 | tee "$OUT_DIR/parity.txt" | tail -3

echo "== benchmarks"
for arch in 1.3b 7b; do
    for q in none 4; do
        extra=(); [ "$q" = 4 ] && extra=(--quantize 4)
        python -m mlx_dsvl.bench --arch "$arch" --device gpu --dtype bfloat16 "${extra[@]}" \
            --max-tokens 64 --compare --json "$OUT_DIR/bench-$arch-$q.json" > "$OUT_DIR/bench-$arch-$q.txt" 2>&1 \
            || echo "bench $arch q=$q failed: see $OUT_DIR/bench-$arch-$q.txt"
    done
done

python - "$OUT_DIR" <<'PY'
import glob, json, sys
rows = [json.load(open(f)) for f in sorted(glob.glob(f"{sys.argv[1]}/bench-*.json"))]
cols = ["arch", "quantize", "dtype", "load_s", "sam_ms", "siglip_ms", "aligner_ms", "prefill_tps",
        "ttft_s", "decode_tps", "decode_ratio", "decode_fraction_of_bound", "turn2_ttft_s", "peak_memory_gb"]
print("| " + " | ".join(cols) + " |")
print("|" + "---|" * len(cols))
for r in rows:
    print("| " + " | ".join(f"{r.get(c):.3g}" if isinstance(r.get(c), float) else str(r.get(c, "-")) for c in cols) + " |")
PY
echo "== done in $(( $(date +%s) - start )) s"

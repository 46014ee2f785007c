#!/usr/bin/env bash
# The GPU parts of issues #2, #3 and #6, meant for a lent GPU machine (device tool) or any CUDA box.
#
#   here:   .venv/bin/python scripts/gpu_wheels.py        # wheels the machine lacks -> .whl/
#   device: run(command="bash scripts/gpu_checks.sh env load semantics", carry=[".whl"])
#           run(command="bash scripts/gpu_checks.sh qlora strategies", carry=[".whl"])
#
# Parts (each under its own time limit, so one slow part cannot eat a 10-minute call):
#   env         GPU, driver and package versions; bitsandbytes nf4 round trip on the GPU
#   load        tests/engine/test_gpu.py: tiny model in nf4 + generation, CUDA vs CPU token
#               selection, full-size (7B, random weights) nf4 load -> gpu_load.json
#   semantics   engine.benchmarks.cuda_semantics -> cuda_semantics.json (docs/verification.md D1, D3)
#   qlora       engine.benchmarks.finetune_gpu -> qlora_gpu.json
#   strategies  engine.benchmarks.strategies --device cuda -> strategies_gpu.md/.csv/.png
# Figures go to docs/benchmarks/ and are copied to $OUT with the log (the device tool brings back
# at most 8 files from $OUT); commit them from there. Exit status: the number of failed parts.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-$PWD/.cache/gpu-out}
BENCH=docs/benchmarks
WHEELS=${WHEELS:-.whl}
mkdir -p "$OUT" "$BENCH"
export PY OUT BENCH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# the parent folder of the full-size random checkpoint (GEOVQA_BIG_TMP/geollava-7b-random): the
# script removes that checkpoint at the end, never anything else in the folder
export GEOVQA_BIG_TMP=${GEOVQA_BIG_TMP:-/tmp/geovqa-big}
mkdir -p "$GEOVQA_BIG_TMP"
LOG="$OUT/gpu_checks.log"

if compgen -G "$WHEELS/*.whl" >/dev/null; then
    site=/tmp/geovqa-site
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "$WHEELS"/*.whl || { echo "installing $WHEELS failed" >&2; exit 100; }
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

part_env() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
    "$PY" - <<'PYCODE'
import importlib.metadata as md
import torch
for name in ("torch", "transformers", "tokenizers", "accelerate", "peft", "bitsandbytes",
             "rasterio", "shapely", "numpy", "safetensors"):
    try:
        print(f"{name:14s} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name:14s} MISSING")
assert torch.cuda.is_available(), "torch sees no CUDA GPU"
import bitsandbytes.functional as F
x = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
q, state = F.quantize_4bit(x, quant_type="nf4")
err = (F.dequantize_4bit(q, state) - x).abs().mean().item()
print(f"nf4 round trip on {torch.cuda.get_device_name(0)}: mean abs error {err:.4f}")
assert err < 0.2
PYCODE
}

part_load() {
    "$PY" -m pytest tests/engine/test_gpu.py -v -p no:cacheprovider -rs \
        && cp "$BENCH/gpu_load.json" "$OUT/"
}

part_semantics() {
    "$PY" -m engine.benchmarks.cuda_semantics --json "$BENCH/cuda_semantics.json"
}

part_qlora() {
    "$PY" -m engine.benchmarks.finetune_gpu --json "$BENCH/qlora_gpu.json"
}

part_strategies() {
    # shellcheck disable=SC2086  # STRATEGY_SIZES is a list of numbers
    "$PY" -m engine.benchmarks.strategies --device cuda --out "$BENCH" \
        --sizes ${STRATEGY_SIZES:-2048 8192 16384}
    local rc=$?
    cp "$BENCH"/strategies_gpu.* "$OUT/" 2>/dev/null  # rows are written after every size
    return $rc
}

# seconds each part may take (override with LIMIT_<part>=N)
declare -A LIMIT=([env]=120 [load]=540 [semantics]=60 [qlora]=540 [strategies]=540)

[ $# -gt 0 ] || set -- env load semantics
failed=0
for part in "$@"; do
    if [ -z "${LIMIT[$part]:-}" ]; then
        echo "unknown part '$part' (env load semantics qlora strategies)" | tee -a "$LOG" >&2
        failed=$((failed + 1))
        continue
    fi
    limit_var="LIMIT_$part"
    limit=${!limit_var:-${LIMIT[$part]}}
    echo "== $part (limit ${limit}s) $(date -u +%H:%M:%S)" | tee -a "$LOG"
    start=$SECONDS
    # a part runs in a subshell of this script under `timeout`; its output goes to the log too
    timeout --kill-after=10 "$limit" bash -c "$(declare -f "part_$part"); part_$part" \
        > >(tee -a "$LOG") 2>&1
    rc=$?
    echo "== $part: exit $rc after $((SECONDS - start))s" | tee -a "$LOG"
    [ $rc -eq 0 ] || failed=$((failed + 1))
done
rm -rf "$GEOVQA_BIG_TMP/geollava-7b-random"
rmdir "$GEOVQA_BIG_TMP" 2>/dev/null || true  # only when nothing else is in it
exit $failed

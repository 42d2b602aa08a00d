#!/usr/bin/env bash
# One device call: CUDA decode kernel checks with the current defaults, the variant sweep at 128K, and the
# chunked-prefill GPU check (bf16, 4 layers) after the session-3 dequantize refactor.
#   bash benchmarks/run_cuda_variants_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/out}
W=/tmp/cuda_var; mkdir -p "$OUT" $W
OUT=$W timeout 120 python benchmarks/check_cuda_decode.py --skip-long > $W/check.log 2>&1; grep FAIL $W/check.log
OUT=$W timeout 100 python benchmarks/cuda_decode_variants.py "" "TB=64" \
  > $W/variants.log 2>&1; grep -E "^\{" $W/variants.log
OUT=$W timeout 90 python benchmarks/gpu_checks.py --layers 4 --dtype bfloat16 --prefill-only 16484 \
  --name gpu_checks_prefill_bfloat16_recheck > $W/prefill.log 2>&1; grep "'check'" $W/prefill.log
tar -czf "$OUT/cuda_var.tar.gz" -C $W .

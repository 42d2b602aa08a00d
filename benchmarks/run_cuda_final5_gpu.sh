#!/usr/bin/env bash
# Session 5 final GPU runs of the committed default kernel (staged outlier slots, QREG/KCH, whole-wave splits).
#   bash benchmarks/run_cuda_final5_gpu.sh a   (~6 min: oracle check, bf16 e2e incl. 32K and 128K x 4, fp16 model checks)
#   bash benchmarks/run_cuda_final5_gpu.sh b   (~5 min: decode_attention table b1/b8 at 128K/512K, bf16 model checks)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ "${1:-a}" = a ]; then
  timeout 150 python benchmarks/check_cuda_decode.py --name check_cuda_decode_final5 > "$OUT/check.log" 2>&1
  grep FAILURES "$OUT/check.log"
  timeout 260 python benchmarks/e2e_decode.py --contexts 32768 131072 524288 --extra 131072x4 --methods \
    kvquant_nuq4_graph kvquant_nuq2_graph --name e2e_decode_bf16_final5 > "$OUT/e2e.log" 2>&1; grep "^{" "$OUT/e2e.log"
  timeout 110 python benchmarks/gpu_checks.py --layers 4 --dtype float16 --name gpu_checks_fp16_final5 \
    > "$OUT/gpu_checks.log" 2>&1; grep "'check'" "$OUT/gpu_checks.log"
else
  timeout 200 python benchmarks/decode_attention.py --contexts 131072 524288 --batches 1 8 --bits 4 2 --no-append \
    --tag _cuda_final5 > "$OUT/decode.log" 2>&1; grep -E "^\| (1|8) " "$OUT/decode.log"
  timeout 110 python benchmarks/gpu_checks.py --layers 4 --dtype bfloat16 --name gpu_checks_bf16_final5 \
    > "$OUT/gpu_checks.log" 2>&1; grep "'check'" "$OUT/gpu_checks.log"
fi
rm -f "$OUT"/e2e_decode_partial.jsonl

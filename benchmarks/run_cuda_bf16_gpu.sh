#!/usr/bin/env bash
# Next GPU step for bf16 models (not yet run): check the CUDA kernel's bf16 inputs, and if every case passes,
# time one layer and the end-to-end bf16 decode (the issue's e2e model is bf16) with KVQUANT_CUDA_BF16=1.
# If it passes, set kvquant_hf.kernels.cuda_decode.CUDA_BF16_DEFAULT's default to "1".
#   bash benchmarks/run_cuda_bf16_gpu.sh      (~5 min)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/out}
W=/tmp/cuda_bf16; mkdir -p "$OUT" $W
OUT=$W timeout 150 python benchmarks/check_cuda_decode.py --bf16 --name check_cuda_decode_bf16 > $W/check.log 2>&1
grep FAIL $W/check.log
if grep -q "FAILURES: 0" $W/check.log; then
  export KVQUANT_CUDA_BF16=1
  OUT=$W timeout 100 python benchmarks/decode_attention.py --quick --dtype bfloat16 --lut nf --tag _cuda_bf16_nf \
    > $W/decode.log 2>&1; grep -E "^\| 1 " $W/decode.log
  OUT=$W timeout 200 python benchmarks/e2e_decode.py --contexts 131072 524288 --extra \
    --methods kvquant_nuq4_graph kvquant_nuq2_graph --name e2e_decode_bf16_cuda > $W/e2e.log 2>&1; grep ms_per $W/e2e.log
  OUT=$W timeout 100 python benchmarks/gpu_checks.py --layers 4 --dtype bfloat16 --name gpu_checks_bf16_cuda \
    > $W/gpu_checks.log 2>&1; grep "'check'" $W/gpu_checks.log
fi
tar -czf "$OUT/cuda_bf16.tar.gz" -C $W .

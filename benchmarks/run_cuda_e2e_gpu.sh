#!/usr/bin/env bash
# The CUDA decode kernel as the default decode path, one device call (~8 min): correctness (check_cuda_decode.py),
# the decode-attention table (fp16, batch 1 and 8), end-to-end CUDA-graph decode at 128K and 512K, and the
# greedy/teacher-forced checks of a 4-layer fp16 Llama-3-8B shape. Results tarred to $OUT/cuda_e2e.tar.gz.
#   bash benchmarks/run_cuda_e2e_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/out}
W=/tmp/cuda_e2e; mkdir -p "$OUT" $W
OUT=$W timeout 150 python benchmarks/check_cuda_decode.py > $W/check.log 2>&1; grep FAIL $W/check.log
OUT=$W timeout 150 python benchmarks/decode_attention.py --contexts 32768 131072 524288 --batches 1 8 --bits 4 2 \
  --no-append --tag _cuda > $W/decode.log 2>&1; grep -E "^\| [18] " $W/decode.log
OUT=$W timeout 150 python benchmarks/e2e_decode.py --dtype float16 --contexts 131072 524288 --extra \
  --methods kvquant_nuq4_graph kvquant_nuq2_graph --name e2e_decode_fp16_cuda > $W/e2e.log 2>&1; grep ms_per $W/e2e.log
OUT=$W timeout 100 python benchmarks/gpu_checks.py --layers 4 --dtype float16 --name gpu_checks_fp16_cuda \
  > $W/gpu_checks.log 2>&1; grep "'check'" $W/gpu_checks.log
tar -czf "$OUT/cuda_e2e.tar.gz" -C $W .

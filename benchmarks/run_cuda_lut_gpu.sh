#!/usr/bin/env bash
# CUDA decode kernel with gathered (non-uniform) signpost tables, one device call: correctness, one layer at 128K
# with NormalFloat tables, end-to-end CUDA-graph decode (uncalibrated caches use NormalFloat tables) at 128K/512K.
#   bash benchmarks/run_cuda_lut_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/out}
W=/tmp/cuda_lut; mkdir -p "$OUT" $W
OUT=$W timeout 150 python benchmarks/check_cuda_decode.py > $W/check.log 2>&1; grep -E "FAIL|Error" $W/check.log | head
OUT=$W timeout 100 python benchmarks/decode_attention.py --quick --lut nf --tag _cuda_nf > $W/decode_nf.log 2>&1
grep -E "^\| 1 |breakdown" $W/decode_nf.log
OUT=$W timeout 100 python benchmarks/decode_attention.py --quick --lut nf --cfg '{"decode_backend": "triton"}' \
  --tag _triton_nf > $W/decode_nf_triton.log 2>&1; grep -E "^\| 1 " $W/decode_nf_triton.log
OUT=$W timeout 200 python benchmarks/e2e_decode.py --dtype float16 --contexts 131072 524288 --extra \
  --methods kvquant_nuq4_graph kvquant_nuq2_graph dynamic --name e2e_decode_fp16_cuda > $W/e2e.log 2>&1
grep ms_per $W/e2e.log
tar -czf "$OUT/cuda_lut.tar.gz" -C $W .

#!/usr/bin/env bash
# The CUDA decode kernel on the H200 in one device call: correctness vs the torch oracle (and the Triton fast
# path), then one decode-attention layer at 128K (Llama-3-8B shape, batch 1) for a few split counts.
#   bash benchmarks/run_cuda_decode_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/out}
W=/tmp/cuda_gpu; mkdir -p "$OUT" $W
OUT=$W timeout 200 python benchmarks/check_cuda_decode.py > $W/check.log 2>&1
grep -v "it/s" $W/check.log | tail -n 25
for s in ${SPLITS:-0 33 66 132}; do
  if [ "$s" = 0 ]; then cfg='{"decode_backend": "cuda"}'; else cfg="{\"decode_backend\": \"cuda\", \"num_splits\": $s}"; fi
  OUT=$W timeout 100 python benchmarks/decode_attention.py --contexts 131072 --batches 1 --bits 4 2 --no-append \
    --cfg "$cfg" --tag _cuda_s$s > $W/time_s$s.log 2>&1
  grep -E "nuq|SDPA|breakdown" $W/time_s$s.log | tail -n 6
done
tar -czf "$OUT/cuda_gpu.tar.gz" -C $W .

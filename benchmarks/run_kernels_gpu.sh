#!/usr/bin/env bash
# The pending kernel checks and timings of issue 4 in one device call (H200, at most ~9 min), tarred to $OUT:
#  1. Triton kernels vs the torch oracle, including the bf16 decode fast-path rows (opt-in until they pass);
#  2. the per-step teacher-forced logits check of backend=triton vs torch on a 4-layer Llama-3-8B shape (bf16);
#  3. one decode-attention layer at 128K in bf16 through the fast path (forced) and through the default dispatch;
#  4. end-to-end decode at 128K (CUDA graph nuq4 vs DynamicCache) for the fp16 model and for the bf16 model with the
#     bf16 fast path on if step 1 passed (KVQUANT_BF16_DECODE=1), else the general kernel.
#
#   bash benchmarks/run_kernels_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/out}
W=/tmp/kernels_gpu; mkdir -p "$OUT" $W
OUT=$W timeout 150 python benchmarks/check_kernels_gpu.py --quick > $W/check_kernels.log 2>&1
bf16_ok=0
if grep -q "bf16 fast path" $W/check_kernels.log && ! grep "bf16 fast path" $W/check_kernels.log | grep -q "'ok': False"; then
  bf16_ok=1
fi
echo "bf16 fast path rows pass: $bf16_ok"
OUT=$W timeout 80 python benchmarks/gpu_checks.py --layers 4 --dtype bfloat16 --name gpu_checks_bf16_4l \
  > $W/gpu_checks.log 2>&1
OUT=$W timeout 90 python benchmarks/decode_attention.py --contexts 131072 --batches 1 --bits 4 2 --no-append \
  --dtype bfloat16 --kernel decode --tag _bf16_fast \
  > $W/decode_bf16_fast.log 2>&1
OUT=$W timeout 100 python benchmarks/e2e_decode.py --dtype float16 --contexts 131072 --extra \
  --methods kvquant_nuq4_graph dynamic --name e2e_decode_fp16 > $W/e2e_fp16.log 2>&1
OUT=$W KVQUANT_BF16_DECODE=$bf16_ok timeout 100 python benchmarks/e2e_decode.py --dtype bfloat16 --contexts 131072 \
  --extra --methods kvquant_nuq4_graph --name e2e_decode_bf16_fastpath$bf16_ok > $W/e2e_bf16.log 2>&1
tar -czf "$OUT/kernels_gpu.tar.gz" -C $W .
for f in $W/*.log; do echo "== $f"; grep -v "it/s" "$f" | tail -n 6; done

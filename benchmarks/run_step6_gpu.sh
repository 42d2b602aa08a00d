#!/usr/bin/env bash
# Session 6, two device calls on the H200 (~6 min each):
#   bash benchmarks/run_step6_gpu.sh a   the exact-block kernel (kvquant_hf.kernels.exact_block.decode_prep: q/key RoPE,
#        sink rows, guard and graph-mode position write in one launch) and the fused RMSNorm checked and timed; the
#        cache-level checks (greedy triton = torch, graph = eager, non-finite guard); bf16 e2e decode with CUDA graphs,
#        with and without fused_norms ("_fn" methods)
#   bash benchmarks/run_step6_gpu.sh b   the float32-oracle check of the CUDA decode kernel with the new split merge,
#        one layer of decode attention at 128K (batch 1 and 8) and the bf16 step profile
#   bash benchmarks/run_step6_gpu.sh c   after the merge reads only the real rows of the split parts (and 16 output
#        channels per program): the oracle check, bf16 model checks, e2e (as in a) and the step profile again
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ "${1:-a}" = a ]; then
  timeout 120 python benchmarks/check_exact_block_gpu.py > "$OUT/exact.log" 2>&1; grep -E "FAILURES|us\)" "$OUT/exact.log"
  timeout 60 python benchmarks/check_nonfinite_gpu.py > "$OUT/nonfinite.log" 2>&1; grep -E "FAILURES" "$OUT/nonfinite.log"
  for dt in bfloat16 float16; do
    timeout 100 python benchmarks/gpu_checks.py --layers 4 --dtype $dt --name gpu_checks_${dt}_s6 \
      > "$OUT/gpu_checks_$dt.log" 2>&1; grep "'check'" "$OUT/gpu_checks_$dt.log"
  done
  timeout 230 python benchmarks/e2e_decode.py --contexts 131072 524288 --extra --methods kvquant_nuq4_graph \
    kvquant_nuq4_graph_fn kvquant_nuq2_graph kvquant_nuq2_graph_fn --skip kvquant_nuq4_graph@524288x1 \
    kvquant_nuq4_graph_fn@524288x1 --name e2e_decode_bf16_s6 > "$OUT/e2e.log" 2>&1; grep "^{" "$OUT/e2e.log"
elif [ "$1" = c ]; then
  timeout 150 python benchmarks/check_cuda_decode.py --skip-long --name check_cuda_decode_s6c > "$OUT/check.log" 2>&1
  grep FAILURES "$OUT/check.log"
  timeout 100 python benchmarks/gpu_checks.py --layers 4 --dtype bfloat16 --name gpu_checks_bfloat16_s6c \
    > "$OUT/gpu_checks.log" 2>&1; grep "'check'" "$OUT/gpu_checks.log"
  timeout 200 python benchmarks/e2e_decode.py --contexts 131072 524288 --extra --methods kvquant_nuq4_graph \
    kvquant_nuq4_graph_fn kvquant_nuq2_graph kvquant_nuq2_graph_fn --skip kvquant_nuq4_graph@524288x1 \
    kvquant_nuq4_graph_fn@524288x1 --name e2e_decode_bf16_s6c > "$OUT/e2e.log" 2>&1; grep "^{" "$OUT/e2e.log"
  timeout 120 python benchmarks/step_profile.py --dtype bfloat16 --contexts 1024 131072 \
    --name step_profile_bfloat16_s6c > "$OUT/profile.log" 2>&1; grep -E "graph_ms|total kernel|merge" "$OUT/profile.log"
  rm -f "$OUT"/*.log
else
  timeout 150 python benchmarks/check_cuda_decode.py --skip-long --name check_cuda_decode_s6 > "$OUT/check.log" 2>&1
  grep FAILURES "$OUT/check.log"
  timeout 150 python benchmarks/decode_attention.py --contexts 131072 --batches 1 8 --bits 4 2 --no-append \
    --tag _s6 > "$OUT/decode.log" 2>&1; grep -E "^\| (1|8) " "$OUT/decode.log"
  timeout 150 python benchmarks/step_profile.py --dtype bfloat16 --contexts 1024 131072 \
    --name step_profile_bfloat16_s6 > "$OUT/profile.log" 2>&1; grep -E "graph_ms|total kernel" "$OUT/profile.log"
fi
rm -f "$OUT"/e2e_decode_partial.jsonl

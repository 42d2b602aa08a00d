#!/usr/bin/env bash
# Session 9, device calls on the H200 (the one-pass CUDA decode kernel, triton_kernels/cuda/packed_decode.cu):
# Calls a-c compare against the RT2=0 / LUTC / VSV variants, whose switches were taken out of the kernel once measured
# (the kept code is what RT2=1, LUTC=1, no VSV built: identical SASS); rerun them at commit cb985cc.
#   bash benchmarks/run_step9_gpu.sh a   the kernel with the R(j) table of cos/sin only in conflict-free padded rows
#        (RT2=1) and 64-bit code / paired scale loads (VEC, VSV; the host picks them from the cache layout): the torch
#        oracle check (every case, 128K included), one layer at 128K for the four combinations, and ncu's shared
#        memory and L1 tables for the old and the new build
#   bash benchmarks/run_step9_gpu.sh b   after the query rows were padded to D + 1 floats (the per-block rotation read
#        them 8-way conflicted): the oracle check (short cases), the 64-bit / paired loads one at a time, LUTC copies
#        of the code-pair tables, and ncu's stall reasons for the new build
#   bash benchmarks/run_step9_gpu.sh c   the kept kernel (RT2, padded query rows, VEC from the layout; paired scale loads
#        removed): score-MMA chains KCH=1/2/4 against the session-8 kernel, the oracle check (every case, fp16; bf16
#        short cases), the GPU pytest tests
#   bash benchmarks/run_step9_gpu.sh d   the issue's benchmarks with the kept kernel: one layer (decode_attention.py)
#        and end to end (e2e_decode.py, bf16 Llama-3-8B shape, CUDA graph)
#   bash benchmarks/run_step9_gpu.sh e   the issue's whole one-layer benchmark (every context, batch and bit width,
#        append rows) with the kept kernel: decode_attention_s9_full.md
#   bash benchmarks/run_step9_gpu.sh f   scores as S^T = K Q^T (KA=1: 8 score MMAs per tile, softmax per token rows):
#        the oracle checks (fp16 every case, bf16 short cases), one layer at 128K against KA=0 (ran at 6a4a546; the
#        KA code was taken out again after it: no gain)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
NCU_SECTIONS="--section SpeedOfLight --section SchedulerStats --section WarpStateStats --section InstructionStats
  --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables"
if [ "${1:-a}" = a ]; then
  python - <<'PY'
import sys; sys.path.insert(0, "benchmarks")
import decode_attention as da
from kvquant_hf.kernels import cuda_decode
for bits in (4, 2):
    print("benchmark cache layout, bits", bits, "vector loads (VEC, VSV):",
          cuda_decode.vector_loads(da.make_packed(1, 4096, bits, da.SLOTS)))
PY
  timeout 200 python benchmarks/check_cuda_decode.py --name check_cuda_decode_s9a > "$OUT/check.log" 2>&1
  grep -E "FAILURES|Error|error|passed" "$OUT/check.log" | head -20
  timeout 200 python benchmarks/cuda_decode_variants.py --name=cuda_decode_s9a "RT2=0 VEC=0 VSV=0" "VEC=0 VSV=0" \
    "RT2=0" "" > "$OUT/variants.log" 2>&1; grep "^{" "$OUT/variants.log"; tail -n 2 "$OUT/variants.log"
  for v in "RT2=0 VEC=0 VSV=0" ""; do
    tag=$( [ -z "$v" ] && echo new || echo old )
    KVQUANT_CUDA_DEFINES="$v" timeout 100 ncu --clock-control none -k regex:kvq_packed_decode -c 1 $NCU_SECTIONS \
      python benchmarks/ncu_decode.py > "$OUT/ncu_decode_s9a_$tag.txt" 2>&1
    grep -E "Duration|Issued Warp|Eligible Warps|L1/TEX Cache Throughput|Mem Busy|Shared|Bank|Wavefronts" \
      "$OUT/ncu_decode_s9a_$tag.txt" | head -30
  done
fi
if [ "${1:-a}" = b ]; then
  timeout 150 python benchmarks/check_cuda_decode.py --skip-long --name check_cuda_decode_s9b > "$OUT/check.log" 2>&1
  grep -E "FAILURES|Error|error" "$OUT/check.log" | head -20
  timeout 250 python benchmarks/cuda_decode_variants.py --name=cuda_decode_s9b "RT2=0 VEC=0 VSV=0" "VEC=0 VSV=0" \
    "VEC=1 VSV=0" "VEC=0 VSV=1" "VEC=0 VSV=0 LUTC=8" "VEC=0 VSV=0 LUTC=4" > "$OUT/variants.log" 2>&1
  grep "^{" "$OUT/variants.log"; tail -n 2 "$OUT/variants.log"
  KVQUANT_CUDA_DEFINES="VEC=0 VSV=0" timeout 100 ncu --clock-control none -k regex:kvq_packed_decode -c 1 \
    $NCU_SECTIONS --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
    python benchmarks/ncu_decode.py > "$OUT/ncu_decode_s9b.txt" 2>&1
  grep -E "Duration|Issued Warp|Eligible Warps|stalled|conflict" "$OUT/ncu_decode_s9b.txt" | head -60
fi
if [ "${1:-a}" = c ]; then
  timeout 200 python benchmarks/cuda_decode_variants.py --name=cuda_decode_s9c "RT2=0 VEC=0" "" "KCH=4" "KCH=1" \
    > "$OUT/variants.log" 2>&1; grep "^{" "$OUT/variants.log"
  timeout 200 python benchmarks/check_cuda_decode.py --name check_cuda_decode_s9c > "$OUT/check.log" 2>&1
  grep -E "FAILURES|Error|error" "$OUT/check.log" | head -20
  timeout 120 python benchmarks/check_cuda_decode.py --bf16 --skip-long --name check_cuda_decode_bf16_s9c \
    > "$OUT/check_bf16.log" 2>&1; grep -E "FAILURES|Error|error" "$OUT/check_bf16.log" | head -20
  timeout 200 python -m pytest -q -m gpu tests -p no:cacheprovider > "$OUT/gpu_pytest_s9.txt" 2>&1
  grep -E "Error|passed|failed" "$OUT/gpu_pytest_s9.txt" | tail -n 8
fi
if [ "${1:-a}" = d ]; then
  timeout 200 python benchmarks/decode_attention.py --contexts 131072 --batches 1 8 --bits 4 2 --no-append --tag _s9 \
    > "$OUT/da.log" 2>&1; grep -E "\| (1|8) \| 131072" "$OUT"/decode_attention_s9.md
  timeout 300 python benchmarks/e2e_decode.py --contexts 131072 524288 --extra --tables nf uniform --methods \
    kvquant_nuq4_graph kvquant_nuq4_graph_ff kvquant_nuq2_graph_ff --skip kvquant_nuq4_graph@524288x1 \
    kvquant_nuq4_graph_ff@524288x1 --name e2e_decode_bf16_s9 > "$OUT/e2e.log" 2>&1; grep "^{" "$OUT/e2e.log"
  rm -f "$OUT"/e2e_decode_partial.jsonl
fi
if [ "${1:-a}" = e ]; then
  timeout 560 python benchmarks/decode_attention.py --tag _s9_full > "$OUT/da_full.log" 2>&1; tail -n 3 "$OUT/da_full.log"
fi
if [ "${1:-a}" = f ]; then
  timeout 200 python benchmarks/check_cuda_decode.py --name check_cuda_decode_s9f > "$OUT/check.log" 2>&1
  grep -E "FAILURES|Error|error" "$OUT/check.log" | head -20
  timeout 120 python benchmarks/check_cuda_decode.py --bf16 --skip-long --name check_cuda_decode_bf16_s9f \
    > "$OUT/check_bf16.log" 2>&1; grep -E "FAILURES|Error|error" "$OUT/check_bf16.log" | head -20
  timeout 200 python benchmarks/cuda_decode_variants.py --name=cuda_decode_s9f "KA=0" "" "KA=0" "" \
    > "$OUT/variants.log" 2>&1; grep "^{" "$OUT/variants.log"
fi
# g (ran at 8541944; that kernel change was taken out again after it: no gain): the tile loop split into stage / patch /
#    compute (lambdas) and the PIPE=1 software pipeline (the next tile
#    dequantized and patched into a second staging buffer while this one is computed; TB=64 for shared memory):
#    the refactored default against the committed kernel (a copy of the previous commit in .s9old/, carried), the
#    oracle checks (default: short cases; PIPE: every case), one layer at 128K
if [ "${1:-a}" = g ]; then
  (cd .s9old && PYTHONPATH=. timeout 100 python benchmarks/cuda_decode_variants.py --name=cuda_decode_s9g_old "" \
    > "$OUT/variants_old.log" 2>&1; grep "^{" "$OUT/variants_old.log")
  timeout 100 python benchmarks/check_cuda_decode.py --skip-long --name check_cuda_decode_s9g > "$OUT/check.log" 2>&1
  grep -E "FAILURES|Error|error" "$OUT/check.log" | head -20
  KVQUANT_CUDA_DEFINES="PIPE=1 TB=64" timeout 200 python benchmarks/check_cuda_decode.py --name check_cuda_decode_s9g_pipe \
    > "$OUT/check_pipe.log" 2>&1; grep -E "FAILURES|Error|error" "$OUT/check_pipe.log" | head -20
  timeout 200 python benchmarks/cuda_decode_variants.py --name=cuda_decode_s9g "" "TB=64" "PIPE=1 TB=64" \
    > "$OUT/variants.log" 2>&1; grep "^{" "$OUT/variants.log"
fi
# h: the model-level GPU checks with the kept kernel (Llama-3-8B shape, 4 layers, random fp16 weights)
if [ "${1:-a}" = h ]; then
  timeout 220 python benchmarks/gpu_checks.py --layers 4 --dtype float16 --name gpu_checks_fp16_s9 \
    > "$OUT/gpu_checks.log" 2>&1; grep "'check'" "$OUT/gpu_checks.log"; tail -n 2 "$OUT/gpu_checks.log"
fi

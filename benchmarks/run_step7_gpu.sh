#!/usr/bin/env bash
# Session 7, device calls on the H200:
#   bash benchmarks/run_step7_gpu.sh a   (first call; also copies `.mA/part` to /tmp/smol/partA for the SmolLM2 call
#        that follows) the exact-block kernel after the refactor (shared n_nonfinite, whole-row sink copy) checked
#        again; the opt-in fused_projections checked and timed (check_fused_gpu.py); the kernels of one CUDA-graph
#        replay with fused norms and projections at 1K and 128K (step_profile --graph-kernels)
#   bash benchmarks/run_step7_gpu.sh b   bf16 e2e decode with CUDA graphs: fused_norms alone ("_fn") vs fused norms
#        and projections ("_ff"), nuq4 at 128K and nuq2 at 128K / 512K
#   bash benchmarks/run_step7_gpu.sh c   after the append became one launch (quantize_kv_triton): its bit identity
#        and time, the bf16 model checks (graph = eager, triton = torch), e2e (default and "_ff") and the graph profile
#   bash benchmarks/run_step7_gpu.sh d   (first call; copies `.mA/part` too) after the CUDA-graph decoder shares one
#        device-side length per step: the CUDA-graph pytest checks, the bf16 model checks, e2e with NormalFloat
#        (uncalibrated / k-means: gathered) vs uniform tables (calibrate --key-table uniform --value-table uniform)
#   bash benchmarks/run_step7_gpu.sh f   after graph-mode decode stopped building the new token's mask and fused_norms
#        also fuses the residual add with the post-attention norm: fused checks, model checks, CUDA-graph pytest, e2e
#   bash benchmarks/run_step7_gpu.sh g   the GPU pytest tests (after the conftest fix), the kernels of one CUDA-graph
#        replay of the fastest configuration (uniform tables, fused norms and projections) and e2e repeats at 128K
#   bash benchmarks/run_step7_gpu.sh e   (second call: SmolLM2) perplexity of the uniform-table calibration
#        (smollm2-1pct-uu) vs the reference (smollm2-1pct), and the passkey grid for nuq4 / nuq3 with uniform tables
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ "${1:-a}" = a ]; then
  if [ -f .mA/part ]; then mkdir -p /tmp/smol && cp .mA/part /tmp/smol/partA; fi
  timeout 120 python benchmarks/check_exact_block_gpu.py > "$OUT/exact.log" 2>&1; grep -E "FAILURES|us\)" "$OUT/exact.log"
  timeout 150 python benchmarks/check_fused_gpu.py > "$OUT/fused.log" 2>&1; grep "^{" "$OUT/fused.log"
  timeout 200 python benchmarks/step_profile.py --dtype bfloat16 --contexts 1024 131072 --graph-kernels \
    --fused norms projections --name step_profile_graph_bf16_s7 > "$OUT/profile.log" 2>&1
  grep -E "graph_ms|total kernel" "$OUT/profile.log"; tail -n 3 "$OUT/profile.log"
elif [ "$1" = c ]; then
  timeout 120 python benchmarks/check_quantize_kv_gpu.py > "$OUT/qkv.log" 2>&1; grep -E "FAILURES|launch" "$OUT/qkv.log"
  timeout 120 python benchmarks/gpu_checks.py --layers 4 --dtype bfloat16 --name gpu_checks_bfloat16_s7 \
    > "$OUT/gpu_checks.log" 2>&1; grep "'check'" "$OUT/gpu_checks.log"
  timeout 200 python benchmarks/e2e_decode.py --contexts 131072 524288 --extra --methods kvquant_nuq4_graph \
    kvquant_nuq4_graph_ff kvquant_nuq2_graph kvquant_nuq2_graph_ff --skip kvquant_nuq4_graph@524288x1 \
    kvquant_nuq4_graph_ff@524288x1 --name e2e_decode_bf16_s7c > "$OUT/e2e.log" 2>&1; grep "^{" "$OUT/e2e.log"
  timeout 150 python benchmarks/step_profile.py --dtype bfloat16 --contexts 1024 131072 --graph-kernels \
    --fused norms projections --name step_profile_graph_bf16_s7c > "$OUT/profile.log" 2>&1
  grep -E "graph_ms|total kernel" "$OUT/profile.log"
elif [ "$1" = d ]; then
  if [ -f .mA/part ]; then mkdir -p /tmp/smol && cp .mA/part /tmp/smol/partA; fi
  timeout 150 python -m pytest -q -m gpu tests/test_graph_and_benchmarking.py tests/test_cache.py tests/test_cuda_decode.py \
    -p no:cacheprovider > "$OUT/pytest.log" 2>&1; tail -n 2 "$OUT/pytest.log"
  timeout 120 python benchmarks/gpu_checks.py --layers 4 --dtype bfloat16 --name gpu_checks_bfloat16_s7d \
    > "$OUT/gpu_checks.log" 2>&1; grep "'check'" "$OUT/gpu_checks.log"
  timeout 300 python benchmarks/e2e_decode.py --contexts 131072 524288 --extra --tables nf uniform --methods \
    kvquant_nuq4_graph kvquant_nuq4_graph_ff kvquant_nuq2_graph kvquant_nuq2_graph_ff --skip \
    kvquant_nuq4_graph@524288x1 kvquant_nuq4_graph_ff@524288x1 --name e2e_decode_bf16_s7d > "$OUT/e2e.log" 2>&1
  grep "^{" "$OUT/e2e.log"
elif [ "$1" = f ]; then
  timeout 150 python -m pytest -q -m gpu tests/test_graph_and_benchmarking.py tests/test_cache.py tests/test_cuda_decode.py \
    -p no:cacheprovider > "$OUT/pytest.log" 2>&1; grep -E "Error|error|passed|failed" "$OUT/pytest.log" | head -n 12
  timeout 150 python benchmarks/check_fused_gpu.py check_fused_gpu_s7f > "$OUT/fused.log" 2>&1; grep "^{" "$OUT/fused.log"
  timeout 120 python benchmarks/gpu_checks.py --layers 4 --dtype bfloat16 --name gpu_checks_bfloat16_s7f \
    > "$OUT/gpu_checks.log" 2>&1; grep "'check'" "$OUT/gpu_checks.log"
  timeout 300 python benchmarks/e2e_decode.py --contexts 131072 524288 --extra --tables nf uniform --methods \
    kvquant_nuq4_graph kvquant_nuq4_graph_ff kvquant_nuq2_graph_ff --skip kvquant_nuq4_graph@524288x1 \
    kvquant_nuq4_graph_ff@524288x1 --name e2e_decode_bf16_s7f > "$OUT/e2e.log" 2>&1; grep "^{" "$OUT/e2e.log"
elif [ "$1" = g ]; then
  timeout 150 python -m pytest -q -m gpu tests/test_graph_and_benchmarking.py tests/test_cache.py tests/test_cuda_decode.py \
    -p no:cacheprovider > "$OUT/pytest.log" 2>&1; grep -E "Error|passed|failed" "$OUT/pytest.log" | tail -n 8
  timeout 150 python benchmarks/step_profile.py --dtype bfloat16 --contexts 1024 131072 --graph-kernels --tables uniform \
    --fused norms projections --name step_profile_graph_bf16_s7g > "$OUT/profile.log" 2>&1
  grep -E "graph_ms|total kernel" "$OUT/profile.log"
  for i in 1 2; do
    timeout 150 python benchmarks/e2e_decode.py --contexts 131072 --extra --tables nf uniform --methods \
      kvquant_nuq4_graph_ff --name e2e_decode_bf16_s7g$i > "$OUT/e2e$i.log" 2>&1; grep "^{" "$OUT/e2e$i.log"
  done
elif [ "$1" = e ]; then
  . benchmarks/smollm2_gpu_env.sh
  common=(--device cuda --dtype float32 --text-file .gpudata/test.raw.txt --signposts-root $SP --work-dir "$OUT/acc")
  for g in fp16 nuq-1pct nuq-uniform; do
    timeout 420 python benchmarks/accuracy_smollm2.py --groups $g "${common[@]}" > "$OUT/acc_$g.log" 2>&1 &
  done
  W=/tmp/passkey_uu; mkdir -p $W
  for b in 4 3; do
    timeout 420 python -m kvquant_hf.evaluation.passkey --model smollm2 --lengths 2048 4096 8192 \
      --depths 0 0.25 0.5 0.75 1 --trials 10 --signposts "$SP/smollm2-1pct-uu" --device cuda --dtype float32 \
      --json "$W/nuq$b-uniform.json" --methods nuq$b > "$W/nuq$b-uniform.log" 2>&1 &
  done
  wait
  timeout 60 python benchmarks/accuracy_smollm2.py --render-only --work-dir "$OUT/acc" --name accuracy_smollm2_uniform \
    > "$OUT/render.log" 2>&1; tail -n 30 "$OUT/render.log"
  tar -czf "$OUT/passkey_uu.tar.gz" -C $W .
  for f in $W/*.log; do echo "== $f"; grep -v "it/s" "$f" | tail -n 3; done
  rm -f "$OUT"/acc/*.tmp
else
  timeout 400 python benchmarks/e2e_decode.py --contexts 131072 524288 --extra --methods kvquant_nuq4_graph_fn \
    kvquant_nuq4_graph_ff kvquant_nuq2_graph_fn kvquant_nuq2_graph_ff --skip kvquant_nuq4_graph_fn@524288x1 \
    kvquant_nuq4_graph_ff@524288x1 --name e2e_decode_bf16_s7 > "$OUT/e2e.log" 2>&1; grep "^{" "$OUT/e2e.log"
fi
rm -f "$OUT"/*.log "$OUT"/e2e_decode_partial.jsonl

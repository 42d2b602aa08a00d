#!/usr/bin/env bash
# SmolLM2 runs on the GPU machine (H200), all at once on one GPU: the ablation of KVQuant's ideas, passkey
# retrieval with the real cache, chunked-prefill perplexity vs simulated, teacher-forced greedy agreement.
# The model travels in two halves over two device calls (benchmarks/smollm2_gpu_env.sh: first call `.mA/part` to
# /tmp/smol/partA; this call carries `.mB/part`); `.gpudata/` carries the texts and the signpost folders.
# Everything lands in $OUT/smollm2_gpu.tar.gz (+ $OUT/smollm2_gpu_logs.txt).
#
#   bash benchmarks/run_smollm2_gpu.sh [seconds per process, default 420] [ablation windows, default 60]
set -uo pipefail
cd "$(dirname "$0")/.."
LIMIT=${1:-420}
WIN=${2:-60}
. benchmarks/smollm2_gpu_env.sh
W=/tmp/smollm2_gpu; mkdir -p "$OUT" $W/logs
T=.gpudata/test.raw.txt
run() { local name=$1; shift; timeout "$LIMIT" "$@" > $W/logs/$name.txt 2>&1 & }
abl=(--windows "$WIN" --bits 4 3 2 --device cuda --signposts-root $SP --text-file $T)
run abl1 python benchmarks/ablation_smollm2.py "${abl[@]}" --work-dir $W/abl1 --variants full keys-only values-only
run abl2 python benchmarks/ablation_smollm2.py "${abl[@]}" --work-dir $W/abl2 --variants keys-per-token keys-post-rope uniform
run abl3 python benchmarks/ablation_smollm2.py "${abl[@]}" --work-dir $W/abl3 --variants no-fisher fisher-x2 outliers-0
run abl4 python benchmarks/ablation_smollm2.py "${abl[@]}" --work-dir $W/abl4 --variants slots-2 slots-4 sink-0 sink-4
run abl5 python benchmarks/ablation_smollm2.py "${abl[@]}" --work-dir $W/abl5 --variants qnorm opt-uniform opt-uniform-slots-2
run abl6 python benchmarks/ablation_smollm2.py "${abl[@]}" --work-dir $W/abl6 \
  --variants opt-uniform-slots-2-keys-only opt-uniform-slots-2-values-only
run passkey python -m kvquant_hf.evaluation.passkey --model smollm2 --lengths 2048 4096 8192 \
  --depths 0 0.25 0.5 0.75 1 --trials 10 --methods fp16 nuq4 nuq3 kivi2 --signposts $SP/smollm2-1pct \
  --device cuda --dtype float32 --json $W/passkey_smollm2.json
run chunked python -m kvquant_hf.evaluation.perplexity --model smollm2 --text-file $T --windows 4 \
  --methods nuq4 nuq3 nuq2 --signposts $SP/smollm2-1pct --cache real --chunk 1024 --device cuda --dtype float32 \
  --json $W/ppl_chunked_real.json
run simulated4 python -m kvquant_hf.evaluation.perplexity --model smollm2 --text-file $T --windows 4 \
  --methods fp16 nuq4 nuq3 nuq2 --signposts $SP/smollm2-1pct --device cuda --dtype float32 \
  --json $W/ppl_simulated4.json
run agreement env OUT=$W python benchmarks/cache_accuracy_smollm2.py --device cuda --dtype float32 \
  --name cache_agreement_smollm2_gpu --signposts $SP/smollm2-1pct --text-file $T --skip-ppl --skip-bits \
  --agreement-bits 4 3 2 --agreement-uncalibrated
wait
for f in $W/logs/*.txt; do echo "== $f"; grep -v "it/s" "$f" | tail -n 40; done > "$OUT/smollm2_gpu_logs.txt"
tar -czf "$OUT/smollm2_gpu.tar.gz" -C $W --exclude='*.tmp' .
for f in $W/logs/*.txt; do echo "== $f"; grep -v "it/s" "$f" | tail -n 3; done

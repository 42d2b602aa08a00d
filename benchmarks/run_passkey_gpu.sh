#!/usr/bin/env bash
# Passkey retrieval on SmolLM2 on the GPU machine (H200): one process per method, all at once on one GPU, so the
# 8192-token cells fit in one device call. Second of two device calls (benchmarks/smollm2_gpu_env.sh: the first call
# copies `.mA/part` to /tmp/smol/partA; this one carries `.mB/part`, `.gpudata/` and `.whl/`).
# Per-method JSON (checkpointed after every cell) and logs land in $OUT/passkey_gpu.tar.gz;
# `python benchmarks/passkey_table.py DIR` turns them into benchmarks/results/passkey_smollm2.{md,json}.
#
#   bash benchmarks/run_passkey_gpu.sh [seconds per process, default 540] [lengths, default "2048 4096 8192"]
set -uo pipefail
cd "$(dirname "$0")/.."
LIMIT=${1:-540}
LENGTHS=${2:-2048 4096 8192}
. benchmarks/smollm2_gpu_env.sh
W=/tmp/passkey_gpu; mkdir -p "$OUT" $W
# shellcheck disable=SC2086
pk() { local name=$1 sp=$2; shift 2
  timeout "$LIMIT" python -m kvquant_hf.evaluation.passkey --model smollm2 --lengths $LENGTHS \
    --depths 0 0.25 0.5 0.75 1 --trials 10 --signposts "$SP/$sp" --device cuda --dtype float32 \
    --json "$W/$name.json" "$@" > "$W/$name.log" 2>&1 & }
pk fp16 smollm2-1pct --methods fp16
pk nuq4 smollm2-1pct --methods nuq4
pk nuq3 smollm2-1pct --methods nuq3
pk kivi2 smollm2-1pct --methods kivi2
pk nuq3-optu smollm2-1pct-optu --methods nuq3
wait
tar -czf "$OUT/passkey_gpu.tar.gz" -C $W .
for f in $W/*.log; do echo "== $f"; grep -v "it/s" "$f" | tail -n 4; done

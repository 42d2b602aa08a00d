#!/usr/bin/env bash
# Session 7: how much does the passkey grid on SmolLM2 move when only the floating-point precision changes? The
# reference grid (passkey_smollm2*.md) runs the model in float32 on the H200. Here the model runs in float16 and in
# bfloat16 with its own cache ("fp16" method), and nuq4 / nuq3 (reference and optu key signposts) run on a float16
# model (the KVQuantCache's CUDA decode kernel then serves them, as in production). All five processes at once on
# one GPU. Second of two device calls (benchmarks/smollm2_gpu_env.sh: the first copies `.mA/part` to /tmp/smol/partA;
# this one carries `.mB/part`, `.gpudata/` and `.whl/` and starts with the wheel install of the device README).
# Per-method JSON and logs land in $OUT/passkey_dtype.tar.gz; `python benchmarks/passkey_table.py DIR` tabulates.
#
#   bash benchmarks/run_passkey_dtype_gpu.sh [seconds per process, default 480]
set -uo pipefail
cd "$(dirname "$0")/.."
LIMIT=${1:-480}
. benchmarks/smollm2_gpu_env.sh
W=/tmp/passkey_dtype; mkdir -p "$OUT" $W
pk() { local name=$1 dtype=$2 sp=$3; shift 3
  timeout "$LIMIT" python -m kvquant_hf.evaluation.passkey --model smollm2 --lengths 2048 4096 8192 \
    --depths 0 0.25 0.5 0.75 1 --trials 10 --signposts "$SP/$sp" --device cuda --dtype "$dtype" \
    --json "$W/$name.json" "$@" > "$W/$name.log" 2>&1 & }
pk fp16-float16 float16 smollm2-1pct --methods fp16
pk fp16-bfloat16 bfloat16 smollm2-1pct --methods fp16
pk nuq4-float16 float16 smollm2-1pct --methods nuq4
pk nuq3-float16 float16 smollm2-1pct --methods nuq3
pk nuq3-optu-float16 float16 smollm2-1pct-optu --methods nuq3
wait
tar -czf "$OUT/passkey_dtype.tar.gz" -C $W .
for f in $W/*.log; do echo "== $f"; grep -v "it/s" "$f" | tail -n 3; done

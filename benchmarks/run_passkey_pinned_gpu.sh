#!/usr/bin/env bash
# Prepared in session 5 (not yet run): the passkey grid on SmolLM2 with the `--key-table kmeans-pinned` calibration
# (`.gpudata/signposts/smollm2-1pct-pinned`, made by `python calibrate.py --model smollm2 --text-file
# ../shared/data/wikitext-2/valid.tokens.txt --bits 4 3 2 --outlier-fraction 0.01 --sink-tokens 1 --nsamples 16
# --seqlen 2048 --key-table kmeans-pinned --output-dir /work/signposts/smollm2-1pct-pinned`), nuq3 and nuq4, to set
# against fp16 and the reference tables in benchmarks/results/passkey_smollm2.md. Second of two device calls, like
# benchmarks/run_passkey_gpu.sh (the first copies `.mA/part`; this one carries `.mB/part`, `.gpudata/`, `.whl/`).
#   bash benchmarks/run_passkey_pinned_gpu.sh [seconds per process, default 540]
set -uo pipefail
cd "$(dirname "$0")/.."
LIMIT=${1:-540}
. benchmarks/smollm2_gpu_env.sh
W=/tmp/passkey_pinned; mkdir -p "$OUT" $W
pk() { local name=$1; shift
  timeout "$LIMIT" python -m kvquant_hf.evaluation.passkey --model smollm2 --lengths 2048 4096 8192 \
    --depths 0 0.25 0.5 0.75 1 --trials 10 --signposts "$SP/smollm2-1pct-pinned" --device cuda --dtype float32 \
    --json "$W/$name.json" "$@" > "$W/$name.log" 2>&1 & }
pk nuq3-pinned --methods nuq3
pk nuq4-pinned --methods nuq4
wait
tar -czf "$OUT/passkey_pinned.tar.gz" -C $W .
for f in $W/*.log; do echo "== $f"; grep -v "it/s" "$f" | tail -n 4; done

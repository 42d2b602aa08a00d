#!/usr/bin/env bash
# Session 6: the passkey grid on SmolLM2 for nuq3 with the "optpinned" key signposts (Fisher-optimized key
# thresholds of smollm2-1pct-optu + Fisher-weighted k-means key table with its ends pinned at +-1, refitted for those
# thresholds; values of smollm2-1pct), made by
#   python benchmarks/signpost_optpinned_smollm2.py --sample CALIB_SAMPLE --bits 3 \
#     --output /work/signposts/smollm2-1pct-s6-optpinned
# and copied to the ignored carry folder .gpudata/signposts/. Second of two device calls, like
# benchmarks/run_passkey_gpu.sh (the first copies `.mA/part` to /tmp/smol/partA; this one carries `.mB/part`,
# `.gpudata/` and `.whl/`, and starts with the wheel install of the device README).
#   bash benchmarks/run_passkey_optpinned_gpu.sh [seconds, default 520]
set -uo pipefail
cd "$(dirname "$0")/.."
LIMIT=${1:-520}
. benchmarks/smollm2_gpu_env.sh
W=/tmp/passkey_optpinned; mkdir -p "$OUT" $W
timeout "$LIMIT" python -m kvquant_hf.evaluation.passkey --model smollm2 --lengths 2048 4096 8192 \
  --depths 0 0.25 0.5 0.75 1 --trials 10 --signposts "$SP/smollm2-1pct-s6-optpinned" --device cuda --dtype float32 \
  --json "$W/nuq3-optpinned.json" --methods nuq3 > "$W/nuq3-optpinned.log" 2>&1
tar -czf "$OUT/passkey_optpinned.tar.gz" -C $W .
grep -v "it/s" $W/nuq3-optpinned.log | tail -n 20

#!/usr/bin/env bash
# Session 6: answer-token margins of the passkey cells (benchmarks/passkey_margins.py) for fp16 and the four nuq3 key
# calibrations of passkey_smollm2_nuq3_variants.md, trials 0-2 of every cell. Second of two device calls, like
# benchmarks/run_passkey_gpu.sh (the first copies `.mA/part` to /tmp/smol/partA; this one carries `.mB/part`,
# `.gpudata/` and `.whl/`, and starts with the wheel install of the device README).
#   bash benchmarks/run_passkey_margins_gpu.sh [seconds, default 280]
set -uo pipefail
cd "$(dirname "$0")/.."
LIMIT=${1:-280}
. benchmarks/smollm2_gpu_env.sh
timeout "$LIMIT" python benchmarks/passkey_margins.py --trials 3 --setting "nuq3=$SP/smollm2-1pct" \
  --setting "nuq3-pinned=$SP/smollm2-1pct-pinned" --setting "nuq3-optu=$SP/smollm2-1pct-optu" \
  --setting "nuq3-optpinned=$SP/smollm2-1pct-s6-optpinned" 2>&1 | grep "^{" | cut -c1-400

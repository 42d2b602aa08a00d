#!/usr/bin/env bash
# CUDA decode kernel, round 3 (session 5): time LUTX=1 (per-lane single-code signpost tables for gathered grids)
# against the default, check it against the float32 oracle, then run the fp16 end-to-end decode with the faster
# variant that passed (the bf16 run of round 2 used the default of that time).
#   bash benchmarks/run_cuda_round3_gpu.sh      (~5 min on the H200)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 100 python benchmarks/cuda_decode_variants.py --name=cuda_decode_round3 "" "LUTX=1" \
  > "$OUT/variants.log" 2>&1; grep "^{" "$OUT/variants.log"
KVQUANT_CUDA_DEFINES="LUTX=1" timeout 150 python benchmarks/check_cuda_decode.py --skip-long \
  --name check_cuda_decode_lutx > "$OUT/check.log" 2>&1; grep FAILURES "$OUT/check.log"
BEST=$(python - "$OUT" <<'PY'
import ast, sys
rows = [ast.literal_eval(l) for l in open(sys.argv[1] + "/variants.log") if l.startswith("{'variant'")]
ok = "FAILURES: 0" in open(sys.argv[1] + "/check.log").read()
rows = [r for r in rows if ok or r["variant"] == "default"]
best = min(rows, key=lambda r: r["nf nuq4"] + r["nf nuq2"])
print("" if best["variant"] == "default" else best["variant"])
PY
)
echo "BEST=[$BEST]"
export KVQUANT_CUDA_DEFINES="$BEST"
timeout 160 python benchmarks/e2e_decode.py --dtype float16 --contexts 131072 524288 --extra --methods \
  kvquant_nuq4_graph kvquant_nuq2_graph --name e2e_decode_fp16_round3 > "$OUT/e2e_fp16.log" 2>&1
grep "^{" "$OUT/e2e_fp16.log"
mkdir -p "$OUT/r"; cp benchmarks/results/cuda_decode_round3.* benchmarks/results/check_cuda_decode_lutx.* \
  benchmarks/results/e2e_decode_fp16_round3.* "$OUT/r/" 2>/dev/null; rm -f "$OUT"/*.log.bak

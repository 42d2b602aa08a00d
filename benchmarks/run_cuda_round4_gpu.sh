#!/usr/bin/env bash
# Session 5, last GPU call: the default kernel after the local-array fix, variants LUTR (per-lane table copies) and
# MINB=3 TB=64 (three CTAs per SM, spills), the LUTR check, then bf16 e2e with the decode-step changes (rotated sink
# kept, fewer finite-check kernels) and the fp16 model-level checks. E2E uses LUTR if it passed and is faster on
# NormalFloat tables (the e2e caches are uncalibrated: NormalFloat).
#   bash benchmarks/run_cuda_round4_gpu.sh      (~6 min on the H200)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 70 python benchmarks/check_cuda_decode.py --skip-long --name check_cuda_decode_round4 > "$OUT/check.log" 2>&1
grep FAILURES "$OUT/check.log"
timeout 100 python benchmarks/cuda_decode_variants.py --name=cuda_decode_round4 "" "LUTR=1" "MINB=3 TB=64" \
  > "$OUT/variants.log" 2>&1; grep "^{" "$OUT/variants.log"
KVQUANT_CUDA_DEFINES="LUTR=1" timeout 70 python benchmarks/check_cuda_decode.py --skip-long \
  --name check_cuda_decode_lutr > "$OUT/check_lutr.log" 2>&1; grep FAILURES "$OUT/check_lutr.log"
BEST=$(python - "$OUT" <<'PY'
import ast, sys
rows = [ast.literal_eval(l) for l in open(sys.argv[1] + "/variants.log") if l.startswith("{'variant'")]
ok = "FAILURES: 0" in open(sys.argv[1] + "/check_lutr.log").read()
rows = [r for r in rows if r["variant"] == "default" or (ok and r["variant"] == "LUTR=1")]
best = min(rows, key=lambda r: r["nf nuq4"] + r["nf nuq2"])
print("" if best["variant"] == "default" else best["variant"])
PY
)
echo "BEST=[$BEST]"
export KVQUANT_CUDA_DEFINES="$BEST"
timeout 130 python benchmarks/e2e_decode.py --contexts 131072 524288 --extra --methods kvquant_nuq4_graph \
  kvquant_nuq2_graph --name e2e_decode_bf16_round4 > "$OUT/e2e.log" 2>&1; grep "^{" "$OUT/e2e.log"
timeout 100 python benchmarks/gpu_checks.py --layers 4 --dtype float16 --name gpu_checks_fp16_round4 \
  > "$OUT/gpu_checks.log" 2>&1; grep "'check'" "$OUT/gpu_checks.log"
rm -f "$OUT"/e2e_decode_partial.jsonl "$OUT"/*.csv

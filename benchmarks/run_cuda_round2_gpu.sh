#!/usr/bin/env bash
# CUDA decode kernel, round 2 (session 5): time the QREG / KCH variants of the staged-slot kernel, check the combined
# variant against the float32 oracle, then run the end-to-end decode (bf16 and fp16 models) with the fastest
# variant that passed (its defines are printed and recorded in the e2e result names' environment).
#   bash benchmarks/run_cuda_round2_gpu.sh      (~7 min on the H200)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 150 python benchmarks/cuda_decode_variants.py --name=cuda_decode_round2 "" "QREG=1" "KCH=2" "QREG=1 KCH=2" \
  > "$OUT/variants.log" 2>&1; grep "^{" "$OUT/variants.log"
KVQUANT_CUDA_DEFINES="QREG=1 KCH=2" timeout 150 python benchmarks/check_cuda_decode.py --skip-long \
  --name check_cuda_decode_qreg_kch > "$OUT/check.log" 2>&1; grep FAILURES "$OUT/check.log"
BEST=$(python - "$OUT" <<'PY'
import ast, sys
rows = [ast.literal_eval(l) for l in open(sys.argv[1] + "/variants.log") if l.startswith("{'variant'")]
ok = "FAILURES: 0" in open(sys.argv[1] + "/check.log").read()
rows = [r for r in rows if ok or r["variant"] == "default"]
best = min(rows, key=lambda r: r["uniform nuq4"] + r["uniform nuq2"])
print("" if best["variant"] == "default" else best["variant"])
PY
)
echo "BEST=[$BEST]"
export KVQUANT_CUDA_DEFINES="$BEST"
timeout 160 python benchmarks/e2e_decode.py --contexts 131072 524288 --extra --methods kvquant_nuq4_graph \
  kvquant_nuq2_graph --name e2e_decode_bf16_stage > "$OUT/e2e_bf16.log" 2>&1; grep "^{" "$OUT/e2e_bf16.log"
timeout 160 python benchmarks/e2e_decode.py --dtype float16 --contexts 131072 524288 --extra --methods \
  kvquant_nuq4_graph kvquant_nuq2_graph --name e2e_decode_fp16_stage > "$OUT/e2e_fp16.log" 2>&1; grep "^{" "$OUT/e2e_fp16.log"
cp benchmarks/results/cuda_decode_round2.* benchmarks/results/check_cuda_decode_qreg_kch.* \
  benchmarks/results/e2e_decode_*_stage.* "$OUT/" 2>/dev/null

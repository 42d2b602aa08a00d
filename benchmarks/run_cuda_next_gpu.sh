#!/usr/bin/env bash
# Run in session 6 (results: benchmarks/results/cuda_decode_ksz.md, check_cuda_decode_KSZS_1*.md): the
# three-CTAs-per-SM variant (KSZS=1: key scale/zero from shared memory; MINB=3 TB=64: <= 168 registers, 69 KB
# shared). Times it against the default at 128K, checks it against the float32 oracle, and prints the per-phase
# profile. Both variants were slower (162.1 and 168.6 vs 157.1 us) and KSZS was then removed from packed_decode.cu,
# so at later commits this script times the default build three times.
#   bash benchmarks/run_cuda_next_gpu.sh      (~4 min on the H200)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 150 python benchmarks/cuda_decode_variants.py --prof --name=cuda_decode_ksz "" "KSZS=1" "KSZS=1 MINB=3 TB=64" \
  > "$OUT/variants.log" 2>&1; grep "^{'variant': '[^P]" "$OUT/variants.log"
for v in "KSZS=1" "KSZS=1 MINB=3 TB=64"; do
  KVQUANT_CUDA_DEFINES="$v" timeout 120 python benchmarks/check_cuda_decode.py --skip-long \
    --name "check_cuda_decode_$(echo "$v" | tr ' =' '__')" > "$OUT/check.log" 2>&1; echo "$v: $(grep FAILURES "$OUT/check.log")"
done

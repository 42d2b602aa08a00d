#!/usr/bin/env bash
# Session 8, device calls on the H200 (the two-phase CUDA decode kernel, triton_kernels/cuda/packed_decode2.cu, with
# the KVQUANT_CUDA_KERNEL=2 switch and the "KERNEL=2" variant word of cuda_decode_variants.py). The kernel was removed
# after the last call (slower than packed_decode.cu with outlier slots: decode_kernel_gap.md, session-8 section); to
# rerun a call, `git checkout dd38fbc` first (calls a-f ran at the commits of the same session that precede it).
#   bash benchmarks/run_step8_gpu.sh a   the new kernel against the torch oracle (check_cuda_decode.py, every case
#        including 128K), then one layer at 128K and 512K: the one-pass kernel ("") vs the two-phase kernel
#        ("KERNEL=2") and its variants (cuda_decode_variants.py)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ "${1:-a}" = a ]; then
  KVQUANT_CUDA_KERNEL=2 timeout 150 python benchmarks/check_cuda_decode.py --name check_cuda_decode_v2 \
    > "$OUT/check.log" 2>&1; grep -E "FAILURES|Error|error" "$OUT/check.log" | head -20
  timeout 150 python benchmarks/cuda_decode_variants.py --name=cuda_decode_v2 "" "KERNEL=2" "KERNEL=2 KCH=1" \
    "KERNEL=2 TB=64" > "$OUT/variants.log" 2>&1; grep "^{" "$OUT/variants.log"; tail -n 3 "$OUT/variants.log"
  CTX=524288 timeout 120 python benchmarks/cuda_decode_variants.py --name=cuda_decode_v2_512k "" "KERNEL=2" \
    > "$OUT/variants512.log" 2>&1; grep "^{" "$OUT/variants512.log"; tail -n 3 "$OUT/variants512.log"
fi
# b: after phase-2 inputs were prefetched at block start, value slots moved after phase 3 and the magic offset taken
#    out before the value MMA: the check again, and where the time goes (variants without key / value slot work)
if [ "${1:-a}" = b ]; then
  KVQUANT_CUDA_KERNEL=2 timeout 150 python benchmarks/check_cuda_decode.py --name check_cuda_decode_v2b \
    > "$OUT/check.log" 2>&1; grep -E "FAILURES|Error|error" "$OUT/check.log" | head -20
  timeout 200 python benchmarks/cuda_decode_variants.py --name=cuda_decode_v2b "" "KERNEL=2" "KERNEL=2 NOKSLOT=1" \
    "KERNEL=2 NOVSLOT=1" "KERNEL=2 NOKSLOT=1 NOVSLOT=1" > "$OUT/variants.log" 2>&1; grep "^{" "$OUT/variants.log"
fi
# c: with the L2 prefetch of the next block (PF=1): times, and the stall reasons of both kernels (ncu, if it reads
#    the counters on this machine)
if [ "${1:-a}" = c ]; then
  timeout 200 python benchmarks/cuda_decode_variants.py --name=cuda_decode_v2c "" "KERNEL=2" "KERNEL=2 PF=0" \
    "KERNEL=2 NOVSLOT=1" "KERNEL=2 NOKSLOT=1 NOVSLOT=1" > "$OUT/variants.log" 2>&1; grep "^{" "$OUT/variants.log"
  for k in 1 2; do
    KVQUANT_CUDA_KERNEL=$k timeout 120 ncu --clock-control none -k regex:kvq_packed_decode -c 1 \
      --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy \
      --section MemoryWorkloadAnalysis --section LaunchStats --section InstructionStats \
      python benchmarks/ncu_decode.py > "$OUT/ncu_v$k.txt" 2>&1
    grep -E "Duration|Stall|Issued Warp|No Eligible|Active Warps|Registers|Throughput|Hit Rate|Executed Ipc" \
      "$OUT/ncu_v$k.txt" | head -40
  done
fi
# d: after the key tile loop was split by rotation mode, one LOP3 per code pair, the value magic offset subtracted once
#    per block, shared cos/sin for the query rotation: the check and the times
if [ "${1:-a}" = d ]; then
  KVQUANT_CUDA_KERNEL=2 timeout 150 python benchmarks/check_cuda_decode.py --name check_cuda_decode_v2d \
    > "$OUT/check.log" 2>&1; grep -E "FAILURES|Error|error" "$OUT/check.log" | head -20
  timeout 200 python benchmarks/cuda_decode_variants.py --name=cuda_decode_v2d "" "KERNEL=2" "KERNEL=2 NOVSLOT=1" \
    "KERNEL=2 NOKSLOT=1 NOVSLOT=1" > "$OUT/variants.log" 2>&1; grep "^{" "$OUT/variants.log"
  KVQUANT_CUDA_KERNEL=2 timeout 120 ncu --clock-control none -k regex:kvq_packed_decode -c 1 \
      --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section InstructionStats \
      python benchmarks/ncu_decode.py > "$OUT/ncu_v2.txt" 2>&1
  grep -E "Duration|Issued Warp|No Eligible|Eligible Warps|Issued Instructions  |stall type|spends" "$OUT/ncu_v2.txt"
fi
# e: value slots summed per channel across lanes (__match_any_sync) instead of shared float atomics; the key
#    scale/zero pairs optionally from shared memory (KSZS=1) for 3-4 CTAs per SM (MINB): checks and times
if [ "${1:-a}" = e ]; then
  KVQUANT_CUDA_KERNEL=2 timeout 100 python benchmarks/check_cuda_decode.py --skip-long --name check_cuda_decode_v2e \
    > "$OUT/check.log" 2>&1; grep -E "FAILURES|Error|error" "$OUT/check.log" | head -20
  KVQUANT_CUDA_KERNEL=2 KVQUANT_CUDA_DEFINES="KSZS=1 MINB=3 TB=64" timeout 100 python benchmarks/check_cuda_decode.py \
    --skip-long --name check_cuda_decode_v2e_ksz > "$OUT/check2.log" 2>&1; grep -E "FAILURES|Error|error" "$OUT/check2.log" | head
  timeout 240 python benchmarks/cuda_decode_variants.py --name=cuda_decode_v2e "" "KERNEL=2" "KERNEL=2 KSZS=1" \
    "KERNEL=2 KSZS=1 MINB=3" "KERNEL=2 KSZS=1 MINB=3 TB=64" "KERNEL=2 KSZS=1 MINB=4 TB=64" > "$OUT/variants.log" 2>&1
  grep "^{" "$OUT/variants.log"
fi
# f: value-slot channels loaded at block start and their code bytes before phase 3 (no dependent global loads left
#    in phase 4): check and times
if [ "${1:-a}" = f ]; then
  KVQUANT_CUDA_KERNEL=2 timeout 100 python benchmarks/check_cuda_decode.py --skip-long --name check_cuda_decode_v2f \
    > "$OUT/check.log" 2>&1; grep -E "FAILURES|Error|error" "$OUT/check.log" | head -20
  timeout 200 python benchmarks/cuda_decode_variants.py --name=cuda_decode_v2f "" "KERNEL=2" "KERNEL=2 NOVSLOT=1" \
    "KERNEL=2 KSZS=1 MINB=3 TB=64" > "$OUT/variants.log" 2>&1; grep "^{" "$OUT/variants.log"
fi
# g: where the value-slot time goes (timing variants: NOVP4 keeps the loads and the rescale but skips the slot loop,
#    NOVMATCH skips the per-channel sums)
if [ "${1:-a}" = g ]; then
  timeout 200 python benchmarks/cuda_decode_variants.py --name=cuda_decode_v2g "KERNEL=2" "KERNEL=2 NOVP4=1" \
    "KERNEL=2 NOVMATCH=1" "KERNEL=2 NOKSLOT=1" > "$OUT/variants.log" 2>&1; grep "^{" "$OUT/variants.log"
fi

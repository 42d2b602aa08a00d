#!/usr/bin/env bash
# Run GPU benchmarks from the repository root: bash benchmarks/run_gpu.sh [NAME ...]
#
# NAME: decode_attention e2e_decode capacity prefill soak (the default: all five, about 3 minutes each on one
# H100), throughput (about 6 minutes per context on one H100: pass --contexts through BENCH_ARGS_throughput), or
# accuracy / passkey (these need the SmolLM2 model, the WikiText-2 text and calibrated signposts: pass
# their options through BENCH_ARGS_accuracy / BENCH_ARGS_passkey). Each benchmark writes
# benchmarks/results/NAME.{md,json} and appends to benchmarks/results/history.csv (copied to $OUT when set).
# Where the tree has no git metadata, set BENCHMARK_COMMIT to the commit being measured.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
names=("$@")
[ ${#names[@]} -eq 0 ] && names=(decode_attention e2e_decode capacity prefill soak)
status=0
for name in "${names[@]}"; do
  case "$name" in
    decode_attention|e2e_decode|capacity|prefill|soak|throughput|accuracy|passkey) ;;
    *) echo "unknown benchmark: $name" >&2; status=2; continue ;;
  esac
  extra_var="BENCH_ARGS_${name}"
  echo "== $name ($(date -u +%H:%M:%S))"
  start=$SECONDS
  # shellcheck disable=SC2086  # BENCH_ARGS_* are word-split on purpose
  if ! python -m "benchmarks.$name" ${!extra_var:-}; then
    echo "== $name FAILED" >&2
    status=1
  fi
  echo "== $name: $((SECONDS - start)) s"
done
exit $status

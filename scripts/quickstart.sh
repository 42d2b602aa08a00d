#!/usr/bin/env bash
# The main job on the embedded SmolLM2-135M-Instruct: set up .venv, calibrate nuq4/nuq3/nuq2 signposts with 1%
# outliers on WikiText-2 validation text, then show perplexity, generated text and memory with the quantized cache.
# About 5 minutes on a 2-core CPU. To stay that short it calibrates on 4 windows of 1024 tokens; the reference
# recipe (16 x 2048, what benchmarks/results use) takes about 12 minutes there: NSAMPLES=16 SEQLEN=2048.
# DATA overrides the WikiText-2 folder (default ../shared/data/wikitext-2 beside the checkout).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/wikitext-2}
NSAMPLES=${NSAMPLES:-4}
SEQLEN=${SEQLEN:-1024}
for f in valid.tokens.txt test.raw.txt; do
  [ -f "$DATA/$f" ] || { echo "error: $DATA/$f not found; set DATA=<folder holding WikiText-2's $f>" >&2; exit 2; }
done
start=$SECONDS
./scripts/setup.sh
. "${VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
echo "== Calibrating SmolLM2-135M on $NSAMPLES x $SEQLEN tokens (reference recipe: 16 x 2048; NSAMPLES=16 SEQLEN=2048)"
python calibrate.py --model smollm2 --text-file "$DATA/valid.tokens.txt" --bits 4 3 2 --outlier-fraction 0.01 \
    --sink-tokens 1 --nsamples "$NSAMPLES" --seqlen "$SEQLEN" --output-dir signposts/smollm2
python -m kvquant_hf.demo --model smollm2 --signposts signposts/smollm2 --text-file "$DATA/test.raw.txt" --windows 2
echo "quickstart done in $(( (SECONDS - start) / 60 )) min $(( (SECONDS - start) % 60 )) s"

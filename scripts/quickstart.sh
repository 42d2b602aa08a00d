#!/usr/bin/env bash
# The main job on the embedded SmolLM2-135M-Instruct: set up .venv, calibrate nuq4/nuq3/nuq2 signposts with 1%
# outliers on WikiText-2 validation text, then show perplexity, generated text and memory with the quantized cache.
# DATA overrides the WikiText-2 folder (default ../shared/data/wikitext-2 beside the checkout).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/wikitext-2}
./scripts/setup.sh
. "${VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python calibrate.py --model smollm2 --text-file "$DATA/valid.tokens.txt" --bits 4 3 2 --outlier-fraction 0.01 \
    --sink-tokens 1 --nsamples 16 --seqlen 2048 --output-dir signposts/smollm2
python -m kvquant_hf.demo --model smollm2 --signposts signposts/smollm2 --text-file "$DATA/test.raw.txt" --windows 2

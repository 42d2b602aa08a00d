#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the whole test suite on CPU; Triton kernels run in the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. "${VENV:-.venv}/bin/activate"
export TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m pytest -q -ra "$@"

#!/usr/bin/env bash
# transformers 5.17 compatibility (the cache argument is `past_key_values` there, `cache` from 5.24):
# build a venv with transformers==5.17.0 and the same torch, then run the tests marked `compat`, and the model-patch
# tests of the opt-in fusions and the CUDA-graph decode path (decoder-layer / attention / MLP forwards replaced;
# Triton interpreter on CPU).
# Usage: .ci/compat_517.sh [extra pytest args]   (VENV_TF517 overrides the venv location)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV_TF517:-build/venv-tf517}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
. "$VENV/bin/activate"
python -m pip install -q torch=="$TORCH_VERSION"        # CPU build, as in scripts/setup.sh
python -m pip install -q "transformers==5.17.0" safetensors pytest "triton>=3.1"
python -c "import transformers, torch; assert transformers.__version__ == '5.17.0', transformers.__version__; print('compat: transformers', transformers.__version__, 'torch', torch.__version__)"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# the package is imported from the checkout (tests/conftest.py puts the repo root on sys.path)
python -m pytest -q -ra -m compat tests/test_cache.py tests/test_generation.py "$@"
python -m pytest -q -ra tests/test_rms_norm.py tests/test_projections.py tests/test_exact_block.py "$@"
# generate with left padding across prefill chunks, concurrent threads, all-padding masks, saved caches
python -m pytest -q -ra tests/test_padding.py tests/test_threads.py tests/test_uncalibrated_masks.py tests/test_cache_pickle.py "$@"

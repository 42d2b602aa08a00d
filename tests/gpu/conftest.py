"""Tests that need a CUDA GPU: every test here is marked ``gpu`` and skipped where CUDA is not available, so
``pytest -m gpu`` on a GPU machine gives one pass/fail answer and CI (no GPU) collects and skips them."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")

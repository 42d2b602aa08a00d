"""Evaluation used by benchmarks, notebooks and tests: perplexity (simulated or real KV cache), passkey retrieval.

Names are imported lazily so that ``python -m kvquant_hf.evaluation.perplexity`` runs without warnings.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DEFAULT_METHODS": "perplexity",
    "evaluate_perplexity": "perplexity",
    "load_token_ids": "perplexity",
    "make_windows": "perplexity",
    "score_window_incremental": "perplexity",
    "score_window_simulated": "perplexity",
    "summary_table": "perplexity",
    "run_passkey": "passkey",
    "build_prompt": "passkey",
}

__all__ = [
    "DEFAULT_METHODS",
    "build_prompt",
    "evaluate_perplexity",
    "load_token_ids",
    "make_windows",
    "run_passkey",
    "score_window_incremental",
    "score_window_simulated",
    "summary_table",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

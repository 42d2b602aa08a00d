"""Import the torch oracle (``kvquant_hf.quant``, ``kvquant_hf.attention``) without the package ``__init__``.

The kernel scripts only need the math, not the transformers integration that ``import kvquant_hf``
pulls in, so they load the submodules through a bare package stub.
"""

from __future__ import annotations

import importlib
import os
import sys
import types

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load():
    """Returns ``(quant, attention)`` modules."""
    if _ROOT not in sys.path:
        sys.path.insert(0, _ROOT)
    if "kvquant_hf" not in sys.modules:
        pkg = types.ModuleType("kvquant_hf")
        pkg.__path__ = [os.path.join(_ROOT, "kvquant_hf")]
        sys.modules["kvquant_hf"] = pkg
    return importlib.import_module("kvquant_hf.quant"), importlib.import_module("kvquant_hf.attention")

"""kvquant_hf: KVQuant KV-cache quantization for Hugging Face transformers (arXiv 2401.18079).

Importing the package registers ``cache_implementation="kvquant"`` with ``model.generate``::

    import kvquant_hf
    out = model.generate(ids, cache_implementation="kvquant", cache_config={"signposts": "S", "bits": 4})

Public API: :class:`KVQuantConfig`, :class:`KVQuantCache`, :func:`patch_model`, :func:`load_signposts`,
:func:`validate_signposts`, :func:`calibrate`, :func:`plan_capacity` (memory planner), and the errors in :mod:`kvquant_hf.errors`. Heavy modules
(calibration, Triton kernels) are imported on first use only.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from pathlib import Path
from typing import Any


class _CheckoutKernelsFinder(importlib.abc.MetaPathFinder):
    """Imports ``kvquant_hf.kernels`` from a source checkout.

    The wheel installs the repository's ``triton_kernels/`` folder as the subpackage ``kvquant_hf.kernels`` (the
    top-level name ``triton_kernels`` belongs to the Triton project). In a checkout run with ``PYTHONPATH=.`` that
    folder sits beside this package; this finder, consulted after the regular ones, maps the name onto it.
    """

    def __init__(self, folder: Path):
        self.folder = folder

    def find_spec(self, fullname, path=None, target=None):
        if fullname != f"{__name__}.kernels":
            return None
        return importlib.util.spec_from_file_location(
            fullname, self.folder / "__init__.py", submodule_search_locations=[str(self.folder)])


_checkout_kernels = Path(__file__).resolve().parent.parent / "triton_kernels"
if _checkout_kernels.is_dir() and not (Path(__file__).resolve().parent / "kernels").is_dir():
    sys.meta_path.append(_CheckoutKernelsFinder(_checkout_kernels))

from .cache import KVQuantCache, KVQuantLayer, UncalibratedCacheWarning
from .config import KVQuantConfig
from .errors import (
    BackendUnavailableError,
    CacheMismatchError,
    KVQuantConfigError,
    KVQuantError,
    KVQuantNumericalError,
    SignpostError,
    UnsupportedModelError,
)
from .generation import build_kvquant_cache, install_generate_hook

__version__ = "0.1.0"

install_generate_hook()

# name -> module that defines it, imported on first attribute access (keeps `import kvquant_hf` light)
_LAZY = {
    "patch_model": ".models",
    "unpatch_model": ".models",
    "SUPPORTED_MODEL_TYPES": ".models",
    "load_signposts": ".signposts",
    "save_signposts": ".signposts",
    "validate_signposts": ".signposts",
    "Signposts": ".signposts",
    "LayerSignposts": ".signposts",
    "calibrate": ".calibration",
    "plan_capacity": ".planner",
    "CapacityPlan": ".planner",
    "CapacityError": ".planner",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kvquant_hf' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "BackendUnavailableError",
    "CacheMismatchError",
    "CapacityError",
    "CapacityPlan",
    "KVQuantCache",
    "KVQuantConfig",
    "KVQuantConfigError",
    "KVQuantError",
    "KVQuantLayer",
    "KVQuantNumericalError",
    "LayerSignposts",
    "SignpostError",
    "Signposts",
    "UncalibratedCacheWarning",
    "UnsupportedModelError",
    "__version__",
    "build_kvquant_cache",
    "calibrate",
    "load_signposts",
    "patch_model",
    "plan_capacity",
    "save_signposts",
    "unpatch_model",
    "validate_signposts",
]

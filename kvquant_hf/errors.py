"""Exception and warning types of kvquant_hf. Every message says what is wrong and how to fix it."""


class KVQuantError(Exception):
    """Base class for every error kvquant_hf raises on bad input."""


class KVQuantConfigError(KVQuantError, ValueError):
    """An invalid configuration value (bits, outlier fraction, sink tokens, cache_config keys...)."""


class SignpostError(KVQuantError, ValueError):
    """Signpost files that are missing, corrupted, of an unknown version or do not match the model."""


class UnsupportedModelError(KVQuantError, NotImplementedError):
    """An architecture or transformers version that kvquant_hf does not support."""


class BackendUnavailableError(KVQuantError, RuntimeError):
    """A backend (for example Triton on a machine without a GPU) that cannot run here."""


class CacheMismatchError(KVQuantError, ValueError):
    """New keys/values that do not fit the cache they are written to (batch, heads, head_dim, dtype, device)."""


class KVQuantNumericalError(KVQuantError, FloatingPointError):
    """NaN or Inf in new keys/values with ``nonfinite="error"`` (the default); nothing of the call was stored.

    Attributes:
        layer_idx (`int`): the model layer that received them.
        rows (`list[int]`): batch rows holding a non-finite token.
        positions (`list[int]`): their positions (the first few).
        tensors (`list[str]`): ``"keys"`` and/or ``"values"``.
    """

    def __init__(self, message: str, layer_idx: int = -1, rows=(), positions=(), tensors=()):
        super().__init__(message)
        self.layer_idx = layer_idx
        self.rows = list(rows)
        self.positions = list(positions)
        self.tensors = list(tensors)


class UncalibratedCacheWarning(UserWarning):
    """Emitted once per `KVQuantCache` that runs without calibrated signposts (NormalFloat tables, key ranges
    from the first prompt)."""

"""Exception types raised by kvquant_hf. Every message says what is wrong and how to fix it."""


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

"""Argument checks of a calibration run, done before the model is loaded or the capture starts.

:func:`check_calibration_args` covers the numbers and choices of :func:`kvquant_hf.calibration.calibrate`,
:func:`check_device` the device (one that exists here). calibrate.py runs both, plus the output folder check
(:func:`kvquant_hf.signpost_checks.check_output_dir`) and the reading of the text, before it loads the model;
each failure is one :class:`KVQuantConfigError` naming the argument and the fix.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch

from .config import SUPPORTED_BITS
from .errors import KVQuantConfigError
from .signpost_checks import FISHER_WEIGHTINGS

KEY_TABLES = ("auto", "kmeans", "kmeans-pinned", "uniform")
VALUE_TABLES = ("kmeans", "uniform")
#: bit widths whose key tables are uniform under ``key_table="auto"`` (the default): on SmolLM2 with a 128-token
#: recent window, uniform key levels beat the Fisher-weighted k-means ones at 4 and 3 bits and lose at 2 bits
#: (``docs/design_alternatives.md``)
AUTO_UNIFORM_KEY_BITS = (3, 4)


def resolve_key_table(key_table: str, bits: int) -> str:
    """The key table one bit width gets: ``"auto"`` is ``"uniform"`` at :data:`AUTO_UNIFORM_KEY_BITS`, else
    ``"kmeans"``; the other choices are themselves."""
    if key_table != "auto":
        return key_table
    return "uniform" if bits in AUTO_UNIFORM_KEY_BITS else "kmeans"
DEVICE_HINT = "use --device cpu, cuda, cuda:N (an existing GPU), mps or auto"


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _positive_int(name: str, value: Any, lo: int, flag: str) -> int:
    if not _is_int(value) or value < lo:
        raise KVQuantConfigError(f"{name}={value!r} must be an integer >= {lo} ({flag}).")
    return int(value)


def check_bits(bits: Any) -> list[int]:
    """`bits` (an int or a sequence of ints from SUPPORTED_BITS) as a list without repeats."""
    items = [bits] if _is_int(bits) else list(bits) if isinstance(bits, Sequence) and not isinstance(bits, str) else []
    if not items or any(not _is_int(b) or b not in SUPPORTED_BITS for b in items):
        raise KVQuantConfigError(f"bits={bits!r} is not supported; choose from {SUPPORTED_BITS}.")
    return list(dict.fromkeys(int(b) for b in items))


def check_calibration_args(
    bits: Any,
    outlier_fraction: Any = 0.01,
    sink_tokens: Any = 1,
    nsamples: Any = None,
    seqlen: Any = None,
    seed: Any = 0,
    fisher_weighting: Any = "fisher",
    max_tokens_per_layer: Any = 1,
    kmeans_max_points: Any = None,
    key_table: Any = "auto",
    value_table: Any = "kmeans",
) -> list[int]:
    """Check the arguments of a calibration run; returns the bit widths as a list.

    `nsamples`, `seqlen` and `kmeans_max_points` are checked when given (pre-cut windows fix the first two).
    """
    bits_list = check_bits(bits)
    f = outlier_fraction
    if not isinstance(f, numbers.Real) or isinstance(f, bool) or not math.isfinite(f) or not 0.0 <= f <= 0.1:
        raise KVQuantConfigError(f"outlier_fraction={f!r} must be in [0, 0.1] (0.01 = 1%).")
    if not isinstance(fisher_weighting, str) or fisher_weighting not in FISHER_WEIGHTINGS:
        raise KVQuantConfigError(
            f"fisher_weighting={fisher_weighting!r} is not supported; choose one of {FISHER_WEIGHTINGS}."
        )
    if not isinstance(key_table, str) or key_table not in KEY_TABLES:
        raise KVQuantConfigError(f"key_table={key_table!r} is not supported; choose one of {KEY_TABLES}.")
    if not isinstance(value_table, str) or value_table not in VALUE_TABLES:
        raise KVQuantConfigError(f"value_table={value_table!r} is not supported; choose one of {VALUE_TABLES}.")
    if not _is_int(sink_tokens) or sink_tokens < 0:
        raise KVQuantConfigError(f"sink_tokens={sink_tokens!r} must be a non-negative integer.")
    _positive_int("seed", seed, 0, "--seed")
    _positive_int("max_tokens_per_layer", max_tokens_per_layer, 1, "--max-tokens-per-layer")
    if nsamples is not None:
        _positive_int("nsamples", nsamples, 1, "--nsamples")
    if seqlen is not None:
        _positive_int("seqlen", seqlen, 2, "--seqlen")
        if sink_tokens >= seqlen - 1:
            raise KVQuantConfigError(
                f"sink_tokens={sink_tokens} must be in [0, seqlen - 1) (seqlen={seqlen}): the sink tokens are left "
                "out of every window; lower --sink-tokens or raise --seqlen."
            )
    if kmeans_max_points is not None:
        _positive_int("kmeans_max_points", kmeans_max_points, 2 ** max(bits_list),
                      f"--kmeans-max-points: a {max(bits_list)}-bit table needs that many points")
    return bits_list


def check_device(device: Any) -> str | None:
    """`device` (None, "auto", "cpu", "cuda", "cuda:N", "mps" or a torch.device) if it exists on this machine."""
    if device is None or device == "auto":
        return device
    if isinstance(device, torch.device):
        dev = device
    elif isinstance(device, str):
        try:
            dev = torch.device(device)
        except RuntimeError as exc:
            raise KVQuantConfigError(f"device={device!r} is not a device name; {DEVICE_HINT}.") from exc
    else:
        raise KVQuantConfigError(f"device={device!r} must be a string such as 'cpu' or 'cuda:0'; {DEVICE_HINT}.")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise KVQuantConfigError(
                f"device={device!r} but no CUDA GPU is available here (torch.cuda.is_available() is False); "
                "use --device cpu."
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise KVQuantConfigError(
                f"device={device!r} does not exist: this machine has {count} CUDA GPU(s) (cuda:0 to "
                f"cuda:{count - 1}); {DEVICE_HINT}."
            )
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise KVQuantConfigError(f"device={device!r} but MPS is not available here; {DEVICE_HINT}.")
    elif dev.type != "cpu":
        raise KVQuantConfigError(f"device={device!r} is not supported for calibration; {DEVICE_HINT}.")
    return str(dev)


__all__ = ["AUTO_UNIFORM_KEY_BITS", "KEY_TABLES", "VALUE_TABLES", "check_bits", "check_calibration_args",
           "check_device", "resolve_key_table"]

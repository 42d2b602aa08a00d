"""Checks of signpost metadata and tensors: types, ranges, shapes and plausible magnitudes.

Every failure raises :class:`SignpostError` naming the field, what it holds, what was expected and the fix
(write the folder again with calibrate.py). :mod:`kvquant_hf.signposts` runs these checks when it saves, loads
and validates signposts; calibrate.py runs :func:`check_output_dir` before it loads the model.

Plausible ranges (beyond them a folder is damaged or was written by something else, never a real calibration):

- model facts: ``num_hidden_layers``, ``num_key_value_heads`` and ``head_dim`` in ``[1, 4096]``;
- ``files``: exactly one SHA-256 (64 hex digits) per layer file ``layer_000.safetensors`` ...;
- nuqX tables sorted, inside the normalized range ``[-1, 1]`` (up to ``TABLE_LIMIT``);
- key thresholds ``lower <= upper``, within the range of the model dtype (65504 for float16);
- Q-Norm statistics: means in ``[-1, 1]``, standard deviations in ``[0, 1]``, ``sd / sd_q`` within a factor 8.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import torch

from .errors import SignpostError

FORMAT_VERSION = 1
KIND = "kvquant-signposts"
METADATA_FILE = "metadata.json"
TENSOR_NAMES = ("key_signposts", "value_signposts", "key_lower", "key_upper", "key_qnorm", "value_qnorm")
FISHER_WEIGHTINGS = ("fisher", "fisher_x2", "none")
SIGNPOST_BITS = (2, 3, 4)
MODEL_LIMITS = {
    "num_hidden_layers": 4096,
    "num_key_value_heads": 4096,
    "head_dim": 4096,
    "num_attention_heads": 65536,
    "hidden_size": 1 << 20,
}
TABLE_LIMIT = 1.0 + 1.0 / 64  # tables live in the normalized space [-1, 1]; a little slack for rounding
QNORM_MEAN_LIMIT = TABLE_LIMIT
QNORM_SD_LIMIT = TABLE_LIMIT
QNORM_RATIO_LIMIT = 8.0
MAX_OUTLIER_FRACTION = 0.1
MAX_SINK_TOKENS = 1 << 16
MAX_COUNT = 1 << 40
MODEL_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                "float64": torch.float64}
CALIBRATION_COUNTS = ("nsamples", "seqlen", "max_tokens_per_layer", "tokens_per_layer", "tokens_seen",
                      "kmeans_max_points", "num_tokens_text")
FIX = "write the folder again with calibrate.py (calibrate.py --model M --text-file T --output-dir DIR)"
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_LAYER_FILE_RE = re.compile(r"layer_\d{3,}\.safetensors")


def layer_filename(layer_idx: int) -> str:
    """File name of one layer's tensors: ``layer_{i:03d}.safetensors``."""
    return f"layer_{layer_idx:03d}.safetensors"


def bits_dirname(bits: int) -> str:
    """Folder name of one bit width: ``nuq{bits}``."""
    return f"nuq{bits}"


def _show(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} (a {type(value).__name__})"


def _bad(where: str, name: str, value: Any, expected: str) -> SignpostError:
    return SignpostError(
        f"{where}: '{name}' is {_show(value)}, expected {expected}; the metadata was edited or damaged: {FIX}."
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(where: str, name: str, value: Any, lo: int, hi: int) -> int:
    """`value` as an int in `[lo, hi]` (bools, floats and strings are refused)."""
    if not _is_int(value) or not lo <= value <= hi:
        raise _bad(where, name, value, f"an integer in [{lo}, {hi}]")
    return value


# --------------------------------------------------------------------------------------------
# metadata.json
# --------------------------------------------------------------------------------------------
def check_model_fields(model: Any, where: str) -> None:
    """The `model` object of metadata.json: types and plausible ranges of the model facts."""
    if not isinstance(model, dict):
        raise _bad(where, "model", model, "an object with model_type, num_hidden_layers, num_key_value_heads, "
                   "head_dim")
    for key in ("model_type", "num_hidden_layers", "num_key_value_heads", "head_dim"):
        if key not in model:
            raise SignpostError(f"{where} lacks model.{key}; the folder is incomplete: {FIX}.")
    model_type = model["model_type"]
    if not isinstance(model_type, str) or not model_type or len(model_type) > 100:
        raise _bad(where, "model.model_type", model_type, "a model type name such as 'llama'")
    for key, hi in MODEL_LIMITS.items():
        required = key in ("num_hidden_layers", "num_key_value_heads", "head_dim")
        if required or model.get(key) is not None:
            check_int(where, f"model.{key}", model[key], 1, hi)
    name = model.get("name_or_path")
    if name is not None and not isinstance(name, str):
        raise _bad(where, "model.name_or_path", name, "a string")


def check_files(files: Any, num_layers: int, where: str) -> None:
    """`files`: one SHA-256 hex digest per layer file, nothing else."""
    if not isinstance(files, dict):
        raise _bad(where, "files", files, "an object mapping layer_000.safetensors ... to SHA-256 checksums")
    expected = [layer_filename(i) for i in range(num_layers)]
    missing = [n for n in expected if n not in files]
    if missing:
        raise SignpostError(
            f"{where} lists no checksum for {missing[:3]} (model has {num_layers} layers, 'files' lists "
            f"{len(files)}); the folder is incomplete: {FIX}."
        )
    extra = sorted(str(n) for n in files if n not in expected)
    if extra:
        raise SignpostError(
            f"{where}: 'files' lists {len(files)} files but model.num_hidden_layers={num_layers} (unexpected "
            f"{extra[:3]}); the folder mixes two calibrations or was edited: {FIX}."
        )
    for name in expected:
        digest = files[name]
        if not isinstance(digest, str) or not _SHA256_RE.fullmatch(digest):
            raise _bad(where, f"files.{name}", digest, "a SHA-256 checksum of 64 lowercase hex digits")


def check_metadata(meta: Any, where: str, files: bool = True) -> None:
    """metadata.json as a whole (`where` names the folder); `files=False` skips the checksums (before saving)."""
    mfile = f"{where}/{METADATA_FILE}"
    if not isinstance(meta, dict):
        raise SignpostError(f"{mfile} is {_show(meta)}, not a JSON object; {FIX}.")
    if meta.get("kind") != KIND:
        raise SignpostError(
            f"{mfile} has kind={meta.get('kind')!r}, expected {KIND!r}: this folder does not hold "
            "kvquant signposts (write one with calibrate.py)."
        )
    version = meta.get("format_version")
    if not _is_int(version) or version != FORMAT_VERSION:
        raise SignpostError(
            f"{where} uses signpost format_version={version!r}, but this kvquant_hf reads version "
            f"{FORMAT_VERSION} only; upgrade kvquant_hf or re-run calibrate.py with this version."
        )
    for key in ("bits", "model", "files"):
        if key not in meta:
            raise SignpostError(f"{mfile} lacks '{key}'; the folder is incomplete: {FIX}.")
    if not _is_int(meta["bits"]) or meta["bits"] not in SIGNPOST_BITS:
        raise _bad(mfile, "bits", meta["bits"], "2, 3 or 4")
    check_model_fields(meta["model"], mfile)
    if files:
        check_files(meta["files"], meta["model"]["num_hidden_layers"], mfile)
    check_optional_fields(meta, mfile)


def check_optional_fields(meta: dict, where: str) -> None:
    """The fields that older or hand-made folders may lack: checked when present."""
    head_dim = meta["model"]["head_dim"]
    if meta.get("outlier_fraction") is not None:
        f = meta["outlier_fraction"]
        if not isinstance(f, (int, float)) or isinstance(f, bool) or not math.isfinite(f) or not (
            0 <= f <= MAX_OUTLIER_FRACTION
        ):
            raise _bad(where, "outlier_fraction", f, f"a number in [0, {MAX_OUTLIER_FRACTION}] (0.01 = 1%)")
    if meta.get("outlier_slots_default") is not None:
        check_int(where, "outlier_slots_default", meta["outlier_slots_default"], 0, head_dim - 1)
    if meta.get("sink_tokens") is not None:
        check_int(where, "sink_tokens", meta["sink_tokens"], 0, MAX_SINK_TOKENS)
    fisher = meta.get("fisher_weighting")
    if fisher is not None and fisher not in FISHER_WEIGHTINGS:
        raise _bad(where, "fisher_weighting", fisher, f"one of {FISHER_WEIGHTINGS}")
    cal = meta.get("calibration")
    if cal is None:
        return
    if not isinstance(cal, dict):
        raise _bad(where, "calibration", cal, "an object describing the calibration run")
    for key in CALIBRATION_COUNTS:
        if cal.get(key) is not None:
            check_int(where, f"calibration.{key}", cal[key], 0, MAX_COUNT)
    starts = cal.get("window_starts")
    if starts is not None and (not isinstance(starts, list) or not all(_is_int(x) and x >= 0 for x in starts)
                               or (_is_int(cal.get("nsamples")) and len(starts) != cal["nsamples"])):
        raise _bad(where, "calibration.window_starts", starts,
                   f"a list of {cal.get('nsamples', 'nsamples')} non-negative token offsets (one per window) or null")
    dtype = cal.get("model_dtype")
    if dtype is not None and dtype not in MODEL_DTYPES:
        raise _bad(where, "calibration.model_dtype", dtype, f"one of {sorted(MODEL_DTYPES)}")


def metadata_dtype(meta: dict) -> torch.dtype | None:
    """The model dtype recorded at calibration (``calibration.model_dtype``), or None."""
    cal = meta.get("calibration")
    return MODEL_DTYPES.get(cal.get("model_dtype")) if isinstance(cal, dict) else None


# --------------------------------------------------------------------------------------------
# tensors of one layer
# --------------------------------------------------------------------------------------------
def check_layer(layer: Any, idx: int, bits: int, num_kv_heads: int, head_dim: int, where: str,
                dtype: torch.dtype | None = None) -> None:
    """Shapes, finiteness, ordering and plausible magnitudes of one layer; raises SignpostError naming the tensor.

    `dtype`: the model dtype when known; thresholds beyond its range cannot come from that model's keys.
    """
    expected = {
        "key_signposts": (2**bits,),
        "value_signposts": (2**bits,),
        "key_lower": (num_kv_heads, head_dim),
        "key_upper": (num_kv_heads, head_dim),
        "key_qnorm": (4,),
        "value_qnorm": (4,),
    }
    tail = f"; {FIX}."
    for name, shape in expected.items():
        t = getattr(layer, name)
        if not isinstance(t, torch.Tensor):
            raise SignpostError(f"{where}: layer {idx} '{name}' is a {type(t).__name__}, expected a tensor{tail}")
        if not t.dtype.is_floating_point:
            raise SignpostError(f"{where}: layer {idx} '{name}' has dtype {t.dtype}, expected float32{tail}")
        if tuple(t.shape) != shape:
            raise SignpostError(
                f"{where}: layer {idx} '{name}' has shape {tuple(t.shape)}, expected {shape} "
                f"(bits={bits}, num_kv_heads={num_kv_heads}, head_dim={head_dim}); the file is inconsistent "
                f"with its metadata{tail}"
            )
        if not torch.isfinite(t).all():
            raise SignpostError(f"{where}: layer {idx} '{name}' contains NaN or inf{tail}")
    for name in ("key_signposts", "value_signposts"):
        t = getattr(layer, name).to(torch.float32)
        if (t[1:] < t[:-1]).any():
            raise SignpostError(f"{where}: layer {idx} '{name}' is not sorted ascending{tail}")
        if t.abs().max() > TABLE_LIMIT:
            raise SignpostError(
                f"{where}: layer {idx} '{name}' spans [{float(t.min()):.4g}, {float(t.max()):.4g}], outside the "
                f"normalized range [-1, 1] that nuqX tables live in{tail}"
            )
    if (layer.key_upper < layer.key_lower).any():
        raise SignpostError(f"{where}: layer {idx} has key_upper < key_lower{tail}")
    if dtype is not None and dtype.is_floating_point:
        limit = torch.finfo(dtype).max
        for name in ("key_lower", "key_upper"):
            peak = float(getattr(layer, name).abs().max())
            if peak > limit:
                raise SignpostError(
                    f"{where}: layer {idx} '{name}' reaches {peak:.3g}, beyond the range of the model dtype "
                    f"{str(dtype).replace('torch.', '')} (max {limit:.6g}): these thresholds cannot come from this "
                    f"model's keys; run calibrate.py on this model."
                )
    for name in ("key_qnorm", "value_qnorm"):
        check_qnorm(getattr(layer, name), f"{where}: layer {idx} '{name}'")


def check_qnorm(stats: torch.Tensor, what: str) -> None:
    """Q-Norm statistics ``(mu, sd, mu_q, sd_q)`` of normalized values: means in [-1, 1], sds in [0, 1]."""
    mu, sd, mu_q, sd_q = (float(s) for s in stats.tolist())  # one transfer for signposts on a GPU
    problem = None
    if abs(mu) > QNORM_MEAN_LIMIT or abs(mu_q) > QNORM_MEAN_LIMIT:
        problem = "means (mu, mu_q) outside [-1, 1]"
    elif not (0 <= sd <= QNORM_SD_LIMIT and 0 <= sd_q <= QNORM_SD_LIMIT):
        problem = "standard deviations (sd, sd_q) outside [0, 1]"
    elif sd_q > 0 and not 1 / QNORM_RATIO_LIMIT <= sd / sd_q <= QNORM_RATIO_LIMIT:
        problem = f"sd / sd_q = {sd / sd_q:.3g}, more than a factor {QNORM_RATIO_LIMIT:g} from 1"
    if problem:
        raise SignpostError(
            f"{what} = ({mu:.4g}, {sd:.4g}, {mu_q:.4g}, {sd_q:.4g}) has {problem}, impossible for statistics of "
            f"normalized values; {FIX}."
        )


# --------------------------------------------------------------------------------------------
# where calibrate.py writes
# --------------------------------------------------------------------------------------------
def check_output_dir(output_dir: Any, bits: Any = ()) -> str:
    """Refuse an output folder that cannot receive `nuq{bits}` folders, before any work starts.

    Returns the path as a `str`. Refused: a path that is a file (or lies under one), a folder that is not
    writable (or whose nearest existing parent is not), and a `nuqX` entry that is a file or a folder that does
    not hold signposts (:func:`kvquant_hf.signposts.save_signposts` would not overwrite it).
    """
    if not isinstance(output_dir, (str, os.PathLike)) or not os.fspath(output_dir):
        raise SignpostError(f"output folder {output_dir!r} is not a path; pass --output-dir DIR.")
    path = os.fspath(output_dir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise SignpostError(
            f"output folder {path!r} is a file, not a folder; pass --output-dir with a folder (new or existing)."
        )
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise SignpostError(
            f"output folder {path!r} cannot be created: {existing!r} is a file; choose another --output-dir."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == os.path.abspath(path) else f"cannot be created in {existing!r}"
        raise SignpostError(
            f"output folder {path!r} {what} (permission denied); choose a writable --output-dir."
        )
    for b in bits:
        target = os.path.join(path, bits_dirname(b))
        if os.path.isfile(target) or os.path.islink(target) and not os.path.isdir(target):
            raise SignpostError(f"{target} exists and is a file; move it away or choose another --output-dir.")
        if os.path.isdir(target) and not os.path.isfile(os.path.join(target, METADATA_FILE)) and os.listdir(target):
            raise SignpostError(
                f"{target} exists and is not a signpost folder; refusing to overwrite it. Choose another --output-dir."
            )
        if os.path.isdir(target) and not os.access(target, os.W_OK | os.X_OK):
            raise SignpostError(f"{target} is not writable (permission denied); choose another --output-dir.")
    return path


__all__ = [
    "FISHER_WEIGHTINGS",
    "FORMAT_VERSION",
    "KIND",
    "METADATA_FILE",
    "TENSOR_NAMES",
    "bits_dirname",
    "check_files",
    "check_int",
    "check_layer",
    "check_metadata",
    "check_model_fields",
    "check_optional_fields",
    "check_output_dir",
    "check_qnorm",
    "layer_filename",
    "metadata_dtype",
]

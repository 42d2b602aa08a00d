"""Per-layer quantizer parameters (signposts, key thresholds, Q-Norm statistics) and their files.

Calibration (``kvquant_hf.calibration`` / ``calibrate.py``) produces one :class:`Signposts` per bit width;
the cache and the simulated quantizers read them back with :func:`load_signposts` and check them against
the model with :func:`validate_signposts`.

File format (version 1)
-----------------------
A calibration run writes one folder per bit width ``X``::

    DIR/
      nuq4/
        metadata.json
        layer_000.safetensors
        layer_001.safetensors
        ...
      nuq3/ ...
      nuq2/ ...

Each ``layer_{i:03d}.safetensors`` holds float32 tensors (no pickle anywhere: safetensors + JSON only):

==================== ================ ============================================================
tensor               shape            meaning
==================== ================ ============================================================
``key_signposts``    ``[2**X]``       sorted nuqX table for keys, in the normalized space (about [-1, 1])
``value_signposts``  ``[2**X]``       sorted nuqX table for values
``key_lower``        ``[H_kv, D]``    per-channel lower threshold of the *pre-RoPE* keys
``key_upper``        ``[H_kv, D]``    per-channel upper threshold (``zero = (u + l) / 2``, ``scale = (u - l) / 2``)
``key_qnorm``        ``[4]``          Q-Norm statistics ``(mu, sd, mu_q, sd_q)`` of normalized keys
``value_qnorm``      ``[4]``          Q-Norm statistics of normalized values
==================== ================ ============================================================

The safetensors header metadata repeats ``kind``, ``format_version``, ``layer`` and ``bits``.
Q-Norm statistics are the mean and standard deviation of the normalized calibration values that fall
inside the thresholds (``mu``, ``sd``) and of the same values rounded to the nearest signpost (``mu_q``,
``sd_q``); see :func:`kvquant_hf.quant.apply_qnorm`.

``metadata.json``::

    {
      "format_version": 1,
      "kind": "kvquant-signposts",
      "model": {model_type, name_or_path, num_hidden_layers, num_attention_heads,
                num_key_value_heads, head_dim, hidden_size},      # kvquant_hf.models.loading.model_identity
      "bits": 4,
      "outlier_fraction": 0.01,
      "outlier_slots_default": 1,        # ceil(outlier_fraction * head_dim), 0 for 0%
      "sink_tokens": 1,
      "fisher_weighting": "fisher",      # "fisher" | "fisher_x2" | "none"
      "calibration": {"text_file" or "dataset", "text_sha256", "nsamples", "seqlen", "seed",
                      "max_tokens_per_layer", "tokens_per_layer", "duration_s", "created",
                      "kvquant_hf_version", ...},
      "files": {"layer_000.safetensors": "<sha256>", ...}
    }

Loading verifies the format version, the type and range of every metadata field, that every listed file
exists and matches its checksum and header, that it parses, and the tensor shapes and magnitudes
(:mod:`kvquant_hf.signpost_checks`); :func:`validate_signposts` then compares the model facts with a model.
Signposts on the Hugging Face Hub are named ``hf://owner/name`` or ``hf://owner/name@revision``
(:mod:`kvquant_hf.signpost_hub`); no other path is ever downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from . import quant
from .errors import SignpostError
from .signpost_checks import (
    FISHER_WEIGHTINGS,
    FIX,
    FORMAT_VERSION,
    KIND,
    METADATA_FILE,
    SIGNPOST_BITS,
    TENSOR_NAMES,
    bits_dirname,
    check_layer,
    check_metadata,
    check_model_fields,
    check_output_dir,
    layer_filename,
    metadata_dtype,
)
from .signpost_hub import HUB_PREFIX, HUB_REPO_RE, download_signposts


def sha256_file(path: str, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# data classes
# --------------------------------------------------------------------------------------------
@dataclass
class LayerSignposts:
    """Quantizer parameters of one decoder layer (all float32).

    Args:
        key_signposts (`torch.Tensor` of shape `[2**bits]`): sorted nuqX table for normalized keys.
        value_signposts (`torch.Tensor` of shape `[2**bits]`): sorted nuqX table for normalized values.
        key_lower (`torch.Tensor` of shape `[num_kv_heads, head_dim]`): per-channel lower thresholds of
            the pre-RoPE keys.
        key_upper (`torch.Tensor` of shape `[num_kv_heads, head_dim]`): per-channel upper thresholds.
        key_qnorm (`torch.Tensor` of shape `[4]`): Q-Norm statistics `(mu, sd, mu_q, sd_q)` for keys.
        value_qnorm (`torch.Tensor` of shape `[4]`): Q-Norm statistics for values.
    """

    key_signposts: torch.Tensor
    value_signposts: torch.Tensor
    key_lower: torch.Tensor
    key_upper: torch.Tensor
    key_qnorm: torch.Tensor
    value_qnorm: torch.Tensor

    def key_lut(self, qnorm: bool = False) -> torch.Tensor:
        """Float32 key lookup table `[2**bits]`, with the Q-Norm correction folded in when `qnorm`."""
        return quant.apply_qnorm(self.key_signposts, self.key_qnorm if qnorm else None)

    def value_lut(self, qnorm: bool = False) -> torch.Tensor:
        """Float32 value lookup table `[2**bits]`, with the Q-Norm correction folded in when `qnorm`."""
        return quant.apply_qnorm(self.value_signposts, self.value_qnorm if qnorm else None)

    def key_zero_scale(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel `zero, scale` `[num_kv_heads, head_dim]` from the key thresholds."""
        return quant.key_zero_scale(self.key_lower, self.key_upper)

    def to(self, device: torch.device | str | None) -> LayerSignposts:
        """A copy with every tensor on `device` (float32 kept)."""
        return LayerSignposts(**{n: getattr(self, n).to(device=device, dtype=torch.float32) for n in TENSOR_NAMES})

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors by file name, contiguous float32 on CPU (what the safetensors file holds)."""
        return {n: getattr(self, n).detach().to("cpu", torch.float32).contiguous() for n in TENSOR_NAMES}


@dataclass
class Signposts:
    """Calibrated quantizer parameters of a whole model for one bit width.

    Args:
        layers (`list[LayerSignposts]`): one entry per decoder layer.
        metadata (`dict`): the `metadata.json` content (see the module docstring); `files` is filled in
            by :func:`save_signposts`.
        path (`str`, *optional*): folder it was loaded from or saved to.

    Example:

    ```python
    >>> from kvquant_hf.signposts import load_signposts, validate_signposts
    >>> sp = load_signposts("signposts/smollm2-1pct", bits=4)
    >>> validate_signposts(sp, model)
    >>> lut = sp.layers[0].key_lut(qnorm=False)  # float32 [16]
    ```
    """

    layers: list[LayerSignposts]
    metadata: dict[str, Any] = field(default_factory=dict)
    path: str | None = None

    @property
    def bits(self) -> int:
        return int(self.metadata["bits"])

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_kv_heads(self) -> int:
        return int(self.layers[0].key_lower.shape[0])

    @property
    def head_dim(self) -> int:
        return int(self.layers[0].key_lower.shape[1])

    @property
    def model_type(self) -> str | None:
        return self.metadata.get("model", {}).get("model_type")

    @property
    def outlier_fraction(self) -> float:
        return float(self.metadata.get("outlier_fraction", 0.0))

    @property
    def outlier_slots_default(self) -> int:
        return int(self.metadata.get("outlier_slots_default", 0))

    @property
    def sink_tokens(self) -> int:
        return int(self.metadata.get("sink_tokens", 0))

    @property
    def fisher_weighting(self) -> str | None:
        return self.metadata.get("fisher_weighting")

    def to(self, device: torch.device | str | None) -> Signposts:
        """A copy with every layer's tensors on `device`."""
        return replace(self, layers=[layer.to(device) for layer in self.layers])

    def __getitem__(self, layer_idx: int) -> LayerSignposts:
        return self.layers[layer_idx]

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        model = self.metadata.get("model", {})
        return (
            f"Signposts(bits={self.bits}, num_layers={self.num_layers}, num_kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, model_type={model.get('model_type')!r}, "
            f"outlier_fraction={self.outlier_fraction}, fisher_weighting={self.fisher_weighting!r}, "
            f"path={self.path!r})"
        )


# --------------------------------------------------------------------------------------------
# save / load
# --------------------------------------------------------------------------------------------
def save_signposts(sp: Signposts, output_dir: str | os.PathLike) -> str:
    """Write `sp` to `output_dir/nuq{bits}/` (layer safetensors files + `metadata.json` with checksums).

    The folder is written next to its destination and moved into place, so a reader never sees a half
    written folder; an existing signpost folder for the same bits is replaced (any other existing folder
    of that name is left alone and raises an error).

    Args:
        sp (`Signposts`): what to save; `sp.metadata` must hold at least `bits` and `model`.
        output_dir (`str`): parent folder (created if needed).

    Returns:
        `str`: the path of the written `nuq{bits}` folder (also stored in `sp.path`; `sp.metadata` gets the
        `format_version`, `kind` and `files` checksums that were written).
    """
    meta = dict(sp.metadata)
    meta["format_version"] = FORMAT_VERSION
    meta["kind"] = KIND
    meta.setdefault("files", {})
    where = "signposts to save"
    check_metadata(meta, where, files=False)
    bits = meta["bits"]
    model = meta["model"]
    if sp.num_layers != model["num_hidden_layers"]:
        raise SignpostError(
            f"signposts to save have {sp.num_layers} layers but metadata.model.num_hidden_layers="
            f"{model['num_hidden_layers']}."
        )
    for i, layer in enumerate(sp.layers):
        check_layer(layer, i, bits, model["num_key_value_heads"], model["head_dim"], where, metadata_dtype(meta))
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as exc:
        raise SignpostError(f"{where}: the metadata cannot be written as JSON ({exc}); keep it to plain "
                            "str, int, float, bool, list and dict values.") from exc

    output_dir = check_output_dir(output_dir, [bits])
    os.makedirs(output_dir, exist_ok=True)
    target = os.path.join(output_dir, bits_dirname(bits))
    tmp = tempfile.mkdtemp(prefix=f".{bits_dirname(bits)}.tmp-", dir=output_dir)
    try:
        files = {}
        for i, layer in enumerate(sp.layers):
            name = layer_filename(i)
            path = os.path.join(tmp, name)
            header = {"kind": KIND, "format_version": str(FORMAT_VERSION), "layer": str(i), "bits": str(bits)}
            save_file(layer.tensors(), path, metadata=header)
            files[name] = sha256_file(path)
        meta["files"] = files
        with open(os.path.join(tmp, METADATA_FILE), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, sort_keys=False)
            f.write("\n")
        _apply_umask(tmp)
        if os.path.exists(target):
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    sp.metadata = meta
    sp.path = target
    return target


def _apply_umask(folder: str) -> None:
    """Give a folder and its files the usual permissions (mkdtemp and safetensors create them owner-only)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for name in os.listdir(folder):
        os.chmod(os.path.join(folder, name), 0o666 & ~umask)


def _available_bits(folder: str) -> list[int]:
    try:
        names = sorted(os.listdir(folder))
    except OSError as exc:
        raise SignpostError(f"signpost folder {folder!r} cannot be read ({exc}); check its permissions.") from exc
    out = []
    for name in names:
        m = re.fullmatch(r"nuq(\d+)", name)
        if m and os.path.isfile(os.path.join(folder, name, METADATA_FILE)):
            out.append(int(m.group(1)))
    return out


def _resolve_folder(path: str, bits: int | None, revision: str | None = None) -> str:
    """Map `DIR/nuqX`, or `DIR` plus `bits`, or an `hf://owner/name[@revision]` repo to the folder with metadata.json.

    Only the `hf://` form reaches the Hugging Face Hub: a local path that does not exist is an error.
    """
    if path.startswith(HUB_PREFIX):
        return _resolve_folder(download_signposts(path, bits, revision), bits)
    if os.path.isfile(os.path.join(path, METADATA_FILE)):
        return path
    if os.path.isdir(path):
        available = _available_bits(path)
        if bits is not None:
            sub = os.path.join(path, bits_dirname(bits))
            if os.path.isfile(os.path.join(sub, METADATA_FILE)):
                return sub
            raise SignpostError(
                f"no {bits}-bit signposts in {path}: {sub}/{METADATA_FILE} is missing "
                f"(available bits: {available or 'none'}); run calibrate.py --bits {bits} --output-dir {path}."
            )
        if len(available) == 1:
            return os.path.join(path, bits_dirname(available[0]))
        if available:
            raise SignpostError(
                f"{path} holds signposts for bits {available}; pass bits=... (or point at {path}/nuqX)."
            )
        raise SignpostError(
            f"{path} holds no signposts ({METADATA_FILE} and nuqX/ folders are missing); "
            "write them with calibrate.py --output-dir."
        )
    if os.path.exists(path):
        parent = os.path.dirname(os.path.abspath(path))
        raise SignpostError(
            f"signposts={path!r} is a file, not a folder; pass the folder written by calibrate.py (the parent of "
            f"nuqX/ folders, or one nuqX/ folder holding {METADATA_FILE}), e.g. {parent!r}."
        )
    hint = ""
    if HUB_REPO_RE.match(path) and not path.startswith((".", "/")):
        hint = f" For signposts on the Hugging Face Hub write signposts='{HUB_PREFIX}{path}' (optionally '@revision')."
    looked = "" if os.path.isabs(path) else f"looked for {os.path.abspath(path)!r}; "
    raise SignpostError(
        f"signpost folder {path!r} does not exist; run calibrate.py --output-dir {path} or fix the path "
        f"({looked}nothing was downloaded).{hint}"
    )


def load_signposts(
    path: str | os.PathLike, bits: int | None = None, device: torch.device | str | None = None,
    revision: str | None = None,
) -> Signposts:
    """Load signposts written by :func:`save_signposts` / `calibrate.py`, verifying files and checksums.

    Args:
        path (`str`): a `nuqX` folder, or its parent together with `bits` (then `path/nuq{bits}` is read;
            without `bits` a parent holding exactly one `nuqX` folder is accepted), or a Hugging Face Hub
            repository holding such folders as `"hf://owner/name"` or `"hf://owner/name@revision"`. Only this
            form downloads (honouring `HF_HUB_OFFLINE`: then only the local Hub cache is read); a local path
            that does not exist is an error.
        bits (`int`, *optional*): the bit width to load; must match the folder's metadata.
        device (`str` or `torch.device`, *optional*): where to put the tensors (default CPU).
        revision (`str`, *optional*): branch, tag or commit of an `hf://` repository (same as `@revision`).

    Returns:
        `Signposts`

    Raises:
        `SignpostError`: missing folder or files, a file instead of a folder, a Hub repository that cannot be
            fetched, unknown format version, checksum mismatch, corrupted or truncated files, metadata fields of
            the wrong type or range, tensors inconsistent with the metadata or of impossible magnitude, or `bits`
            not matching.
    """
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise SignpostError(f"signposts={path!r} is not a folder path; pass the folder written by calibrate.py.")
    if bits is not None and (isinstance(bits, bool) or bits not in SIGNPOST_BITS):
        raise SignpostError(f"bits={bits!r} is not supported; choose one of {SIGNPOST_BITS}.")
    path = os.fspath(path)
    if revision is not None and not path.startswith(HUB_PREFIX):
        raise SignpostError(f"revision={revision!r} applies to {HUB_PREFIX}owner/name paths only, not {path!r}.")
    folder = _resolve_folder(path, bits, revision)
    meta_path = os.path.join(folder, METADATA_FILE)
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise SignpostError(f"{meta_path} is not valid JSON ({exc}); the folder is corrupted: {FIX}.") from exc
    except OSError as exc:
        raise SignpostError(f"{meta_path} cannot be read ({exc}); check the folder's permissions.") from exc
    check_metadata(meta, folder)
    if bits is not None and meta["bits"] != bits:
        raise SignpostError(
            f"{folder} holds {meta['bits']}-bit signposts but bits={bits} was requested; point at the "
            f"nuq{bits} folder or run calibrate.py --bits {bits}."
        )
    model = meta["model"]
    n_layers = model["num_hidden_layers"]
    layers = [_load_layer(folder, i, meta) for i in range(n_layers)]
    if device is not None:
        layers = [layer.to(device) for layer in layers]
    return Signposts(layers=layers, metadata=meta, path=folder)


def _load_layer(folder: str, i: int, meta: dict) -> LayerSignposts:
    """One layer file: present, parses, matches its checksum and header, float tensors that pass the checks."""
    name = layer_filename(i)
    fpath = os.path.join(folder, name)
    n_layers = meta["model"]["num_hidden_layers"]
    if not os.path.isfile(fpath):
        raise SignpostError(
            f"signpost file {fpath} is missing ({n_layers} layer files expected); copy the whole folder or "
            "re-run calibrate.py."
        )
    try:
        tensors = load_file(fpath, device="cpu")
        with safe_open(fpath, framework="pt", device="cpu") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise SignpostError(
            f"signpost file {fpath} is truncated or corrupted ({exc}); re-copy it or re-run calibrate.py."
        ) from exc
    digest = sha256_file(fpath)
    if digest != meta["files"][name]:
        raise SignpostError(
            f"checksum mismatch for {fpath}: sha256 {digest[:16]}..., metadata.json says "
            f"{meta['files'][name][:16]}...; the file was modified or belongs to another calibration run: "
            "re-copy the folder or re-run calibrate.py."
        )
    for key, want in (("layer", str(i)), ("bits", str(meta["bits"]))):
        if key in header and header[key] != want:
            raise SignpostError(
                f"signpost file {fpath} holds {key}={header[key]!r} in its header but metadata.json expects "
                f"{key}={want}; the files were renamed or mixed from different folders: {FIX}."
            )
    absent = [n for n in TENSOR_NAMES if n not in tensors]
    if absent:
        raise SignpostError(f"signpost file {fpath} lacks tensors {absent}; re-run calibrate.py.")
    for n in TENSOR_NAMES:
        if not tensors[n].dtype.is_floating_point:
            raise SignpostError(
                f"signpost file {fpath}: layer {i} '{n}' has dtype {tensors[n].dtype}, expected float32; {FIX}."
            )
    layer = LayerSignposts(**{n: tensors[n].to(torch.float32) for n in TENSOR_NAMES})
    model = meta["model"]
    check_layer(layer, i, meta["bits"], model["num_key_value_heads"], model["head_dim"], folder, metadata_dtype(meta))
    return layer


# --------------------------------------------------------------------------------------------
# validation against a model
# --------------------------------------------------------------------------------------------
def _model_facts(model_or_config: Any) -> dict[str, Any]:
    """`model_identity`-style facts from a model, a config or an identity dict."""
    if isinstance(model_or_config, dict):
        return model_or_config
    cfg = getattr(model_or_config, "config", model_or_config)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    n_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    return {
        "model_type": getattr(cfg, "model_type", None),
        "name_or_path": getattr(cfg, "_name_or_path", "") or "",
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": getattr(cfg, "num_key_value_heads", None) or n_heads,
        "head_dim": head_dim,
        "hidden_size": getattr(cfg, "hidden_size", None),
    }


def validate_signposts(sp: Signposts, model_or_config: Any, bits: int | None = None) -> None:
    """Check that signposts fit a model (and a bit width); raise a SignpostError saying how to fix it.

    Args:
        sp (`Signposts`): loaded or freshly calibrated signposts.
        model_or_config: a `PreTrainedModel`, its `PretrainedConfig`, or a `model_identity()` dict.
        bits (`int`, *optional*): the bit width the cache will use.

    Raises:
        `SignpostError`: model_type, layer count, kv heads or head_dim differ from the model, `bits` differs,
            or the tensors are inconsistent with the metadata.
    """
    where = getattr(sp, "path", None) or "signposts"
    meta = getattr(sp, "metadata", None)
    layers = getattr(sp, "layers", None)
    if not isinstance(meta, dict) or not isinstance(layers, (list, tuple)) or not layers:
        raise SignpostError(
            f"{where}: expected Signposts with per-layer tensors and a metadata dict, got {type(sp).__name__} "
            f"with {type(layers).__name__} layers; load them with load_signposts(folder) or run calibrate.py."
        )
    if "model" not in meta or "bits" not in meta:
        raise SignpostError(f"{where}: the metadata lacks 'model' or 'bits'; {FIX}.")
    if isinstance(meta["bits"], bool) or meta["bits"] not in SIGNPOST_BITS:
        raise SignpostError(f"{where}: metadata bits={meta['bits']!r}, expected 2, 3 or 4; {FIX}.")
    check_model_fields(meta["model"], where)
    facts = _model_facts(model_or_config)
    cal = meta["model"]
    fix = "run calibrate.py on this model"
    if cal.get("model_type") != facts["model_type"]:
        raise SignpostError(
            f"{where}: signposts were calibrated for model_type={cal.get('model_type')!r}, the model is "
            f"{facts['model_type']!r}; {fix}."
        )
    shape = getattr(layers[0], "key_lower", None)
    if not isinstance(shape, torch.Tensor) or shape.dim() != 2:
        raise SignpostError(f"{where}: layer 0 'key_lower' is not a [num_kv_heads, head_dim] tensor; {FIX}.")
    checks = (
        ("num_hidden_layers", "layers", len(layers)),
        ("num_key_value_heads", "key/value heads", int(shape.shape[0])),
        ("head_dim", "head_dim", int(shape.shape[1])),
    )
    for key, what, have in checks:
        if cal[key] != have:
            raise SignpostError(
                f"{where}: metadata says {key}={cal.get(key)} but the tensors have {have}; the folder is "
                "inconsistent: re-run calibrate.py."
            )
        if have != int(facts[key]):
            raise SignpostError(
                f"{where}: signposts were calibrated for {have} {what}, the model has {facts[key]}; {fix}."
            )
    sp_bits = meta["bits"]
    if bits is not None and sp_bits != int(bits):
        raise SignpostError(
            f"{where}: signposts are for {sp_bits}-bit (nuq{sp_bits}) quantization but bits={bits} was requested; "
            f"load the nuq{bits} folder (load_signposts(dir, bits={bits})) or run calibrate.py --bits {bits}."
        )
    dtype = _model_dtype(model_or_config) or metadata_dtype(meta)
    for i, layer in enumerate(layers):
        check_layer(layer, i, sp_bits, cal["num_key_value_heads"], cal["head_dim"], where, dtype)


def _model_dtype(model_or_config: Any) -> torch.dtype | None:
    """The dtype of a model's weights (None for a config or an identity dict)."""
    dtype = getattr(model_or_config, "dtype", None) if isinstance(model_or_config, torch.nn.Module) else None
    return dtype if isinstance(dtype, torch.dtype) else None


__all__ = [
    "FISHER_WEIGHTINGS", "FORMAT_VERSION", "HUB_PREFIX", "KIND", "METADATA_FILE", "TENSOR_NAMES", "LayerSignposts",
    "Signposts", "bits_dirname", "layer_filename", "load_signposts", "save_signposts", "sha256_file",
    "validate_signposts",
]

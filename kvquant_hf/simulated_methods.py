"""What a simulated cache does: method specifications (:class:`MethodSpec`, ``"nuq4"``, ``"int3"``, ``"kivi2"``...),
the nuq quantizer parameters of each layer (from signposts or uncalibrated), and the fast quantize-dequantize
functions the simulated layers store with (bit-identical to :mod:`kvquant_hf.quant`'s quantize + dequantize).

The layers and the cache that use them are in :mod:`kvquant_hf.simulated`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import torch

from . import quant
from .errors import KVQuantConfigError, SignpostError

METHOD_FAMILIES = ("fp16", "nuq", "int", "kivi")
#: the method names :func:`parse_method` accepts, as said in messages and ``--help``
METHOD_NAMES = "fp16, nuq2/nuq3/nuq4, int2/int3/int4/int8, kivi2/kivi3/kivi4/kivi8"
_METHOD_RE = re.compile(r"^(fp16|nuq|int|kivi)(\d*)$")


# --------------------------------------------------------------------------------------------
# method specification
# --------------------------------------------------------------------------------------------
@dataclass
class MethodSpec:
    """What one simulated cache does.

    Args:
        family (`str`): "fp16", "nuq", "int" or "kivi".
        bits (`int`, optional): bits per code (2, 3, 4; None for fp16).
        outlier_slots (`int`): exact slots per token and head (nuq only).
        sink_tokens (`int`): first tokens of each sequence kept exact.
        qnorm (`bool`): use the Q-Norm-corrected lookup tables (nuq only).
        kivi_group (`int`): tokens per KIVI key group.
        key_granularity (`str`): "channel" (KVQuant: offline per-channel thresholds) or "token" (online
            per-token range, like values). Only "channel" is storable by the real cache.
        key_rope (`str`): "pre" (KVQuant: quantize before RoPE) or "post". Only "pre" is storable.
        quantize (`str`): "both" (default), or "keys" / "values" to quantize only that side and keep the other
            exact (nuq only; a diagnostic for where the error comes from, not storable).
        name (`str`, optional): label used in results (default: ``family + bits``).
    """

    family: str
    bits: int | None = None
    outlier_slots: int = 0
    sink_tokens: int = 0
    qnorm: bool = False
    kivi_group: int = 32
    key_granularity: str = "channel"
    key_rope: str = "pre"
    quantize: str = "both"
    name: str | None = None

    def __post_init__(self) -> None:
        if self.family not in METHOD_FAMILIES:
            raise KVQuantConfigError(f"unknown method family {self.family!r}; choose one of {METHOD_FAMILIES}.")
        if self.family == "fp16":
            self.bits = None
        elif self.bits not in (2, 3, 4, 8):
            raise KVQuantConfigError(
                f"{self.family} needs bits in (2, 3, 4) (8 for int/kivi), got {self.bits!r}; e.g. 'nuq4', 'int3'."
            )
        if self.family == "nuq" and self.bits == 8:
            raise KVQuantConfigError("nuq8 is not supported; nuqX takes X in (2, 3, 4).")
        if self.key_granularity not in ("channel", "token"):
            raise KVQuantConfigError(f"key_granularity={self.key_granularity!r}; use 'channel' or 'token'.")
        if self.key_rope not in ("pre", "post"):
            raise KVQuantConfigError(f"key_rope={self.key_rope!r}; use 'pre' or 'post'.")
        if self.quantize not in ("both", "keys", "values"):
            raise KVQuantConfigError(f"quantize={self.quantize!r}; use 'both', 'keys' or 'values'.")
        if self.quantize != "both" and self.family != "nuq":
            raise KVQuantConfigError("quantize='keys'/'values' is a nuq diagnostic; use quantize='both' for "
                                     f"{self.family}.")
        if self.sink_tokens < 0 or self.outlier_slots < 0:
            raise KVQuantConfigError("sink_tokens and outlier_slots must be >= 0.")
        if self.name is None:
            self.name = self.family + ("" if self.bits is None else str(self.bits))

    @property
    def storable(self) -> bool:
        """Whether the real ``KVQuantCache`` can store exactly this (nuq with KVQuant's key layout)."""
        return (self.family == "nuq" and self.key_granularity == "channel" and self.key_rope == "pre"
                and self.quantize == "both")


def parse_method(method: str | MethodSpec, **overrides: Any) -> MethodSpec:
    """Parse ``"fp16" | "nuq4" | "int3" | "kivi2" ...`` into a :class:`MethodSpec`.

    Args:
        method: method name or an existing spec (returned as is, ``overrides`` ignored).
        overrides: MethodSpec fields (``outlier_slots``, ``sink_tokens``, ``qnorm`` ...); the nuq-only
            ones are ignored for the baselines, which have no sink and no outliers.
    """
    if isinstance(method, MethodSpec):
        return method
    m = _METHOD_RE.match(str(method).strip().lower())
    if m is None or (m.group(1) != "fp16" and not m.group(2)):
        raise KVQuantConfigError(
            f"unknown method {method!r}; use {METHOD_NAMES}."
        )
    family, bits = m.group(1), (int(m.group(2)) if m.group(2) and m.group(1) != "fp16" else None)
    kwargs: dict[str, Any] = {"family": family, "bits": bits, "name": str(method).strip().lower()}
    if family == "nuq":
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
    elif family == "kivi" and overrides.get("kivi_group") is not None:
        kwargs["kivi_group"] = overrides["kivi_group"]
    return MethodSpec(**kwargs)


def method_avg_bits(spec: MethodSpec, head_dim: int, seq_len: int | None = None) -> float:
    """Average stored bits per K/V element, counting scales, zeros, outlier slots and the sink.

    * fp16: 16.
    * nuqX: :func:`quant.nuq_avg_bits` (codes, per-token value scale/zero in fp16, slots of fp16 value +
      uint8 channel); per-channel key thresholds are per layer and vanish. The sink's first
      ``sink_tokens`` tokens count 16 bits out of ``seq_len`` tokens.
    * intX: X + 2 * 16 / head_dim (fp16 scale and zero per head vector), keys and values alike.
    * KIVI-X: keys X + 2 * 16 / group (per-channel scale/zero per group of tokens), values X + 32 / head_dim.
    """
    if spec.family == "fp16":
        return 16.0
    bits = int(spec.bits)
    if spec.family == "int":
        return bits + 32.0 / head_dim
    if spec.family == "kivi":
        return ((bits + 32.0 / spec.kivi_group) + (bits + 32.0 / head_dim)) / 2
    avg = quant.nuq_avg_bits(bits, head_dim, spec.outlier_slots)
    if spec.key_granularity == "token":  # keys then carry a per-token scale/zero too
        avg += 16.0 / head_dim
    if spec.sink_tokens and seq_len:
        s = min(spec.sink_tokens, seq_len)
        avg = (avg * (seq_len - s) + 16.0 * s) / seq_len
    return float(avg)


# --------------------------------------------------------------------------------------------
# nuq parameters (from signposts or uncalibrated)
# --------------------------------------------------------------------------------------------
@dataclass
class NuqLayerParams:
    """Quantizer parameters of one layer for the nuq method.

    Args:
        key_lut / value_lut: float32 ``[2**bits]`` lookup tables (Q-Norm already folded in if wanted).
        key_lower / key_upper: float32 ``[H_kv, D]`` per-channel key thresholds (pre-RoPE, or post-RoPE for
            ``key_rope="post"``); None means "take them from the first call's keys" (uncalibrated).
    """

    key_lut: torch.Tensor
    value_lut: torch.Tensor
    key_lower: torch.Tensor | None = None
    key_upper: torch.Tensor | None = None


def _call_lut(obj: Any, name: str, qnorm: bool) -> torch.Tensor:
    attr = getattr(obj, name)
    lut = attr(qnorm) if callable(attr) else attr
    return torch.as_tensor(lut, dtype=torch.float32)


def nuq_params_from_signposts(signposts: Any, qnorm: bool = False) -> list[NuqLayerParams]:
    """Per-layer :class:`NuqLayerParams` from a loaded ``Signposts`` object.

    Accepts anything with ``.layers[i]`` exposing ``key_lut(qnorm)`` / ``value_lut(qnorm)`` (or the
    ``key_signposts`` / ``value_signposts`` tables) and ``key_lower`` / ``key_upper`` ``[H_kv, D]``.
    """
    layers = getattr(signposts, "layers", None)
    if not layers:
        raise SignpostError(
            f"{type(signposts).__name__} has no per-layer signposts; pass kvquant_hf.signposts.load_signposts(...)."
        )
    out = []
    for i, layer in enumerate(layers):
        if hasattr(layer, "key_lut"):
            k_lut, v_lut = _call_lut(layer, "key_lut", qnorm), _call_lut(layer, "value_lut", qnorm)
        else:
            k_lut = quant.apply_qnorm(layer.key_signposts, getattr(layer, "key_qnorm", None) if qnorm else None)
            v_lut = quant.apply_qnorm(layer.value_signposts, getattr(layer, "value_qnorm", None) if qnorm else None)
        lower, upper = getattr(layer, "key_lower", None), getattr(layer, "key_upper", None)
        if lower is None or upper is None:
            raise SignpostError(f"signposts of layer {i} have no key thresholds (key_lower/key_upper).")
        out.append(
            NuqLayerParams(
                k_lut, v_lut, torch.as_tensor(lower, dtype=torch.float32), torch.as_tensor(upper, dtype=torch.float32)
            )
        )
    return out


def load_signposts_for(path: str, bits: int) -> Any:
    """Load signposts for ``bits`` from ``path`` (a ``nuqX`` folder or the parent holding ``nuq{bits}``)."""
    try:
        from .signposts import load_signposts
    except ImportError as exc:  # pragma: no cover - depends on a sibling module
        raise SignpostError(
            "kvquant_hf.signposts is not available in this checkout; pass NuqLayerParams or a Signposts object."
        ) from exc
    sub = os.path.join(path, f"nuq{bits}")
    target = sub if os.path.isdir(sub) else path
    return load_signposts(target, bits=bits)  # names a missing path, a file, or an hf:// repo it could not fetch


# --------------------------------------------------------------------------------------------
# fast quantize-dequantize (bit-identical to quant.quantize_* + dequantize_*, without the packing)
# --------------------------------------------------------------------------------------------
def _encode(x_norm: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """``#{m : x_norm > mid_m}`` (same as ``quant.encode_nearest``), one compare-and-add per midpoint
    (no ``[..., 2**bits - 1]`` intermediate; faster than bucketize on CPU for these small tables)."""
    mids = quant.signpost_midpoints(lut).to(x_norm.device)
    codes = torch.zeros(x_norm.shape, dtype=torch.uint8, device=x_norm.device)
    for i in range(mids.numel()):
        codes += x_norm > mids[i]
    return codes.long()


def fake_quant_keys(
    k: torch.Tensor, lut: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, n_slots: int, bits: int
) -> tuple[torch.Tensor, int]:
    """Float32 ``dequantize_keys(quantize_keys(k, ...))`` and the clipped-outlier count.

    Bit-identical to the :mod:`kvquant_hf.quant` oracle (tested); a faster path for 0 or 1 slot that skips
    the bit packing and the sort. More slots fall back to the oracle.
    """
    if n_slots > 1:
        packed = quant.quantize_keys(k, lut, lower, upper, n_slots, bits)
        return quant.dequantize_keys(packed, lut, lower, upper, bits, k.shape[-1]), packed.n_clipped
    x = k.to(torch.float32)
    zero, scale = quant.key_zero_scale(lower.to(x.device), upper.to(x.device))
    zero, scale = zero[None, :, None, :], scale[None, :, None, :]
    lo = lower.to(x.device, torch.float32)[None, :, None, :]
    hi = upper.to(x.device, torch.float32)[None, :, None, :]
    excess = quant.key_outlier_excess(x, lo, hi, scale)
    n_out = int((excess > 0).sum())
    xc = torch.minimum(torch.maximum(x, lo), hi)
    codes = _encode((xc - zero) * (1.0 / scale), lut)
    out = lut.to(x.device, torch.float32)[codes] * scale + zero
    if n_slots == 0:
        return out, n_out
    top, idx = excess.max(dim=-1, keepdim=True)  # first maximum = smallest channel on ties, like the oracle
    used = top > 0
    n_clipped = n_out - int(used.sum())
    exact = torch.gather(k, -1, idx).to(torch.float32)
    hit = used & (torch.arange(x.shape[-1], device=x.device) == idx)
    return torch.where(hit, exact, out), n_clipped


def fake_quant_values(v: torch.Tensor, lut: torch.Tensor, n_slots: int, bits: int) -> torch.Tensor:
    """Float32 ``dequantize_values(quantize_values(v, ...))``; bit-identical fast path for 0 or 1 slot."""
    if n_slots > 1:
        return quant.dequantize_values(quant.quantize_values(v, lut, n_slots, bits), lut, bits, v.shape[-1])
    x = v.to(torch.float32)
    d = x.shape[-1]
    sd = quant.value_scale_dtype(v.dtype)
    if n_slots == 0:
        lo, hi = x.amin(-1), x.amax(-1)
    else:
        ch = torch.arange(d, device=x.device)
        mx, i_mx = x.max(dim=-1, keepdim=True)
        mn, i_mn = x.min(dim=-1, keepdim=True)
        mx2 = x.masked_fill(ch == i_mx, float("-inf")).amax(-1, keepdim=True)  # = mx if the max is tied
        mn2 = x.masked_fill(ch == i_mn, float("inf")).amin(-1, keepdim=True)
        top2, bot2 = torch.cat([mx, mx2], -1), torch.cat([mn, mn2], -1)
        # a = 0: drop the maximum (range max2 - min); a = 1: drop the minimum (range max - min2); ties -> a = 0
        drop_min = (top2[..., 0] - bot2[..., 1]) < (top2[..., 1] - bot2[..., 0])
        lo = torch.where(drop_min, bot2[..., 1], bot2[..., 0])
        hi = torch.where(drop_min, top2[..., 0], top2[..., 1])
    smax = torch.finfo(sd).max  # same range arithmetic as quant.quantize_values
    zero = (hi * 0.5 + lo * 0.5).clamp(-smax, smax).to(sd)
    scale = (hi * 0.5 - lo * 0.5).clamp(quant.MIN_SCALE, smax).to(sd)
    zero32 = zero.to(torch.float32).unsqueeze(-1)
    scale32 = scale.to(torch.float32).clamp_min(quant.MIN_SCALE).unsqueeze(-1)
    codes = _encode((x - zero32) * (1.0 / scale32), lut)
    out = lut.to(x.device, torch.float32)[codes] * scale32 + zero32
    if n_slots == 0:
        return out
    # the slot: the minimum's first occurrence (a = 1) or the maximum's last occurrence (a = 0), as the
    # oracle's stable ascending sort orders ties
    first_min = i_mn  # torch.min/max return the first occurrence
    last_max = d - 1 - torch.argmax((x == mx).to(torch.int8).flip(-1), dim=-1, keepdim=True)
    idx = torch.where(drop_min.unsqueeze(-1), first_min, last_max)
    return torch.where(ch == idx, torch.gather(v, -1, idx).to(torch.float32), out)


__all__ = [
    "METHOD_FAMILIES",
    "METHOD_NAMES",
    "MethodSpec",
    "NuqLayerParams",
    "fake_quant_keys",
    "fake_quant_values",
    "load_signposts_for",
    "method_avg_bits",
    "nuq_params_from_signposts",
    "parse_method",
]

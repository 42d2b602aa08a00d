"""What a simulated cache does: method specifications (:class:`MethodSpec`, ``"nuq4"``, ``"int3"``, ``"kivi2"``...),
the nuq quantizer parameters of each layer (from signposts or uncalibrated), and the fast quantize-dequantize
functions the simulated layers store with (bit-identical to :mod:`kvquant_hf.quant`'s quantize + dequantize).

The layers and the cache that use them are in :mod:`kvquant_hf.simulated`.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any

import torch

from . import quant
from .config import DEFAULT_RECENT_WINDOW
from .errors import KVQuantConfigError, SignpostError

METHOD_FAMILIES = ("fp16", "nuq", "int", "kivi")
#: the method names :func:`parse_method` accepts, as said in messages and ``--help``
METHOD_NAMES = ("fp16, nuq2/nuq3/nuq4, int2/int3/int4/int8, kivi2/kivi3/kivi4/kivi8 (KIVI suffixes: -g64, -g128 for "
                "key groups of 64/128 tokens, -oneshot for the within-call baseline, e.g. kivi2-g128)")
_METHOD_RE = re.compile(r"^(fp16|nuq|int|kivi)(\d*)(?:-(g\d+|oneshot))?$")
#: KIVI's published defaults: key groups of 32 tokens, a full-precision residual of 128 tokens
KIVI_GROUP = 32
KIVI_RESIDUAL = 128


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
        kivi_group (`int`): tokens per KIVI key group (``G``); values use groups of ``min(G, head_dim)`` channels.
        kivi_oneshot (`bool`): KIVI without residual: key groups formed within each call, values per whole head
            vector (``kiviX-oneshot``); not decode-equivalent.
        recent_window (`int`, optional): ``R``, exact recent tokens. nuq: query ``i`` sees stored token ``j``
            exact (key and value) iff ``i - j <= R`` (0: only its own token). KIVI: the full-precision residual
            (default 128, a multiple of ``kivi_group``): key ``j`` is exact iff ``j >= R * (i // R)`` (keys are
            flushed in blocks of ``R``), value ``j`` iff ``i - j <= R`` (values slide). None: 0, or 128 for KIVI.
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
    kivi_group: int = KIVI_GROUP
    kivi_oneshot: bool = False
    recent_window: int | None = None
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
        self._check_window()
        if self.name is None:
            self.name = self.family + ("" if self.bits is None else str(self.bits))

    def _check_window(self) -> None:
        kivi_residual = self.family == "kivi" and not self.kivi_oneshot
        if self.recent_window is None:  # the defaults: KIVI's residual, the cache's window for nuq
            self.recent_window = KIVI_RESIDUAL if kivi_residual else DEFAULT_RECENT_WINDOW if self.family == "nuq" else 0
        r = self.recent_window
        if not isinstance(r, int) or isinstance(r, bool) or r < 0:
            raise KVQuantConfigError(f"recent_window={r!r}; it must be an integer >= 0 (exact recent tokens).")
        if self.family == "kivi":
            g = self.kivi_group
            if not isinstance(g, int) or isinstance(g, bool) or g <= 0:
                raise KVQuantConfigError(f"kivi_group={g!r}; it must be a positive number of tokens (KIVI: 32).")
            if kivi_residual and (r == 0 or r % g):
                raise KVQuantConfigError(
                    f"KIVI's residual (recent_window={r}) must be a positive multiple of its key group ({g}) so that "
                    f"flushed blocks hold whole groups; use e.g. recent_window={KIVI_RESIDUAL} (KIVI's default)."
                )
            if self.kivi_oneshot and r:
                raise KVQuantConfigError("kiviX-oneshot has no residual; use recent_window=0 or the kiviX method.")
        elif self.family in ("int", "fp16") and r:
            raise KVQuantConfigError(f"recent_window applies to nuq and KIVI only, not to {self.family}.")

    @property
    def storable(self) -> bool:
        """Whether the real ``KVQuantCache`` can store exactly this (nuq with KVQuant's key layout)."""
        return (self.family == "nuq" and self.key_granularity == "channel" and self.key_rope == "pre"
                and self.quantize == "both")


def parse_method(method: str | MethodSpec, **overrides: Any) -> MethodSpec:
    """Parse ``"fp16" | "nuq4" | "int3" | "kivi2" | "kivi4-g128" | "kivi2-oneshot" ...`` into a :class:`MethodSpec`.

    ``kiviX`` is KIVI at its published defaults (key groups of 32 tokens, residual 128, decode-equivalent);
    ``kiviX-g64`` / ``kiviX-g128`` use key groups of 64/128 tokens; ``kiviX-oneshot`` quantizes within each call.

    Args:
        method: method name or an existing spec (returned as is, ``overrides`` ignored).
        overrides: MethodSpec fields (``outlier_slots``, ``sink_tokens``, ``qnorm``, ``recent_window`` ...); the
            nuq-only ones are ignored for the baselines, which have no sink, no outliers and (KIVI) their own
            residual.
    """
    if isinstance(method, MethodSpec):
        return method
    m = _METHOD_RE.match(str(method).strip().lower())
    if m is None or (m.group(1) != "fp16" and not m.group(2)) or (m.group(3) and m.group(1) != "kivi"):
        raise KVQuantConfigError(
            f"unknown method {method!r}; use {METHOD_NAMES}."
        )
    family, bits = m.group(1), (int(m.group(2)) if m.group(2) and m.group(1) != "fp16" else None)
    kwargs: dict[str, Any] = {"family": family, "bits": bits, "name": str(method).strip().lower()}
    suffix = m.group(3)
    if family == "nuq":
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
    elif family == "kivi":
        if suffix == "oneshot":
            kwargs["kivi_oneshot"] = True
        elif suffix:
            if int(suffix[1:]) not in (32, 64, 128):
                raise KVQuantConfigError(f"unknown method {method!r}: KIVI key groups are g32 (default), g64 or g128.")
            kwargs["kivi_group"] = int(suffix[1:])
        elif overrides.get("kivi_group") is not None:
            kwargs["kivi_group"] = overrides["kivi_group"]
    return MethodSpec(**kwargs)


def nuq_stored_bytes(spec: MethodSpec, head_dim: int, seq_len: int, num_kv_heads: int = 1) -> float:
    """Bytes a nuq cache stores per sequence and layer at ``seq_len`` tokens, by the real cache's accounting
    (:mod:`kvquant_hf.layer_storage`, fp16 model): every non-sink token packed, the last ``recent_window`` of them
    also kept exact, the sink exact; ``num_kv_heads`` heads (the int32 position is per token, shared by them)."""
    from .config import KVQuantConfig
    from .layer_storage import history_token_bytes, sink_token_bytes, window_token_bytes

    cfg = KVQuantConfig(bits=int(spec.bits), outlier_slots=spec.outlier_slots, sink_tokens=0)
    dt = torch.float16
    s = min(spec.sink_tokens, seq_len)
    hist = history_token_bytes(cfg, num_kv_heads, head_dim, dt)
    return float((seq_len - s) * hist + min(int(spec.recent_window), seq_len - s) * window_token_bytes(
        num_kv_heads, head_dim, dt) + s * sink_token_bytes(num_kv_heads, head_dim, dt))


def kivi_stored_bits(spec: MethodSpec, head_dim: int, seq_len: int) -> float:
    """Bits KIVI stores per head at ``seq_len`` tokens: quantized key codes + fp16 scale and zero per channel and
    group of ``G`` tokens, quantized value codes + fp16 scale and zero per token and group of ``min(G, D)``
    channels, residual tokens (keys ``T mod R``, values ``min(T, R)``) in fp16."""
    bits, g, r, d = int(spec.bits), spec.kivi_group, int(spec.recent_window), head_dim
    k_res = seq_len % r
    k_q = seq_len - k_res
    v_res = min(seq_len, r)
    v_q = seq_len - v_res
    key_bits = k_q * d * bits + (k_q // g) * d * 32 + k_res * d * 16
    value_bits = v_q * d * bits + v_q * math.ceil(d / min(g, d)) * 32 + v_res * d * 16
    return float(key_bits + value_bits)


def method_avg_bits(spec: MethodSpec, head_dim: int, seq_len: int | None = None, num_kv_heads: int = 1) -> float:
    """Average stored bits per K/V element at ``seq_len`` tokens (None: the long-sequence limit), every stored byte
    counted (codes, scales, zeros, outlier slots, positions, sink, exact recent window, residual).

    * fp16: 16.
    * nuqX: :func:`nuq_stored_bytes` (the real cache's accounting: ``(T - sink) * history_token_bytes +
      min(R, T - sink) * window_token_bytes + sink * sink_token_bytes``) over ``T * num_kv_heads * 2 * D``
      elements; the int32 position costs ``32 / (num_kv_heads * 2 * D)`` bits per element (default one head).
      Per-channel key thresholds are per layer and vanish. ``key_granularity="token"`` adds a per-token fp16
      scale/zero for keys.
    * intX: X + 2 * 16 / head_dim (fp16 scale and zero per head vector), keys and values alike.
    * kiviX: :func:`kivi_stored_bits`. kiviX-oneshot: keys X + 2 * 16 / group, values X + 32 / head_dim.
    """
    if spec.family == "fp16":
        return 16.0
    bits = int(spec.bits)
    if num_kv_heads < 1:
        raise KVQuantConfigError(f"num_kv_heads={num_kv_heads!r}; it must be >= 1.")
    if seq_len is not None and seq_len < 1:
        raise KVQuantConfigError(f"seq_len={seq_len!r}; it must be >= 1 (or None for the long-sequence limit).")
    if spec.family == "int":
        return bits + 32.0 / head_dim
    if spec.family == "kivi":
        if spec.kivi_oneshot:
            return ((bits + 32.0 / spec.kivi_group) + (bits + 32.0 / head_dim)) / 2
        if seq_len is None:
            return ((bits + 32.0 / spec.kivi_group) + (bits + 32.0 * math.ceil(head_dim / min(spec.kivi_group,
                                                                                            head_dim)) / head_dim)) / 2
        return kivi_stored_bits(spec, head_dim, seq_len) / (2 * head_dim * seq_len)
    if seq_len is None:
        from .config import KVQuantConfig
        from .layer_storage import history_token_bytes

        cfg = KVQuantConfig(bits=bits, outlier_slots=spec.outlier_slots, sink_tokens=0)
        avg = 8.0 * history_token_bytes(cfg, num_kv_heads, head_dim, torch.float16) / (num_kv_heads * 2 * head_dim)
    else:
        avg = 8.0 * nuq_stored_bytes(spec, head_dim, seq_len, num_kv_heads) / (seq_len * num_kv_heads * 2 * head_dim)
    if spec.key_granularity == "token":  # keys then carry a per-token scale/zero too
        avg += 16.0 / head_dim
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
    "KIVI_GROUP",
    "KIVI_RESIDUAL",
    "kivi_stored_bits",
    "load_signposts_for",
    "method_avg_bits",
    "nuq_params_from_signposts",
    "nuq_stored_bytes",
    "parse_method",
]

"""The KVQuant math in plain PyTorch: the single source of truth for every kernel and the CPU backend.

Conventions (every kernel reproduces them bit for bit):

* **Codes and packing.** A code is an integer in ``[0, 2**bits)``. A vector of ``D`` codes packs into
  ``D * bits // 8`` bytes (``uint8``) as a little-endian bit stream: code ``i`` occupies bits
  ``bits*i .. bits*i + bits - 1`` counted from the least significant bit of byte 0. For 4 bits this is
  two codes per byte (low nibble first), for 2 bits four per byte, and 3-bit codes are packed tightly
  (8 codes in 3 bytes, some straddling a byte boundary). ``D`` must be a multiple of 16 so each RoPE
  half (``rotate_half`` pairs channel ``d`` with ``d + D/2``) starts on a byte boundary.
* **Normalization.** ``x_n = (x - zero) * inv_scale`` in float32 with ``inv_scale = 1 / scale``,
  where ``zero = (u + l) / 2`` and ``scale = (u - l) / 2`` for thresholds ``l <= u``. Keys use
  per-channel thresholds calibrated offline on *pre-RoPE* keys (``[H_kv, D]``); values use per-token
  thresholds computed online (one pair per head vector), rounded to the storage dtype *before* they
  normalize so that encode and decode agree.
* **nuqX encode/decode.** Signposts are a sorted table of ``2**bits`` points in (about) ``[-1, 1]``.
  ``code = #{m : x_n > mid_m}`` with ``mid_m = (s_m + s_{m+1}) / 2`` (nearest signpost, ties go to the
  lower one). Decode is ``lut[code] * scale + zero``.
* **Dense-and-sparse (the outlier rule).** Each token and head has ``n_slots`` outlier slots: ``(value, channel)``
  pairs stored exactly (value in the model dtype, channel as ``uint8``; unused slots hold channel
  ``UNUSED_SLOT`` = 255). Decoding *replaces* the dequantized value of that channel by the exact one
  (:func:`apply_slots`; a later slot naming the same channel wins).
  Keys: elements outside the calibrated per-channel ``[l, u]`` are outliers (:func:`key_outlier_excess`); when a
  token has more than ``n_slots`` of them the ones with the largest normalized excess keep a slot (ties to the
  smaller channel, :func:`top_slots`) and the rest are clipped to the threshold (and counted). Values: per token,
  exactly ``n_slots`` extremes are removed: ``a`` from the bottom and ``n_slots - a`` from the top, with ``a``
  chosen to minimize the range of what remains (smallest ``a`` on ties; :func:`value_outlier_split`); ``l``/``u``
  are then the remaining minimum and maximum. Every kernel mirrors these functions (docs/changing_the_method.md
  lists the tests that pin them).
* **Range arithmetic.** ``zero = u/2 + l/2`` and ``scale = u/2 - l/2`` (halving is exact, so this equals
  ``(u + l) / 2`` and ``(u - l) / 2`` without overflowing for huge float32 inputs). Per-token value
  ``scale``/``zero`` saturate at the largest finite number of their storage dtype (65504 for fp16: only
  float32 models with values beyond +-65504 reach it; such values then clip at the ends of the range);
  ``scale`` is at least ``MIN_SCALE``, so all-equal and all-zero vectors round-trip exactly through their zero
  point when the table contains 0, and to within ``MIN_SCALE`` otherwise.
* **Q-Norm.** Optional per-layer correction ``lut' = (lut - mu_q) / sd_q * sd + mu`` folded into the
  lookup table, so kernels need nothing extra.

Tensor layouts: keys/values ``[batch, kv_heads, seq, head_dim]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import KVQuantConfigError

UNUSED_SLOT = 255  # channel of an unused outlier slot
MIN_SCALE = 6.103515625e-05  # smallest normal fp16 (2**-14): floor of every scale (all-equal vectors)
#: finite stand-in for -inf in the attention's online softmax (running-max init, masked scores, the log-sum-exp of
#: nothing): no inf - inf. The torch reference (kvquant_hf.attention) and every kernel use it.
NEG_BIG = -1.0e30


# --------------------------------------------------------------------------------------------
# bit packing
# --------------------------------------------------------------------------------------------
def _check_bits(bits: int) -> None:
    if bits not in (2, 3, 4, 8):
        raise KVQuantConfigError(f"bits={bits!r} is not supported; choose one of (2, 3, 4).")


def packed_dim(head_dim: int, bits: int) -> int:
    """Bytes per packed vector of ``head_dim`` codes."""
    if head_dim % 16:
        raise KVQuantConfigError(
            f"head_dim={head_dim} is not supported; it must be a multiple of 16 (64 and 128 are tested)."
        )
    return head_dim * bits // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``[..., D]`` (values in ``[0, 2**bits)``) into ``uint8 [..., D*bits/8]``."""
    _check_bits(bits)
    d = codes.shape[-1]
    if (d * bits) % 8:
        raise KVQuantConfigError(f"cannot pack {d} codes of {bits} bits into whole bytes; use D % 8 == 0.")
    c = codes.to(torch.int32)
    if bits in (2, 4, 8):
        per = 8 // bits
        c = c.reshape(*c.shape[:-1], d // per, per)
        shifts = torch.arange(per, device=c.device, dtype=torch.int32) * bits
        return (c << shifts).sum(-1).to(torch.uint8)
    # 3 bits: 8 codes -> one 24-bit little-endian word -> 3 bytes
    c = c.reshape(*c.shape[:-1], d // 8, 8)
    shifts = torch.arange(8, device=c.device, dtype=torch.int32) * 3
    word = (c << shifts).sum(-1)
    out = torch.stack([(word >> (8 * i)) & 0xFF for i in range(3)], dim=-1)
    return out.reshape(*c.shape[:-2], d * 3 // 8).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, head_dim: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``uint8 [..., D*bits/8]`` -> ``int64 [..., D]``."""
    _check_bits(bits)
    p = packed.to(torch.int32)
    mask = (1 << bits) - 1
    if bits in (2, 4, 8):
        per = 8 // bits
        shifts = torch.arange(per, device=p.device, dtype=torch.int32) * bits
        out = (p.unsqueeze(-1) >> shifts) & mask
        return out.reshape(*p.shape[:-1], head_dim).long()
    p = p.reshape(*p.shape[:-1], head_dim // 8, 3)
    word = p[..., 0] | (p[..., 1] << 8) | (p[..., 2] << 16)
    shifts = torch.arange(8, device=p.device, dtype=torch.int32) * 3
    out = (word.unsqueeze(-1) >> shifts) & mask
    return out.reshape(*p.shape[:-2], head_dim).long()


# --------------------------------------------------------------------------------------------
# signpost tables
# --------------------------------------------------------------------------------------------
def uniform_signposts(bits: int) -> torch.Tensor:
    """``2**bits`` evenly spaced points on [-1, 1] (uniform intX grid in the normalized space)."""
    return torch.linspace(-1.0, 1.0, 2**bits, dtype=torch.float32)


def normal_float_signposts(bits: int) -> torch.Tensor:
    """NormalFloat-style table (quantiles of a normal, scaled to [-1, 1]) for uncalibrated use."""
    n = 2**bits
    probs = torch.linspace(0.5 / n, 1 - 0.5 / n, n, dtype=torch.float64)
    q = math.sqrt(2.0) * torch.erfinv(2 * probs - 1)
    return (q / q.abs().max()).to(torch.float32)


def signpost_midpoints(lut: torch.Tensor) -> torch.Tensor:
    """Decision boundaries between consecutive (sorted) signposts, float32 ``[2**bits - 1]``."""
    lut = lut.to(torch.float32)
    return (lut[1:] + lut[:-1]) * 0.5


def encode_nearest(x_norm: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Index of the nearest signpost (ties to the lower one) for normalized float32 values."""
    mids = signpost_midpoints(lut).to(x_norm.device)
    return (x_norm.unsqueeze(-1) > mids).sum(-1)


def apply_qnorm(lut: torch.Tensor, stats: torch.Tensor | None) -> torch.Tensor:
    """Fold Q-Norm ``stats = [mu, sd, mu_q, sd_q]`` into the lookup table (identity if None)."""
    if stats is None:
        return lut.to(torch.float32)
    mu, sd, mu_q, sd_q = [float(s) for s in stats]
    if sd_q <= 0:
        return lut.to(torch.float32)
    return ((lut.to(torch.float32) - mu_q) / sd_q * sd + mu).to(torch.float32)


# --------------------------------------------------------------------------------------------
# keys: per-channel, offline thresholds (pre-RoPE)
# --------------------------------------------------------------------------------------------
@dataclass
class PackedKeys:
    """Packed pre-RoPE keys for ``[B, H, S]`` tokens (see module docstring)."""

    codes: torch.Tensor  # uint8 [B, H, S, D*bits/8]
    out_val: torch.Tensor  # model dtype [B, H, S, n_slots]
    out_idx: torch.Tensor  # uint8 [B, H, S, n_slots], 255 = unused
    n_clipped: int = 0  # outliers beyond n_slots that were clipped to the threshold


@dataclass
class PackedValues:
    """Packed values for ``[B, H, S]`` tokens (see module docstring)."""

    codes: torch.Tensor  # uint8 [B, H, S, D*bits/8]
    scale: torch.Tensor  # scale dtype [B, H, S]
    zero: torch.Tensor  # scale dtype [B, H, S]
    out_val: torch.Tensor  # model dtype [B, H, S, n_slots]
    out_idx: torch.Tensor  # uint8 [B, H, S, n_slots]


def key_zero_scale(lower: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``zero, scale`` (float32) from calibrated thresholds ``[H, D]``."""
    lower = lower.to(torch.float32)
    upper = upper.to(torch.float32)
    zero = upper * 0.5 + lower * 0.5
    scale = (upper * 0.5 - lower * 0.5).clamp_min(MIN_SCALE)
    return zero, scale


def key_outlier_excess(x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The key outlier rule: the normalized distance ``max(lower - x, x - upper, 0) / scale`` of each element outside
    its channel's calibrated range (float32, broadcasting); an element is an outlier iff it is > 0."""
    return torch.maximum(lower - x, x - upper).clamp_min(0.0) / scale


def top_slots(score: torch.Tensor, n_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest ``n_slots`` entries of ``score [..., D]`` and their channels; ties to the smaller channel index."""
    order = torch.sort(score, dim=-1, descending=True, stable=True)
    return order.values[..., :n_slots], order.indices[..., :n_slots]


def value_outlier_split(sorted_vals: torch.Tensor, n_slots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The value outlier rule on ascending ``sorted_vals [..., D]``: ``a`` of the ``n_slots`` extremes come from the
    bottom and ``n_slots - a`` from the top, ``a`` minimizing the range of what remains (smallest ``a`` on ties).

    Returns ``a [...]`` (int64) and the remaining minimum ``lo [...]`` and maximum ``hi [...]``.
    """
    d = sorted_vals.shape[-1]
    k = n_slots
    ranges = torch.stack([sorted_vals[..., d - 1 - (k - a)] - sorted_vals[..., a] for a in range(k + 1)], dim=-1)
    a_best = torch.argmin(ranges, dim=-1)
    lo = torch.gather(sorted_vals, -1, a_best.unsqueeze(-1)).squeeze(-1)
    hi = torch.gather(sorted_vals, -1, (d - 1 - (k - a_best)).unsqueeze(-1)).squeeze(-1)
    return a_best, lo, hi


def quantize_keys(
    k: torch.Tensor,
    lut: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
    n_slots: int,
    bits: int,
) -> PackedKeys:
    """Quantize pre-RoPE keys ``[B, H, S, D]`` with per-channel thresholds ``[H, D]``."""
    b, h, s, d = k.shape
    if lower.shape != (h, d) or upper.shape != (h, d):
        raise KVQuantConfigError(
            f"key thresholds have shape {tuple(lower.shape)}, expected {(h, d)} for keys {tuple(k.shape)}."
        )
    x = k.to(torch.float32)
    zero, scale = key_zero_scale(lower.to(x.device), upper.to(x.device))
    zero = zero[None, :, None, :]
    scale = scale[None, :, None, :]
    lo = lower.to(x.device, torch.float32)[None, :, None, :]
    hi = upper.to(x.device, torch.float32)[None, :, None, :]
    excess = key_outlier_excess(x, lo, hi, scale)
    n_clipped = 0
    out_val = torch.zeros(b, h, s, n_slots, dtype=k.dtype, device=k.device)
    out_idx = torch.full((b, h, s, n_slots), UNUSED_SLOT, dtype=torch.uint8, device=k.device)
    if n_slots > 0:
        top_score, top_idx = top_slots(excess, n_slots)
        used = top_score > 0
        out_idx = torch.where(used, top_idx, torch.full_like(top_idx, UNUSED_SLOT)).to(torch.uint8)
        out_val = torch.where(used, torch.gather(k, -1, top_idx), torch.zeros((), dtype=k.dtype, device=k.device))
        n_clipped = int(((excess > 0).sum(-1) - used.sum(-1)).clamp_min(0).sum())
    else:
        n_clipped = int((excess > 0).sum())
    xc = torch.minimum(torch.maximum(x, lo), hi)
    x_norm = (xc - zero) * (1.0 / scale)
    codes = encode_nearest(x_norm, lut)
    return PackedKeys(pack_codes(codes, bits), out_val, out_idx, n_clipped)


def apply_slots(x: torch.Tensor, out_val: torch.Tensor, out_idx: torch.Tensor) -> torch.Tensor:
    """Replace channels named in the outlier slots by their exact values (float32 result); a later slot naming the
    same channel wins, ``UNUSED_SLOT`` names none."""
    if out_idx.shape[-1] == 0:
        return x
    d = x.shape[-1]
    ch = torch.arange(d, device=x.device)
    for j in range(out_idx.shape[-1]):
        hit = out_idx[..., j : j + 1].long() == ch
        x = torch.where(hit, out_val[..., j : j + 1].to(torch.float32), x)
    return x


def dequantize_keys(
    packed: PackedKeys, lut: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, bits: int, head_dim: int
) -> torch.Tensor:
    """Float32 pre-RoPE keys ``[B, H, S, D]`` from :class:`PackedKeys`."""
    zero, scale = key_zero_scale(lower.to(packed.codes.device), upper.to(packed.codes.device))
    codes = unpack_codes(packed.codes, bits, head_dim)
    x = lut.to(packed.codes.device, torch.float32)[codes] * scale[None, :, None, :] + zero[None, :, None, :]
    return apply_slots(x, packed.out_val, packed.out_idx)


# --------------------------------------------------------------------------------------------
# values: per-token, online thresholds
# --------------------------------------------------------------------------------------------
def value_scale_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """Storage dtype of per-token scale/zero: bf16 for bf16 models, fp16 otherwise."""
    return torch.bfloat16 if model_dtype == torch.bfloat16 else torch.float16


def quantize_values(v: torch.Tensor, lut: torch.Tensor, n_slots: int, bits: int) -> PackedValues:
    """Quantize values ``[B, H, S, D]`` per token with exactly ``n_slots`` extremes kept exact."""
    b, h, s, d = v.shape
    x = v.to(torch.float32)
    sd = value_scale_dtype(v.dtype)
    srt = torch.sort(x, dim=-1, stable=True)
    vals, order = srt.values, srt.indices
    k = n_slots
    if k >= d:
        raise KVQuantConfigError(f"outlier slots ({k}) must be fewer than head_dim ({d}).")
    a_best, lo, hi = value_outlier_split(vals, k)  # [B, H, S]
    smax = torch.finfo(sd).max
    zero = (hi * 0.5 + lo * 0.5).clamp(-smax, smax).to(sd)
    scale = (hi * 0.5 - lo * 0.5).clamp(MIN_SCALE, smax).to(sd)
    zero32 = zero.to(torch.float32).unsqueeze(-1)
    scale32 = scale.to(torch.float32).clamp_min(MIN_SCALE).unsqueeze(-1)
    x_norm = (x - zero32) * (1.0 / scale32)
    codes = encode_nearest(x_norm, lut)
    if k > 0:
        j = torch.arange(k, device=v.device)
        pos = torch.where(j < a_best.unsqueeze(-1), j, d - k + j)  # sorted positions of the slots
        out_idx = torch.gather(order, -1, pos).to(torch.uint8)
        out_val = torch.gather(v, -1, out_idx.long())
    else:
        out_idx = torch.empty(b, h, s, 0, dtype=torch.uint8, device=v.device)
        out_val = torch.empty(b, h, s, 0, dtype=v.dtype, device=v.device)
    return PackedValues(pack_codes(codes, bits), scale, zero, out_val, out_idx)


def dequantize_values(packed: PackedValues, lut: torch.Tensor, bits: int, head_dim: int) -> torch.Tensor:
    """Float32 values ``[B, H, S, D]`` from :class:`PackedValues`."""
    codes = unpack_codes(packed.codes, bits, head_dim)
    scale = packed.scale.to(torch.float32).clamp_min(MIN_SCALE).unsqueeze(-1)
    zero = packed.zero.to(torch.float32).unsqueeze(-1)
    x = lut.to(packed.codes.device, torch.float32)[codes] * scale + zero
    return apply_slots(x, packed.out_val, packed.out_idx)


# --------------------------------------------------------------------------------------------
# uncalibrated key thresholds
# --------------------------------------------------------------------------------------------
def key_thresholds_from_sample(k: torch.Tensor, outlier_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``lower, upper [H, D]`` at the ``f/2`` and ``1 - f/2`` quantiles of ``k [B, H, S, D]``.

    Used offline by calibration and, without signposts, online from the prompt.
    """
    h, d = k.shape[1], k.shape[3]
    x = k.to(torch.float32).transpose(0, 1).reshape(h, -1, d)  # [H, B*S, D]
    if outlier_fraction <= 0 or x.shape[1] < 2:
        return x.amin(1), x.amax(1)
    n = x.shape[1]
    lo_q = outlier_fraction / 2
    srt = torch.sort(x, dim=1).values
    # linear interpolation quantile (same as torch.quantile, without its size limit)
    def q(p: float) -> torch.Tensor:
        pos = p * (n - 1)
        i0 = math.floor(pos)
        i1 = min(i0 + 1, n - 1)
        w = pos - i0
        return srt[:, i0] * (1 - w) + srt[:, i1] * w

    return q(lo_q), q(1 - lo_q)


# --------------------------------------------------------------------------------------------
# baselines (simulated quantize-dequantize)
# --------------------------------------------------------------------------------------------
def fake_quant_int_per_token(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Uniform asymmetric intX, one (scale, zero) per head vector (FlexGen/ATOM-style)."""
    xf = x.to(torch.float32)
    mn = xf.amin(-1, keepdim=True)
    mx = xf.amax(-1, keepdim=True)
    levels = 2**bits - 1
    scale = ((mx - mn) / levels).clamp_min(1e-8)
    q = torch.round((xf - mn) / scale).clamp(0, levels)
    return (q * scale + mn).to(x.dtype)


def fake_quant_kivi_keys(k_post_rope: torch.Tensor, bits: int, group: int = 32) -> torch.Tensor:
    """KIVI-style keys: per channel over groups of ``group`` consecutive tokens (post-RoPE)."""
    b, h, s, d = k_post_rope.shape
    pad = (-s) % group
    xf = k_post_rope.to(torch.float32)
    if pad:
        xf = torch.cat([xf, xf[:, :, -1:].expand(b, h, pad, d)], dim=2)
    g = xf.reshape(b, h, -1, group, d)
    mn = g.amin(3, keepdim=True)
    mx = g.amax(3, keepdim=True)
    levels = 2**bits - 1
    scale = ((mx - mn) / levels).clamp_min(1e-8)
    q = torch.round((g - mn) / scale).clamp(0, levels)
    out = (q * scale + mn).reshape(b, h, -1, d)[:, :, :s]
    return out.to(k_post_rope.dtype)


def fake_quant_kivi_values(v: torch.Tensor, bits: int) -> torch.Tensor:
    """KIVI-style values: per token (same as intX per token)."""
    return fake_quant_int_per_token(v, bits)


def kivi_fake_quant_groups(x: torch.Tensor, bits: int, group: int, dim: int) -> torch.Tensor:
    """KIVI's quantize-dequantize: asymmetric uniform ``bits`` over groups of ``group`` consecutive entries along
    ``dim``, min/max range, scale ``(max - min) / (2**bits - 1)`` and zero ``min`` stored in fp16 (as KIVI's
    fp16 model keeps them); float32 result. ``x.shape[dim]`` must be a multiple of ``group``."""
    n = x.shape[dim]
    if group <= 0 or n % group:
        raise KVQuantConfigError(f"KIVI groups of {group} need a length that is a multiple of it along dim {dim}, "
                                 f"got {n}; quantize only complete groups.")
    xf = x.to(torch.float32).movedim(dim, -1)
    g = xf.reshape(*xf.shape[:-1], n // group, group)
    fmax = torch.finfo(torch.float16).max
    mn = g.amin(-1, keepdim=True).clamp(-fmax, fmax).to(torch.float16).to(torch.float32)
    mx = g.amax(-1, keepdim=True).clamp(-fmax, fmax).to(torch.float16).to(torch.float32)
    levels = 2**bits - 1
    scale = ((mx - mn) / levels).to(torch.float16).to(torch.float32)
    q = ((g - mn) / scale.clamp_min(1e-8)).clamp(0, levels).round()
    return (q * scale + mn).reshape(xf.shape).movedim(-1, dim)


def kivi_fake_quant_keys(k_post_rope: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """KIVI keys ``[B, H, S, D]`` (post-RoPE, ``S`` a multiple of ``group``): per channel over groups of ``group``
    consecutive tokens, fp16 scale/zero per channel and group (:func:`kivi_fake_quant_groups`)."""
    return kivi_fake_quant_groups(k_post_rope, bits, group, dim=2)


def kivi_fake_quant_values(v: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """KIVI values ``[B, H, S, D]``: per token over groups of ``min(group, D)`` channels, fp16 scale/zero per token
    and channel group (:func:`kivi_fake_quant_groups`)."""
    return kivi_fake_quant_groups(v, bits, min(group, v.shape[-1]), dim=-1)


# --------------------------------------------------------------------------------------------
# bits accounting
# --------------------------------------------------------------------------------------------
def nuq_avg_bits(bits: int, head_dim: int, n_slots: int, value_bits: int | None = None,
                 outlier_value_bytes: int = 2, scale_bytes: int = 2) -> float:
    """Average stored bits per K/V element of nuqX (codes + per-token value scale/zero + slots).

    Per-channel key parameters are per layer (not per token) and vanish per element.
    """
    vb = bits if value_bits is None else value_bits
    slot_bits = n_slots * (outlier_value_bytes + 1) * 8 / head_dim
    k = bits + slot_bits
    v = vb + 2 * scale_bytes * 8 / head_dim + slot_bits
    return (k + v) / 2

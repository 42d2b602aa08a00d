"""Helpers shared by the kernel tests: packed caches built with the torch reference and RoPE frequencies (the offline
NVRTC compile of the CUDA decode kernel is in ``nvrtc_offline.py``)."""

from __future__ import annotations

import torch

from kvquant_hf import quant
from kvquant_hf.attention import PackedKV


def make_packed(b, h, length, d, kbits, vbits, n_slots, dtype, seed, cap_extra=5, positions=None) -> PackedKV:
    """A ``PackedKV`` of ``length`` random tokens (capacity ``length + cap_extra``) quantized by :mod:`kvquant_hf.quant`
    with NormalFloat tables; with slots, key channel 5 is an outlier channel. Positions start at 3 unless given."""
    g = torch.Generator().manual_seed(seed)
    cap = length + cap_extra
    k = torch.randn(b, h, cap, d, generator=g) * 2
    v = torch.randn(b, h, cap, d, generator=g)
    if n_slots:
        k[..., 5] *= 4  # outlier channel for the keys
    klut = quant.normal_float_signposts(kbits)
    vlut = quant.normal_float_signposts(vbits)
    lo, hi = quant.key_thresholds_from_sample(k, 0.02)
    pk = quant.quantize_keys(k.to(dtype), klut, lo, hi, n_slots, kbits)
    pv = quant.quantize_values(v.to(dtype), vlut, n_slots, vbits)
    zero, scale = quant.key_zero_scale(lo, hi)
    if positions is None:
        positions = torch.arange(cap, dtype=torch.int32)[None].repeat(b, 1) + 3
    return PackedKV(pk.codes, pk.out_val, pk.out_idx, pv.codes, pv.scale, pv.zero, pv.out_val, pv.out_idx,
                    klut, vlut, zero, scale, positions.to(torch.int32), length, kbits, vbits, d)


def inv_freq(d, base=10000.0) -> torch.Tensor:
    """Default RoPE frequencies, float32 ``[d / 2]``."""
    return 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))

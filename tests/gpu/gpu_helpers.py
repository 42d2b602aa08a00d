"""Inputs shared by the GPU kernel tests: packed caches written by the quantize kernels, attention inputs."""

from __future__ import annotations

import torch

from kvquant_hf import attention, quant
from kvquant_hf.kernels import quantize_keys_triton, quantize_values_triton

DEV = "cuda"
#: ||out - ref|| / ||ref|| below which a kernel output matches the float32 torch reference
REL_TOL = 1e-2


def build_cache(b, h, length, d, bits, n_slots, dtype, seed, cap_extra=64, pad=None, gap=None, uniform=False):
    """A packed cache filled by the quantize kernels (one launch per tensor), as a ``PackedKV``."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    cap = length + cap_extra
    sd = quant.value_scale_dtype(dtype)
    k = torch.randn(b, h, length, d, device=DEV, generator=g) * 2
    k[..., 3] *= 5
    v = torch.randn(b, h, length, d, device=DEV, generator=g)
    table = quant.uniform_signposts if uniform else quant.normal_float_signposts  # uniform: affine fast path
    klut = table(bits).to(DEV)
    vlut = table(bits).to(DEV)
    lo, hi = quant.key_thresholds_from_sample(k[:, :, : min(length, 4096)], 0.01)
    zero, scale = quant.key_zero_scale(lo, hi)
    store = dict(
        k_codes=torch.zeros(b, h, cap, d * bits // 8, dtype=torch.uint8, device=DEV),
        k_out_val=torch.zeros(b, h, cap, n_slots, dtype=dtype, device=DEV),
        k_out_idx=torch.full((b, h, cap, n_slots), 255, dtype=torch.uint8, device=DEV),
        v_codes=torch.zeros(b, h, cap, d * bits // 8, dtype=torch.uint8, device=DEV),
        v_scale=torch.ones(b, h, cap, dtype=sd, device=DEV),
        v_zero=torch.zeros(b, h, cap, dtype=sd, device=DEV),
        v_out_val=torch.zeros(b, h, cap, n_slots, dtype=dtype, device=DEV),
        v_out_idx=torch.full((b, h, cap, n_slots), 255, dtype=torch.uint8, device=DEV),
    )
    quantize_keys_triton(k.to(dtype), klut, lo, hi, n_slots, bits,
                         out=(store["k_codes"], store["k_out_val"], store["k_out_idx"]), start=0,
                         k_zero=zero, k_scale=scale)
    quantize_values_triton(v.to(dtype), vlut, n_slots, bits,
                           out=(store["v_codes"], store["v_scale"], store["v_zero"], store["v_out_val"],
                                store["v_out_idx"]), start=0)
    positions = torch.arange(cap, dtype=torch.int32, device=DEV)[None].repeat(b, 1)
    if pad is not None:  # left padding: masked tokens, then positions restart at 0
        for i, p in enumerate(pad):
            positions[i, :p] = 1
            positions[i, p:] = torch.arange(cap - p, dtype=torch.int32, device=DEV)
    if gap is not None:  # a jump in the positions mid-block: that block takes the exact-RoPE path
        positions[:, gap:] += 7
    return attention.PackedKV(**store, k_lut=klut, v_lut=vlut, k_zero=zero, k_scale=scale, positions=positions,
                              length=length, key_bits=bits, value_bits=bits, head_dim=d)


def attention_inputs(b, hq, h, d, lq, sink, dtype, seed, pad=None):
    """Random queries, an exact block of ``sink`` tokens + the ``lq`` new ones (causal among themselves), and the
    keyword arguments of the attention functions (Llama-3 RoPE base, ``hist_start`` = ``pad`` when given)."""
    g = torch.Generator(device=DEV).manual_seed(seed + 1)
    e = sink + lq
    q = torch.randn(b, hq, lq, d, device=DEV, generator=g).to(dtype)
    ek = torch.randn(b, h, e, d, device=DEV, generator=g).to(dtype)
    ev = torch.randn(b, h, e, d, device=DEV, generator=g).to(dtype)
    mask = torch.ones(b, lq, e, dtype=torch.bool, device=DEV)
    mask[:, :, sink:] = torch.tril(torch.ones(lq, lq, dtype=torch.bool, device=DEV))
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, d, 2, dtype=torch.float32, device=DEV) / d))
    kw = dict(scaling=d ** -0.5, inv_freq=inv_freq, attention_scaling=1.0)
    if pad is not None:
        kw["hist_start"] = torch.tensor(pad, dtype=torch.int64, device=DEV)
    return q, ek, ev, mask, kw


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float32."""
    out, ref = out.float(), ref.float()
    return ((out - ref).norm() / ref.norm()).item()

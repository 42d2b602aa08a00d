"""Prefill helpers: dequantize a range of the packed history into the model dtype (keys rotated to their
positions), and merge attention parts by their log-sum-exps in place.

Used by the prefill path (``prefill_attention="auto"``, :func:`kvquant_hf.attention.packed_attention_prefill`):
a prefill chunk dequantizes the history block by block and attends it with a fused attention kernel on the
tensor cores. One pass per element: unpack the 2/3/4-bit code, signpost lookup, per-channel (keys) or per-token
(values) scale and zero, exact outlier slots, RoPE for keys; float32 math, one rounding to the output dtype.
Same result as :meth:`kvquant_hf.attention.PackedKV.dequantize_block` + :func:`kvquant_hf.attention.rope_rotate`.
:func:`merge_lse_` folds each part's output (any layout and float dtype, e.g. FlashAttention's) into a float32
accumulator in one pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import K_MIN_SCALE, cos_sin, replace_slots


@triton.jit
def _codes(row_ptr, ch, ch_mask, BITS: tl.constexpr, ROW_BYTES: tl.constexpr):
    """Codes of channels ``ch [1, C]`` from rows of packed bytes at ``row_ptr [T, 1]`` (little-endian bit order:
    code ``j`` occupies bits ``j*BITS .. j*BITS+BITS-1`` of the row, as :func:`kvquant_hf.quant.pack_codes`)."""
    bit = ch * BITS
    byte = bit // 8
    w = tl.load(row_ptr + byte, mask=ch_mask, other=0).to(tl.int32)
    if BITS == 3:  # a 3-bit code may straddle two bytes
        w1 = tl.load(row_ptr + byte + 1, mask=ch_mask & (byte + 1 < ROW_BYTES), other=0).to(tl.int32)
        w = w | (w1 << 8)
    return (w >> (bit % 8)) & ((1 << BITS) - 1)


# reference: kvquant_hf.attention.PackedKV.dequantize_block + rope_rotate (outlier slots: kvquant_hf.quant.apply_slots)
@triton.jit
def dequantize_kernel(
    kc_ptr, kov_ptr, koi_ptr, vc_ptr, vsc_ptr, vz_ptr, vov_ptr, voi_ptr, pos_ptr,
    klut_ptr, vlut_ptr, kzero_ptr, kscale_ptr, invf_ptr,
    ko_ptr, vo_ptr,
    start, n, H, attn_scale,
    s_kc_b, s_kc_h, s_kc_t, s_kov_b, s_kov_h, s_kov_t, s_koi_b, s_koi_h, s_koi_t,
    s_vc_b, s_vc_h, s_vc_t, s_vs_b, s_vs_h, s_vs_t, s_vz_b, s_vz_h, s_vz_t,
    s_vov_b, s_vov_h, s_vov_t, s_voi_b, s_voi_h, s_voi_t,
    s_pos_b, s_pos_t,
    KBITS: tl.constexpr, VBITS: tl.constexpr, D: tl.constexpr, HALF_P2: tl.constexpr, D_P2: tl.constexpr,
    SK: tl.constexpr, SV: tl.constexpr, BLOCK_T: tl.constexpr, FAST: tl.constexpr,
):
    pid_t = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)[:, None]  # [T, 1] within the range
    t_mask = t < n
    tt = (start + t).to(tl.int64)  # token index in the storage
    half: tl.constexpr = D // 2

    # ---- keys: two halves for rotate_half RoPE
    c1 = tl.arange(0, HALF_P2)  # channels of the first RoPE half (the second: + half)
    c = c1[None, :]
    c_mask = c < half
    m = t_mask & c_mask
    k_rows = kc_ptr + b.to(tl.int64) * s_kc_b + h * s_kc_h + tt * s_kc_t
    kov_rows = kov_ptr + b.to(tl.int64) * s_kov_b + h * s_kov_h + tt * s_kov_t
    koi_rows = koi_ptr + b.to(tl.int64) * s_koi_b + h * s_koi_h + tt * s_koi_t
    ca = _codes(k_rows, c, m, KBITS, D * KBITS // 8)
    cb = _codes(k_rows, c + half, m, KBITS, D * KBITS // 8)
    za = tl.load(kzero_ptr + h * D + c, mask=c_mask, other=0.0)
    zb = tl.load(kzero_ptr + h * D + half + c, mask=c_mask, other=0.0)
    sa = tl.load(kscale_ptr + h * D + c, mask=c_mask, other=0.0)
    sb = tl.load(kscale_ptr + h * D + half + c, mask=c_mask, other=0.0)
    xa = tl.load(klut_ptr + ca) * sa + za
    xb = tl.load(klut_ptr + cb) * sb + zb
    xa = replace_slots(xa, c1, kov_rows, koi_rows, t_mask, SK)
    xb = replace_slots(xb, c1 + half, kov_rows, koi_rows, t_mask, SK)
    pos = tl.load(pos_ptr + b.to(tl.int64) * s_pos_b + tt * s_pos_t, mask=t_mask, other=0).to(tl.float32)
    cos, sin = cos_sin(pos * tl.load(invf_ptr + c, mask=c_mask, other=0.0), FAST)
    cos = cos * attn_scale
    sin = sin * attn_scale
    out_rows = ((b * H + h).to(tl.int64) * n + t) * D
    tl.store(ko_ptr + out_rows + c, (xa * cos - xb * sin).to(ko_ptr.dtype.element_ty), mask=m)
    tl.store(ko_ptr + out_rows + half + c, (xb * cos + xa * sin).to(ko_ptr.dtype.element_ty), mask=m)

    # ---- values: per-token scale and zero
    cv1 = tl.arange(0, D_P2)
    cv = cv1[None, :]
    mv = t_mask & (cv < D)
    v_rows = vc_ptr + b.to(tl.int64) * s_vc_b + h * s_vc_h + tt * s_vc_t
    code = _codes(v_rows, cv, mv, VBITS, D * VBITS // 8)
    sc = tl.load(vsc_ptr + b.to(tl.int64) * s_vs_b + h * s_vs_h + tt * s_vs_t, mask=t_mask, other=1.0)
    zr = tl.load(vz_ptr + b.to(tl.int64) * s_vz_b + h * s_vz_h + tt * s_vz_t, mask=t_mask, other=0.0)
    x = tl.load(vlut_ptr + code) * tl.maximum(sc.to(tl.float32), K_MIN_SCALE) + zr.to(tl.float32)
    vov_rows = vov_ptr + b.to(tl.int64) * s_vov_b + h * s_vov_h + tt * s_vov_t
    voi_rows = voi_ptr + b.to(tl.int64) * s_voi_b + h * s_voi_h + tt * s_voi_t
    x = replace_slots(x, cv1, vov_rows, voi_rows, t_mask, SV)
    tl.store(vo_ptr + out_rows + cv, x.to(vo_ptr.dtype.element_ty), mask=mv)


def dequantize_history_triton(packed, start: int, end: int, inv_freq: torch.Tensor, attention_scaling: float,
                              dtype: torch.dtype, fast_math: bool | None = None, block_t: int = 32
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys (rotated to their stored positions) and values ``[B, H, end-start, D]`` in ``dtype`` for history
    tokens ``[start, end)`` of a :class:`kvquant_hf.attention.PackedKV`."""
    if not 0 <= start <= end <= packed.length:
        raise ValueError(f"token range [{start}, {end}) is outside the history (0..{packed.length}); "
                         f"pass 0 <= start <= end <= packed.length.")
    d = packed.head_dim
    if d % 8:
        raise ValueError(f"head_dim {d} is not a multiple of 8 (the packed code rows need whole bytes).")
    b, h = packed.k_codes.shape[:2]
    n = end - start
    dev = packed.k_codes.device
    ko = torch.empty(b, h, n, d, dtype=dtype, device=dev)
    vo = torch.empty(b, h, n, d, dtype=dtype, device=dev)
    if n == 0 or b * h == 0:
        return ko, vo
    if fast_math is None:
        fast_math = dev.type == "cuda"
    f32 = torch.float32
    klut, vlut = packed.k_lut.to(dev, f32).contiguous(), packed.v_lut.to(dev, f32).contiguous()
    kzero, kscale = packed.k_zero.to(dev, f32).contiguous(), packed.k_scale.to(dev, f32).contiguous()
    invf = inv_freq.to(dev, f32).contiguous()
    kc, kov, koi, vc = packed.k_codes, packed.k_out_val, packed.k_out_idx, packed.v_codes
    vs, vz, vov, voi, pos = packed.v_scale, packed.v_zero, packed.v_out_val, packed.v_out_idx, packed.positions
    for x in (kc, vc):
        if x.stride(-1) != 1:
            raise ValueError("packed code rows must be contiguous in their last dimension.")
    grid = (triton.cdiv(n, block_t), b * h)
    dequantize_kernel[grid](
        kc, kov, koi, vc, vs, vz, vov, voi, pos, klut, vlut, kzero, kscale, invf, ko, vo,
        start, n, h, float(attention_scaling),
        kc.stride(0), kc.stride(1), kc.stride(2), kov.stride(0), kov.stride(1), kov.stride(2),
        koi.stride(0), koi.stride(1), koi.stride(2),
        vc.stride(0), vc.stride(1), vc.stride(2), vs.stride(0), vs.stride(1), vs.stride(2),
        vz.stride(0), vz.stride(1), vz.stride(2),
        vov.stride(0), vov.stride(1), vov.stride(2), voi.stride(0), voi.stride(1), voi.stride(2),
        pos.stride(0), pos.stride(1),
        KBITS=packed.key_bits, VBITS=packed.value_bits, D=d, HALF_P2=triton.next_power_of_2(d // 2),
        D_P2=triton.next_power_of_2(d), SK=kov.shape[-1], SV=vov.shape[-1], BLOCK_T=block_t, FAST=fast_math,
    )
    return ko, vo


@triton.jit
def _merge_kernel(acc_ptr, acc_lse_ptr, o_ptr, lse_ptr, H, M, LQ,
                  s_ob, s_oh, s_og, s_ol, s_lb, s_lh, s_lg, s_ll,
                  D: tl.constexpr, D_P2: tl.constexpr, BLOCK_R: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)  # folded row (group member, query row)
    r_mask = r < M
    gi = r // LQ
    i = r % LQ
    c = tl.arange(0, D_P2)
    m2 = r_mask[:, None] & (c[None, :] < D)
    row = (bh.to(tl.int64) * M + r)
    a_lse = tl.load(acc_lse_ptr + row, mask=r_mask, other=float("-inf"))
    p_lse = tl.load(lse_ptr + b.to(tl.int64) * s_lb + h * s_lh + gi * s_lg + i * s_ll, mask=r_mask,
                    other=float("-inf")).to(tl.float32)
    m = tl.maximum(a_lse, p_lse)
    m = tl.where(m == float("-inf"), 0.0, m)
    w_old = tl.exp(a_lse - m)
    w_new = tl.exp(p_lse - m)
    den = w_old + w_new
    acc = tl.load(acc_ptr + row[:, None] * D + c[None, :], mask=m2, other=0.0)
    o = tl.load(o_ptr + b.to(tl.int64) * s_ob + h * s_oh + (gi * s_og + i * s_ol)[:, None] + c[None, :], mask=m2,
                other=0.0).to(tl.float32)
    acc = (acc * w_old[:, None] + o * w_new[:, None]) / tl.maximum(den, 1e-30)[:, None]
    tl.store(acc_ptr + row[:, None] * D + c[None, :], acc, mask=m2)
    tl.store(acc_lse_ptr + row, m + tl.log(den), mask=r_mask)


def merge_lse_(acc: torch.Tensor, acc_lse: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, lq: int,
               block_r: int = 32) -> None:
    """In place: ``acc [B, H, G*Lq, D]`` float32 (contiguous; rows ordered (group member, query row)) and its
    log-sum-exp ``acc_lse [B, H, G*Lq]`` absorb one more attention part: ``o`` either in the same folded layout
    ``[B, H, G*Lq, D]`` or per query head ``[B, H*G, Lq, D]`` (any strides, any float dtype) and its log-sum-exp
    (``[B, H, G*Lq]`` or ``[B, H*G, Lq]``). Rows whose log-sum-exps are both -inf stay zero."""
    b, h, m, d = acc.shape
    if o.stride(-1) != 1:
        o = o.contiguous()
    if not (acc.is_contiguous() and acc_lse.is_contiguous() and acc.dtype == acc_lse.dtype == torch.float32):
        raise ValueError("acc and acc_lse must be contiguous float32 tensors.")
    g = m // lq
    if o.shape == acc.shape:
        s_ob, s_oh, s_om = o.stride(0), o.stride(1), o.stride(2)
        s_og, s_ol = lq * s_om, s_om
        s_lb, s_lh, s_lm = lse.stride()
        s_lg, s_ll = lq * s_lm, s_lm
    elif o.shape == (b, h * g, lq, d) and lse.shape == (b, h * g, lq):
        s_ob, s_oh, s_og, s_ol = o.stride(0), g * o.stride(1), o.stride(1), o.stride(2)
        s_lb, s_lh, s_lg, s_ll = lse.stride(0), g * lse.stride(1), lse.stride(1), lse.stride(2)
    else:
        raise ValueError(f"part of shape {tuple(o.shape)} does not match the accumulator {tuple(acc.shape)}.")
    grid = (triton.cdiv(m, block_r), b * h)
    _merge_kernel[grid](acc, acc_lse, o, lse, h, m, lq, s_ob, s_oh, s_og, s_ol, s_lb, s_lh, s_lg, s_ll,
                        D=d, D_P2=triton.next_power_of_2(d), BLOCK_R=block_r)

"""Pack-on-append kernels: nuqX encode + bit packing + outlier slots for new keys and values, written straight into
the cache's storage at a token offset. The host launchers and their checks are in :mod:`.quantize`.

Each kernel mirrors the torch reference bit for bit: :func:`kvquant_hf.quant.quantize_keys` (per-channel thresholds,
key outlier rule :func:`kvquant_hf.quant.key_outlier_excess` / :func:`kvquant_hf.quant.top_slots`) and
:func:`kvquant_hf.quant.quantize_values` (per-token range, value outlier rule
:func:`kvquant_hf.quant.value_outlier_split`). See the module docstring of ``kvquant_hf/quant.py`` for the format.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import K_MIN_SCALE, K_UNUSED_SLOT


# ----------------------------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _encode_nearest(x_norm, lut_ptr, BITS: tl.constexpr):
    """``#{m : x_norm > (lut[m] + lut[m+1]) / 2}``: the nearest signpost, ties to the lower one."""
    code = tl.zeros(x_norm.shape, dtype=tl.int32)
    for m in tl.static_range((1 << BITS) - 1):
        lo = tl.load(lut_ptr + m)
        hi = tl.load(lut_ptr + m + 1)
        mid = (hi + lo) * 0.5  # same fp32 ops as quant.signpost_midpoints
        code += (x_norm > mid).to(tl.int32)
    return code


@triton.jit
def _store_packed(codes, dst_rows, row_mask, BITS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr):
    """Pack ``codes`` int32 [BLOCK_T, HEAD_DIM] as a little-endian bit stream at ``dst_rows`` [BLOCK_T, 1].

    Every group of 8 codes is one ``8 * BITS``-bit word, i.e. ``BITS`` whole bytes, for 2, 3 and 4 bits.
    """
    c = tl.reshape(codes.to(tl.int64), (BLOCK_T, HEAD_DIM // 8, 8))
    shifts = (tl.arange(0, 8) * BITS).to(tl.int64)
    word = tl.sum(c << shifts[None, None, :], axis=2)  # [BLOCK_T, HEAD_DIM // 8]; bits are disjoint
    grp = (tl.arange(0, HEAD_DIM // 8) * BITS)[None, :]
    for r in tl.static_range(BITS):
        byte = ((word >> (8 * r)) & 255).to(tl.uint8)
        tl.store(dst_rows + grp + r, byte, mask=row_mask)


@triton.jit
def _pick_f32(vec, idx, KP: tl.constexpr):
    """``vec[:, idx]`` for ``vec`` [T, KP] and per-row ``idx`` [T, 1] (exact: keeps the sign of zero)."""
    kk = tl.arange(0, KP)[None, :]
    return tl.max(tl.where(kk == idx, vec, float("-inf")), axis=1)


@triton.jit
def _pick_i32(vec, idx, KP: tl.constexpr):
    kk = tl.arange(0, KP)[None, :]
    return tl.sum(tl.where(kk == idx, vec, 0), axis=1)


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
# reference: kvquant_hf.quant.quantize_keys (outlier rule: key_outlier_excess, top_slots)
@triton.jit
def quantize_keys_kernel(
    k_ptr,  # [B, H, S, D] model dtype, pre-RoPE keys
    lut_ptr,  # f32 [2**BITS] signposts (sorted)
    lower_ptr,  # f32 [H, D] per-channel thresholds (contiguous)
    upper_ptr,  # f32 [H, D]
    zero_ptr,  # f32 [H, D] upper / 2 + lower / 2
    scale_ptr,  # f32 [H, D] max(upper / 2 - lower / 2, MIN_SCALE)
    codes_ptr,  # uint8 [B, H, cap, D*BITS/8] destination (last dim contiguous)
    oval_ptr,  # model dtype [B, H, cap, N_SLOTS] destination
    oidx_ptr,  # uint8 [B, H, cap, N_SLOTS] destination
    clip_ptr,  # int32 [1] clipped-outlier counter (only if COUNT_CLIPPED)
    S,  # new tokens
    start,  # token offset in the destination
    start_ptr,  # int32 [1] token offset read on the device (START_ON_DEVICE: CUDA-graph decode)
    H,  # kv heads
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_cb, stride_ch, stride_cs,
    stride_vb, stride_vh, stride_vs,
    stride_ib, stride_ih, stride_is,
    HEAD_DIM: tl.constexpr,
    BITS: tl.constexpr,
    N_SLOTS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    COUNT_CLIPPED: tl.constexpr,
    START_ON_DEVICE: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_t = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)  # [T] new-token index
    t_mask = t < S
    ch = tl.arange(0, HEAD_DIM)  # [D]

    x_raw = tl.load(
        k_ptr + b * stride_kb + h * stride_kh + t[:, None] * stride_ks + ch[None, :] * stride_kd,
        mask=t_mask[:, None],
        other=0.0,
    )
    x = x_raw.to(tl.float32)  # [T, D]
    row = h * HEAD_DIM + ch
    lo = tl.load(lower_ptr + row)[None, :]
    hi = tl.load(upper_ptr + row)[None, :]
    zero = tl.load(zero_ptr + row)[None, :]
    scale = tl.load(scale_ptr + row)[None, :]

    # normalized distance outside [lo, hi]; exact division so that ties order like torch
    # mirrors kvquant_hf.quant.key_outlier_excess
    excess = tl.maximum(tl.maximum(lo - x, x - hi), 0.0)
    excess = tl.math.div_rn(excess, tl.broadcast_to(scale, excess.shape))

    if START_ON_DEVICE:
        dst = t + tl.load(start_ptr).to(tl.int64)
    else:
        dst = t + start
    if N_SLOTS > 0:
        oval_rows = oval_ptr + b * stride_vb + h * stride_vh + dst * stride_vs
        oidx_rows = oidx_ptr + b * stride_ib + h * stride_ih + dst * stride_is
        score = excess
        n_used = tl.zeros([BLOCK_T], dtype=tl.int32)
        for s in tl.static_range(N_SLOTS):
            # largest score; ties go to the smaller channel (mirrors kvquant_hf.quant.top_slots)
            best = tl.max(score, axis=1)
            sel = tl.min(tl.where(score == best[:, None], ch[None, :], HEAD_DIM), axis=1)
            used = best > 0.0
            hit = ch[None, :] == sel[:, None]
            val = tl.max(tl.where(hit, x, float("-inf")), axis=1)
            tl.store(oidx_rows + s, tl.where(used, sel, K_UNUSED_SLOT).to(tl.uint8), mask=t_mask)
            tl.store(oval_rows + s, tl.where(used, val, 0.0).to(oval_ptr.dtype.element_ty), mask=t_mask)
            n_used += used.to(tl.int32)
            score = tl.where(hit, -1.0, score)
        if COUNT_CLIPPED:
            n_out = tl.sum((excess > 0.0).to(tl.int32), axis=1)
            clipped = tl.where(t_mask, tl.maximum(n_out - n_used, 0), 0)
            tl.atomic_add(clip_ptr, tl.sum(clipped, axis=0))
    else:
        if COUNT_CLIPPED:
            n_out = tl.sum((excess > 0.0).to(tl.int32), axis=1)
            tl.atomic_add(clip_ptr, tl.sum(tl.where(t_mask, n_out, 0), axis=0))

    xc = tl.minimum(tl.maximum(x, lo), hi)
    inv_scale = tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)
    x_norm = (xc - zero) * inv_scale
    codes = _encode_nearest(x_norm, lut_ptr, BITS)
    code_rows = codes_ptr + b * stride_cb + h * stride_ch + dst[:, None] * stride_cs
    _store_packed(codes, code_rows, t_mask[:, None], BITS, HEAD_DIM, BLOCK_T)


# reference: kvquant_hf.quant.quantize_values (outlier rule: value_outlier_split)
@triton.jit
def quantize_values_kernel(
    v_ptr,  # [B, H, S, D] model dtype
    lut_ptr,  # f32 [2**BITS]
    codes_ptr,  # uint8 [B, H, cap, D*BITS/8] destination (last dim contiguous)
    scale_ptr,  # fp16/bf16 [B, H, cap] destination
    zero_ptr,  # fp16/bf16 [B, H, cap] destination
    oval_ptr,  # model dtype [B, H, cap, N_SLOTS]
    oidx_ptr,  # uint8 [B, H, cap, N_SLOTS]
    S,
    start,
    start_ptr,  # int32 [1] (START_ON_DEVICE)
    H,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_cb, stride_ch, stride_cs,
    stride_sb, stride_sh, stride_ss,
    stride_zb, stride_zh, stride_zs,
    stride_ob, stride_oh, stride_os,
    stride_ib, stride_ih, stride_is,
    HEAD_DIM: tl.constexpr,
    BITS: tl.constexpr,
    N_SLOTS: tl.constexpr,
    KP: tl.constexpr,  # next power of two >= N_SLOTS + 1
    SCALE_MAX: tl.constexpr,  # largest finite value of the scale/zero storage dtype
    BLOCK_T: tl.constexpr,
    START_ON_DEVICE: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_t = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    t_mask = t < S
    ch = tl.arange(0, HEAD_DIM)
    x_raw = tl.load(
        v_ptr + b * stride_vb + h * stride_vh + t[:, None] * stride_vs + ch[None, :] * stride_vd,
        mask=t_mask[:, None],
        other=0.0,
    )
    x = x_raw.to(tl.float32)  # [T, D]
    kk = tl.arange(0, KP)[None, :]

    # The N_SLOTS + 1 smallest and largest entries in the order of a stable ascending sort:
    # bottom ties go to the smaller channel, top ties to the larger one.
    taken = tl.zeros([BLOCK_T, HEAD_DIM], dtype=tl.int32)
    bot_v = tl.zeros([BLOCK_T, KP], dtype=tl.float32)
    bot_i = tl.zeros([BLOCK_T, KP], dtype=tl.int32)
    for a in tl.static_range(N_SLOTS + 1):
        mn = tl.min(tl.where(taken != 0, float("inf"), x), axis=1)
        cand = (taken == 0) & (x == mn[:, None])
        sel = tl.min(tl.where(cand, ch[None, :], HEAD_DIM), axis=1)
        hit = ch[None, :] == sel[:, None]
        val = tl.max(tl.where(hit, x, float("-inf")), axis=1)
        taken = tl.where(hit, 1, taken)
        bot_v = tl.where(kk == a, val[:, None], bot_v)
        bot_i = tl.where(kk == a, sel[:, None], bot_i)
    taken = tl.zeros([BLOCK_T, HEAD_DIM], dtype=tl.int32)
    top_v = tl.zeros([BLOCK_T, KP], dtype=tl.float32)
    top_i = tl.zeros([BLOCK_T, KP], dtype=tl.int32)
    for a in tl.static_range(N_SLOTS + 1):
        mx = tl.max(tl.where(taken != 0, float("-inf"), x), axis=1)
        cand = (taken == 0) & (x == mx[:, None])
        sel = tl.max(tl.where(cand, ch[None, :], -1), axis=1)
        hit = ch[None, :] == sel[:, None]
        val = tl.max(tl.where(hit, x, float("-inf")), axis=1)
        taken = tl.where(hit, 1, taken)
        top_v = tl.where(kk == a, val[:, None], top_v)  # top_v[:, a] = sorted[D - 1 - a]
        top_i = tl.where(kk == a, sel[:, None], top_i)

    # a from the bottom, N_SLOTS - a from the top: minimize the remaining range, first minimum (mirrors
    # kvquant_hf.quant.value_outlier_split)
    best_r = tl.full([BLOCK_T], float("inf"), tl.float32)
    a_best = tl.zeros([BLOCK_T], dtype=tl.int32)
    for a in tl.static_range(N_SLOTS + 1):
        r = _pick_f32(top_v, N_SLOTS - a, KP) - _pick_f32(bot_v, a, KP)
        better = r < best_r
        a_best = tl.where(better, a, a_best)
        best_r = tl.where(better, r, best_r)
    lo = _pick_f32(bot_v, a_best[:, None], KP)
    hi = _pick_f32(top_v, (N_SLOTS - a_best)[:, None], KP)

    # halves first: no overflow for huge fp32 values; saturate at the storage dtype's largest finite value
    zero = tl.minimum(tl.maximum(hi * 0.5 + lo * 0.5, -SCALE_MAX), SCALE_MAX).to(scale_ptr.dtype.element_ty)
    scale = tl.minimum(tl.maximum(hi * 0.5 - lo * 0.5, K_MIN_SCALE), SCALE_MAX).to(scale_ptr.dtype.element_ty)
    if START_ON_DEVICE:
        dst = t + tl.load(start_ptr).to(tl.int64)
    else:
        dst = t + start
    tl.store(zero_ptr + b * stride_zb + h * stride_zh + dst * stride_zs, zero, mask=t_mask)
    tl.store(scale_ptr + b * stride_sb + h * stride_sh + dst * stride_ss, scale, mask=t_mask)

    zero32 = zero.to(tl.float32)
    scale32 = tl.maximum(scale.to(tl.float32), K_MIN_SCALE)
    inv_scale = tl.math.div_rn(tl.full(scale32.shape, 1.0, tl.float32), scale32)
    x_norm = (x - zero32[:, None]) * inv_scale[:, None]
    codes = _encode_nearest(x_norm, lut_ptr, BITS)
    code_rows = codes_ptr + b * stride_cb + h * stride_ch + dst[:, None] * stride_cs
    _store_packed(codes, code_rows, t_mask[:, None], BITS, HEAD_DIM, BLOCK_T)

    if N_SLOTS > 0:
        oval_rows = oval_ptr + b * stride_ob + h * stride_oh + dst * stride_os
        oidx_rows = oidx_ptr + b * stride_ib + h * stride_ih + dst * stride_is
        for j in tl.static_range(N_SLOTS):
            # sorted position j (bottom) if j < a_best, else D - N_SLOTS + j (top index N_SLOTS - 1 - j)
            idx = tl.where(j < a_best, _pick_i32(bot_i, j, KP), _pick_i32(top_i, N_SLOTS - 1 - j, KP))
            val = tl.max(tl.where(ch[None, :] == idx[:, None], x, float("-inf")), axis=1)
            tl.store(oidx_rows + j, idx.to(tl.uint8), mask=t_mask)
            tl.store(oval_rows + j, val.to(oval_ptr.dtype.element_ty), mask=t_mask)



# reference: kvquant_hf.quant.quantize_keys + quantize_values (one launch for both)
@triton.jit
def quantize_kv_kernel(
    k_ptr, k_lut_ptr, lower_ptr, upper_ptr, kzero_ptr, kscale_ptr, kcodes_ptr, kval_ptr, kidx_ptr, clip_ptr,
    k_s, k_start, k_start_ptr, k_h,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_kcb, stride_kch, stride_kcs,
    stride_kvb, stride_kvh, stride_kvs,
    stride_kib, stride_kih, stride_kis,
    v_ptr, v_lut_ptr, vcodes_ptr, vscale_ptr, vzero_ptr, vval_ptr, vidx_ptr,
    v_s, v_start, v_start_ptr, v_h,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_vcb, stride_vch, stride_vcs,
    stride_sb, stride_sh, stride_ss,
    stride_zb, stride_zh, stride_zs,
    stride_ob, stride_oh, stride_os,
    stride_ib, stride_ih, stride_is,
    HEAD_DIM: tl.constexpr, K_BITS: tl.constexpr, K_SLOTS: tl.constexpr, V_BITS: tl.constexpr,
    V_SLOTS: tl.constexpr, KP: tl.constexpr, SCALE_MAX: tl.constexpr, BLOCK_T: tl.constexpr,
    COUNT_CLIPPED: tl.constexpr, START_ON_DEVICE: tl.constexpr,
):
    # grid axis 2: 0 = keys, 1 = values; each program runs exactly the body of the separate kernel
    if tl.program_id(2) == 0:
        quantize_keys_kernel(
            k_ptr, k_lut_ptr, lower_ptr, upper_ptr, kzero_ptr, kscale_ptr, kcodes_ptr, kval_ptr, kidx_ptr, clip_ptr,
            k_s, k_start, k_start_ptr, k_h,
            stride_kb, stride_kh, stride_ks, stride_kd,
            stride_kcb, stride_kch, stride_kcs,
            stride_kvb, stride_kvh, stride_kvs,
            stride_kib, stride_kih, stride_kis,
            HEAD_DIM, K_BITS, K_SLOTS, BLOCK_T, COUNT_CLIPPED, START_ON_DEVICE,
        )
    else:
        quantize_values_kernel(
            v_ptr, v_lut_ptr, vcodes_ptr, vscale_ptr, vzero_ptr, vval_ptr, vidx_ptr,
            v_s, v_start, v_start_ptr, v_h,
            stride_vb, stride_vh, stride_vs, stride_vd,
            stride_vcb, stride_vch, stride_vcs,
            stride_sb, stride_sh, stride_ss,
            stride_zb, stride_zh, stride_zs,
            stride_ob, stride_oh, stride_os,
            stride_ib, stride_ih, stride_is,
            HEAD_DIM, V_BITS, V_SLOTS, KP, SCALE_MAX, BLOCK_T, START_ON_DEVICE,
        )


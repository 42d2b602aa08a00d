"""Split-K flash decoding over the packed KVQuant cache (decode and prefill chunks over a packed history).

One fused kernel reads the packed history once per KV head: per block of ``BLOCK_N`` tokens it unpacks
the 2/3/4-bit key codes (each RoPE half separately: channels ``[0, D/2)`` and ``[D/2, D)`` start on a
byte boundary), looks them up in the signpost table, scales them per channel, replaces the outlier
slots, applies RoPE with the token positions, scores all query rows of the GQA group at once
(``tl.dot``), runs an online softmax, dequantizes the values (per-token scale/zero + slots) and
accumulates. A second kernel merges the splits and attends to the exact block (attention-sink tokens
and the new tokens, float keys already rotated).

RoPE on the fly. ``cos/sin(pos * inv_freq)`` per element would make the kernel compute-bound, so for
a block whose positions are consecutive (``pos[j] = p0 + j``: the normal case) the rotation is split
as ``R(p0 + j) = R(p0) R(j)``: ``R(j)`` is a ``[BLOCK_N, D/2]`` table computed once per program and
``R(p0)^T`` is applied to the (few) query rows instead of the keys, since
``q . R(p0) R(j) k = (R(p0)^T q) . (R(j) k)``. Blocks with other positions (padding boundaries,
reordered caches) rotate each key exactly. Large angles are reduced to ``[-pi, pi]`` with a three-term
Cody-Waite reduction before ``cos``/``sin``.

The torch reference with the same contract is :func:`kvquant_hf.attention.packed_attention_torch`.
This module imports only torch and triton.
"""

from __future__ import annotations

import functools
import math
import os
import weakref

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

LOG2E = 1.4426950408889634
NEG_BIG = -1.0e30  # running-max init and the log-sum-exp of an empty split (finite: no inf - inf)
MIN_SCALE = 6.103515625e-05  # == kvquant_hf.quant.MIN_SCALE

_TWO_PI = 2.0 * math.pi
_C1 = float(torch.tensor(_TWO_PI, dtype=torch.float32))
_C2 = float(torch.tensor(_TWO_PI - _C1, dtype=torch.float32))
_C3 = float(torch.tensor(_TWO_PI - _C1 - _C2, dtype=torch.float32))
_TWO_PI_C1 = tl.constexpr(_C1)
_TWO_PI_C2 = tl.constexpr(_C2)
_TWO_PI_C3 = tl.constexpr(_C3)
_INV_TWO_PI = tl.constexpr(1.0 / _TWO_PI)
_K_NEG_BIG = tl.constexpr(NEG_BIG)  # the same constant inside kernels
_K_MIN_SCALE = tl.constexpr(MIN_SCALE)  # the same constant inside kernels


# ----------------------------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _cos_sin_small(angle, FAST: tl.constexpr):
    """cos/sin of angles already in about [-100 pi, 100 pi]: MUFU approximations on the GPU (FAST)."""
    if FAST:
        return libdevice.fast_cosf(angle), libdevice.fast_sinf(angle)
    else:
        return tl.cos(angle), tl.sin(angle)


@triton.jit
def _cos_sin(angle, FAST: tl.constexpr):
    """cos/sin of float32 angles of any size (Cody-Waite reduction to [-pi, pi], error ~1e-6)."""
    k = tl.floor(angle * _INV_TWO_PI + 0.5)
    r = tl.fma(-k, _TWO_PI_C1, angle)
    r = tl.fma(-k, _TWO_PI_C2, r)
    r = tl.fma(-k, _TWO_PI_C3, r)
    return _cos_sin_small(r, FAST)


@triton.jit
def _mm(a, b, USE_DOT: tl.constexpr, IEEE: tl.constexpr):
    """``a [M, K] @ b [K, N]`` in float32; ``tl.dot`` when every dim is >= 16, else broadcast-sum."""
    if USE_DOT:
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        else:
            return tl.dot(a, b)
    else:
        return tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)


@triton.jit
def _load_raw(rows, row_mask, BITS: tl.constexpr, N: tl.constexpr):
    """Load the packed bytes of ``N`` codes at byte pointers ``rows`` [BLOCK_N, 1] (``N % 8 == 0``).

    2/4 bits: the bytes, uint8 [BLOCK_N, N*BITS/8]; 3 bits: one 24-bit word per 8 codes, int32 [BLOCK_N, N/8].
    """
    if BITS == 3:
        grp = (tl.arange(0, N // 8) * 3)[None, :]
        b0 = tl.load(rows + grp, mask=row_mask, other=0).to(tl.int32)
        b1 = tl.load(rows + grp + 1, mask=row_mask, other=0).to(tl.int32)
        b2 = tl.load(rows + grp + 2, mask=row_mask, other=0).to(tl.int32)
        return b0 | (b1 << 8) | (b2 << 16)
    else:
        return tl.load(rows + tl.arange(0, N * BITS // 8)[None, :], mask=row_mask, other=0)


@triton.jit
def _lut_half(raw, tab_ptr, BITS: tl.constexpr, BLOCK_N: tl.constexpr, N: tl.constexpr):
    """Signpost values (float32 [BLOCK_N, N], channel order) of the codes in ``raw`` (from :func:`_load_raw`).

    One gather per byte (4 bits: 2 codes, 2 bits: 4 codes) or per 6-bit pair (3 bits) from a small table
    of code tuples (:func:`_tuple_table`): fewer gathers than one per code, and the gathers happen
    before the codes are spread over channels.
    """
    if BITS == 4:
        idx = raw.to(tl.int32)  # [BLOCK_N, N/2]
        vals = tl.load(tab_ptr + idx[:, :, None] * 2 + tl.arange(0, 2)[None, None, :])  # [BLOCK_N, N/2, 2]
    elif BITS == 2:
        idx = raw.to(tl.int32)  # [BLOCK_N, N/4]
        vals = tl.load(tab_ptr + idx[:, :, None] * 4 + tl.arange(0, 4)[None, None, :])  # [BLOCK_N, N/4, 4]
    else:
        six = (raw[:, :, None] >> (tl.arange(0, 4) * 6)[None, None, :]) & 63  # [BLOCK_N, N/8, 4]
        vals = tl.load(tab_ptr + six[:, :, :, None] * 2 + tl.arange(0, 2)[None, None, None, :])
    return tl.reshape(vals, (BLOCK_N, N))


@triton.jit
def _replace_slots(x, ch, oval_rows, oidx_rows, row_mask, N_SLOTS: tl.constexpr):
    """Replace ``x [BLOCK_N, N]`` (channels ``ch [N]``) by the exact outlier values named in the slots."""
    for s in tl.static_range(N_SLOTS):
        idx = tl.load(oidx_rows + s, mask=row_mask, other=255).to(tl.int32)  # [BLOCK_N, 1]
        val = tl.load(oval_rows + s, mask=row_mask, other=0.0).to(tl.float32)
        x = tl.where(ch[None, :] == idx, val, x)
    return x


# ----------------------------------------------------------------------------------------------
# stage 1: one split of the packed history
# ----------------------------------------------------------------------------------------------
@triton.jit
def _packed_attn_split_kernel(
    q_ptr,  # [B, Hq, Lq, D] queries (RoPE applied)
    kc_ptr,  # uint8 [B, H, cap, D*K_BITS/8]   (last dim contiguous, as for every cache tensor)
    kov_ptr,  # [B, H, cap, K_SLOTS] model dtype
    koi_ptr,  # uint8 [B, H, cap, K_SLOTS]
    vc_ptr,  # uint8 [B, H, cap, D*V_BITS/8]
    vs_ptr,  # fp16/bf16 [B, H, cap]
    vz_ptr,  # fp16/bf16 [B, H, cap]
    vov_ptr,  # [B, H, cap, V_SLOTS]
    voi_ptr,  # uint8 [B, H, cap, V_SLOTS]
    ktab_ptr,  # f32 code-tuple table of the key signposts (_tuple_table)
    vtab_ptr,  # f32 code-tuple table of the value signposts
    kzero_ptr,  # f32 [H, D] contiguous
    kscale_ptr,  # f32 [H, D] contiguous
    pos_ptr,  # int32 [B, cap]
    inv_freq_ptr,  # f32 [D/2]
    hist_ptr,  # int32 [B] first visible history token (HAS_HIST)
    qpos_ptr,  # int [B, Lq] query positions (HAS_WINDOW)
    o_ptr,  # f32 [B, H, NUM_SPLITS, M_PAD, D] normalized partial outputs
    lse_ptr,  # f32 [B, H, NUM_SPLITS, M_PAD] log2-sum-exp of each split (NEG_BIG if empty)
    L,  # history tokens held
    len_ptr,  # int32 [1] history tokens held, read on the device (LEN_ON_DEVICE: CUDA-graph decode)
    LQ,  # query rows per head
    H,  # kv heads
    NUM_MB,  # row blocks per kv head
    NUM_SPLITS,
    qk_scale,  # scaling * attention_scaling * log2(e)
    window,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kcb, stride_kch, stride_kct,
    stride_kvb, stride_kvh, stride_kvt,
    stride_kib, stride_kih, stride_kit,
    stride_vcb, stride_vch, stride_vct,
    stride_vsb, stride_vsh, stride_vst,
    stride_vzb, stride_vzh, stride_vzt,
    stride_vvb, stride_vvh, stride_vvt,
    stride_vib, stride_vih, stride_vit,
    stride_pb, stride_pt,
    stride_qpb, stride_qpl,
    HEAD_DIM: tl.constexpr,
    GROUP: tl.constexpr,
    K_BITS: tl.constexpr,
    V_BITS: tl.constexpr,
    K_SLOTS: tl.constexpr,
    V_SLOTS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_HIST: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    ROPE_TABLE: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_F32: tl.constexpr,  # float32 dot operands (tf32, or IEEE if IEEE): bf16/fp32 queries
    IEEE: tl.constexpr,
    FAST: tl.constexpr,  # GPU: MUFU cos/sin after range reduction (the interpreter has no libdevice)
    LEN_ON_DEVICE: tl.constexpr,
):
    HALF: tl.constexpr = HEAD_DIM // 2
    if LEN_ON_DEVICE:
        L = tl.load(len_ptr).to(tl.int64)
    pid = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    mb = pid % NUM_MB
    bh = pid // NUM_MB
    h = bh % H
    b = bh // H
    if DOT_F32:
        dt = tl.float32
    else:
        dt = q_ptr.dtype.element_ty

    # query rows of this kv head: row r = lq * GROUP + g  ->  query head h * GROUP + g, query row lq
    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < LQ * GROUP
    lq = rows // GROUP
    hq = h * GROUP + rows % GROUP
    dh = tl.arange(0, HALF)
    q_rows = q_ptr + b * stride_qb + hq[:, None] * stride_qh + lq[:, None] * stride_ql
    q1 = tl.load(q_rows + dh[None, :] * stride_qd, mask=row_mask[:, None], other=0.0).to(tl.float32)
    q2 = tl.load(q_rows + (dh + HALF)[None, :] * stride_qd, mask=row_mask[:, None], other=0.0).to(tl.float32)
    freq = tl.load(inv_freq_ptr + dh)  # [HALF]
    kz1 = tl.load(kzero_ptr + h * HEAD_DIM + dh)[None, :]
    kz2 = tl.load(kzero_ptr + h * HEAD_DIM + HALF + dh)[None, :]
    ks1 = tl.load(kscale_ptr + h * HEAD_DIM + dh)[None, :]
    ks2 = tl.load(kscale_ptr + h * HEAD_DIM + HALF + dh)[None, :]
    if HAS_WINDOW:
        qpos = tl.load(qpos_ptr + b * stride_qpb + lq * stride_qpl, mask=row_mask, other=0).to(tl.int64)

    # this split's token range (a fixed grid of NUM_SPLITS; trailing splits may be empty)
    chunk = tl.cdiv(tl.cdiv(L, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, L)
    if HAS_HIST:
        lo = tl.maximum(lo, tl.load(hist_ptr + b).to(tl.int64))

    jn = tl.arange(0, BLOCK_N)
    if ROPE_TABLE:
        tab_c, tab_s = _cos_sin_small(jn.to(tl.float32)[:, None] * freq[None, :], FAST)  # R(j), |angle| < BLOCK_N

    m_i = tl.full([BLOCK_M], _K_NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc1 = tl.zeros([BLOCK_M, HALF], tl.float32)
    acc2 = tl.zeros([BLOCK_M, HALF], tl.float32)
    kc_base = kc_ptr + b * stride_kcb + h * stride_kch
    kov_base = kov_ptr + b * stride_kvb + h * stride_kvh
    koi_base = koi_ptr + b * stride_kib + h * stride_kih
    vc_base = vc_ptr + b * stride_vcb + h * stride_vch
    vs_base = vs_ptr + b * stride_vsb + h * stride_vsh
    vz_base = vz_ptr + b * stride_vzb + h * stride_vzh
    vov_base = vov_ptr + b * stride_vvb + h * stride_vvh
    voi_base = voi_ptr + b * stride_vib + h * stride_vih
    pos_base = pos_ptr + b * stride_pb
    K_HALF_BYTES: tl.constexpr = HALF * K_BITS // 8
    V_HALF_BYTES: tl.constexpr = HALF * V_BITS // 8

    # software prefetch: the packed bytes, positions and value scales of the first block
    offs = lo + jn
    n_mask = offs < hi
    nm = n_mask[:, None]
    raw_k1 = _load_raw(kc_base + offs[:, None] * stride_kct, nm, K_BITS, HALF)
    raw_k2 = _load_raw(kc_base + offs[:, None] * stride_kct + K_HALF_BYTES, nm, K_BITS, HALF)
    raw_v1 = _load_raw(vc_base + offs[:, None] * stride_vct, nm, V_BITS, HALF)
    raw_v2 = _load_raw(vc_base + offs[:, None] * stride_vct + V_HALF_BYTES, nm, V_BITS, HALF)
    pos = tl.load(pos_base + offs * stride_pt, mask=n_mask, other=0)
    vsc = tl.load(vs_base + offs * stride_vst, mask=n_mask, other=1.0)
    vze = tl.load(vz_base + offs * stride_vzt, mask=n_mask, other=0.0)
    for t0 in range(lo, hi, BLOCK_N):
        offs = t0 + jn  # int64 token index
        n_mask = offs < hi
        nm = n_mask[:, None]
        # outlier slots of this block (small: issued early, used after the unpacking)
        kov_rows = kov_base + offs[:, None] * stride_kvt
        koi_rows = koi_base + offs[:, None] * stride_kit
        vov_rows = vov_base + offs[:, None] * stride_vvt
        voi_rows = voi_base + offs[:, None] * stride_vit

        # prefetch the next block while this one is computed
        nxt = offs + BLOCK_N
        n_nxt = nxt < hi
        nm_nxt = n_nxt[:, None]
        nraw_k1 = _load_raw(kc_base + nxt[:, None] * stride_kct, nm_nxt, K_BITS, HALF)
        nraw_k2 = _load_raw(kc_base + nxt[:, None] * stride_kct + K_HALF_BYTES, nm_nxt, K_BITS, HALF)
        nraw_v1 = _load_raw(vc_base + nxt[:, None] * stride_vct, nm_nxt, V_BITS, HALF)
        nraw_v2 = _load_raw(vc_base + nxt[:, None] * stride_vct + V_HALF_BYTES, nm_nxt, V_BITS, HALF)
        npos = tl.load(pos_base + nxt * stride_pt, mask=n_nxt, other=0)
        nvsc = tl.load(vs_base + nxt * stride_vst, mask=n_nxt, other=1.0)
        nvze = tl.load(vz_base + nxt * stride_vzt, mask=n_nxt, other=0.0)

        # keys: codes -> LUT -> per-channel scale/zero -> outlier slots, per RoPE half
        k1 = _lut_half(raw_k1, ktab_ptr, K_BITS, BLOCK_N, HALF) * ks1 + kz1  # [BLOCK_N, HALF]
        k2 = _lut_half(raw_k2, ktab_ptr, K_BITS, BLOCK_N, HALF) * ks2 + kz2
        k1 = _replace_slots(k1, dh, kov_rows, koi_rows, nm, K_SLOTS)
        k2 = _replace_slots(k2, dh + HALF, kov_rows, koi_rows, nm, K_SLOTS)

        # RoPE: consecutive positions use R(p0) on the queries and the R(j) table on the keys
        p0 = tl.sum(tl.where(jn == 0, pos, 0), axis=0)
        consec = tl.max(tl.abs(tl.where(n_mask, pos - p0 - jn, 0)), axis=0) == 0
        if consec:
            c0, s0 = _cos_sin(p0.to(tl.float32) * freq, FAST)
            qa1 = q1 * c0[None, :] + q2 * s0[None, :]
            qa2 = q2 * c0[None, :] - q1 * s0[None, :]
            if ROPE_TABLE:
                cs = tab_c
                sn = tab_s
            else:
                cs, sn = _cos_sin_small(jn.to(tl.float32)[:, None] * freq[None, :], FAST)
        else:
            cs, sn = _cos_sin(pos.to(tl.float32)[:, None] * freq[None, :], FAST)
            qa1 = q1
            qa2 = q2
        kr1 = k1 * cs - k2 * sn
        kr2 = k2 * cs + k1 * sn

        qk = _mm(qa1.to(dt), tl.trans(kr1.to(dt)), USE_DOT, IEEE)
        qk += _mm(qa2.to(dt), tl.trans(kr2.to(dt)), USE_DOT, IEEE)
        qk = qk * qk_scale
        visible = n_mask[None, :]
        if HAS_WINDOW:
            visible = visible & ((qpos[:, None] - pos[None, :].to(tl.int64)) < window)
        qk = tl.where(visible, qk, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new

        # values: codes -> LUT -> per-token scale/zero -> outlier slots
        sc = tl.maximum(vsc.to(tl.float32), _K_MIN_SCALE)[:, None]
        ze = vze.to(tl.float32)[:, None]
        v1 = _lut_half(raw_v1, vtab_ptr, V_BITS, BLOCK_N, HALF) * sc + ze
        v2 = _lut_half(raw_v2, vtab_ptr, V_BITS, BLOCK_N, HALF) * sc + ze
        v1 = _replace_slots(v1, dh, vov_rows, voi_rows, nm, V_SLOTS)
        v2 = _replace_slots(v2, dh + HALF, vov_rows, voi_rows, nm, V_SLOTS)

        pd = p.to(dt)
        acc1 = acc1 * alpha[:, None] + _mm(pd, v1.to(dt), USE_DOT, IEEE)
        acc2 = acc2 * alpha[:, None] + _mm(pd, v2.to(dt), USE_DOT, IEEE)

        raw_k1 = nraw_k1
        raw_k2 = nraw_k2
        raw_v1 = nraw_v1
        raw_v2 = nraw_v2
        pos = npos
        vsc = nvsc
        vze = nvze

    has = l_i > 0.0
    inv_l = 1.0 / tl.where(has, l_i, 1.0)
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), _K_NEG_BIG)
    m_pad = NUM_MB * BLOCK_M
    part = (bh * NUM_SPLITS + split) * m_pad + rows  # [BLOCK_M] row index into the partial buffers
    tl.store(lse_ptr + part, lse)
    o_rows = o_ptr + part[:, None] * HEAD_DIM
    tl.store(o_rows + dh[None, :], acc1 * inv_l[:, None])
    tl.store(o_rows + HALF + dh[None, :], acc2 * inv_l[:, None])


# ----------------------------------------------------------------------------------------------
# stage 1, decode fast path: fp16 dequantization in packed pairs (2/4-bit codes, <= 16 query rows)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _shift_pair(w, i: tl.constexpr, BITS: tl.constexpr, BF16: tl.constexpr):
    """int32 holding code ``i`` (low half) and code ``i + CPW/2`` (high half) of each word as float16 bits
    ``0x6400 | code << (BITS*k)``, i.e. ``1024 + code * 2**(BITS*k)``, with ``k = i % NS`` (see :func:`_code_scale`);
    with ``BF16`` as bfloat16 bits ``0x4300 | code << (BITS*k)`` = ``128 + code * 2**(BITS*k)``.

    Codes whose bits already lie in a half's mantissa (bits 0 .. 9, bfloat16: 0 .. 6) are masked in place: one
    shift per ``NS`` pairs instead of one per pair.
    """
    MANT: tl.constexpr = 7 if BF16 else 10
    MAGIC: tl.constexpr = 0x43004300 if BF16 else 0x64006400
    NS: tl.constexpr = 1 if BITS == 4 else MANT // BITS  # pairs per shift (4 bits: measured no gain)
    MASK: tl.constexpr = ((1 << BITS) - 1) * 0x10001
    SH: tl.constexpr = BITS * NS * (i // NS)
    K: tl.constexpr = i % NS
    if SH == 0:
        return (w & (MASK << (BITS * K))) | MAGIC
    else:
        return ((w >> SH) & (MASK << (BITS * K))) | MAGIC


@triton.jit
def _code_scale(e, BITS: tl.constexpr, BF16: tl.constexpr):
    """``2**-(BITS*k)`` of pair-order column ``e`` (:func:`_shift_pair`): undoes the in-place mask."""
    MANT: tl.constexpr = 7 if BF16 else 10
    NS: tl.constexpr = 1 if BITS == 4 else MANT // BITS
    CPW: tl.constexpr = 32 // BITS
    NI: tl.constexpr = CPW // 2
    q = (e % CPW) // 2
    if NI == 4:
        i = (q % 2) * 2 + q // 2
    else:
        i = (q % 2) * 4 + ((q // 2) % 2) * 2 + q // 4
    k = i % NS
    return tl.exp2((-(BITS * k)).to(tl.float32))


@triton.jit
def _codes_f16(w, BITS: tl.constexpr, BLOCK_N: tl.constexpr, N: tl.constexpr, BF16: tl.constexpr):
    """Codes of int32 words ``w [BLOCK_N, N*BITS/32]`` as float16 (``BF16``: bfloat16, magic ``128``) small
    integers ``[BLOCK_N, N]``.

    Each word holds ``CPW = 32/BITS`` codes. One mask of ``(w >> BITS*i)`` takes the codes ``i`` and
    ``i + CPW/2`` into the two 16-bit halves, ``| 0x6400`` makes them the float16 ``1024 + code`` (codes already
    inside the mantissa are masked in place, ``1024 + code * 2**(BITS*k)``) and one packed half2 FMA with
    power-of-two constants (exact) leaves the code: about a mask and an FMA per two codes. The
    shifted copies are combined with ``tl.join`` (new dims stay inside a thread: no layout change), so the
    result is in the *pair order* of :func:`_pair_perm`; queries, scales and outputs use the same order.
    """
    NI: tl.constexpr = 16 // BITS
    if NI == 4:
        c = tl.join(tl.join(_shift_pair(w, 0, BITS, BF16), _shift_pair(w, 1, BITS, BF16)),
                    tl.join(_shift_pair(w, 2, BITS, BF16), _shift_pair(w, 3, BITS, BF16)))
    else:
        c = tl.join(tl.join(tl.join(_shift_pair(w, 0, BITS, BF16), _shift_pair(w, 1, BITS, BF16)),
                            tl.join(_shift_pair(w, 2, BITS, BF16), _shift_pair(w, 3, BITS, BF16))),
                    tl.join(tl.join(_shift_pair(w, 4, BITS, BF16), _shift_pair(w, 5, BITS, BF16)),
                            tl.join(_shift_pair(w, 6, BITS, BF16), _shift_pair(w, 7, BITS, BF16))))
    x = tl.reshape(tl.join(_half(c & 0xFFFF, BF16), _half(c >> 16, BF16)), (BLOCK_N, N))
    if BF16:
        f = _code_scale(tl.arange(0, N), BITS, BF16).to(tl.bfloat16)[None, :]
        return x * f - 128.0 * f  # exact: a power-of-two scale of small integers
    else:
        f = _code_scale(tl.arange(0, N), BITS, BF16).to(tl.float16)[None, :]
        return x * f - 1024.0 * f  # exact: a power-of-two scale of small integers


@triton.jit
def _half(bits16, BF16: tl.constexpr):
    """int32 holding 16-bit patterns (low half) -> float16 (``BF16``: bfloat16) values."""
    if BF16:
        return bits16.to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return bits16.to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _to_half(x, BF16: tl.constexpr):
    """``x`` rounded to the fast path's 16-bit float type (float16, ``BF16``: bfloat16)."""
    if BF16:
        return x.to(tl.bfloat16)
    else:
        return x.to(tl.float16)


@triton.jit
def _pair_perm(e, BITS: tl.constexpr, LUT: tl.constexpr):
    """Channel (within a RoPE half) of pair-order index ``e`` (:func:`_codes_f16`, or :func:`_lut_f16` if LUT).

    ``e = CPW*w + 2*q + j`` (``CPW = 32/BITS`` codes per word ``w``); ``i`` is ``q`` with its bits reversed (the
    nested joins put the first shift in the slowest in-thread dim). Codes: channel ``i + (CPW/2)*j`` of the
    word; gathered pairs: channel ``2*i + j``.
    """
    CPW: tl.constexpr = 32 // BITS
    NI: tl.constexpr = CPW // 2
    r = e % CPW
    q = r // 2
    if NI == 4:
        i = (q % 2) * 2 + q // 2
    else:
        i = (q % 2) * 4 + ((q // 2) % 2) * 2 + q // 4
    if LUT:
        return e - r + 2 * i + (r % 2)
    else:
        return e - r + i + (r % 2) * NI


@triton.jit
def _lut_pair(w, tab_ptr, t: tl.constexpr, BITS: tl.constexpr):
    """int32 = half2 signposts of the two codes in bits ``[2*BITS*t, 2*BITS*(t+1))`` of each word."""
    SH: tl.constexpr = 2 * BITS * t
    if SH == 0:
        u = w & ((1 << (2 * BITS)) - 1)
    elif SH + 2 * BITS == 32:
        u = (w >> SH) & ((1 << (2 * BITS)) - 1)
    else:
        u = (w >> SH) & ((1 << (2 * BITS)) - 1)
    return tl.load(tab_ptr + u)


@triton.jit
def _lut_f16(w, tab_ptr, BITS: tl.constexpr, BLOCK_N: tl.constexpr, N: tl.constexpr, BF16: tl.constexpr):
    """Signposts (float16 ``[BLOCK_N, N]``) of the codes in int32 words ``w``: one gather per code pair.

    ``tab_ptr`` is the half2 pair table of :func:`_pair_table` (entry ``u`` = signposts of the codes
    ``u & (2**BITS - 1)`` and ``u >> BITS``, low half first). Combined with ``tl.join`` like
    :func:`_codes_f16`; the order is :func:`_pair_perm` with ``LUT=True``.
    """
    NL: tl.constexpr = 16 // BITS  # pairs per word
    if NL == 4:
        c = tl.join(tl.join(_lut_pair(w, tab_ptr, 0, BITS), _lut_pair(w, tab_ptr, 1, BITS)),
                    tl.join(_lut_pair(w, tab_ptr, 2, BITS), _lut_pair(w, tab_ptr, 3, BITS)))
    else:
        c = tl.join(tl.join(tl.join(_lut_pair(w, tab_ptr, 0, BITS), _lut_pair(w, tab_ptr, 1, BITS)),
                            tl.join(_lut_pair(w, tab_ptr, 2, BITS), _lut_pair(w, tab_ptr, 3, BITS))),
                    tl.join(tl.join(_lut_pair(w, tab_ptr, 4, BITS), _lut_pair(w, tab_ptr, 5, BITS)),
                            tl.join(_lut_pair(w, tab_ptr, 6, BITS), _lut_pair(w, tab_ptr, 7, BITS))))
    return tl.reshape(tl.join(_half(c & 0xFFFF, BF16), _half(c >> 16, BF16)), (BLOCK_N, N))


@triton.jit
def _replace_slots_f16(x, e, BITS: tl.constexpr, LUT: tl.constexpr, HALF_BASE: tl.constexpr, oval_rows, oidx_rows,
                       n_mask, N_SLOTS: tl.constexpr, BF16: tl.constexpr):
    """:func:`_replace_slots` on float16 ``x [BLOCK_N, N]`` in pair order (column ``e``, channels
    ``HALF_BASE + _pair_perm(e)``); slot pointers ``[BLOCK_N]``.

    The channel of column ``e`` is ``word base + offset``; the compare is written as
    ``idx - word_base == offset`` so the offsets (the same in every word) can stay immediates.
    """
    CPW: tl.constexpr = 32 // BITS
    off = _pair_perm(e % CPW, BITS, LUT)  # channel offset inside the word
    base = e - e % CPW + HALF_BASE
    for s in tl.static_range(N_SLOTS):
        idx = tl.load(oidx_rows + s, mask=n_mask, other=255).to(tl.int32)  # [BLOCK_N]
        val = _to_half(tl.load(oval_rows + s, mask=n_mask, other=0.0), BF16)
        x = tl.where((idx[:, None] - base[None, :]) == off[None, :], val[:, None], x)
    return x


@triton.jit
def _key_slot_scores(q_rows, row_mask, kcb_rows, koi_rows, kov_rows, n_mask, pos, klut_ptr, kscale_h, kzero_h,
                     inv_freq_ptr, HEAD_DIM: tl.constexpr, K_BITS: tl.constexpr, K_SLOTS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FAST: tl.constexpr):
    """Score change ``[BLOCK_M, BLOCK_N]`` from the key outlier slots, applied sparsely.

    A slot replaces the dequantized pre-RoPE key element ``k[idx]`` by ``val``; the rotated key changes by
    ``(val - k[idx]) * R(pos) e_idx``, so the score of row ``m`` changes by ``(val - k[idx])`` times the query
    rotated back by ``R(pos)`` at channel ``idx``: per token and slot one code, one cos/sin pair and two query
    gathers instead of a compare and select over every element. A later slot naming the same channel wins (as in
    :func:`kvquant_hf.quant._apply_slots`); channels >= head_dim (255 = unused) do nothing.
    """
    HALF: tl.constexpr = HEAD_DIM // 2
    corr = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for s in tl.static_range(K_SLOTS):
        idx = tl.load(koi_rows + s, mask=n_mask, other=255).to(tl.int32)  # [BLOCK_N]
        use = n_mask & (idx < HEAD_DIM)
        for t in tl.static_range(s + 1, K_SLOTS):
            use = use & (tl.load(koi_rows + t, mask=n_mask, other=255).to(tl.int32) != idx)
        idx = tl.where(use, idx, 0)
        val = tl.load(kov_rows + s, mask=use, other=0.0).to(tl.float32)
        bit = idx * K_BITS
        byte = tl.load(kcb_rows + bit // 8, mask=use, other=0).to(tl.int32)
        code = (byte >> (bit % 8)) & ((1 << K_BITS) - 1)
        deq = tl.load(klut_ptr + code) * tl.load(kscale_h + idx) + tl.load(kzero_h + idx)
        delta = tl.where(use, val - deq, 0.0)
        dd = idx % HALF
        c, sn = _cos_sin(pos.to(tl.float32) * tl.load(inv_freq_ptr + dd), FAST)
        qa = tl.load(q_rows + dd[None, :], mask=row_mask[:, None] & use[None, :], other=0.0).to(tl.float32)
        qb = tl.load(q_rows + HALF + dd[None, :], mask=row_mask[:, None] & use[None, :], other=0.0).to(tl.float32)
        second = (idx >= HALF)[None, :]
        coef = tl.where(second, qb * c[None, :] - qa * sn[None, :], qa * c[None, :] + qb * sn[None, :])
        corr += coef * delta[None, :]
    return corr


@triton.jit
def _load_block(kc_base, vc_base, pos_base, vs_base, vz_base, offs, n_mask, kwst, vwst, stride_vst, stride_vzt,
                KW: tl.constexpr, VW: tl.constexpr):
    """One block's packed key/value words (two RoPE halves each), positions and value scale/zero."""
    nm = n_mask[:, None]
    kwi = tl.arange(0, KW)[None, :]
    vwi = tl.arange(0, VW)[None, :]
    wk1 = tl.load(kc_base + offs[:, None] * kwst + kwi, mask=nm, other=0)
    wk2 = tl.load(kc_base + offs[:, None] * kwst + KW + kwi, mask=nm, other=0)
    wv1 = tl.load(vc_base + offs[:, None] * vwst + vwi, mask=nm, other=0)
    wv2 = tl.load(vc_base + offs[:, None] * vwst + VW + vwi, mask=nm, other=0)
    pos = tl.load(pos_base + offs, mask=n_mask, other=0)
    vsc = tl.load(vs_base + offs * stride_vst, mask=n_mask, other=1.0)
    vze = tl.load(vz_base + offs * stride_vzt, mask=n_mask, other=0.0)
    return wk1, wk2, wv1, wv2, pos, vsc, vze


@triton.jit
def _packed_decode_kernel(
    q_ptr,  # fp16 [B, Hq, Lq, D] queries (RoPE applied)
    kc_ptr,  # uint8 [B, H, cap, D*K_BITS/8], read as int32 words (4-byte aligned rows, strides in words)
    kov_ptr, koi_ptr,  # [B, H, cap, K_SLOTS] key slot values (fp16) / channels (uint8)
    vc_ptr,  # uint8 [B, H, cap, D*V_BITS/8]
    vs_ptr, vz_ptr,  # fp16 [B, H, cap] value scale / zero
    vov_ptr, voi_ptr,  # [B, H, cap, V_SLOTS]
    klut_ptr, vlut_ptr,  # f32 [2**bits] signposts (key slots read them)
    kpair_ptr, vpair_ptr,  # int32 half2 pair tables (_pair_table), gathered per code pair unless *_AFFINE
    kzero_ptr, kscale_ptr,  # f32 [H, D] contiguous
    pos_ptr,  # int32 [B, cap]
    inv_freq_ptr,  # f32 [D/2]
    hist_ptr,  # int32 [B] first visible history token (HAS_HIST)
    o_ptr,  # f32 [B, H, NUM_SPLITS, BLOCK_M, D] normalized partial outputs
    lse_ptr,  # f32 [B, H, NUM_SPLITS, BLOCK_M]
    L, len_ptr, LQ, H, NUM_SPLITS,
    qk_scale,
    k_a, k_b,  # key grid lut[c] = k_a + k_b * c (K_AFFINE)
    v_a, v_b,  # value grid lut[c] = v_a + v_b * c (V_AFFINE)
    stride_qb, stride_qh, stride_ql,
    stride_kcb, stride_kch, stride_kct,
    stride_kvb, stride_kvh, stride_kvt,
    stride_kib, stride_kih, stride_kit,
    stride_vcb, stride_vch, stride_vct,
    stride_vsb, stride_vsh, stride_vst,
    stride_vzb, stride_vzh, stride_vzt,
    stride_vvb, stride_vvh, stride_vvt,
    stride_vib, stride_vih, stride_vit,
    stride_pb,
    HEAD_DIM: tl.constexpr,
    GROUP: tl.constexpr,
    K_BITS: tl.constexpr,
    V_BITS: tl.constexpr,
    K_SLOTS: tl.constexpr,
    V_SLOTS: tl.constexpr,
    K_AFFINE: tl.constexpr,
    V_AFFINE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_HIST: tl.constexpr,
    FAST: tl.constexpr,
    LEN_ON_DEVICE: tl.constexpr,
    PREFETCH: tl.constexpr,  # load the next block's words one iteration ahead (registers vs latency)
    K_SPARSE: tl.constexpr,  # key slots as a score correction (True) or replaced in the dequantized keys
    KEY_F32: tl.constexpr,  # keys: float32 scale/zero/RoPE (True) or packed half2 math
    BF16: tl.constexpr,  # bfloat16 model: queries, slots, value scale/zero and the MMA operands in bfloat16
):
    HALF: tl.constexpr = HEAD_DIM // 2
    KW: tl.constexpr = HALF * K_BITS // 32  # int32 words per RoPE half
    VW: tl.constexpr = HALF * V_BITS // 32
    if LEN_ON_DEVICE:
        L = tl.load(len_ptr)
    bh = tl.program_id(0)
    split = tl.program_id(1)
    h = bh % H
    b = bh // H

    # query rows of this kv head (row r = lq * GROUP + g), channels in pair order
    rows = tl.arange(0, BLOCK_M)
    row_mask = rows < LQ * GROUP
    lq = rows // GROUP
    hq = h * GROUP + rows % GROUP
    e = tl.arange(0, HALF)
    chk = _pair_perm(e, K_BITS, not K_AFFINE)  # key channel of pair-order column e (per half)
    chv = _pair_perm(e, V_BITS, not V_AFFINE)
    q_rows = q_ptr + b.to(tl.int64) * stride_qb + (hq * stride_qh + lq * stride_ql)[:, None]
    q1 = tl.load(q_rows + chk[None, :], mask=row_mask[:, None], other=0.0)  # fp16 (upcast per use)
    q2 = tl.load(q_rows + HALF + chk[None, :], mask=row_mask[:, None], other=0.0)
    freq = tl.load(inv_freq_ptr + chk)
    kz1 = tl.load(kzero_ptr + h * HEAD_DIM + chk)
    kz2 = tl.load(kzero_ptr + h * HEAD_DIM + HALF + chk)
    ks1 = tl.load(kscale_ptr + h * HEAD_DIM + chk)
    ks2 = tl.load(kscale_ptr + h * HEAD_DIM + HALF + chk)
    if K_AFFINE:  # lut[c] * s + z == c * (b s) + (a s + z)
        kz1 = kz1 + k_a * ks1
        kz2 = kz2 + k_a * ks2
        ks1 = ks1 * k_b
        ks2 = ks2 * k_b
    kz1h = _to_half(kz1, BF16)[None, :]
    kz2h = _to_half(kz2, BF16)[None, :]
    ks1h = _to_half(ks1, BF16)[None, :]
    ks2h = _to_half(ks2, BF16)[None, :]

    chunk = tl.cdiv(tl.cdiv(L, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, L)
    if HAS_HIST:
        lo = tl.maximum(lo, tl.load(hist_ptr + b))

    jn = tl.arange(0, BLOCK_N)
    tab_c, tab_s = _cos_sin_small(jn.to(tl.float32)[:, None] * freq[None, :], FAST)  # R(j)
    if not KEY_F32:
        tab_c = _to_half(tab_c, BF16)
        tab_s = _to_half(tab_s, BF16)

    m_i = tl.full([BLOCK_M], _K_NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc1 = tl.zeros([BLOCK_M, HALF], tl.float32)
    acc2 = tl.zeros([BLOCK_M, HALF], tl.float32)
    # per-program bases (64-bit once), then 32-bit offsets
    kc_base = kc_ptr.to(tl.pointer_type(tl.int32)) + b.to(tl.int64) * stride_kcb + h.to(tl.int64) * stride_kch
    vc_base = vc_ptr.to(tl.pointer_type(tl.int32)) + b.to(tl.int64) * stride_vcb + h.to(tl.int64) * stride_vch
    kov_base = kov_ptr + b.to(tl.int64) * stride_kvb + h.to(tl.int64) * stride_kvh
    koi_base = koi_ptr + b.to(tl.int64) * stride_kib + h.to(tl.int64) * stride_kih
    vs_base = vs_ptr + b.to(tl.int64) * stride_vsb + h.to(tl.int64) * stride_vsh
    vz_base = vz_ptr + b.to(tl.int64) * stride_vzb + h.to(tl.int64) * stride_vzh
    vov_base = vov_ptr + b.to(tl.int64) * stride_vvb + h.to(tl.int64) * stride_vvh
    voi_base = voi_ptr + b.to(tl.int64) * stride_vib + h.to(tl.int64) * stride_vih
    pos_base = pos_ptr + b.to(tl.int64) * stride_pb
    kcb_base = kc_ptr + b.to(tl.int64) * stride_kcb * 4 + h.to(tl.int64) * stride_kch * 4  # bytes (slots)
    stride_kcbt = stride_kct * 4
    kwst = stride_kct  # int32 words (the launcher passes byte strides / 4)
    vwst = stride_vct

    if PREFETCH:  # software prefetch: the packed words, positions and value scales of the first block
        wk1, wk2, wv1, wv2, pos, vsc, vze = _load_block(kc_base, vc_base, pos_base, vs_base, vz_base, lo + jn,
                                                        lo + jn < hi, kwst, vwst, stride_vst, stride_vzt, KW, VW)
    for t0 in range(lo, hi, BLOCK_N):
        offs = t0 + jn
        n_mask = offs < hi
        kov_rows = kov_base + offs * stride_kvt
        koi_rows = koi_base + offs * stride_kit
        vov_rows = vov_base + offs * stride_vvt
        voi_rows = voi_base + offs * stride_vit

        if PREFETCH:  # the next block's words while this one is computed
            nwk1, nwk2, nwv1, nwv2, npos, nvsc, nvze = _load_block(
                kc_base, vc_base, pos_base, vs_base, vz_base, offs + BLOCK_N, offs + BLOCK_N < hi, kwst, vwst,
                stride_vst, stride_vzt, KW, VW)
        else:
            wk1, wk2, wv1, wv2, pos, vsc, vze = _load_block(kc_base, vc_base, pos_base, vs_base, vz_base, offs,
                                                            n_mask, kwst, vwst, stride_vst, stride_vzt, KW, VW)

        # keys (pre-RoPE): code -> (grid folded into scale/zero | signpost gather) -> slots
        if K_AFFINE:
            c1 = _codes_f16(wk1, K_BITS, BLOCK_N, HALF, BF16)
            c2 = _codes_f16(wk2, K_BITS, BLOCK_N, HALF, BF16)
        else:
            c1 = _lut_f16(wk1, kpair_ptr, K_BITS, BLOCK_N, HALF, BF16)
            c2 = _lut_f16(wk2, kpair_ptr, K_BITS, BLOCK_N, HALF, BF16)
        if KEY_F32:  # float32 scale/zero and RoPE, one rounding to fp16 for the MMA (as the general kernel)
            k1 = c1.to(tl.float32) * ks1[None, :] + kz1[None, :]
            k2 = c2.to(tl.float32) * ks2[None, :] + kz2[None, :]
        else:  # packed half2 math (fewer registers, ~3x the rounding error of the scores)
            k1 = c1 * ks1h + kz1h
            k2 = c2 * ks2h + kz2h
        if not K_SPARSE:
            k1 = _replace_slots_f16(k1, e, K_BITS, not K_AFFINE, 0, kov_rows, koi_rows, n_mask, K_SLOTS, BF16)
            k2 = _replace_slots_f16(k2, e, K_BITS, not K_AFFINE, HALF, kov_rows, koi_rows, n_mask, K_SLOTS, BF16)

        p0 = tl.sum(tl.where(jn == 0, pos, 0), axis=0)
        consec = tl.max(tl.abs(tl.where(n_mask, pos - p0 - jn, 0)), axis=0) == 0
        # each arm computes the scores itself (no tensors of two layouts merged after the branch)
        if consec:
            c0, s0 = _cos_sin(p0.to(tl.float32) * freq, FAST)
            q1f = q1.to(tl.float32)
            q2f = q2.to(tl.float32)
            qa1 = _to_half(q1f * c0[None, :] + q2f * s0[None, :], BF16)
            qa2 = _to_half(q2f * c0[None, :] - q1f * s0[None, :], BF16)
            qk = tl.dot(qa1, tl.trans(_to_half(k1 * tab_c - k2 * tab_s, BF16)))
            qk += tl.dot(qa2, tl.trans(_to_half(k2 * tab_c + k1 * tab_s, BF16)))
        else:
            csf, snf = _cos_sin(pos.to(tl.float32)[:, None] * freq[None, :], FAST)
            if KEY_F32:
                cs = csf
                sn = snf
            else:
                cs = _to_half(csf, BF16)
                sn = _to_half(snf, BF16)
            qk = tl.dot(q1, tl.trans(_to_half(k1 * cs - k2 * sn, BF16)))
            qk += tl.dot(q2, tl.trans(_to_half(k2 * cs + k1 * sn, BF16)))
        if K_SPARSE:
            qk += _key_slot_scores(q_rows, row_mask, kcb_base + offs * stride_kcbt, koi_rows, kov_rows, n_mask, pos,
                                   klut_ptr, kscale_ptr + h * HEAD_DIM, kzero_ptr + h * HEAD_DIM, inv_freq_ptr,
                                   HEAD_DIM, K_BITS, K_SLOTS, BLOCK_M, BLOCK_N, FAST)
        qk = tl.where(n_mask[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new

        # values: per-token scale/zero (the grid folded in when affine) -> slots
        sc = tl.maximum(vsc.to(tl.float32), _K_MIN_SCALE)
        ze = vze.to(tl.float32)
        if V_AFFINE:
            d1 = _codes_f16(wv1, V_BITS, BLOCK_N, HALF, BF16)
            d2 = _codes_f16(wv2, V_BITS, BLOCK_N, HALF, BF16)
            ze = ze + v_a * sc
            sc = sc * v_b
        else:
            d1 = _lut_f16(wv1, vpair_ptr, V_BITS, BLOCK_N, HALF, BF16)
            d2 = _lut_f16(wv2, vpair_ptr, V_BITS, BLOCK_N, HALF, BF16)
        sch = _to_half(sc, BF16)[:, None]
        zeh = _to_half(ze, BF16)[:, None]
        v1 = d1 * sch + zeh
        v2 = d2 * sch + zeh
        v1 = _replace_slots_f16(v1, e, V_BITS, not V_AFFINE, 0, vov_rows, voi_rows, n_mask, V_SLOTS, BF16)
        v2 = _replace_slots_f16(v2, e, V_BITS, not V_AFFINE, HALF, vov_rows, voi_rows, n_mask, V_SLOTS, BF16)

        pd = _to_half(p, BF16)
        acc1 = acc1 * alpha[:, None] + tl.dot(pd, v1)
        acc2 = acc2 * alpha[:, None] + tl.dot(pd, v2)

        if PREFETCH:
            wk1 = nwk1
            wk2 = nwk2
            wv1 = nwv1
            wv2 = nwv2
            pos = npos
            vsc = nvsc
            vze = nvze

    has = l_i > 0.0
    inv_l = 1.0 / tl.where(has, l_i, 1.0)
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), _K_NEG_BIG)
    part = (bh * NUM_SPLITS + split) * BLOCK_M + rows
    tl.store(lse_ptr + part, lse)
    o_rows = o_ptr + part[:, None] * HEAD_DIM
    tl.store(o_rows + chv[None, :], acc1 * inv_l[:, None])
    tl.store(o_rows + HALF + chv[None, :], acc2 * inv_l[:, None])


# ----------------------------------------------------------------------------------------------
# stage 2: merge the splits and attend to the exact block
# ----------------------------------------------------------------------------------------------
@triton.jit
def _packed_attn_merge_kernel(
    q_ptr,  # [B, Hq, Lq, D]
    ek_ptr,  # [B, H, E, D] exact keys (rotated), model dtype
    ev_ptr,  # [B, H, E, D] exact values
    em_ptr,  # bool [B, Lq, E] (HAS_EMASK)
    o_ptr,  # f32 [B, H, NUM_SPLITS, M_PAD, D]
    lse_ptr,  # f32 [B, H, NUM_SPLITS, M_PAD]
    out_ptr,  # [B, Hq, Lq, D] query dtype
    E,
    LQ,
    H,
    NUM_MB,
    NUM_SPLITS,
    qk_scale,  # scaling * log2(e)
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_ekb, stride_ekh, stride_eke, stride_ekd,
    stride_evb, stride_evh, stride_eve, stride_evd,
    stride_emb, stride_eml, stride_eme,
    stride_ob, stride_oh, stride_ol, stride_od,
    HEAD_DIM: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
    HAS_EMASK: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_F32: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_D: tl.constexpr = 0,  # output channels per program (grid axis 1); 0: all of HEAD_DIM
    BLOCK_S: tl.constexpr = 1,  # splits merged per step (a [BLOCK_S, BLOCK_M, BLOCK_D] tile: loads in flight)
):
    pid = tl.program_id(0).to(tl.int64)
    mb = pid % NUM_MB
    bh = pid // NUM_MB
    h = bh % H
    b = bh // H
    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < LQ * GROUP
    lq = rows // GROUP
    hq = h * GROUP + rows % GROUP
    BD: tl.constexpr = HEAD_DIM if BLOCK_D == 0 else BLOCK_D
    d = tl.program_id(1) * BD + tl.arange(0, BD)  # this program's output channels
    dq = tl.arange(0, HEAD_DIM)  # all channels (exact-block scores)

    # splits: the row maxima first, then one weighted sum with BLOCK_S splits per step (no rescaling chain, so
    # the loads of a step are independent: a decode step's merge is bound by load latency, not bandwidth)
    m_pad = NUM_MB * BLOCK_M
    js = tl.arange(0, BLOCK_S)
    m_i = tl.full([BLOCK_M], _K_NEG_BIG, tl.float32)
    for s0 in range(0, NUM_SPLITS, BLOCK_S):
        sp = s0 + js
        part = (bh * NUM_SPLITS + sp[:, None]) * m_pad + rows[None, :]
        lse_s = tl.load(lse_ptr + part, mask=(sp < NUM_SPLITS)[:, None] & row_mask[None, :], other=float("-inf"))
        m_i = tl.maximum(m_i, tl.max(lse_s, axis=0))
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BD], tl.float32)
    for s0 in range(0, NUM_SPLITS, BLOCK_S):
        sp = s0 + js
        ok = (sp < NUM_SPLITS)[:, None] & row_mask[None, :]  # padding rows of the parts are never read
        part = (bh * NUM_SPLITS + sp[:, None]) * m_pad + rows[None, :]  # [BLOCK_S, BLOCK_M]
        w = tl.exp2(tl.load(lse_ptr + part, mask=ok, other=float("-inf")) - m_i[None, :])
        o_s = tl.load(o_ptr + part[:, :, None] * HEAD_DIM + d[None, None, :], mask=ok[:, :, None], other=0.0)
        acc += tl.sum(w[:, :, None] * o_s, axis=0)
        l_i += tl.sum(w, axis=0)

    if E > 0:
        if DOT_F32:
            edt = tl.float32
        else:
            edt = ek_ptr.dtype.element_ty
        q_rows = q_ptr + b * stride_qb + hq[:, None] * stride_qh + lq[:, None] * stride_ql
        q = tl.load(q_rows + dq[None, :] * stride_qd, mask=row_mask[:, None], other=0.0).to(edt)
        je = tl.arange(0, BLOCK_E)
        for e0 in range(0, E, BLOCK_E):
            e = e0 + je
            e_mask = e < E
            k = tl.load(
                ek_ptr + b * stride_ekb + h * stride_ekh + e[:, None] * stride_eke + dq[None, :] * stride_ekd,
                mask=e_mask[:, None], other=0.0,
            )
            v = tl.load(
                ev_ptr + b * stride_evb + h * stride_evh + e[:, None] * stride_eve + d[None, :] * stride_evd,
                mask=e_mask[:, None], other=0.0,
            )
            qk = _mm(q, tl.trans(k.to(edt)), USE_DOT, IEEE) * qk_scale
            visible = e_mask[None, :]
            if HAS_EMASK:
                em = tl.load(
                    em_ptr + b * stride_emb + lq[:, None] * stride_eml + e[None, :] * stride_eme,
                    mask=row_mask[:, None] & e_mask[None, :], other=0,
                )
                visible = visible & (em != 0)
            qk = tl.where(visible, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + _mm(p.to(edt), v.to(edt), USE_DOT, IEEE)
            m_i = m_new

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    out_rows = out_ptr + b * stride_ob + hq[:, None] * stride_oh + lq[:, None] * stride_ol
    tl.store(out_rows + d[None, :] * stride_od, out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])


# ----------------------------------------------------------------------------------------------
# host launcher
# ----------------------------------------------------------------------------------------------
_TABLES: dict = {}  # id(lut) -> (weakref to lut, lut._version, bits, table)


def _version_of(lut: torch.Tensor) -> int:
    """In-place version of a tensor; inference tensors (made under torch.inference_mode) keep none."""
    return -1 if lut.is_inference() else lut._version


def _tuple_table(lut: torch.Tensor, bits: int) -> torch.Tensor:
    """Signpost values of every code tuple that one gather reads, float32 and flat.

    4 bits: ``[256, 2]`` (both codes of a byte, low nibble first); 2 bits: ``[256, 4]``; 3 bits: ``[64, 2]``
    (6-bit pairs of codes). Cached per lookup-table tensor and its in-place version counter.
    """
    hit = _TABLES.get(id(lut))
    if hit is not None and hit[0]() is lut and hit[1] == _version_of(lut) and hit[2] == bits:
        return hit[3]
    per = 2 if bits in (3, 4) else 4
    idx = torch.arange(1 << (bits * per), device=lut.device)
    codes = torch.stack([(idx >> (bits * i)) & ((1 << bits) - 1) for i in range(per)], dim=-1)
    tab = lut.to(torch.float32)[codes].reshape(-1).contiguous()
    if len(_TABLES) > 1024:
        for key in [k for k, v in _TABLES.items() if v[0]() is None]:
            del _TABLES[key]
    _TABLES[id(lut)] = (weakref.ref(lut), _version_of(lut), bits, tab)
    return tab


def _pair_table(lut: torch.Tensor, bits: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """int32 ``[2**(2*bits)]``: entry ``u`` packs the ``dtype`` (float16 or bfloat16) signposts of codes
    ``u & (2**bits-1)`` (low half) and ``u >> bits`` (high half) -- one gather per two codes in the decode fast
    path. Cached like :func:`_tuple_table`."""
    key = ("pair", id(lut), dtype)
    hit = _TABLES.get(key)
    if hit is not None and hit[0]() is lut and hit[1] == _version_of(lut) and hit[2] == bits:
        return hit[3]
    u = torch.arange(1 << (2 * bits), device=lut.device)
    h = lut.to(dtype)
    lo = h[u & ((1 << bits) - 1)].view(torch.int16).to(torch.int32) & 0xFFFF
    hi = h[u >> bits].view(torch.int16).to(torch.int32) & 0xFFFF
    tab = (lo | (hi << 16)).contiguous()
    _TABLES[key] = (weakref.ref(lut), _version_of(lut), bits, tab)
    return tab


_GRIDS: dict = {}  # id(lut) -> (weakref to lut, lut._version, (a, b) or None)


def affine_grid(lut: torch.Tensor) -> tuple[float, float] | None:
    """``(a, b)`` when the lookup table is a uniform grid ``lut[c] == a + b * c`` (to float32 rounding), else None.

    Decided on the host once per table tensor and in-place version (one device sync, cached); during CUDA-graph
    capture an unseen table is treated as non-uniform (no sync allowed).
    """
    hit = _GRIDS.get(id(lut))
    if hit is not None and hit[0]() is lut and hit[1] == _version_of(lut):
        return hit[2]
    if lut.is_cuda and torch.cuda.is_current_stream_capturing():
        return None
    vals = [float(x) for x in lut.detach().to("cpu", torch.float64).tolist()]
    n = len(vals)
    a, b = vals[0], (vals[-1] - vals[0]) / max(n - 1, 1)
    tol = 4.0 * 2.0 ** -24 * max(max(abs(x) for x in vals), 1e-30)
    ok = n >= 2 and b != 0.0 and all(abs(x - (a + b * c)) <= tol for c, x in enumerate(vals))
    res = (a, b) if ok else None
    if len(_GRIDS) > 1024:
        for key in [k for k, v in _GRIDS.items() if v[0]() is None]:
            del _GRIDS[key]
    _GRIDS[id(lut)] = (weakref.ref(lut), _version_of(lut), res)
    return res


_LAST_KERNELS: dict = {}  # the last compiled kernels (register/spill reports in the benchmarks)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # interpreter: a few splits exercise the merge


def default_num_splits(batch: int, kv_heads: int, row_blocks: int, length: int, device: torch.device,
                       block_n: int = 64, max_splits: int = 64, per_sm: int = 2) -> int:
    """Splits so that stage 1 fills ``per_sm`` programs per SM in whole waves, bounded by the number of token blocks.

    Rounded down: 64 (batch, head) programs on 132 SMs take 4 splits (256 programs, one wave of two per SM), not 5
    (320 programs: a second wave that is a fifth full doubles the time of the one before it).
    """
    programs = batch * kv_heads * row_blocks
    want = max(1, (per_sm * _sm_count(device)) // max(programs, 1))
    return int(max(1, min(want, max_splits, triton.cdiv(max(length, 1), block_n))))


#: take the decode fast path for bfloat16 queries by default (False: only with ``decode_kernel=True``). The bf16
#: variant compiles for sm_90 (benchmarks/kernel_sass_report.py) but the Triton interpreter has no bf16 arithmetic,
#: so it is checked on a GPU only (benchmarks/check_kernels_gpu.py, "fast path" rows) before it becomes the default.
#: ``KVQUANT_BF16_DECODE=1`` in the environment turns it on (benchmarks/run_kernels_gpu.sh does after the check).
BF16_DECODE_DEFAULT = os.environ.get("KVQUANT_BF16_DECODE", "0") == "1"


#: the per-token tensors of a ``PackedKV`` (``[B, H, cap, ...]``)
_PER_TOKEN = ("k_codes", "k_out_val", "k_out_idx", "v_codes", "v_scale", "v_zero", "v_out_val", "v_out_idx")


def _decode_path_blocker(query, packed, m_rows, window, kb, vb, d) -> str:
    """Why the decode fast path (:func:`_packed_decode_kernel`) does not apply; "" when it does."""
    if query.dtype not in (torch.float16, torch.bfloat16):
        return f"query dtype {query.dtype} (needs float16 or bfloat16)"
    if m_rows > 16:
        return f"{m_rows} query rows per kv head (needs q_len * group <= 16)"
    if window is not None:
        return "sliding window"
    if kb not in (2, 4) or vb not in (2, 4):
        return f"bits {kb}/{vb} (needs 2 or 4)"
    if d < 32:
        return f"head_dim {d} (needs >= 32)"
    for name in ("k_codes", "v_codes"):
        t = getattr(packed, name)
        if t.data_ptr() % 4 or any(st % 4 for st in t.stride()[:3]):
            return f"packed.{name} rows are not 4-byte aligned"
    for name in _PER_TOKEN:  # both decode kernels address a (batch, head)'s tokens with 32-bit offsets
        t = getattr(packed, name)
        if t.shape[2] * t.stride(2) >= 2**31:
            return f"packed.{name} is too long for 32-bit per-token offsets"
    for name in ("k_out_val", "v_out_val", "v_scale", "v_zero"):
        if getattr(packed, name).dtype != query.dtype:
            return f"packed.{name} is {getattr(packed, name).dtype}, the query {query.dtype}"
    if packed.positions.stride(1) != 1:
        return "packed.positions is not contiguous in its last dimension"
    return ""


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def packed_attention_triton(
    query: torch.Tensor,
    packed,
    exact_k: torch.Tensor,
    exact_v: torch.Tensor,
    exact_mask: torch.Tensor | None,
    *,
    scaling: float,
    inv_freq: torch.Tensor,
    attention_scaling: float = 1.0,
    hist_start: torch.Tensor | None = None,
    q_positions: torch.Tensor | None = None,
    window: int | None = None,
    num_splits: int | None = None,
    block_n: int = 32,
    num_warps: int = 4,
    num_stages: int = 1,
    rope_table: bool = True,
    maxnreg: int | None = None,
    length_dev: torch.Tensor | None = None,
    decode_kernel: bool | None = None,
    lut_gather: bool = False,
    prefetch: bool = True,
    sparse_key_slots: bool = False,
    key_f32: bool = True,
    decode_backend: str | None = None,
) -> torch.Tensor:
    """Attention over ``[packed history | exact block]``: the fused Triton version of
    :func:`kvquant_hf.attention.packed_attention_torch` (same arguments and result).

    Args:
        query (`torch.Tensor`): ``[batch_size, num_q_heads, q_len, head_dim]`` with RoPE applied
            (fp16, bf16 or fp32).
        packed (`PackedKV` or None): the layer's packed history (see ``kvquant_hf.attention.PackedKV``);
            None or ``length == 0``: no history.
        exact_k / exact_v (`torch.Tensor`): ``[batch_size, num_kv_heads, E, head_dim]`` exact keys
            (rotated) and values (attention-sink tokens and the new tokens), ``E`` may be 0.
        exact_mask (`torch.Tensor`, optional): bool ``[batch_size, q_len, E]``, True = attend; None = all.
        scaling (`float`): softmax scale.
        inv_freq (`torch.Tensor`): float32 ``[head_dim / 2]`` RoPE frequencies of the history keys.
        attention_scaling (`float`): factor on cos/sin (1.0 except yarn/longrope).
        hist_start (`torch.Tensor`, optional): int ``[batch_size]``; history tokens ``j < hist_start[b]``
            are masked (left padding).
        q_positions (`torch.Tensor`, optional): int ``[batch_size, q_len]`` positions of the query rows.
        window (`int`, optional): sliding window: history token ``j`` is visible to row ``r`` iff
            ``q_positions[b, r] - positions[b, j] < window`` (needs ``q_positions``).
        num_splits (`int`, optional): split-K factor of the history (grid dimension). Fix it for
            CUDA-graph capture; default: enough programs to fill the GPU twice.
        block_n, num_warps, num_stages, rope_table, maxnreg: tuning knobs of the history kernel
            (tokens per block, warps, software-pipelining stages, R(j) table in registers, register cap).
        length_dev (`torch.Tensor`, optional): int32 ``[1]`` on the device: the history length read by the
            kernel instead of ``packed.length`` (CUDA-graph decode; give a fixed ``num_splits`` too). The caller
            guarantees it does not exceed the capacity.
        decode_kernel (`bool`, optional): use the decode fast path (:func:`_packed_decode_kernel`: fp16 queries,
            ``q_len * group <= 16``, 2/4-bit codes, no window, 4-byte aligned code rows); None = whenever it
            applies, False = never, True = required (ValueError if it does not apply).
        lut_gather (`bool`): decode fast path only: gather the signposts even when a table is a uniform grid
            (the affine shortcut is taken by default; this knob exists for tests and benchmarks).
        prefetch (`bool`): decode fast path only: load the next block's packed words one iteration ahead.
        sparse_key_slots (`bool`): decode fast path only: apply the key outlier slots as a per-token score
            correction (True) or by a compare and select over the dequantized keys (False, the default: fewer
            instructions once the keys are dequantized in packed pairs).
        key_f32 (`bool`): decode fast path only: key scale/zero and RoPE in float32 (default: about the same
            instruction count, more registers, ~2x smaller score error than half2 math) or packed half2 (False).
        decode_backend (`str`, optional): first stage of the decode fast path: ``"cuda"`` (the tensor-core kernel of
            :mod:`kvquant_hf.kernels.cuda_decode`; ValueError if it does not apply), ``"triton"``, or None = CUDA where it
            applies and :data:`kvquant_hf.kernels.cuda_decode.CUDA_DECODE_DEFAULT` is set, else Triton.

    Returns:
        `torch.Tensor`: ``[batch_size, num_q_heads, q_len, head_dim]`` in the query dtype; rows with
        nothing visible are 0.
    """
    _need(query.dim() == 4, f"query must be [batch, q_heads, q_len, head_dim]; got {tuple(query.shape)}.")
    _need(query.dtype in (torch.float16, torch.bfloat16, torch.float32),
          f"query dtype {query.dtype} is not supported; use float16, bfloat16 or float32.")
    bsz, hq, lq, d = query.shape
    dev = query.device
    _need(exact_k.dim() == 4 and exact_k.shape[0] == bsz and exact_k.shape[3] == d,
          f"exact_k must be [batch, kv_heads, E, head_dim] = [{bsz}, H, E, {d}]; got {tuple(exact_k.shape)}.")
    h = exact_k.shape[1]
    e = exact_k.shape[2]
    _need(exact_v.shape == exact_k.shape,
          f"exact_v shape {tuple(exact_v.shape)} != exact_k shape {tuple(exact_k.shape)}.")
    _need(h > 0 and hq % h == 0, f"query heads ({hq}) must be a multiple of kv heads ({h}).")
    _need(d >= 16 and d & (d - 1) == 0, f"head_dim={d} is not supported by the Triton kernel; use a power of 2 >= 16.")
    group = hq // h
    if exact_mask is not None:
        _need(exact_mask.shape == (bsz, lq, e) and exact_mask.dtype == torch.bool,
              f"exact_mask must be bool [batch, q_len, E] = {(bsz, lq, e)}; got {exact_mask.dtype} "
              f"{tuple(exact_mask.shape)}.")
    _need(inv_freq.shape == (d // 2,), f"inv_freq must have shape ({d // 2},); got {tuple(inv_freq.shape)}.")
    if window is not None:
        _need(q_positions is not None, "window needs q_positions (the positions of the query rows).")
        _need(isinstance(window, int) and window > 0, f"window={window!r} must be a positive int.")
    if q_positions is not None:
        _need(q_positions.shape == (bsz, lq) and not q_positions.dtype.is_floating_point and q_positions.device == dev,
              f"q_positions must be an integer tensor [batch, q_len] = {(bsz, lq)} on {dev}; got "
              f"{q_positions.dtype} {tuple(q_positions.shape)} on {q_positions.device}.")
    if hist_start is not None:
        _need(hist_start.shape == (bsz,) and not hist_start.dtype.is_floating_point and hist_start.device == dev,
              f"hist_start must be an integer tensor [batch] = ({bsz},) on {dev}; got {hist_start.dtype} "
              f"{tuple(hist_start.shape)} on {hist_start.device}.")

    length = 0 if packed is None else int(packed.length)
    if length_dev is not None:
        _need(length_dev.shape == (1,) and length_dev.dtype == torch.int32 and length_dev.device == dev,
              f"length_dev must be an int32 tensor of shape (1,) on {dev}.")
        _need(num_splits is not None, "length_dev needs a fixed num_splits (the grid cannot follow the length).")
    m_rows = group * lq
    block_m = min(64, max(16, triton.next_power_of_2(m_rows)))
    num_mb = triton.cdiv(m_rows, block_m)
    # dot operands: fp16 for fp16 models; float32 (tf32 on the GPU) for bf16 models, whose 8-bit mantissa
    # would cost ~1e-2 relative error on the dequantized K/V and the probabilities; IEEE float32 for fp32.
    dot_f32 = query.dtype != torch.float16
    ieee = query.dtype == torch.float32
    out = torch.empty_like(query)

    if length > 0:
        kb, vb = packed.key_bits, packed.value_bits
        _need(kb in (2, 3, 4) and vb in (2, 3, 4), f"bits must be 2, 3 or 4; got key_bits={kb}, value_bits={vb}.")
        _need(packed.head_dim == d, f"packed head_dim {packed.head_dim} != query head_dim {d}.")
        cap = packed.k_codes.shape[2]
        _need(length <= cap, f"packed.length={length} exceeds the capacity {cap}.")
        expect = {
            "k_codes": ((bsz, h, cap, d * kb // 8), torch.uint8),
            "v_codes": ((bsz, h, cap, d * vb // 8), torch.uint8),
            "k_out_idx": ((bsz, h, cap, packed.k_out_idx.shape[-1]), torch.uint8),
            "v_out_idx": ((bsz, h, cap, packed.v_out_idx.shape[-1]), torch.uint8),
            "k_out_val": ((bsz, h, cap, packed.k_out_idx.shape[-1]), None),
            "v_out_val": ((bsz, h, cap, packed.v_out_idx.shape[-1]), None),
            "v_scale": ((bsz, h, cap), None),
            "v_zero": ((bsz, h, cap), None),
            "positions": ((bsz, cap), torch.int32),
        }
        for name, (shape, dtype) in expect.items():
            t = getattr(packed, name)
            _need(tuple(t.shape) == shape, f"packed.{name} has shape {tuple(t.shape)}, expected {shape}.")
            _need(dtype is None or t.dtype == dtype, f"packed.{name} has dtype {t.dtype}, expected {dtype}.")
            _need(t.device == dev, f"packed.{name} is on {t.device}, the query on {dev}.")
            _need(t.dim() < 4 or t.shape[3] <= 1 or t.stride(3) == 1,
                  f"packed.{name} must be contiguous in its last dimension (strides {t.stride()}).")
        _need(packed.k_lut.shape == (2**kb,) and packed.v_lut.shape == (2**vb,), "lookup tables have wrong sizes.")
        k_slots = packed.k_out_idx.shape[-1]
        v_slots = packed.v_out_idx.shape[-1]
        why = _decode_path_blocker(query, packed, m_rows, window, kb, vb, d)
        if decode_kernel and why:
            raise ValueError(f"decode_kernel=True but the decode fast path does not apply: {why}.")
        use_decode = decode_kernel is not False and not why
        _need(decode_backend in (None, "cuda", "triton"),
              f"decode_backend={decode_backend!r} must be None, 'cuda' or 'triton'.")
        use_cuda = False
        if use_decode and decode_backend != "triton":
            from . import cuda_decode

            why_c = cuda_decode.cuda_decode_blocker(query, m_rows, window, kb, vb, d, k_slots, v_slots,
                                                    allow_bf16=decode_backend == "cuda" or cuda_decode.CUDA_BF16_DEFAULT)
            if decode_backend == "cuda" and why_c:
                raise ValueError(f"decode_backend='cuda' but the CUDA decode kernel does not apply: {why_c}.")
            use_cuda = not why_c and (decode_backend == "cuda" or cuda_decode.CUDA_DECODE_DEFAULT)
        elif decode_backend == "cuda":
            raise ValueError(f"decode_backend='cuda' but the decode fast path does not apply: {why}.")
        if (use_decode and not use_cuda and decode_kernel is None and query.dtype == torch.bfloat16
                and not BF16_DECODE_DEFAULT):
            use_decode = False  # bf16 Triton fast path: opt-in (check_kernels_gpu.py "bf16 fast path" rows fail 1e-2)
        if use_decode:
            block_m = 16
            num_mb = 1
        ktab = vtab = None
        if not use_decode:
            ktab = _tuple_table(packed.k_lut.to(dev), kb)
            vtab = _tuple_table(packed.v_lut.to(dev), vb)
        kzero = packed.k_zero.to(dev, torch.float32).contiguous()
        kscale = packed.k_scale.to(dev, torch.float32).contiguous()
        _need(kzero.shape == (h, d) and kscale.shape == (h, d), f"k_zero/k_scale must be [{h}, {d}].")
        freq = inv_freq.to(dev, torch.float32).contiguous()
        if num_splits is None:  # the CUDA kernel: 256+ tokens per CTA (4 warps); more splits cost more in the merge
            num_splits = default_num_splits(bsz, h, num_mb, length, dev, 256 if use_cuda else block_n,
                                            128 if use_cuda else 64, cuda_decode.ctas_per_sm() if use_cuda else 2)
        _need(isinstance(num_splits, int) and num_splits >= 1, f"num_splits={num_splits!r} must be an int >= 1.")
        o_part = torch.empty(bsz, h, num_splits, num_mb * block_m, d, dtype=torch.float32, device=dev)
        lse_part = torch.empty(bsz, h, num_splits, num_mb * block_m, dtype=torch.float32, device=dev)
        hist = hist_start if hist_start is not None else packed.positions
        qpos = q_positions if q_positions is not None else packed.positions
        pk = packed
        if use_decode:  # signposts of both fast paths: a uniform grid folds into scale/zero, other tables are gathered
            klut = packed.k_lut.to(dev, torch.float32).contiguous()
            vlut = packed.v_lut.to(dev, torch.float32).contiguous()
            kgrid = None if lut_gather else affine_grid(packed.k_lut)
            vgrid = None if lut_gather else affine_grid(packed.v_lut)
        if use_cuda:  # False afterwards only if the kernel could not be compiled here (then Triton below)
            use_cuda = cuda_decode.packed_decode_cuda(
                query, packed, kzero, kscale, freq, hist_start, length, length_dev, o_part, lse_part, num_splits,
                float(scaling * attention_scaling * LOG2E), klut, vlut, kgrid, vgrid, required=decode_backend == "cuda")
        if use_cuda:
            _LAST_KERNELS["split"] = None
        elif use_decode:
            kpair = klut if kgrid is not None else _pair_table(packed.k_lut.to(dev), kb, query.dtype)
            vpair = vlut if vgrid is not None else _pair_table(packed.v_lut.to(dev), vb, query.dtype)
            _LAST_KERNELS["split"] = _packed_decode_kernel[(bsz * h, num_splits)](
                query, pk.k_codes, pk.k_out_val, pk.k_out_idx, pk.v_codes, pk.v_scale, pk.v_zero,
                pk.v_out_val, pk.v_out_idx, klut, vlut, kpair, vpair, kzero, kscale, pk.positions, freq, hist,
                o_part, lse_part,
                length, length_dev if length_dev is not None else pk.positions, lq, h, num_splits,
                float(scaling * attention_scaling * LOG2E),
                *(kgrid or (0.0, 1.0)), *(vgrid or (0.0, 1.0)),
                *query.stride()[:3],
                *(st // 4 for st in pk.k_codes.stride()[:3]), *pk.k_out_val.stride()[:3], *pk.k_out_idx.stride()[:3],
                *(st // 4 for st in pk.v_codes.stride()[:3]), *pk.v_scale.stride()[:3], *pk.v_zero.stride()[:3],
                *pk.v_out_val.stride()[:3], *pk.v_out_idx.stride()[:3],
                pk.positions.stride(0),
                HEAD_DIM=d, GROUP=group, K_BITS=kb, V_BITS=vb, K_SLOTS=k_slots, V_SLOTS=v_slots,
                K_AFFINE=kgrid is not None, V_AFFINE=vgrid is not None,
                BLOCK_M=block_m, BLOCK_N=block_n, HAS_HIST=hist_start is not None,
                FAST=query.is_cuda, LEN_ON_DEVICE=length_dev is not None, PREFETCH=prefetch,
                K_SPARSE=k_slots > 0 and sparse_key_slots, KEY_F32=key_f32, BF16=query.dtype == torch.bfloat16,
                num_warps=num_warps, num_stages=num_stages, **({"maxnreg": maxnreg} if maxnreg else {}),
            )
        else:
            _LAST_KERNELS["split"] = _packed_attn_split_kernel[(bsz * h * num_mb, num_splits)](
                query, pk.k_codes, pk.k_out_val, pk.k_out_idx, pk.v_codes, pk.v_scale, pk.v_zero,
                pk.v_out_val, pk.v_out_idx, ktab, vtab, kzero, kscale, pk.positions, freq, hist, qpos,
                o_part, lse_part,
                length, length_dev if length_dev is not None else pk.positions, lq, h, num_mb, num_splits,
                float(scaling * attention_scaling * LOG2E), int(window) if window is not None else 0,
                *query.stride(),
                *pk.k_codes.stride()[:3], *pk.k_out_val.stride()[:3], *pk.k_out_idx.stride()[:3],
                *pk.v_codes.stride()[:3], *pk.v_scale.stride()[:3], *pk.v_zero.stride()[:3],
                *pk.v_out_val.stride()[:3], *pk.v_out_idx.stride()[:3],
                *pk.positions.stride()[:2],
                *(qpos.stride()[:2] if q_positions is not None else (0, 0)),
                HEAD_DIM=d, GROUP=group, K_BITS=kb, V_BITS=vb, K_SLOTS=k_slots, V_SLOTS=v_slots,
                BLOCK_M=block_m, BLOCK_N=block_n, HAS_HIST=hist_start is not None, HAS_WINDOW=window is not None,
                ROPE_TABLE=rope_table, USE_DOT=d // 2 >= 16, DOT_F32=dot_f32, IEEE=ieee,
                FAST=query.is_cuda, LEN_ON_DEVICE=length_dev is not None,
                num_warps=num_warps, num_stages=num_stages, **({"maxnreg": maxnreg} if maxnreg else {}),
            )
    else:
        num_splits = 0
        o_part = torch.empty(1, dtype=torch.float32, device=dev)
        lse_part = o_part

    em = exact_mask if exact_mask is not None else out
    ek, ev = (exact_k, exact_v) if e > 0 else (query, query)
    block_e = min(64, max(16, triton.next_power_of_2(max(e, 1))))
    # decode (few exact keys): the output channels split over programs and 8 splits merged per step; prefill-sized
    # exact blocks keep one program per row block (each program recomputes the exact-block scores)
    block_d = min(d, 16) if e <= 64 else 0
    _packed_attn_merge_kernel[(bsz * h * num_mb, d // block_d if block_d else 1)](
        query, ek, ev, em, o_part, lse_part, out,
        e, lq, h, num_mb, num_splits, float(scaling * LOG2E),
        *query.stride(),
        *(exact_k.stride() if e > 0 else (0, 0, 0, 0)),
        *(exact_v.stride() if e > 0 else (0, 0, 0, 0)),
        *(exact_mask.stride() if exact_mask is not None else (0, 0, 0)),
        *out.stride(),
        HEAD_DIM=d, GROUP=group, BLOCK_M=block_m, BLOCK_E=block_e, HAS_EMASK=exact_mask is not None,
        USE_DOT=d >= 16 and block_e >= 16, DOT_F32=dot_f32, IEEE=ieee, BLOCK_D=block_d,
        BLOCK_S=8 if block_d else 1,
        num_warps=4,
    )
    return out

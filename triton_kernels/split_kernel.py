"""Stage 1 of the attention over the packed history, general kernel: one split of the history per program.

Any dtype (fp16, bf16, fp32 queries), 2/3/4-bit codes, sliding windows and prefill chunks (many query rows). Per
block of ``BLOCK_N`` tokens it unpacks the key codes (each RoPE half separately: channels ``[0, D/2)`` and
``[D/2, D)`` start on a byte boundary), looks them up in the signpost table, scales them per channel, replaces the
outlier slots, applies RoPE with the token positions, scores all query rows of the GQA group at once, runs an online
softmax, dequantizes the values (per-token scale/zero + slots) and accumulates. The launcher is
:func:`kvquant_hf.kernels.decode_attention.packed_attention_triton`; the design is described in docs/kernels.md.

Mirrors :func:`kvquant_hf.attention.packed_attention_torch` (dequantization: :mod:`kvquant_hf.quant`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import K_MIN_SCALE, K_NEG_BIG, cos_sin, cos_sin_small, matmul, replace_slots


# ----------------------------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------------------------
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
    of code tuples (:func:`tuple_table`): fewer gathers than one per code, and the gathers happen
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



# ----------------------------------------------------------------------------------------------
# stage 1: one split of the packed history
# ----------------------------------------------------------------------------------------------
# reference: kvquant_hf.attention.packed_attention_torch (dequantization and outlier slots: kvquant_hf.quant)
@triton.jit
def packed_attn_split_kernel(
    q_ptr,  # [B, Hq, Lq, D] queries (RoPE applied)
    kc_ptr,  # uint8 [B, H, cap, D*K_BITS/8]   (last dim contiguous, as for every cache tensor)
    kov_ptr,  # [B, H, cap, K_SLOTS] model dtype
    koi_ptr,  # uint8 [B, H, cap, K_SLOTS]
    vc_ptr,  # uint8 [B, H, cap, D*V_BITS/8]
    vs_ptr,  # fp16/bf16 [B, H, cap]
    vz_ptr,  # fp16/bf16 [B, H, cap]
    vov_ptr,  # [B, H, cap, V_SLOTS]
    voi_ptr,  # uint8 [B, H, cap, V_SLOTS]
    ktab_ptr,  # f32 code-tuple table of the key signposts (tuple_table)
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
    tab_c, tab_s = cos_sin_small(jn.to(tl.float32)[:, None] * freq[None, :], FAST)  # R(j), |angle| < BLOCK_N

    m_i = tl.full([BLOCK_M], K_NEG_BIG, tl.float32)
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
        k1 = replace_slots(k1, dh, kov_rows, koi_rows, nm, K_SLOTS)
        k2 = replace_slots(k2, dh + HALF, kov_rows, koi_rows, nm, K_SLOTS)

        # RoPE: consecutive positions use R(p0) on the queries and the R(j) table on the keys
        p0 = tl.sum(tl.where(jn == 0, pos, 0), axis=0)
        consec = tl.max(tl.abs(tl.where(n_mask, pos - p0 - jn, 0)), axis=0) == 0
        if consec:
            c0, s0 = cos_sin(p0.to(tl.float32) * freq, FAST)
            qa1 = q1 * c0[None, :] + q2 * s0[None, :]
            qa2 = q2 * c0[None, :] - q1 * s0[None, :]
            cs = tab_c
            sn = tab_s
        else:
            cs, sn = cos_sin(pos.to(tl.float32)[:, None] * freq[None, :], FAST)
            qa1 = q1
            qa2 = q2
        kr1 = k1 * cs - k2 * sn
        kr2 = k2 * cs + k1 * sn

        qk = matmul(qa1.to(dt), tl.trans(kr1.to(dt)), USE_DOT, IEEE)
        qk += matmul(qa2.to(dt), tl.trans(kr2.to(dt)), USE_DOT, IEEE)
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
        sc = tl.maximum(vsc.to(tl.float32), K_MIN_SCALE)[:, None]
        ze = vze.to(tl.float32)[:, None]
        v1 = _lut_half(raw_v1, vtab_ptr, V_BITS, BLOCK_N, HALF) * sc + ze
        v2 = _lut_half(raw_v2, vtab_ptr, V_BITS, BLOCK_N, HALF) * sc + ze
        v1 = replace_slots(v1, dh, vov_rows, voi_rows, nm, V_SLOTS)
        v2 = replace_slots(v2, dh + HALF, vov_rows, voi_rows, nm, V_SLOTS)

        pd = p.to(dt)
        acc1 = acc1 * alpha[:, None] + matmul(pd, v1.to(dt), USE_DOT, IEEE)
        acc2 = acc2 * alpha[:, None] + matmul(pd, v2.to(dt), USE_DOT, IEEE)

        raw_k1 = nraw_k1
        raw_k2 = nraw_k2
        raw_v1 = nraw_v1
        raw_v2 = nraw_v2
        pos = npos
        vsc = nvsc
        vze = nvze

    has = l_i > 0.0
    inv_l = 1.0 / tl.where(has, l_i, 1.0)
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), K_NEG_BIG)
    m_pad = NUM_MB * BLOCK_M
    part = (bh * NUM_SPLITS + split) * m_pad + rows  # [BLOCK_M] row index into the partial buffers
    tl.store(lse_ptr + part, lse)
    o_rows = o_ptr + part[:, None] * HEAD_DIM
    tl.store(o_rows + dh[None, :], acc1 * inv_l[:, None])
    tl.store(o_rows + HALF + dh[None, :], acc2 * inv_l[:, None])

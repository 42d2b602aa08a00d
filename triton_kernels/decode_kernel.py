"""Stage 1 of the attention over the packed history, decode fast path: fp16 (or bf16) dequantization in packed
pairs for 2/4-bit codes and at most 16 query rows per KV head.

Codes become half-precision values by the magic-number trick (:func:`shift_pair`, :func:`_codes_f16`) or a gather
per code pair (:func:`_lut_f16`), keys are scaled per channel (uniform signpost grids folded into scale and zero),
rotated by RoPE with the ``R(p0) R(j)`` split and scored on the tensor cores; the values are dequantized the same
way. Same partial outputs as :mod:`.split_kernel`, merged by :mod:`.merge_kernel`. The launcher is
:func:`kvquant_hf.kernels.decode_attention.packed_attention_triton`; the design is described in docs/kernels.md.

Mirrors :func:`kvquant_hf.attention.packed_attention_torch` (dequantization and outlier slots:
:mod:`kvquant_hf.quant`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import K_MIN_SCALE, K_NEG_BIG, K_UNUSED_SLOT, cos_sin, cos_sin_small


@triton.jit
def shift_pair(w, i: tl.constexpr, BITS: tl.constexpr, BF16: tl.constexpr):
    """int32 holding code ``i`` (low half) and code ``i + CPW/2`` (high half) of each word as float16 bits
    ``0x6400 | code << (BITS*k)``, i.e. ``1024 + code * 2**(BITS*k)``, with ``k = i % NS`` (see :func:`_code_scale`);
    with ``BF16`` as bfloat16 bits ``0x4300 | code << (BITS*k)`` = ``128 + code * 2**(BITS*k)``.

    Codes whose bits already lie in a half's mantissa (bits 0 .. 9, bfloat16: 0 .. 6) are masked in place: one
    shift per ``NS`` pairs instead of one per pair.
    """
    MANT: tl.constexpr = 7 if BF16 else 10
    MAGIC: tl.constexpr = 0x43004300 if BF16 else 0x64006400
    NS: tl.constexpr = 1 if BITS == 4 else MANT // BITS  # pairs per shift (4 bits: one, two per shift gain nothing)
    MASK: tl.constexpr = ((1 << BITS) - 1) * 0x10001
    SH: tl.constexpr = BITS * NS * (i // NS)
    K: tl.constexpr = i % NS
    if SH == 0:
        return (w & (MASK << (BITS * K))) | MAGIC
    else:
        return ((w >> SH) & (MASK << (BITS * K))) | MAGIC


@triton.jit
def _code_scale(e, BITS: tl.constexpr, BF16: tl.constexpr):
    """``2**-(BITS*k)`` of pair-order column ``e`` (:func:`shift_pair`): undoes the in-place mask."""
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
        c = tl.join(tl.join(shift_pair(w, 0, BITS, BF16), shift_pair(w, 1, BITS, BF16)),
                    tl.join(shift_pair(w, 2, BITS, BF16), shift_pair(w, 3, BITS, BF16)))
    else:
        c = tl.join(tl.join(tl.join(shift_pair(w, 0, BITS, BF16), shift_pair(w, 1, BITS, BF16)),
                            tl.join(shift_pair(w, 2, BITS, BF16), shift_pair(w, 3, BITS, BF16))),
                    tl.join(tl.join(shift_pair(w, 4, BITS, BF16), shift_pair(w, 5, BITS, BF16)),
                            tl.join(shift_pair(w, 6, BITS, BF16), shift_pair(w, 7, BITS, BF16))))
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

    ``tab_ptr`` is the half2 pair table of :func:`.common.pair_table` (entry ``u`` = signposts of the codes
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
    """:func:`.common.replace_slots` on float16 ``x [BLOCK_N, N]`` in pair order (column ``e``, channels
    ``HALF_BASE + _pair_perm(e)``); slot pointers ``[BLOCK_N]``.

    The channel of column ``e`` is ``word base + offset``; the compare is written as
    ``idx - word_base == offset`` so the offsets (the same in every word) can stay immediates.
    """
    CPW: tl.constexpr = 32 // BITS
    off = _pair_perm(e % CPW, BITS, LUT)  # channel offset inside the word
    base = e - e % CPW + HALF_BASE
    for s in tl.static_range(N_SLOTS):
        idx = tl.load(oidx_rows + s, mask=n_mask, other=K_UNUSED_SLOT).to(tl.int32)  # [BLOCK_N]
        val = _to_half(tl.load(oval_rows + s, mask=n_mask, other=0.0), BF16)
        x = tl.where((idx[:, None] - base[None, :]) == off[None, :], val[:, None], x)
    return x


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


# reference: kvquant_hf.attention.packed_attention_torch (dequantization and outlier slots: kvquant_hf.quant)
@triton.jit
def packed_decode_kernel(
    q_ptr,  # fp16 [B, Hq, Lq, D] queries (RoPE applied)
    kc_ptr,  # uint8 [B, H, cap, D*K_BITS/8], read as int32 words (4-byte aligned rows, strides in words)
    kov_ptr, koi_ptr,  # [B, H, cap, K_SLOTS] key slot values (fp16) / channels (uint8)
    vc_ptr,  # uint8 [B, H, cap, D*V_BITS/8]
    vs_ptr, vz_ptr,  # fp16 [B, H, cap] value scale / zero
    vov_ptr, voi_ptr,  # [B, H, cap, V_SLOTS]
    kpair_ptr, vpair_ptr,  # int32 half2 pair tables (pair_table), gathered per code pair unless *_AFFINE
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

    chunk = tl.cdiv(tl.cdiv(L, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, L)
    if HAS_HIST:
        lo = tl.maximum(lo, tl.load(hist_ptr + b))

    jn = tl.arange(0, BLOCK_N)
    tab_c, tab_s = cos_sin_small(jn.to(tl.float32)[:, None] * freq[None, :], FAST)  # R(j)

    m_i = tl.full([BLOCK_M], K_NEG_BIG, tl.float32)
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
    kwst = stride_kct  # int32 words (the launcher passes byte strides / 4)
    vwst = stride_vct

    # software prefetch: the packed words, positions and value scales of the first block
    wk1, wk2, wv1, wv2, pos, vsc, vze = _load_block(kc_base, vc_base, pos_base, vs_base, vz_base, lo + jn,
                                                    lo + jn < hi, kwst, vwst, stride_vst, stride_vzt, KW, VW)
    for t0 in range(lo, hi, BLOCK_N):
        offs = t0 + jn
        n_mask = offs < hi
        kov_rows = kov_base + offs * stride_kvt
        koi_rows = koi_base + offs * stride_kit
        vov_rows = vov_base + offs * stride_vvt
        voi_rows = voi_base + offs * stride_vit

        # the next block's words while this one is computed
        nwk1, nwk2, nwv1, nwv2, npos, nvsc, nvze = _load_block(
            kc_base, vc_base, pos_base, vs_base, vz_base, offs + BLOCK_N, offs + BLOCK_N < hi, kwst, vwst,
            stride_vst, stride_vzt, KW, VW)

        # keys (pre-RoPE): code -> (grid folded into scale/zero | signpost gather) -> slots
        if K_AFFINE:
            c1 = _codes_f16(wk1, K_BITS, BLOCK_N, HALF, BF16)
            c2 = _codes_f16(wk2, K_BITS, BLOCK_N, HALF, BF16)
        else:
            c1 = _lut_f16(wk1, kpair_ptr, K_BITS, BLOCK_N, HALF, BF16)
            c2 = _lut_f16(wk2, kpair_ptr, K_BITS, BLOCK_N, HALF, BF16)
        # float32 scale/zero and RoPE, one rounding to the 16-bit type for the MMA (as the general kernel)
        k1 = c1.to(tl.float32) * ks1[None, :] + kz1[None, :]
        k2 = c2.to(tl.float32) * ks2[None, :] + kz2[None, :]
        k1 = _replace_slots_f16(k1, e, K_BITS, not K_AFFINE, 0, kov_rows, koi_rows, n_mask, K_SLOTS, BF16)
        k2 = _replace_slots_f16(k2, e, K_BITS, not K_AFFINE, HALF, kov_rows, koi_rows, n_mask, K_SLOTS, BF16)

        p0 = tl.sum(tl.where(jn == 0, pos, 0), axis=0)
        consec = tl.max(tl.abs(tl.where(n_mask, pos - p0 - jn, 0)), axis=0) == 0
        # each arm computes the scores itself (no tensors of two layouts merged after the branch)
        if consec:
            c0, s0 = cos_sin(p0.to(tl.float32) * freq, FAST)
            q1f = q1.to(tl.float32)
            q2f = q2.to(tl.float32)
            qa1 = _to_half(q1f * c0[None, :] + q2f * s0[None, :], BF16)
            qa2 = _to_half(q2f * c0[None, :] - q1f * s0[None, :], BF16)
            qk = tl.dot(qa1, tl.trans(_to_half(k1 * tab_c - k2 * tab_s, BF16)))
            qk += tl.dot(qa2, tl.trans(_to_half(k2 * tab_c + k1 * tab_s, BF16)))
        else:
            cs, sn = cos_sin(pos.to(tl.float32)[:, None] * freq[None, :], FAST)
            qk = tl.dot(q1, tl.trans(_to_half(k1 * cs - k2 * sn, BF16)))
            qk += tl.dot(q2, tl.trans(_to_half(k2 * cs + k1 * sn, BF16)))
        qk = tl.where(n_mask[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new

        # values: per-token scale/zero (the grid folded in when affine) -> slots
        sc = tl.maximum(vsc.to(tl.float32), K_MIN_SCALE)
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

        wk1 = nwk1
        wk2 = nwk2
        wv1 = nwv1
        wv2 = nwv2
        pos = npos
        vsc = nvsc
        vze = nvze

    has = l_i > 0.0
    inv_l = 1.0 / tl.where(has, l_i, 1.0)
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), K_NEG_BIG)
    part = (bh * NUM_SPLITS + split) * BLOCK_M + rows
    tl.store(lse_ptr + part, lse)
    o_rows = o_ptr + part[:, None] * HEAD_DIM
    tl.store(o_rows + chv[None, :], acc1 * inv_l[:, None])
    tl.store(o_rows + HALF + chv[None, :], acc2 * inv_l[:, None])


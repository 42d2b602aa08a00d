"""Stage 2 of the attention over the packed history: merge the splits' partial outputs by their log-sum-exps and
attend to the exact block (attention-sink tokens and the new tokens, float keys already rotated).

Shared by every stage-1 kernel (:mod:`.split_kernel`, :mod:`.decode_kernel`, the CUDA kernel of
:mod:`.cuda_decode`). Mirrors the exact-block part of :func:`kvquant_hf.attention.packed_attention_torch`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import K_NEG_BIG, matmul


# reference: kvquant_hf.attention.packed_attention_torch (the merge of history and exact block)
@triton.jit
def packed_attn_merge_kernel(
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
    m_i = tl.full([BLOCK_M], K_NEG_BIG, tl.float32)
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
            qk = matmul(q, tl.trans(k.to(edt)), USE_DOT, IEEE) * qk_scale
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
            acc = acc * alpha[:, None] + matmul(p.to(edt), v.to(edt), USE_DOT, IEEE)
            m_i = m_new

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    out_rows = out_ptr + b * stride_ob + hq[:, None] * stride_oh + lq[:, None] * stride_ol
    tl.store(out_rows + d[None, :] * stride_od, out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])


"""The exact block of one attention call in one kernel: RoPE on the queries and the new keys, sink rows copied in,
the non-finite guard, and (CUDA-graph decode) the positions of the new tokens written into the cache.

What the torch path of the layer's attention does with about twenty small torch kernels per layer and step
(``apply_rope`` on q and on the new keys: five each; ``cat`` of sink and new keys, values and mask; the guard; the
position ``index_copy``), in one launch. RoPE is rounded like transformers' ``x * cos + rotate_half(x) * sin`` in the
model dtype (each product and the sum rounded to the dtype, no FMA contraction), so the result is bit-identical to the
torch ops.

One program per (batch row, new token): all query heads, all KV heads and channels at once; the program of token 0
of a row also copies that row's sink keys (already rotated) and values into the front of the exact block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .guard import n_nonfinite


@triton.jit
def _rope_rows(x1, x2, c1, c2, s1, s2, OUT_DTYPE: tl.constexpr):
    # [rows, D/2] halves of x; cos/sin halves [1, D/2]; each product and the sum rounded to the model dtype
    a1 = (x1 * c1).to(OUT_DTYPE).to(tl.float32)
    b1 = (-x2 * s1).to(OUT_DTYPE).to(tl.float32)
    a2 = (x2 * c2).to(OUT_DTYPE).to(tl.float32)
    b2 = (x1 * s2).to(OUT_DTYPE).to(tl.float32)
    return (a1 + b1).to(OUT_DTYPE), (a2 + b2).to(OUT_DTYPE)


# reference: kvquant_hf.layer_api.apply_rope on q and the new keys, the sink copy and the guard rule of .guard
@triton.jit
def _decode_prep_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, qo_ptr, ek_ptr, ev_ptr, sk_ptr, sv_ptr,
    counter_ptr, pos_ptr, posout_ptr, len_ptr,
    L, H, HQ, S,
    sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd,
    scb, scl, scd, ssb, ssl, ssd,
    sob, soh, sol, sod, seb, seh, sel, sed, sfb, sfh, sfl, sfd,
    s_skb, s_skh, s_skl, s_skd, s_svb, s_svh, s_svl, s_svd,
    spb, spl, sqpb,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HQ: tl.constexpr,
    ROTATE_Q: tl.constexpr, GUARD: tl.constexpr, WRITE_POS: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // L
    t = pid % L
    dt = ek_ptr.dtype.element_ty
    oh = tl.arange(0, BLOCK_H)
    od = tl.arange(0, HALF)
    hm = (oh[:, None] < H) & (od[None, :] < HALF)
    c1 = tl.load(cos_ptr + b * scb + t * scl + od * scd).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + b * scb + t * scl + (od + HALF) * scd).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + b * ssb + t * ssl + od * ssd).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + b * ssb + t * ssl + (od + HALF) * ssd).to(tl.float32)[None, :]

    # new keys and values of this token, all KV heads: [BLOCK_H, HALF] halves
    kp = k_ptr + b * skb + t * skl + oh[:, None] * skh + od[None, :] * skd
    vp = v_ptr + b * svb + t * svl + oh[:, None] * svh + od[None, :] * svd
    k1 = tl.load(kp, mask=hm, other=0.0).to(tl.float32)
    k2 = tl.load(kp + HALF * skd, mask=hm, other=0.0).to(tl.float32)
    v1 = tl.load(vp, mask=hm, other=0.0)
    v2 = tl.load(vp + HALF * svd, mask=hm, other=0.0)
    if GUARD:  # a NaN or Inf anywhere in the token's keys or values: zero it in every head (in place), count it
        v1f = v1.to(tl.float32)
        v2f = v2.to(tl.float32)
        nbad = n_nonfinite(k1) + n_nonfinite(k2) + n_nonfinite(v1f) + n_nonfinite(v2f)
        bad = (tl.zeros([BLOCK_H, HALF], dtype=tl.int32) + nbad) > 0
        zero = tl.zeros([BLOCK_H, HALF], dtype=tl.float32)
        k1 = tl.where(bad, zero, k1)
        k2 = tl.where(bad, zero, k2)
        v1 = tl.where(bad, zero, v1f).to(v_ptr.dtype.element_ty)
        v2 = tl.where(bad, zero, v2f).to(v_ptr.dtype.element_ty)
        wipe = hm & bad
        tl.store(kp, zero.to(k_ptr.dtype.element_ty), mask=wipe)
        tl.store(kp + HALF * skd, zero.to(k_ptr.dtype.element_ty), mask=wipe)
        tl.store(vp, zero.to(v_ptr.dtype.element_ty), mask=wipe)
        tl.store(vp + HALF * svd, zero.to(v_ptr.dtype.element_ty), mask=wipe)
        tl.atomic_add(counter_ptr, (nbad > 0).to(tl.int64))
    r1, r2 = _rope_rows(k1, k2, c1, c2, s1, s2, dt)
    e = S + t
    ep = ek_ptr + b * seb + e * sel + oh[:, None] * seh + od[None, :] * sed
    tl.store(ep, r1, mask=hm)
    tl.store(ep + HALF * sed, r2, mask=hm)
    fp = ev_ptr + b * sfb + e * sfl + oh[:, None] * sfh + od[None, :] * sfd
    tl.store(fp, v1.to(ev_ptr.dtype.element_ty), mask=hm)
    tl.store(fp + HALF * sfd, v2.to(ev_ptr.dtype.element_ty), mask=hm)

    if t == 0:  # the sink rows of this batch row (keys already rotated): whole rows, all D = 2 * HALF channels
        ow = tl.arange(0, 2 * HALF)
        wm = (oh[:, None] < H) & (ow[None, :] < 2 * HALF)
        for s in range(S):
            a = tl.load(sk_ptr + b * s_skb + s * s_skl + oh[:, None] * s_skh + ow[None, :] * s_skd, mask=wm)
            w = tl.load(sv_ptr + b * s_svb + s * s_svl + oh[:, None] * s_svh + ow[None, :] * s_svd, mask=wm)
            tl.store(ek_ptr + b * seb + s * sel + oh[:, None] * seh + ow[None, :] * sed, a.to(dt), mask=wm)
            tl.store(ev_ptr + b * sfb + s * sfl + oh[:, None] * sfh + ow[None, :] * sfd,
                     w.to(ev_ptr.dtype.element_ty), mask=wm)

    if ROTATE_Q:
        oq = tl.arange(0, BLOCK_HQ)
        qm = (oq[:, None] < HQ) & (od[None, :] < HALF)
        qp = q_ptr + b * sqb + t * sql + oq[:, None] * sqh + od[None, :] * sqd
        q1 = tl.load(qp, mask=qm, other=0.0).to(tl.float32)
        q2 = tl.load(qp + HALF * sqd, mask=qm, other=0.0).to(tl.float32)
        u1, u2 = _rope_rows(q1, q2, c1, c2, s1, s2, qo_ptr.dtype.element_ty)
        op = qo_ptr + b * sob + t * sol + oq[:, None] * soh + od[None, :] * sod
        tl.store(op, u1, mask=qm)
        tl.store(op + HALF * sod, u2, mask=qm)

    if WRITE_POS:  # CUDA-graph decode: the new token's position at the device-side history length
        start = tl.load(len_ptr)
        p = tl.load(pos_ptr + b * spb + t * spl)
        tl.store(posout_ptr + b * sqpb + start + t, p.to(tl.int32))


def _rows(x: torch.Tensor, b: int, name: str) -> torch.Tensor:
    if x.shape[0] not in (1, b):
        raise ValueError(f"{name} has batch size {x.shape[0]}, expected 1 or {b}.")
    return x.expand(b, *x.shape[1:])


def decode_prep(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    sink_k: torch.Tensor | None = None,
    sink_v: torch.Tensor | None = None,
    *,
    rotate_query: bool = True,
    counter: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    positions_out: torch.Tensor | None = None,
    length_dev: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries and exact block of one attention call.

    Args:
        query: ``[B, Hq, L, D]`` queries before RoPE (any strides; returned as is when ``rotate_query`` is False).
        key / value: ``[B, H, L, D]`` new keys (before RoPE) and values, model dtype, any strides.
        cos / sin: ``[B or 1, L, D]`` the model's RoPE tables for the new tokens.
        sink_k / sink_v: ``[B, H, S, D]`` sink keys (already rotated) and values (``S`` may be 0; None: no sink).
        counter: int64 ``[1]``: apply the non-finite guard (a token with NaN/Inf anywhere in its key or value is
            zeroed in ``key`` and ``value`` in place, in every head, and counted here); None: no guard.
        positions / positions_out / length_dev: write ``positions [B or 1, L]`` into
            ``positions_out [B, cap]`` (int32) at ``length_dev[0] + t`` (CUDA-graph decode; all or none of them).

    Returns:
        ``(query, exact_k, exact_v)``: rotated queries ``[B, Hq, L, D]`` (contiguous), ``exact_k`` / ``exact_v``
        ``[B, H, S + L, D]`` = ``[sink | rotated new keys]`` and ``[sink | new values]``.
    """
    if key.dim() != 4 or value.shape != key.shape:
        raise ValueError(f"keys {tuple(key.shape)} and values {tuple(value.shape)} must both be [B, H, L, D].")
    b, h, n, d = key.shape
    if query.dim() != 4 or query.shape[0] != b or query.shape[2] != n or query.shape[3] != d:
        raise ValueError(f"queries {tuple(query.shape)} must be [B, Hq, L, D] = [{b}, Hq, {n}, {d}].")
    if d % 2 or d & (d - 1):
        raise ValueError(f"head_dim {d} must be an even power of two.")
    if key.dtype != value.dtype or query.dtype != key.dtype:
        raise ValueError(f"query/key/value dtypes differ: {query.dtype}, {key.dtype}, {value.dtype}.")
    cos, sin = _rows(cos, b, "cos"), _rows(sin, b, "sin")
    if cos.shape != (b, n, d) or sin.shape != (b, n, d):
        raise ValueError(f"cos/sin {tuple(cos.shape)} / {tuple(sin.shape)} must be [B or 1, {n}, {d}].")
    if sink_k is None:
        sink_k = sink_v = key[:, :, :0]
    s = sink_k.shape[2]
    if sink_k.shape != (b, h, s, d) or sink_v.shape != sink_k.shape:
        raise ValueError(f"sink keys {tuple(sink_k.shape)} / values {tuple(sink_v.shape)} must be [{b}, {h}, S, {d}].")
    write_pos = positions_out is not None
    if write_pos != (positions is not None) or write_pos != (length_dev is not None):
        raise ValueError("positions, positions_out and length_dev go together (all or none).")
    if write_pos:
        positions = _rows(positions, b, "positions")
        if positions.shape != (b, n) or positions_out.dim() != 2 or positions_out.shape[0] != b:
            raise ValueError(f"positions {tuple(positions.shape)} must be [B, {n}] and positions_out [B, cap].")
        if positions_out.dtype != torch.int32 or positions_out.stride(1) != 1:
            raise ValueError("positions_out must be int32 and contiguous in its last dimension.")
    if counter is not None and (counter.dtype != torch.int64 or counter.numel() != 1):
        raise ValueError(f"counter must be one int64 element, got {counter.dtype} x {counter.numel()}.")
    hq = query.shape[1]
    q_out = torch.empty(b, hq, n, d, dtype=query.dtype, device=query.device) if rotate_query else query
    exact_k = torch.empty(b, h, s + n, d, dtype=key.dtype, device=key.device)
    exact_v = torch.empty(b, h, s + n, d, dtype=value.dtype, device=value.device)
    if b * n == 0:
        exact_k[:, :, :s] = sink_k
        exact_v[:, :, :s] = sink_v
        return q_out, exact_k, exact_v
    pos_t = positions if write_pos else key
    pos_o = positions_out if write_pos else key
    _decode_prep_kernel[(b * n,)](
        query, key, value, cos, sin, q_out, exact_k, exact_v, sink_k, sink_v,
        counter if counter is not None else key, pos_t, pos_o, length_dev if write_pos else key,
        n, h, hq, s,
        *query.stride(), *key.stride(), *value.stride(), *cos.stride(), *sin.stride(),
        *q_out.stride(), *exact_k.stride(), *exact_v.stride(), *sink_k.stride(), *sink_v.stride(),
        *(positions.stride() if write_pos else (0, 0)), positions_out.stride(0) if write_pos else 0,
        HALF=d // 2, BLOCK_H=triton.next_power_of_2(h), BLOCK_HQ=triton.next_power_of_2(hq),
        ROTATE_Q=rotate_query, GUARD=counter is not None, WRITE_POS=write_pos,
        # no FMA contraction: Triton narrows the rounded products to f16/bf16 arithmetic and would otherwise fuse
        # them into fma.rn.f16 (one rounding instead of torch's two: 1-ulp differences); separate correctly rounded
        # mul and add equal torch's float32-then-round
        enable_fp_fusion=False,
    )
    return q_out, exact_k, exact_v

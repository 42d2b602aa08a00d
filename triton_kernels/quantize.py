"""Pack-on-append: nuqX encode + bit packing + outlier slots for new keys and values.

Both kernels are bit-identical to :func:`kvquant_hf.quant.quantize_keys` and
:func:`kvquant_hf.quant.quantize_values` (codes, slots, scales, tie rules) and write straight into the
cache's preallocated storage at a token offset, so appending ``S`` new tokens costs one launch per
tensor kind and no allocation. See the module docstring of ``kvquant_hf/quant.py`` for the format.

This module imports only torch and triton (no transformers, no kvquant_hf) so that it stays usable
as a standalone kernel library; the few constants it shares with ``quant.py`` are repeated below and
checked by the tests.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

UNUSED_SLOT = 255  # == kvquant_hf.quant.UNUSED_SLOT
MIN_SCALE = 6.103515625e-05  # == kvquant_hf.quant.MIN_SCALE (smallest normal fp16, exactly 2**-14)
SUPPORTED_BITS = (2, 3, 4)


class KeyCodes(NamedTuple):
    """Packed keys of the tokens just written (views into the destination storage).

    Field names match :class:`kvquant_hf.quant.PackedKeys` (without ``n_clipped``: counting clipped
    outliers would need a host sync; pass ``clip_counter`` to accumulate it on the device instead).
    """

    codes: torch.Tensor  # uint8 [B, H, S, D*bits/8]
    out_val: torch.Tensor  # model dtype [B, H, S, n_slots]
    out_idx: torch.Tensor  # uint8 [B, H, S, n_slots], 255 = unused


class ValueCodes(NamedTuple):
    """Packed values of the tokens just written; field names match :class:`kvquant_hf.quant.PackedValues`."""

    codes: torch.Tensor  # uint8 [B, H, S, D*bits/8]
    scale: torch.Tensor  # fp16/bf16 [B, H, S]
    zero: torch.Tensor  # fp16/bf16 [B, H, S]
    out_val: torch.Tensor  # model dtype [B, H, S, n_slots]
    out_idx: torch.Tensor  # uint8 [B, H, S, n_slots]
_K_UNUSED_SLOT = tl.constexpr(UNUSED_SLOT)  # the same constant inside kernels
_K_MIN_SCALE = tl.constexpr(MIN_SCALE)  # the same constant inside kernels


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
@triton.jit
def _quantize_keys_kernel(
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
            # largest score; ties go to the smaller channel (stable descending sort)
            best = tl.max(score, axis=1)
            sel = tl.min(tl.where(score == best[:, None], ch[None, :], HEAD_DIM), axis=1)
            used = best > 0.0
            hit = ch[None, :] == sel[:, None]
            val = tl.max(tl.where(hit, x, float("-inf")), axis=1)
            tl.store(oidx_rows + s, tl.where(used, sel, _K_UNUSED_SLOT).to(tl.uint8), mask=t_mask)
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


@triton.jit
def _quantize_values_kernel(
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

    # a from the bottom, N_SLOTS - a from the top: minimize the remaining range (first minimum)
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
    scale = tl.minimum(tl.maximum(hi * 0.5 - lo * 0.5, _K_MIN_SCALE), SCALE_MAX).to(scale_ptr.dtype.element_ty)
    if START_ON_DEVICE:
        dst = t + tl.load(start_ptr).to(tl.int64)
    else:
        dst = t + start
    tl.store(zero_ptr + b * stride_zb + h * stride_zh + dst * stride_zs, zero, mask=t_mask)
    tl.store(scale_ptr + b * stride_sb + h * stride_sh + dst * stride_ss, scale, mask=t_mask)

    zero32 = zero.to(tl.float32)
    scale32 = tl.maximum(scale.to(tl.float32), _K_MIN_SCALE)
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


# ----------------------------------------------------------------------------------------------
# host launchers
# ----------------------------------------------------------------------------------------------
def _check_common(x: torch.Tensor, lut: torch.Tensor, n_slots: int, bits: int, what: str) -> tuple[int, ...]:
    if x.dim() != 4:
        raise ValueError(f"{what} must be [batch, kv_heads, seq, head_dim]; got shape {tuple(x.shape)}.")
    b, h, s, d = x.shape
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"{what} dtype {x.dtype} is not supported; use float16, bfloat16 or float32.")
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r} is not supported; choose one of {SUPPORTED_BITS}.")
    if d < 16 or d & (d - 1):
        raise ValueError(f"head_dim={d} is not supported by the Triton kernels; use a power of two >= 16 (64, 128).")
    if lut.shape != (2**bits,):
        raise ValueError(f"lookup table has shape {tuple(lut.shape)}, expected ({2**bits},) for {bits} bits.")
    if lut.device != x.device:
        raise ValueError(f"lookup table is on {lut.device} but {what} are on {x.device}.")
    if not isinstance(n_slots, int) or n_slots < 0:
        raise ValueError(f"n_slots={n_slots!r} must be a non-negative int.")
    return b, h, s, d


def _check_dest(t: torch.Tensor, name: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
    """``t`` is a destination ``[B, H, cap, ...]``: check all but the capacity dim, dtype and device."""
    if t.dim() != len(shape) or t.shape[:2] != shape[:2] or tuple(t.shape[3:]) != tuple(shape[3:]):
        raise ValueError(f"destination {name} has shape {tuple(t.shape)}, expected {shape} (cap = any).")
    if t.dtype != dtype:
        raise ValueError(f"destination {name} has dtype {t.dtype}, expected {dtype}.")
    if t.device != device:
        raise ValueError(f"destination {name} is on {t.device}, expected {device}.")
    if t.dim() == 4 and t.shape[3] > 1 and t.stride(3) != 1:
        raise ValueError(f"destination {name} must be contiguous in its last dimension (stride {t.stride()}).")


def _device_start(start, out, dev: torch.device):
    """``start`` may be an int32 ``[1]`` device tensor (CUDA-graph decode): the offset is then read by the
    kernel, and the caller guarantees ``start + seq_len <= capacity`` (no host sync to check it)."""
    if not isinstance(start, torch.Tensor):
        return start, None
    if out is None:
        raise ValueError("a device-side start needs `out` (the storage to write into).")
    if start.shape != (1,) or start.dtype != torch.int32 or start.device != dev:
        raise ValueError(f"a device-side start must be an int32 tensor of shape (1,) on {dev}; got "
                         f"{start.dtype} {tuple(start.shape)} on {start.device}.")
    return 0, start


def _check_range(cap: int, start: int, s: int) -> None:
    if not isinstance(start, int) or start < 0 or start + s > cap:
        raise ValueError(f"cannot write {s} tokens at offset start={start!r} into a capacity of {cap} tokens.")


def _block_t(s: int) -> int:
    return max(1, min(16, triton.next_power_of_2(max(s, 1))))


def _prepare_keys(
    k: torch.Tensor,
    k_lut: torch.Tensor,
    k_lower: torch.Tensor,
    k_upper: torch.Tensor,
    n_slots: int,
    bits: int,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    start: int = 0,
    *,
    k_zero: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    clip_counter: torch.Tensor | None = None,
) -> tuple[KeyCodes, tuple | None]:
    """Checks, destinations and launch ``(grid, args, constexprs)`` of :func:`quantize_keys_triton`."""
    b, h, s, d = _check_common(k, k_lut, n_slots, bits, "keys")
    if k_lower.shape != (h, d) or k_upper.shape != (h, d):
        raise ValueError(
            f"key thresholds have shapes {tuple(k_lower.shape)}/{tuple(k_upper.shape)}, expected {(h, d)}."
        )
    nbytes = d * bits // 8
    dev = k.device
    start, start_dev = _device_start(start, out, dev)
    lower = k_lower.to(dev, torch.float32).contiguous()
    upper = k_upper.to(dev, torch.float32).contiguous()
    if k_zero is None or k_scale is None:
        k_zero = upper * 0.5 + lower * 0.5  # == quant.key_zero_scale
        k_scale = (upper * 0.5 - lower * 0.5).clamp_min(MIN_SCALE)
    else:
        if k_zero.shape != (h, d) or k_scale.shape != (h, d):
            raise ValueError(f"k_zero/k_scale must have shape {(h, d)}.")
        k_zero = k_zero.to(dev, torch.float32).contiguous()
        k_scale = k_scale.to(dev, torch.float32).contiguous()
    lut = k_lut.to(torch.float32).contiguous()
    if out is None:
        codes = torch.empty(b, h, s, nbytes, dtype=torch.uint8, device=dev)
        oval = torch.empty(b, h, s, n_slots, dtype=k.dtype, device=dev)
        oidx = torch.empty(b, h, s, n_slots, dtype=torch.uint8, device=dev)
        start = 0
    else:
        if len(out) != 3:
            raise ValueError("out must be (codes, out_val, out_idx).")
        codes, oval, oidx = out
        _check_dest(codes, "codes", (b, h, -1, nbytes), torch.uint8, dev)
        _check_dest(oval, "out_val", (b, h, -1, n_slots), k.dtype, dev)
        _check_dest(oidx, "out_idx", (b, h, -1, n_slots), torch.uint8, dev)
        cap = codes.shape[2]
        if oval.shape[2] != cap or oidx.shape[2] != cap:
            raise ValueError("codes, out_val and out_idx must have the same capacity (dim 2).")
        _check_range(cap, start, s)
    if clip_counter is not None and (clip_counter.dtype != torch.int32 or clip_counter.device != dev):
        raise ValueError("clip_counter must be an int32 tensor on the keys' device.")
    launch = None
    if s > 0:
        block_t = _block_t(s)
        grid = (b * h, triton.cdiv(s, block_t))
        args = (
            k, lut, lower, upper, k_zero, k_scale, codes, oval, oidx,
            clip_counter if clip_counter is not None else codes,
            s, start, start_dev if start_dev is not None else codes, h,
            k.stride(0), k.stride(1), k.stride(2), k.stride(3),
            codes.stride(0), codes.stride(1), codes.stride(2),
            oval.stride(0), oval.stride(1), oval.stride(2),
            oidx.stride(0), oidx.stride(1), oidx.stride(2),
        )
        consts = dict(HEAD_DIM=d, BITS=bits, N_SLOTS=n_slots, BLOCK_T=block_t,
                      COUNT_CLIPPED=clip_counter is not None, START_ON_DEVICE=start_dev is not None)
        launch = (grid, args, consts)
    if start_dev is not None:
        return KeyCodes(codes, oval, oidx), launch
    sl = slice(start, start + s)
    return KeyCodes(codes[:, :, sl], oval[:, :, sl], oidx[:, :, sl]), launch


def _prepare_values(
    v: torch.Tensor,
    v_lut: torch.Tensor,
    n_slots: int,
    bits: int,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    start: int = 0,
) -> tuple[ValueCodes, tuple | None]:
    """Checks, destinations and launch ``(grid, args, constexprs)`` of :func:`quantize_values_triton`."""
    b, h, s, d = _check_common(v, v_lut, n_slots, bits, "values")
    if 2 * (n_slots + 1) > d:
        raise ValueError(f"n_slots={n_slots} is too many for head_dim={d}; need 2 * (n_slots + 1) <= head_dim.")
    nbytes = d * bits // 8
    dev = v.device
    start, start_dev = _device_start(start, out, dev)
    sd = torch.bfloat16 if v.dtype == torch.bfloat16 else torch.float16
    lut = v_lut.to(torch.float32).contiguous()
    if out is None:
        codes = torch.empty(b, h, s, nbytes, dtype=torch.uint8, device=dev)
        scale = torch.empty(b, h, s, dtype=sd, device=dev)
        zero = torch.empty(b, h, s, dtype=sd, device=dev)
        oval = torch.empty(b, h, s, n_slots, dtype=v.dtype, device=dev)
        oidx = torch.empty(b, h, s, n_slots, dtype=torch.uint8, device=dev)
        start = 0
    else:
        if len(out) != 5:
            raise ValueError("out must be (codes, scale, zero, out_val, out_idx).")
        codes, scale, zero, oval, oidx = out
        _check_dest(codes, "codes", (b, h, -1, nbytes), torch.uint8, dev)
        _check_dest(scale, "scale", (b, h, -1), sd, dev)
        _check_dest(zero, "zero", (b, h, -1), sd, dev)
        _check_dest(oval, "out_val", (b, h, -1, n_slots), v.dtype, dev)
        _check_dest(oidx, "out_idx", (b, h, -1, n_slots), torch.uint8, dev)
        cap = codes.shape[2]
        if any(t.shape[2] != cap for t in (scale, zero, oval, oidx)):
            raise ValueError("all value destinations must have the same capacity (dim 2).")
        _check_range(cap, start, s)
    launch = None
    if s > 0:
        block_t = _block_t(s)
        grid = (b * h, triton.cdiv(s, block_t))
        args = (
            v, lut, codes, scale, zero, oval, oidx,
            s, start, start_dev if start_dev is not None else codes, h,
            v.stride(0), v.stride(1), v.stride(2), v.stride(3),
            codes.stride(0), codes.stride(1), codes.stride(2),
            scale.stride(0), scale.stride(1), scale.stride(2),
            zero.stride(0), zero.stride(1), zero.stride(2),
            oval.stride(0), oval.stride(1), oval.stride(2),
            oidx.stride(0), oidx.stride(1), oidx.stride(2),
        )
        consts = dict(HEAD_DIM=d, BITS=bits, N_SLOTS=n_slots, KP=triton.next_power_of_2(n_slots + 1),
                      SCALE_MAX=float(torch.finfo(sd).max), BLOCK_T=block_t, START_ON_DEVICE=start_dev is not None)
        launch = (grid, args, consts)
    if start_dev is not None:
        return ValueCodes(codes, scale, zero, oval, oidx), launch
    sl = slice(start, start + s)
    return ValueCodes(codes[:, :, sl], scale[:, :, sl], zero[:, :, sl], oval[:, :, sl], oidx[:, :, sl]), launch


def quantize_keys_triton(
    k: torch.Tensor,
    k_lut: torch.Tensor,
    k_lower: torch.Tensor,
    k_upper: torch.Tensor,
    n_slots: int,
    bits: int,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    start: int = 0,
    *,
    k_zero: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    clip_counter: torch.Tensor | None = None,
) -> KeyCodes:
    """Quantize pre-RoPE keys per channel (nuqX + outlier slots), bit-identical to ``quant.quantize_keys``.

    Args:
        k (`torch.Tensor`): ``[batch_size, kv_heads, seq_len, head_dim]`` pre-RoPE keys (fp16/bf16/fp32,
            any strides).
        k_lut (`torch.Tensor`): float32 ``[2**bits]`` sorted signposts.
        k_lower, k_upper (`torch.Tensor`): float32 ``[kv_heads, head_dim]`` calibrated thresholds.
        n_slots (`int`): outlier slots per token and head.
        bits (`int`): 2, 3 or 4.
        out (`tuple`, optional): destination storage ``(codes uint8 [B, H, cap, D*bits/8],
            out_val k.dtype [B, H, cap, n_slots], out_idx uint8 [B, H, cap, n_slots])``; the tokens are
            written at ``[start, start + seq_len)`` of the capacity dimension. New tensors if None.
        start (`int` or `torch.Tensor`): token offset in ``out``; an int32 ``[1]`` device tensor is read by
            the kernel (CUDA-graph decode; the full destination tensors are returned then).
        k_zero, k_scale (`torch.Tensor`, optional): ``quant.key_zero_scale(k_lower, k_upper)`` if
            already computed (saves two tiny launches per call).
        clip_counter (`torch.Tensor`, optional): int32 ``[1]`` on the device; the number of outliers
            clipped because a token had more than ``n_slots`` is added to it (no host sync).

    Returns:
        `KeyCodes`: views of the written tokens ``(codes, out_val, out_idx)``.
    """
    result, launch = _prepare_keys(k, k_lut, k_lower, k_upper, n_slots, bits, out, start, k_zero=k_zero,
                                   k_scale=k_scale, clip_counter=clip_counter)
    if launch is not None:
        grid, args, consts = launch
        _quantize_keys_kernel[grid](*args, **consts, num_warps=4)
    return result


def quantize_values_triton(
    v: torch.Tensor,
    v_lut: torch.Tensor,
    n_slots: int,
    bits: int,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    start: int = 0,
) -> ValueCodes:
    """Quantize values per token (nuqX, ``n_slots`` extremes kept exact), bit-identical to ``quant.quantize_values``.

    Args:
        v (`torch.Tensor`): ``[batch_size, kv_heads, seq_len, head_dim]`` values (fp16/bf16/fp32).
        v_lut (`torch.Tensor`): float32 ``[2**bits]`` sorted signposts.
        n_slots (`int`): outlier slots per token and head; ``2 * (n_slots + 1) <= head_dim``.
        bits (`int`): 2, 3 or 4.
        out (`tuple`, optional): destination storage ``(codes uint8 [B, H, cap, D*bits/8], scale [B, H, cap],
            zero [B, H, cap], out_val v.dtype [B, H, cap, n_slots], out_idx uint8 [B, H, cap, n_slots])``
            with scale/zero in bf16 for bf16 values and fp16 otherwise (``quant.value_scale_dtype``).
        start (`int` or `torch.Tensor`): token offset in ``out``; an int32 ``[1]`` device tensor is read by
            the kernel (CUDA-graph decode; the full destination tensors are returned then).

    Returns:
        `ValueCodes`: views of the written tokens ``(codes, scale, zero, out_val, out_idx)``.
    """
    result, launch = _prepare_values(v, v_lut, n_slots, bits, out, start)
    if launch is not None:
        grid, args, consts = launch
        _quantize_values_kernel[grid](*args, **consts, num_warps=4)
    return result


@triton.jit
def _quantize_kv_kernel(
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
        _quantize_keys_kernel(
            k_ptr, k_lut_ptr, lower_ptr, upper_ptr, kzero_ptr, kscale_ptr, kcodes_ptr, kval_ptr, kidx_ptr, clip_ptr,
            k_s, k_start, k_start_ptr, k_h,
            stride_kb, stride_kh, stride_ks, stride_kd,
            stride_kcb, stride_kch, stride_kcs,
            stride_kvb, stride_kvh, stride_kvs,
            stride_kib, stride_kih, stride_kis,
            HEAD_DIM, K_BITS, K_SLOTS, BLOCK_T, COUNT_CLIPPED, START_ON_DEVICE,
        )
    else:
        _quantize_values_kernel(
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


def quantize_kv_triton(
    k: torch.Tensor,
    v: torch.Tensor,
    k_lut: torch.Tensor,
    k_lower: torch.Tensor,
    k_upper: torch.Tensor,
    v_lut: torch.Tensor,
    n_slots: int,
    key_bits: int,
    value_bits: int,
    k_out: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    v_out: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    start: int = 0,
    *,
    k_zero: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    clip_counter: torch.Tensor | None = None,
) -> tuple[KeyCodes, ValueCodes]:
    """:func:`quantize_keys_triton` and :func:`quantize_values_triton` of the same new tokens in **one launch**
    (a cache append; one kernel less per layer and step). Same arguments as the two (``k_out`` / ``v_out`` are their
    ``out``, ``start`` is shared), same results bit for bit: each program runs the body of one of the two kernels.
    ``k`` and ``v`` must have the same shape."""
    if k.shape != v.shape:
        raise ValueError(f"keys {tuple(k.shape)} and values {tuple(v.shape)} must have the same shape.")
    kres, klaunch = _prepare_keys(k, k_lut, k_lower, k_upper, n_slots, key_bits, k_out, start, k_zero=k_zero,
                                  k_scale=k_scale, clip_counter=clip_counter)
    vres, vlaunch = _prepare_values(v, v_lut, n_slots, value_bits, v_out, start)
    if klaunch is not None:
        (grid, kargs, kc), (_, vargs, vc) = klaunch, vlaunch
        _quantize_kv_kernel[grid + (2,)](
            *kargs, *vargs, HEAD_DIM=kc["HEAD_DIM"], K_BITS=kc["BITS"], K_SLOTS=kc["N_SLOTS"], V_BITS=vc["BITS"],
            V_SLOTS=vc["N_SLOTS"], KP=vc["KP"], SCALE_MAX=vc["SCALE_MAX"], BLOCK_T=kc["BLOCK_T"],
            COUNT_CLIPPED=kc["COUNT_CLIPPED"], START_ON_DEVICE=kc["START_ON_DEVICE"], num_warps=4,
        )
    return kres, vres

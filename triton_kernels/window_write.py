"""One decode token into the recent window's ring, in one kernel.

What :meth:`kvquant_hf.layer_window.RecentWindow.store_window` does with torch ops for one new token (index copies
of the pre-RoPE key, the rotated key, the value, the position and the valid flag into ring slot
``sink_tokens + j % R``), in one launch per layer and step. In CUDA-graph decode the slot follows the device-side
history length ``j = length_dev[0]``, and the kernel also writes ``max(j + 1 - R, 0)``: the packed tokens the next
step's attention reads (those older than the window).

One program per batch row: all KV heads and channels of the token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# reference: kvquant_hf.layer_window.RecentWindow.store_window (torch index_copy_ path)
@triton.jit
def _window_append_kernel(
    k_ptr, v_ptr, kr_ptr, pos_ptr, sk_ptr, sv_ptr, skr_ptr, spos_ptr, svalid_ptr, len_ptr, attend_ptr,
    J, NS, R, H,
    skb, skh, skd, svb, svh, svd, srb, srh, srd, spb,
    s_skb, s_skh, s_skl, s_skd, s_svb, s_svh, s_svl, s_svd, s_srb, s_srh, s_srl, s_srd, s_spb, s_svalb,
    D: tl.constexpr, BLOCK_H: tl.constexpr, LEN_ON_DEVICE: tl.constexpr, WRITE_ATTEND: tl.constexpr,
):
    b = tl.program_id(0)
    if LEN_ON_DEVICE:
        j = tl.load(len_ptr)
    else:
        j = J
    slot = NS + j % R
    oh = tl.arange(0, BLOCK_H)
    od = tl.arange(0, D)
    m = (oh[:, None] < H) & (od[None, :] < D)
    k = tl.load(k_ptr + b * skb + oh[:, None] * skh + od[None, :] * skd, mask=m)
    v = tl.load(v_ptr + b * svb + oh[:, None] * svh + od[None, :] * svd, mask=m)
    kr = tl.load(kr_ptr + b * srb + oh[:, None] * srh + od[None, :] * srd, mask=m)
    tl.store(sk_ptr + b * s_skb + slot * s_skl + oh[:, None] * s_skh + od[None, :] * s_skd, k, mask=m)
    tl.store(sv_ptr + b * s_svb + slot * s_svl + oh[:, None] * s_svh + od[None, :] * s_svd, v, mask=m)
    tl.store(skr_ptr + b * s_srb + slot * s_srl + oh[:, None] * s_srh + od[None, :] * s_srd, kr, mask=m)
    p = tl.load(pos_ptr + b * spb)
    tl.store(spos_ptr + b * s_spb + slot, p.to(tl.int32))
    tl.store(svalid_ptr + b * s_svalb + slot, 1)
    if WRITE_ATTEND:
        if b == 0:
            tl.store(attend_ptr, tl.maximum(j + 1 - R, 0))


def window_append_(
    key: torch.Tensor,
    value: torch.Tensor,
    key_rot: torch.Tensor,
    positions: torch.Tensor,
    sink_k: torch.Tensor,
    sink_v: torch.Tensor,
    sink_k_rot: torch.Tensor,
    sink_positions: torch.Tensor,
    sink_valid: torch.Tensor,
    sink_tokens: int,
    window: int,
    index: int | None = None,
    length_dev: torch.Tensor | None = None,
    attend_len: torch.Tensor | None = None,
) -> None:
    """Write one new token per row into the ring (in place).

    Args:
        key / value / key_rot: ``[B, H, 1, D]`` the new pre-RoPE key, value and rotated key (model dtype, any
            strides). positions: ``[B, 1]`` its position.
        sink_k / sink_v / sink_k_rot: ``[B, H, sink_tokens + window, D]``; sink_positions: int32
            ``[B, sink_tokens + window]``; sink_valid: bool, the same shape (the token is real: set True).
        index: the token's history index (eager); or ``length_dev`` (int32 ``[1]``, CUDA-graph decode), with
            ``attend_len`` (int32 ``[1]``) receiving ``max(index + 1 - window, 0)``.
    """
    b, h, n, d = key.shape
    if n != 1 or value.shape != key.shape or key_rot.shape != key.shape:
        raise ValueError(f"one new token per row: keys {tuple(key.shape)}, values {tuple(value.shape)}, rotated keys "
                         f"{tuple(key_rot.shape)} must all be [B, H, 1, D].")
    if window < 1 or sink_k.shape != (b, h, sink_tokens + window, d):
        raise ValueError(f"ring tensors {tuple(sink_k.shape)} must be [{b}, {h}, {sink_tokens + window}, {d}].")
    if (index is None) == (length_dev is None):
        raise ValueError("give exactly one of index (eager) and length_dev (CUDA-graph decode).")
    if attend_len is not None and length_dev is None:
        raise ValueError("attend_len goes with length_dev.")
    if sink_positions.stride(1) != 1 or sink_valid.stride(1) != 1:
        raise ValueError("sink_positions and sink_valid must be contiguous in their last dimension.")
    positions = positions.expand(b, 1)
    valid = sink_valid.view(torch.uint8)
    _window_append_kernel[(b,)](
        key, value, key_rot, positions, sink_k, sink_v, sink_k_rot, sink_positions, valid,
        length_dev if length_dev is not None else sink_positions,
        attend_len if attend_len is not None else sink_positions,
        0 if index is None else int(index), sink_tokens, window, h,
        key.stride(0), key.stride(1), key.stride(3), value.stride(0), value.stride(1), value.stride(3),
        key_rot.stride(0), key_rot.stride(1), key_rot.stride(3), positions.stride(0),
        *sink_k.stride(), *sink_v.stride(), *sink_k_rot.stride(), sink_positions.stride(0), valid.stride(0),
        D=d, BLOCK_H=triton.next_power_of_2(h), LEN_ON_DEVICE=length_dev is not None,
        WRITE_ATTEND=attend_len is not None,
    )

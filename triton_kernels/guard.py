"""Non-finite guard for new keys/values in one kernel (the decode step's ``nonfinite="zero"`` / CUDA-graph path).

A token is *bad* when any element of its key or value, in any head, is NaN or Inf: the kernel zeroes that token's
keys and values in every head, in place, and adds the number of bad tokens to a device counter. Same semantics as
the torch code in :meth:`kvquant_hf.cache.KVQuantLayer.check_finite`, in one launch instead of about ten (one
program per (batch row, token), all heads and channels of K and V at once).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def n_nonfinite(x):
    """The number of NaN and +-Inf elements of the 2-D tile ``x`` (int32), counted in float32."""
    xf = x.to(tl.float32)
    # x - x is 0 for every finite x and NaN for NaN and +-Inf
    return tl.sum(tl.sum(((xf - xf) != 0).to(tl.int32), axis=1), axis=0)


# reference: the torch rule in the module docstring (tests/test_triton_kernels.py pins it)
@triton.jit
def _zero_nonfinite_kernel(k_ptr, v_ptr, counter_ptr, L, H, D,
                           skb, skh, skl, skd, svb, svh, svl, svd,
                           BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // L
    t = pid % L
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < H) & (offs_d[None, :] < D)
    kp = k_ptr + b * skb + t * skl + offs_h[:, None] * skh + offs_d[None, :] * skd
    vp = v_ptr + b * svb + t * svl + offs_h[:, None] * svh + offs_d[None, :] * svd
    kx = tl.load(kp, mask=mask, other=0.0).to(tl.float32)
    vx = tl.load(vp, mask=mask, other=0.0).to(tl.float32)
    nbad = n_nonfinite(kx) + n_nonfinite(vx)
    zero = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    wipe = mask & ((tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.int32) + nbad) > 0)
    tl.store(kp, zero.to(k_ptr.dtype.element_ty), mask=wipe)
    tl.store(vp, zero.to(v_ptr.dtype.element_ty), mask=wipe)
    tl.atomic_add(counter_ptr, (nbad > 0).to(tl.int64))


def zero_nonfinite_tokens_(k: torch.Tensor, v: torch.Tensor, counter: torch.Tensor) -> None:
    """Zero, in place, every token of ``k``/``v`` ``[B, H, L, D]`` with a NaN or Inf anywhere in its key or value
    (all heads), and add the number of such tokens to ``counter`` (int64, one element)."""
    if k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"keys {tuple(k.shape)} and values {tuple(v.shape)} must both be [B, H, L, D].")
    if counter.dtype != torch.int64 or counter.numel() != 1:
        raise ValueError(f"counter must be one int64 element, got {counter.dtype} x {counter.numel()}.")
    b, h, n, d = k.shape
    if b * n == 0:
        return
    _zero_nonfinite_kernel[(b * n,)](
        k, v, counter, n, h, d, *k.stride(), *v.stride(),
        BLOCK_H=triton.next_power_of_2(h), BLOCK_D=triton.next_power_of_2(d),
    )

"""RMSNorm in one kernel, rounded like transformers' ``LlamaRMSNorm`` / ``MistralRMSNorm``.

transformers computes ``weight * (x.float() * rsqrt(mean(x.float()**2) + eps)).to(x.dtype)`` with about eight
kernels (casts, pow, mean, add, rsqrt, two multiplies); a decode step runs it twice per layer, so in a CUDA-graph
step those launches cost more than the arithmetic. This kernel does one row per program with the same roundings
(normalized row rounded to the input dtype, then the weight product rounded to the output dtype); only the float32
summation order of the variance differs, so an output element can differ from transformers' by one unit in the
last place of the model dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, N, stride_x, stride_y, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    var = tl.sum(x * x, axis=0) / N
    r = 1.0 / tl.sqrt(var + eps)
    h = (x * r).to(x_ptr.dtype.element_ty).to(tl.float32)  # hidden_states.to(input_dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, (w * h).to(y_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * normalize(x)`` over the last dimension of ``x [..., N]`` (see the module doc); the result has
    transformers' dtype, ``torch.promote_types(weight.dtype, x.dtype)``."""
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected ({n},) for inputs [..., {n}].")
    if x.device != weight.device:
        raise ValueError(f"inputs on {x.device} but weight on {weight.device}.")
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if x2.shape[0]:
        block = triton.next_power_of_2(n)
        _rms_norm_kernel[(x2.shape[0],)](x2, weight, y, n, x2.stride(0), y.stride(0), float(eps), BLOCK=block,
                                         num_warps=min(16, max(1, block // 256)), enable_fp_fusion=False)
    return y.reshape(*x.shape[:-1], n)


@triton.jit
def _add_rms_norm_kernel(r_ptr, x_ptr, w_ptr, s_ptr, y_ptr, N, stride_r, stride_x, stride_s, stride_y, eps,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    s = (r + x).to(s_ptr.dtype.element_ty)  # residual + hidden_states, rounded like the torch add
    tl.store(s_ptr + row * stride_s + cols, s, mask=mask)
    sf = s.to(tl.float32)
    var = tl.sum(sf * sf, axis=0) / N
    inv = 1.0 / tl.sqrt(var + eps)
    h = (sf * inv).to(s_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, (w * h).to(y_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = residual + x`` and ``rms_norm(s, weight, eps)`` in one kernel (a decoder layer's residual add and the
    next RMSNorm); returns ``(s, normed)``, ``s`` rounded like the torch add, ``normed`` like :func:`rms_norm`."""
    n = x.shape[-1]
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} must match x {tuple(x.shape)} {x.dtype}.")
    if weight.shape != (n,):
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected ({n},) for inputs [..., {n}].")
    r2, x2 = residual.reshape(-1, n), x.reshape(-1, n)
    r2 = r2 if r2.stride(-1) == 1 else r2.contiguous()
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    s = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    y = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if x2.shape[0]:
        block = triton.next_power_of_2(n)
        _add_rms_norm_kernel[(x2.shape[0],)](r2, x2, weight, s, y, n, r2.stride(0), x2.stride(0), s.stride(0),
                                             y.stride(0), float(eps), BLOCK=block,
                                             num_warps=min(16, max(1, block // 256)), enable_fp_fusion=False)
    return s.reshape(x.shape), y.reshape(*x.shape[:-1], n)

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

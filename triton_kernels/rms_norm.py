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
def _normalize_store(x, rnd_ptr, w_ptr, y_ptr, row, stride_y, cols, mask, N, eps):
    """``weight * (x * rsqrt(mean(x^2) + eps))`` for one float32 row ``x`` (zeros past ``N``): the normalized row
    rounded to ``rnd_ptr``'s dtype (``hidden_states.to(input_dtype)``), the weight product to ``y_ptr``'s."""
    var = tl.sum(x * x, axis=0) / N
    r = 1.0 / tl.sqrt(var + eps)
    h = (x * r).to(rnd_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, (w * h).to(y_ptr.dtype.element_ty), mask=mask)


# reference: transformers' LlamaRMSNorm (tests/test_rms_norm.py)
@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, N, stride_x, stride_y, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    _normalize_store(x, x_ptr, w_ptr, y_ptr, row, stride_y, cols, mask, N, eps)


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
    _normalize_store(s.to(tl.float32), s_ptr, w_ptr, y_ptr, row, stride_y, cols, mask, N, eps)


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t [..., n]`` as rows ``[R, n]`` with a contiguous last dimension (what the kernels index)."""
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _check_weight(weight: torch.Tensor, x: torch.Tensor) -> int:
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected ({n},) for inputs [..., {n}].")
    if x.device != weight.device:
        raise ValueError(f"inputs on {x.device} but weight on {weight.device}; move them to one device.")
    return n


def _launch(kernel, n_rows: int, n: int, *args) -> None:
    if n_rows:
        block = triton.next_power_of_2(n)
        kernel[(n_rows,)](*args, BLOCK=block, num_warps=min(16, max(1, block // 256)), enable_fp_fusion=False)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * normalize(x)`` over the last dimension of ``x [..., N]`` (see the module doc); the result has
    transformers' dtype, ``torch.promote_types(weight.dtype, x.dtype)``."""
    n = _check_weight(weight, x)
    x2 = _rows(x, n)
    y = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    _launch(_rms_norm_kernel, x2.shape[0], n, x2, weight, y, n, x2.stride(0), y.stride(0), float(eps))
    return y.reshape(*x.shape[:-1], n)


def add_rms_norm(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = residual + x`` and ``rms_norm(s, weight, eps)`` in one kernel (a decoder layer's residual add and the
    next RMSNorm); returns ``(s, normed)``, ``s`` rounded like the torch add, ``normed`` like :func:`rms_norm`."""
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} must match x {tuple(x.shape)} {x.dtype}.")
    n = _check_weight(weight, x)
    r2, x2 = _rows(residual, n), _rows(x, n)
    s = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    y = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    _launch(_add_rms_norm_kernel, x2.shape[0], n, r2, x2, weight, s, y, n, r2.stride(0), x2.stride(0), s.stride(0),
            y.stride(0), float(eps))
    return s.reshape(x.shape), y.reshape(*x.shape[:-1], n)

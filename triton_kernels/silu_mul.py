"""``silu(gate) * up`` in one kernel, from the fused gate/up projection ``[..., 2 * I]``.

transformers' Llama/Mistral MLP computes ``act_fn(gate_proj(x)) * up_proj(x)``: a SiLU kernel (computed in float32,
rounded to the model dtype) and a multiply (rounded again). This kernel reads both halves of one ``[..., 2 * I]``
GEMV output and writes the product with the same two roundings: the SiLU as ``x / (1 + exp(-x))`` in float32 with
an IEEE division (``div_rn``), rounded to the dtype, then the product rounded. ``tl.exp`` is not the CUDA ``expf``
torch uses, so a few float16 elements can differ by one unit in the last place (bfloat16 results are identical).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# reference: transformers' act_fn(gate) * up (tests/test_projections.py)
@triton.jit
def _silu_mul_kernel(gu_ptr, y_ptr, inter, stride_g, stride_y, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    g = tl.load(gu_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_g + inter + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.div_rn(g, 1.0 + tl.exp(-g)).to(y_ptr.dtype.element_ty).to(tl.float32)  # act_fn(gate) in the dtype
    tl.store(y_ptr + row * stride_y + cols, (s * u).to(y_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate_up[..., :I]) * gate_up[..., I:]`` for ``gate_up [..., 2 * I]``; returns ``[..., I]``."""
    two_i = gate_up.shape[-1]
    if two_i % 2:
        raise ValueError(f"gate_up has {two_i} channels in its last dimension; expected an even number (gate | up).")
    if gate_up.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"gate_up is {gate_up.dtype}; silu_mul takes float16, bfloat16 or float32.")
    inter = two_i // 2
    x2 = gate_up.reshape(-1, two_i)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty((x2.shape[0], inter), dtype=gate_up.dtype, device=gate_up.device)
    if x2.shape[0]:
        block = min(1024, triton.next_power_of_2(inter))
        _silu_mul_kernel[(x2.shape[0], triton.cdiv(inter, block))](x2, y, inter, x2.stride(0), y.stride(0),
                                                                  BLOCK=block, num_warps=4)
    return y.reshape(*gate_up.shape[:-1], inter)

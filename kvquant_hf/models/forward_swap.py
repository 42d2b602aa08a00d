"""Swapping a module's ``forward`` for an instance-level one, and putting the original back.

Shared by the opt-in fusions (:mod:`.norms`, :mod:`.projections`). Modules that carry an accelerate hook
(``_hf_hook``: a ``device_map`` placement or offload) are never swapped: the hook's wrapper *is* their instance
``forward`` and moves inputs / weights to the module's device, which a fused forward would skip.
"""

from __future__ import annotations

import types

import torch

#: dtypes the fused Triton kernels take
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def hooked(module) -> bool:
    """Whether accelerate manages this module's forward (device placement or offload)."""
    return getattr(module, "_hf_hook", None) is not None


def swap_forward(module, key: str, fn) -> bool:
    """Give ``module`` the forward ``fn`` (a function of ``self``), keeping the current one under ``key``;
    idempotent; False (nothing done) for hooked modules."""
    if hooked(module):
        return False
    if key not in module.__dict__:
        module.__dict__[key] = module.forward
        module.forward = types.MethodType(fn, module)
    return True


def restore_forward(module, key: str) -> bool:
    """Undo :func:`swap_forward`: the saved forward again (an instance-level one is put back, the class one by
    removing the override). Returns whether ``module`` had been swapped."""
    original = module.__dict__.pop(key, None)
    if original is None:
        return False
    module.__dict__.pop("forward", None)
    if getattr(original, "__func__", None) is not type(module).forward:
        module.forward = original
    return True


def grad_needed(*tensors: torch.Tensor) -> bool:
    """Autograd would record this op: the fused Triton kernels have no backward, so the stock ops run instead."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)

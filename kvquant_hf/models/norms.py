"""Opt-in: transformers' RMSNorm modules of a Llama/Mistral model computed by one Triton kernel on CUDA.

A decode step runs two RMSNorms per layer at about eight small kernels each; under a CUDA graph (``cuda_graph``)
those launches, not the arithmetic, are what they cost. :func:`fuse_rms_norms` swaps the forward of every
``LlamaRMSNorm`` / ``MistralRMSNorm`` for :func:`triton_kernels.rms_norm.rms_norm` (same roundings; the float32
variance is summed in another order, so an element can differ by one unit in the last place of the model dtype).
Inputs that are not on CUDA, or when Triton cannot be used, go to the original forward. Turn it on with
``cache_config={"fused_norms": True}`` in ``generate`` or ``fuse_rms_norms(model)``; :func:`unfuse_rms_norms`
undoes it.
"""

from __future__ import annotations

import types

import torch

#: RMSNorm classes whose forward is ``weight * normalize(x.float()).to(x.dtype)`` with ``variance_epsilon``
FUSABLE_NORMS = ("LlamaRMSNorm", "MistralRMSNorm")
#: device types the fused forward handles (the tests add "cpu" under the Triton interpreter)
DEVICE_TYPES = ("cuda",)
_kernels = None  # triton_kernels.rms_norm, imported by fuse_rms_norms (not per call: the forward is on the hot path)


def _fused_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if hidden_states.device.type in DEVICE_TYPES and hidden_states.dtype in (torch.float16, torch.bfloat16,
                                                                             torch.float32):
        return _kernels.rms_norm(hidden_states, self.weight, self.variance_epsilon)
    return self.__dict__["_kvquant_norm_forward"](hidden_states)


def fuse_rms_norms(model) -> int:
    """Swap the forward of every fusable RMSNorm module of ``model`` (idempotent); returns how many are fused."""
    global _kernels
    try:
        import triton_kernels.rms_norm as kernels
    except ImportError as exc:
        raise RuntimeError(f"fused_norms needs Triton and the triton_kernels package ({exc}); install triton or "
                           "leave fused_norms off.") from exc
    _kernels = kernels
    n = 0
    for module in model.modules():
        if type(module).__name__ not in FUSABLE_NORMS or not hasattr(module, "variance_epsilon"):
            continue
        if "_kvquant_norm_forward" not in module.__dict__:
            module.__dict__["_kvquant_norm_forward"] = module.forward
            module.forward = types.MethodType(_fused_forward, module)
        n += 1
    model._kvquant_fused_norms = n > 0
    return n


def unfuse_rms_norms(model) -> None:
    """Undo :func:`fuse_rms_norms`."""
    for module in model.modules():
        original = module.__dict__.pop("_kvquant_norm_forward", None)
        if original is not None:
            module.__dict__.pop("forward", None)
    model._kvquant_fused_norms = False

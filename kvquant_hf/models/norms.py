"""Opt-in: transformers' RMSNorm modules of a Llama/Mistral model computed by one Triton kernel on CUDA.

A decode step runs two RMSNorms per layer at about eight small kernels each; under a CUDA graph (``cuda_graph``)
those launches, not the arithmetic, are what they cost. :func:`fuse_rms_norms` swaps the forward of every
``LlamaRMSNorm`` / ``MistralRMSNorm`` for :func:`kvquant_hf.kernels.rms_norm.rms_norm` (same roundings; the float32
variance is summed in another order, so an element can differ by one unit in the last place of the model dtype),
and in every Llama/Mistral decoder layer computes the residual add after the attention together with the
post-attention norm (:func:`kvquant_hf.kernels.rms_norm.add_rms_norm`, the add rounded like torch's).
Inputs that are not on CUDA, autograd (the kernels have no backward), mixed dtypes (autocast) and modules placed by
accelerate (``device_map`` hooks) go to the original forward. Turn it on with
``cache_config={"fused_norms": True}`` in ``generate`` or ``fuse_rms_norms(model)``; :func:`unfuse_rms_norms`
undoes it.
"""

from __future__ import annotations

import torch

from .forward_swap import KERNEL_DTYPES, grad_needed, restore_forward, swap_forward

#: RMSNorm classes whose forward is ``weight * normalize(x.float()).to(x.dtype)`` with ``variance_epsilon``
FUSABLE_NORMS = ("LlamaRMSNorm", "MistralRMSNorm")
#: decoder layers whose forward is ``h = x + attn(norm1(x)); h + mlp(norm2(h))``: the first residual add and
#: ``norm2`` become one kernel (:func:`kvquant_hf.kernels.rms_norm.add_rms_norm`)
FUSABLE_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer")
#: device types the fused forward handles (the tests add "cpu" under the Triton interpreter)
DEVICE_TYPES = ("cuda",)
_kernels = None  # kvquant_hf.kernels.rms_norm, imported by fuse_rms_norms (not per call: the forward is on the hot path)


def _fused_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if (hidden_states.device.type in DEVICE_TYPES and hidden_states.dtype in KERNEL_DTYPES
            and self.weight.device == hidden_states.device and not grad_needed(hidden_states, self.weight)):
        return _kernels.rms_norm(hidden_states, self.weight, self.variance_epsilon)
    return self.__dict__["_kvquant_norm_forward"](hidden_states)


def _fused_layer_forward(self, hidden_states: torch.Tensor, *args, **kwargs):
    """The stock decoder-layer forward (keyword arguments go to the attention unchanged, as there) with the residual
    add after the attention and the post-attention RMSNorm in one kernel. Training (autograd), positional extras
    and inputs the kernel does not take run the stock forward."""
    norm = self.post_attention_layernorm
    if (args or self.training or hidden_states.device.type not in DEVICE_TYPES or hidden_states.dtype not in KERNEL_DTYPES
            or grad_needed(hidden_states, norm.weight)):
        return self.__dict__["_kvquant_layer_forward"](hidden_states, *args, **kwargs)
    residual = hidden_states
    h = self.input_layernorm(hidden_states)
    h, _ = self.self_attn(hidden_states=h, **kwargs)
    if h.dtype == residual.dtype and h.device == residual.device == norm.weight.device and not grad_needed(h):
        hidden, h = _kernels.add_rms_norm(residual, h, norm.weight, norm.variance_epsilon)
    else:  # e.g. autocast: the attention's output dtype differs from the residual's; the stock ops promote
        hidden = residual + h
        h = norm(hidden)
    return hidden + self.mlp(h)


def _fusable_layer(layer) -> bool:
    return (type(layer).__name__ in FUSABLE_LAYERS
            and all(type(getattr(layer, name, None)).__name__ in FUSABLE_NORMS
                    for name in ("input_layernorm", "post_attention_layernorm"))
            and hasattr(layer.post_attention_layernorm, "variance_epsilon")
            and hasattr(layer, "self_attn") and hasattr(layer, "mlp"))


def fuse_rms_norms(model) -> int:
    """Swap the forward of every fusable RMSNorm module (and decoder layer) of ``model`` (idempotent); returns how
    many norms are fused. Modules placed by accelerate (``device_map`` hooks) keep their forward."""
    global _kernels
    try:
        import kvquant_hf.kernels.rms_norm as kernels
    except ImportError as exc:
        raise RuntimeError(f"fused_norms needs Triton and the kvquant_hf.kernels package ({exc}); install triton or "
                           "leave fused_norms off.") from exc
    _kernels = kernels
    n = 0
    for module in model.modules():
        if type(module).__name__ in FUSABLE_NORMS and hasattr(module, "variance_epsilon"):
            n += swap_forward(module, "_kvquant_norm_forward", _fused_forward)
    for module in model.modules():
        if _fusable_layer(module):
            swap_forward(module, "_kvquant_layer_forward", _fused_layer_forward)
    model._kvquant_fused_norms = n > 0
    return n


def unfuse_rms_norms(model) -> None:
    """Undo :func:`fuse_rms_norms`."""
    for module in model.modules():
        restore_forward(module, "_kvquant_norm_forward")
        restore_forward(module, "_kvquant_layer_forward")
    model._kvquant_fused_norms = False

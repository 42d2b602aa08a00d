"""Opt-in: one GEMV for q/k/v and one for gate/up in every Llama/Mistral decoder layer, SiLU·mul in one kernel.

A batch-1 decode step reads each weight once; with separate ``q_proj`` / ``k_proj`` / ``v_proj`` the two small KV
projections run at well under the copy bandwidth and each adds a split-K reduction, and the MLP adds a SiLU and a
multiply kernel. :func:`fuse_projections` concatenates the weights of each group into one tensor **and makes the
original ``nn.Linear`` weights views into it** (no extra memory; the stock forwards still work), then:

* the patched attention forward (:mod:`kvquant_hf.models.llama`) computes ``q, k, v`` with one ``F.linear`` when a
  kvquant cache is used;
* the MLP forward computes ``gate | up`` with one ``F.linear`` and ``silu(gate) * up`` with
  :func:`kvquant_hf.kernels.silu_mul.silu_mul` on CUDA (torch ops elsewhere).

Each output element is the same dot product as before, but the GEMM library may pick another kernel (split-K
order) for the larger matrix, so logits can differ in the last bits of the model dtype; that is why it is off by
default. Turn it on with ``cache_config={"fused_projections": True}`` in ``generate`` or ``fuse_projections(model)``;
:func:`unfuse_projections` (and ``unpatch_model``) undo it. Layers whose projections are not plain ``nn.Linear``
modules on one device with a floating-point weight (quantized linears, offloaded or meta weights, mixed biases) and
MLPs whose activation is not SiLU are left as they are.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .forward_swap import KERNEL_DTYPES, grad_needed, hooked, restore_forward, swap_forward
from .layers import decoder_layers

#: decoder-layer MLP classes whose forward is ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``
FUSABLE_MLPS = ("LlamaMLP", "MistralMLP")
#: activation classes that compute ``x * sigmoid(x)`` (torch's and transformers' names)
SILU_ACTIVATIONS = ("SiLU", "SiLUActivation")
#: device types on which the MLP uses the Triton SiLU·mul kernel (the tests add "cpu" under the interpreter)
DEVICE_TYPES = ("cuda",)
kernels = None  # kvquant_hf.kernels.silu_mul, imported once by fuse_projections when Triton is there


@dataclass
class FusedLinear:
    """Concatenated weight ``[sum(sizes), in]`` (and bias) of several linears that read the same input; the
    linears' weights are views of it (``ptrs``: where each one's data starts)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    sizes: tuple[int, ...]
    linears: tuple[nn.Linear, ...]
    ptrs: tuple[int, ...]

    def current(self) -> bool:
        """Whether the linears still hold views of the fused tensor (``model.to(...)``, ``.half()`` or
        ``load_state_dict(..., assign=True)`` give them new tensors and leave this copy stale). Host-side only."""
        return all(lin.weight.data_ptr() == p and lin.weight.dtype == self.weight.dtype
                   and lin.weight.device == self.weight.device for lin, p in zip(self.linears, self.ptrs))

    def usable(self, x: torch.Tensor) -> bool:
        """The fused GEMV may run: inference (the fused tensor carries no gradients to the parameters) on the
        weights' device."""
        return x.device == self.weight.device and not grad_needed(x, *(lin.weight for lin in self.linears))

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)


def _stale(module, key: str) -> None:
    """Drop a fusion whose weights were replaced (the stock forward takes over; the stale copy is freed)."""
    module.__dict__.pop(key, None)
    restore_forward(module, "_kvquant_mlp_forward")
    warnings.warn(f"fused_projections: the weights of {type(module).__name__} were replaced after fusing (model.to, "
                  ".half(), load_state_dict(assign=True), ...); this fusion is dropped and the stock forward runs. "
                  "Call kvquant_hf.models.projections.fuse_projections(model) again to fuse the new weights.",
                  RuntimeWarning, stacklevel=3)


def active_qkv(attn, x: torch.Tensor) -> FusedLinear | None:
    """The fused q/k/v GEMV of an attention module, if it has one that is current and usable for ``x``."""
    qkv = attn.__dict__.get("_kvquant_qkv")
    if qkv is None:
        return None
    if not qkv.current():
        _stale(attn, "_kvquant_qkv")
        return None
    return qkv if qkv.usable(x) else None


def _fusable(linears) -> bool:
    first = linears[0]
    for lin in linears:
        if type(lin) is not nn.Linear or hooked(lin):
            return False  # quantized / offloaded linears keep their own forward
        w = lin.weight
        if (not w.is_floating_point() or w.device.type == "meta" or w.device != first.weight.device
                or w.dtype != first.weight.dtype or w.shape[1] != first.weight.shape[1]):
            return False
        if (lin.bias is None) != (first.bias is None):
            return False
    return True


def _fuse(linears) -> FusedLinear:
    with torch.no_grad():
        weight = torch.cat([lin.weight for lin in linears], dim=0)
        bias = None if linears[0].bias is None else torch.cat([lin.bias for lin in linears], dim=0)
        sizes = tuple(int(lin.weight.shape[0]) for lin in linears)
        for lin, w in zip(linears, weight.split(sizes, dim=0)):
            lin.weight.data = w  # a view: the separate weights are freed, the modules keep working
        if bias is not None:
            for lin, b in zip(linears, bias.split(sizes, dim=0)):
                lin.bias.data = b
    return FusedLinear(weight, bias, sizes, tuple(linears), tuple(lin.weight.data_ptr() for lin in linears))


def _fused_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    gate_up = self.__dict__["_kvquant_gate_up"]
    if not gate_up.current():
        _stale(self, "_kvquant_gate_up")
        return self.forward(x)
    if not gate_up.usable(x):
        return self.__dict__["_kvquant_mlp_forward"](x)
    gu = F.linear(x, gate_up.weight, gate_up.bias)
    if kernels is not None and gu.device.type in DEVICE_TYPES and gu.dtype in KERNEL_DTYPES:
        h = kernels.silu_mul(gu)
    else:
        gate, up = gu.split(gate_up.sizes, dim=-1)
        h = self.act_fn(gate) * up
    return self.down_proj(h)


def fuse_projections(model) -> int:
    """Fuse q/k/v and gate/up of every fusable decoder layer of ``model`` (idempotent); returns how many groups
    were fused (two per layer at most)."""
    global kernels
    try:
        import kvquant_hf.kernels.silu_mul as module
    except ImportError:  # no Triton: the MLP falls back to torch's silu and multiply
        module = None
    kernels = module
    n = 0
    for layer in decoder_layers(model)[1]:
        attn = getattr(layer, "self_attn", None)
        if attn is not None and "_kvquant_qkv" not in attn.__dict__:
            lins = [getattr(attn, name, None) for name in ("q_proj", "k_proj", "v_proj")]
            if all(lin is not None for lin in lins) and _fusable(lins) and not hooked(attn):
                attn.__dict__["_kvquant_qkv"] = _fuse(lins)
        n += int(attn is not None and "_kvquant_qkv" in attn.__dict__)
        mlp = getattr(layer, "mlp", None)
        if (mlp is not None and type(mlp).__name__ in FUSABLE_MLPS and "_kvquant_gate_up" not in mlp.__dict__
                and type(getattr(mlp, "act_fn", None)).__name__ in SILU_ACTIVATIONS):
            lins = [getattr(mlp, "gate_proj", None), getattr(mlp, "up_proj", None)]
            if all(lin is not None for lin in lins) and _fusable(lins) and not hooked(mlp):
                mlp.__dict__["_kvquant_gate_up"] = _fuse(lins)
                swap_forward(mlp, "_kvquant_mlp_forward", _fused_mlp_forward)
        n += int(mlp is not None and "_kvquant_gate_up" in mlp.__dict__)
    model._kvquant_fused_projections = n > 0
    return n


def _unfuse(linears) -> None:
    with torch.no_grad():
        for lin in linears:  # own storage again: the layout of the original model (the fused tensor is freed)
            lin.weight.data = lin.weight.data.clone()
            if lin.bias is not None:
                lin.bias.data = lin.bias.data.clone()


def unfuse_projections(model) -> None:
    """Undo :func:`fuse_projections`: the stock forwards, and every weight in its own storage again (one layer's
    group is copied at a time)."""
    for layer in decoder_layers(model)[1]:
        attn = getattr(layer, "self_attn", None)
        if attn is not None and attn.__dict__.pop("_kvquant_qkv", None) is not None:
            _unfuse([attn.q_proj, attn.k_proj, attn.v_proj])
        mlp = getattr(layer, "mlp", None)
        if mlp is not None and mlp.__dict__.pop("_kvquant_gate_up", None) is not None:
            restore_forward(mlp, "_kvquant_mlp_forward")
            _unfuse([mlp.gate_proj, mlp.up_proj])
    model._kvquant_fused_projections = False

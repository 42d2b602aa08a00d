"""Llama attention forward that gives the cache layer pre-RoPE keys (shared by Llama-like models)."""

from __future__ import annotations

import torch

from ..layer_api import AttendInputs, RopeContext, apply_rope
from .projections import active_qkv


def _is_kvquant_cache(cache) -> bool:
    layers = getattr(cache, "layers", None)
    return bool(layers) and hasattr(layers[0], "attend")


def kvquant_attention_forward(
    self,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    attention_mask: torch.Tensor | None = None,
    past_key_values=None,
    cache=None,
    sliding_window: int | None = None,
    **kwargs,
):
    """Attention forward for Llama-like layers: project, rotate q only, let the cache layer attend.

    Accepts both ``cache=`` (transformers >= 5.24) and ``past_key_values=`` (earlier 5.x). With a cache
    that is not a kvquant cache (or none) it runs the stock forward unchanged.
    """
    kv_cache = cache if cache is not None else past_key_values
    if not _is_kvquant_cache(kv_cache):
        active_qkv(self, hidden_states)  # drops (and frees) a fusion whose weights were replaced
        original = self.__dict__["_kvquant_original_forward"]
        return original(
            hidden_states, position_embeddings, attention_mask, **{self.__dict__["_kvquant_cache_kw"]: kv_cache}, **kwargs
        )

    bsz, q_len, _ = hidden_states.shape
    hidden_shape = (bsz, q_len, -1, self.head_dim)
    qkv = active_qkv(self, hidden_states)  # fused_projections: one GEMV for q, k and v
    if qkv is not None:
        query, key, value = (x.view(hidden_shape).transpose(1, 2) for x in qkv(hidden_states))
    else:
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

    cos, sin = position_embeddings
    layer = kv_cache.layers[self.layer_idx]
    rotated = not getattr(layer, "rotates_query", False)  # KVQuantLayer rotates q with the new keys in one kernel
    if rotated:
        query = apply_rope(query, cos.to(query.dtype), sin.to(query.dtype))

    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        start = kv_cache.get_seq_length(self.layer_idx)
        position_ids = torch.arange(start, start + q_len, device=hidden_states.device).unsqueeze(0)
    position_ids = position_ids.expand(bsz, q_len)

    rotary = self.__dict__["_kvquant_rotary"]
    rope = RopeContext(
        cos=cos, sin=sin, inv_freq=rotary.inv_freq, attention_scaling=float(getattr(rotary, "attention_scaling", 1.0))
    )
    out = layer.attend(
        AttendInputs(
            query=query,
            key=key,
            value=value,
            positions=position_ids,
            rope=rope,
            attention_mask=attention_mask,
            scaling=self.scaling,
            sliding_window=sliding_window,
            query_rotated=rotated,
        )
    )
    out = out.reshape(bsz, q_len, -1).contiguous()
    return self.o_proj(out), None


def llama_attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
    """Patched ``LlamaAttention.forward``."""
    return kvquant_attention_forward(self, hidden_states, position_embeddings, attention_mask, **kwargs)

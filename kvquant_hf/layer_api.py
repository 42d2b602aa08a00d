"""The contract between the patched attention forwards and the cache layers that attend.

The patched Llama/Mistral attention (``kvquant_hf/models/``) projects q/k/v, rotates *only q*, and
hands everything to the cache layer for ``layer_idx``::

    out = cache.layers[layer_idx].attend(AttendInputs(...))   # [B, q_len, Hq, D]

Every layer class that can sit in a cache used with the patched models implements ``attend``:

* ``kvquant_hf.cache.KVQuantLayer``: the real packed cache (stores pre-RoPE codes, attends over
  [sink | packed history | new tokens] with RoPE applied on the fly to the history).
* ``kvquant_hf.simulated.*Layer``: quantize-dequantize simulation for the perplexity harness
  (nuqX, intX, KIVI), the same semantics with float storage.

Semantics shared by all of them (so that simulated and real perplexities agree): the new tokens of
one call attend to each other exactly (fp, causal) and to everything stored earlier through its
quantized form; after attending, the new tokens are stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class RopeContext:
    """How to rotate keys: HF ``rotate_half`` RoPE with ``cos = cos(pos * inv_freq) * attention_scaling``.

    Args:
        cos, sin: ``[B, q_len, D]`` for the new tokens, exactly as the model computed them.
        inv_freq: ``[D/2]`` float32 frequencies (already including linear/llama3/dynamic scaling).
        attention_scaling: factor the model applies to cos and sin (1.0 except yarn/longrope).
    """

    cos: torch.Tensor
    sin: torch.Tensor
    inv_freq: torch.Tensor
    attention_scaling: float = 1.0

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[..., D]`` for integer ``positions [...]`` (float32 math, like HF)."""
        freqs = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq.to(positions.device, torch.float32)
        emb = torch.cat([freqs, freqs], dim=-1)
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    return torch.cat((-x[..., d:], x[..., :d]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [B, H, S, D]`` rotated with ``cos/sin [B, S, D]`` (HF convention)."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


@dataclass
class AttendInputs:
    """Everything a layer needs to attend for one call of the attention forward.

    Args:
        query: ``[B, Hq, q_len, D]`` queries, RoPE already applied (unless ``query_rotated`` is False).
        key: ``[B, Hkv, q_len, D]`` new keys *before* RoPE.
        value: ``[B, Hkv, q_len, D]`` new values.
        positions: ``[B, q_len]`` int64 position ids of the new tokens.
        rope: how to rotate (see :class:`RopeContext`).
        attention_mask: the mask transformers passed to the attention layer: ``None`` (plain causal,
            no padding), a 4D bool ``[B, 1, q_len, kv_len]`` (True = attend) or a 4D float additive
            mask, with ``kv_len`` = tokens stored before this call + ``q_len`` (cache order).
        scaling: softmax scale (``head_dim ** -0.5`` for Llama).
        sliding_window: attend only to keys with ``q_pos - k_pos < sliding_window`` (None = all).
        query_rotated: False when ``query`` is still *before* RoPE (the patched forwards do this for layers whose
            ``rotates_query`` is True; they rotate it with ``rope.cos/sin`` exactly as the stock forward would).
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    positions: torch.Tensor
    rope: RopeContext
    attention_mask: torch.Tensor | None
    scaling: float
    sliding_window: int | None = None
    query_rotated: bool = True


class AttendingLayer(Protocol):
    def attend(self, inputs: AttendInputs) -> torch.Tensor:
        """Attend and store the new tokens; returns ``[B, q_len, Hq, D]`` in the query dtype."""
        ...

"""Attention over a packed layer: the torch reference/CPU backend and the dispatch to Triton.

The history is stored packed (pre-RoPE keys, see :mod:`kvquant_hf.quant`); the *exact block* holds
float keys (already rotated) and values attended without quantization: the attention-sink tokens and
the new tokens of the current call. The torch path dequantizes the history block by block with an
online softmax, so it never materializes a dequantized copy of a long cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import quant
from .layer_api import rotate_half

NEG_LARGE = -1.0e30


@dataclass
class PackedKV:
    """Views of one layer's packed storage (first ``length`` tokens are valid).

    Shapes: ``k_codes [B, H, cap, D*key_bits/8]`` uint8, ``k_out_val [B, H, cap, Sk]`` (model dtype),
    ``k_out_idx [B, H, cap, Sk]`` uint8, ``v_codes [B, H, cap, D*value_bits/8]``, ``v_scale/v_zero
    [B, H, cap]``, ``v_out_val/v_out_idx [B, H, cap, Sv]``, ``k_lut [2**key_bits]`` and ``v_lut
    [2**value_bits]`` float32, ``k_zero/k_scale [H, D]`` float32, ``positions [B, cap]`` int32.
    """

    k_codes: torch.Tensor
    k_out_val: torch.Tensor
    k_out_idx: torch.Tensor
    v_codes: torch.Tensor
    v_scale: torch.Tensor
    v_zero: torch.Tensor
    v_out_val: torch.Tensor
    v_out_idx: torch.Tensor
    k_lut: torch.Tensor
    v_lut: torch.Tensor
    k_zero: torch.Tensor
    k_scale: torch.Tensor
    positions: torch.Tensor
    length: int
    key_bits: int
    value_bits: int
    head_dim: int

    def dequantize_block(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 pre-RoPE keys and values ``[B, H, end-start, D]`` for history tokens [start, end)."""
        d = self.head_dim
        kc = quant.unpack_codes(self.k_codes[:, :, start:end], self.key_bits, d)
        k = self.k_lut[kc] * self.k_scale[None, :, None, :] + self.k_zero[None, :, None, :]
        k = quant._apply_slots(k, self.k_out_val[:, :, start:end], self.k_out_idx[:, :, start:end])
        vc = quant.unpack_codes(self.v_codes[:, :, start:end], self.value_bits, d)
        scale = self.v_scale[:, :, start:end].to(torch.float32).clamp_min(quant.MIN_SCALE).unsqueeze(-1)
        zero = self.v_zero[:, :, start:end].to(torch.float32).unsqueeze(-1)
        v = self.v_lut[vc] * scale + zero
        v = quant._apply_slots(v, self.v_out_val[:, :, start:end], self.v_out_idx[:, :, start:end])
        return k, v


def rope_rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float) -> torch.Tensor:
    """Rotate float32 ``x [B, H, S, D]`` with integer ``positions [B, S]`` (HF rotate_half convention)."""
    freqs = positions.to(torch.float32).unsqueeze(-1) * inv_freq.to(x.device, torch.float32)
    emb = torch.cat([freqs, freqs], dim=-1)
    cos = (emb.cos() * attention_scaling).unsqueeze(1)
    sin = (emb.sin() * attention_scaling).unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def packed_attention_torch(
    query: torch.Tensor,
    packed: PackedKV | None,
    exact_k: torch.Tensor,
    exact_v: torch.Tensor,
    exact_mask: torch.Tensor | None,
    *,
    scaling: float,
    inv_freq: torch.Tensor,
    attention_scaling: float = 1.0,
    hist_start: torch.Tensor | None = None,
    q_positions: torch.Tensor | None = None,
    window: int | None = None,
    block_size: int = 4096,
) -> torch.Tensor:
    """Reference attention over ``[packed history | exact block]`` (float32 math).

    Args:
        query: ``[B, Hq, Lq, D]`` queries with RoPE applied.
        packed: the layer's packed history (``None`` or ``length == 0``: no history).
        exact_k / exact_v: ``[B, H, E, D]`` exact keys (rotated) and values: sink + new tokens.
        exact_mask: bool ``[B, Lq, E]`` (True = attend) or None (attend to all).
        scaling: softmax scale.
        inv_freq / attention_scaling: RoPE for the history keys (``cos(pos * inv_freq) * scaling``).
        hist_start: int ``[B]``: history tokens with index ``< hist_start[b]`` are masked (left padding).
        q_positions / window: sliding window; history token j is visible to query row r iff
            ``q_positions[b, r] - positions[b, j] < window``.
        block_size: history tokens dequantized per step.

    Returns:
        ``[B, Hq, Lq, D]`` in the query dtype.
    """
    b, hq, lq, d = query.shape
    h = exact_k.shape[1]
    if hq % h:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({h}).")
    g = hq // h
    q = query.to(torch.float32).reshape(b, h, g * lq, d) * scaling  # rows ordered (group, q row)
    m = torch.full((b, h, g * lq), NEG_LARGE, dtype=torch.float32, device=query.device)
    den = torch.zeros_like(m)
    acc = torch.zeros(b, h, g * lq, d, dtype=torch.float32, device=query.device)

    def step(keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor | None) -> None:
        # keys/values [B, H, N, D] float32; visible bool [B, Lq, N] or None
        nonlocal m, den, acc
        s = torch.einsum("bhrd,bhnd->bhrn", q, keys)
        if visible is not None:
            vis = visible.unsqueeze(1).unsqueeze(1).expand(b, 1, g, lq, -1).reshape(b, 1, g * lq, -1)
            s = s.masked_fill(~vis, NEG_LARGE)
        m_new = torch.maximum(m, s.amax(-1))
        alpha = torch.exp(m - m_new)
        p = torch.exp(s - m_new.unsqueeze(-1))
        if visible is not None:
            p = p * vis
        den = den * alpha + p.sum(-1)
        acc = acc * alpha.unsqueeze(-1) + torch.einsum("bhrn,bhnd->bhrd", p, values)
        m = m_new

    n_hist = 0 if packed is None else packed.length
    for start in range(0, n_hist, block_size):
        end = min(start + block_size, n_hist)
        k, v = packed.dequantize_block(start, end)
        pos = packed.positions[:, start:end]
        k = rope_rotate(k, pos, inv_freq, attention_scaling)
        visible = None
        if hist_start is not None:
            idx = torch.arange(start, end, device=query.device)
            visible = (idx[None, :] >= hist_start.to(query.device)[:, None]).unsqueeze(1).expand(b, lq, end - start)
        if window is not None and q_positions is not None:
            in_win = (q_positions[:, :, None].to(torch.int64) - pos[:, None, :].to(torch.int64)) < window
            visible = in_win if visible is None else visible & in_win
        step(k, v, visible)
    if exact_k.shape[2] > 0:
        step(exact_k.to(torch.float32), exact_v.to(torch.float32), exact_mask)
    out = acc / den.clamp_min(1e-30).unsqueeze(-1)
    return out.reshape(b, h * g, lq, d).to(query.dtype)

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
from .quant import NEG_BIG


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
        k = quant.apply_slots(k, self.k_out_val[:, :, start:end], self.k_out_idx[:, :, start:end])
        vc = quant.unpack_codes(self.v_codes[:, :, start:end], self.value_bits, d)
        scale = self.v_scale[:, :, start:end].to(torch.float32).clamp_min(quant.MIN_SCALE).unsqueeze(-1)
        zero = self.v_zero[:, :, start:end].to(torch.float32).unsqueeze(-1)
        v = self.v_lut[vc] * scale + zero
        v = quant.apply_slots(v, self.v_out_val[:, :, start:end], self.v_out_idx[:, :, start:end])
        return k, v


#: tokens of packed history that the torch path dequantizes at once
TORCH_HISTORY_BLOCK = 4096


def rope_rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float) -> torch.Tensor:
    """Rotate float32 ``x [B, H, S, D]`` with integer ``positions [B, S]`` (HF rotate_half convention)."""
    freqs = positions.to(torch.float32).unsqueeze(-1) * inv_freq.to(x.device, torch.float32)
    emb = torch.cat([freqs, freqs], dim=-1)
    cos = (emb.cos() * attention_scaling).unsqueeze(1)
    sin = (emb.sin() * attention_scaling).unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def history_blocks(packed: PackedKV | None, block_size: int, inv_freq: torch.Tensor, attention_scaling: float):
    """Yield ``(start, end, keys, values)`` for the packed history in blocks of ``block_size`` tokens: float32
    keys dequantized and rotated to their stored positions, float32 values (nothing for an empty history)."""
    n_hist = 0 if packed is None else packed.length
    for start in range(0, n_hist, block_size):
        end = min(start + block_size, n_hist)
        k, v = packed.dequantize_block(start, end)
        yield start, end, rope_rotate(k, packed.positions[:, start:end], inv_freq, attention_scaling), v


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
    block_size: int = TORCH_HISTORY_BLOCK,
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
    m = torch.full((b, h, g * lq), NEG_BIG, dtype=torch.float32, device=query.device)
    den = torch.zeros_like(m)
    acc = torch.zeros(b, h, g * lq, d, dtype=torch.float32, device=query.device)

    def step(keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor | None) -> None:
        # keys/values [B, H, N, D] float32; visible bool [B, Lq, N] or None
        nonlocal m, den, acc
        s = torch.einsum("bhrd,bhnd->bhrn", q, keys)
        if visible is not None:
            vis = visible.unsqueeze(1).unsqueeze(1).expand(b, 1, g, lq, -1).reshape(b, 1, g * lq, -1)
            s = s.masked_fill(~vis, NEG_BIG)
        m_new = torch.maximum(m, s.amax(-1))
        alpha = torch.exp(m - m_new)
        p = torch.exp(s - m_new.unsqueeze(-1))
        if visible is not None:
            p = p * vis
        den = den * alpha + p.sum(-1)
        acc = acc * alpha.unsqueeze(-1) + torch.einsum("bhrn,bhnd->bhrd", p, values)
        m = m_new

    for start, end, k, v in history_blocks(packed, block_size, inv_freq, attention_scaling):
        pos = packed.positions[:, start:end]
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


# --------------------------------------------------------------------------------------------
# prefill chunks over a packed history: dequantize block by block, fused attention with log-sum-exp, merge
# --------------------------------------------------------------------------------------------
#: history tokens dequantized per block on the prefill path (bounds its transient memory)
PREFILL_HISTORY_BLOCK = 65536
#: exact-block query rows per step of the float32 math of the exact block
_EXACT_ROWS = 2048
_LSE_OP_STATUS: dict = {}  # (device type, dtype, head_dim, order) -> the checked fused op, or None (unusable here)


def attention_lse_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                        visible: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``(softmax(q k^T * scale) v, logsumexp)``; ``visible`` bool broadcastable to the scores."""
    s = torch.einsum("bhmd,bhnd->bhmn", q.to(torch.float32), k.to(torch.float32)) * scale
    if visible is not None:
        s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).unsqueeze(-1))
    return torch.einsum("bhmn,bhnd->bhmd", p, v.to(torch.float32)), lse


def _attention_lse_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The same with PyTorch's memory-efficient attention kernel (CUDA), which also returns the log-sum-exp.
    ``causal``: square blocks only (query row i sees keys 0..i)."""
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal,
                                                                      scale=scale)[:2]
    return out, lse[..., : q.shape[2]].to(torch.float32)


def _attention_lse_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The same with PyTorch's FlashAttention-2 kernel (CUDA, fp16/bf16): the fastest fused kernel on Hopper.
    Both fused ops return the output in the input dtype (any strides) and a float32 log-sum-exp."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
    return out, lse.to(torch.float32)


def _attention_lse_cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The same with PyTorch's cuDNN fused attention (CUDA, fp16/bf16; Hopper-tuned kernels)."""
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False,
                                                                  scale=scale)[:2]
    return out, lse.reshape(q.shape[:3]).to(torch.float32)


#: fused attention-with-log-sum-exp ops of the prefill path, fastest first (each is self-checked before use)
PREFILL_FUSED_OPS = {"cudnn": _attention_lse_cudnn, "flash": _attention_lse_flash, "efficient": _attention_lse_fused}
#: the order in which they are tried (fp16/bf16; float32 queries only have "efficient")
PREFILL_FUSED_ORDER = ("cudnn", "flash", "efficient")


def check_lse_op(op, device: torch.device, dtype: torch.dtype, head_dim: int = 64) -> bool:
    """Whether ``op`` runs here for ``head_dim`` and agrees with the float32 math, with and without the causal mask
    (its signature and log-sum-exp layout are private API; the kernels behind it support some head sizes only)."""
    try:
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(1, 2, n, head_dim, device=device, generator=g, dtype=dtype) for n in (40, 72, 72))
        out, lse = op(q, k, v, 0.125)
        ref_out, ref_lse = attention_lse_math(q, k, v, 0.125)
        ok = torch.allclose(out.float(), ref_out, atol=2e-2, rtol=2e-2) and torch.allclose(lse, ref_lse, atol=2e-2)
        k, v = k[:, :, :40], v[:, :, :40]
        out, lse = op(q, k, v, 0.125, causal=True)
        tril = torch.ones(40, 40, dtype=torch.bool, device=device).tril()
        ref_out, ref_lse = attention_lse_math(q, k, v, 0.125, tril)
        return bool(ok and torch.allclose(out.float(), ref_out, atol=2e-2, rtol=2e-2)
                    and torch.allclose(lse, ref_lse, atol=2e-2))
    except (RuntimeError, TypeError, AttributeError, NotImplementedError):
        return False


def _lse_op(device: torch.device, dtype: torch.dtype, head_dim: int = 64):
    """The first fused attention-with-log-sum-exp op of :data:`PREFILL_FUSED_ORDER` that passes
    :func:`check_lse_op` for ``dtype`` and ``head_dim`` on ``device``, or None (checked once per device type,
    dtype, head size and order)."""
    if device.type != "cuda":
        return None
    key = (device.type, dtype, head_dim, tuple(PREFILL_FUSED_ORDER))
    if key not in _LSE_OP_STATUS:
        names = [n for n in PREFILL_FUSED_ORDER if n == "efficient" or dtype in (torch.float16, torch.bfloat16)]
        ops = [PREFILL_FUSED_OPS[n] for n in names]
        _LSE_OP_STATUS[key] = next((op for op in ops if check_lse_op(op, device, dtype, head_dim)), None)
    return _LSE_OP_STATUS[key]


def fused_lse_name(device: torch.device, dtype: torch.dtype, head_dim: int = 64) -> str | None:
    """Name (a key of :data:`PREFILL_FUSED_OPS`) of the fused op the prefill path uses for ``dtype`` and
    ``head_dim`` on ``device``."""
    op = _lse_op(device, dtype, head_dim)
    return next((n for n, f in PREFILL_FUSED_OPS.items() if f is op), None)


def fused_lse_available(device: torch.device, dtype: torch.dtype = torch.float16, head_dim: int = 64) -> bool:
    """Whether a fused attention-with-log-sum-exp kernel runs on ``device`` for ``dtype`` and ``head_dim`` and
    agrees with the float32 math (checked once per device type, dtype and head size on a small random case)."""
    return _lse_op(device, dtype, head_dim) is not None


def _dequantize_blocks(packed: PackedKV | None, block_size: int, inv_freq: torch.Tensor, attention_scaling: float,
                       dtype: torch.dtype, use_kernel: bool):
    """Like :func:`history_blocks` but in ``dtype``; with ``use_kernel`` one Triton pass per block
    (:mod:`kvquant_hf.kernels.dequantize`) instead of the float32 torch ops."""
    if not use_kernel or packed is None:
        for start, end, k, v in history_blocks(packed, block_size, inv_freq, attention_scaling):
            yield start, end, k.to(dtype), v.to(dtype)
        return
    from kvquant_hf.kernels.dequantize import dequantize_history_triton

    for start in range(0, packed.length, block_size):
        end = min(start + block_size, packed.length)
        yield (start, end, *dequantize_history_triton(packed, start, end, inv_freq, attention_scaling, dtype))


def _is_sink_causal(mask: torch.Tensor | None, n_sink: int, lq: int) -> bool:
    """Whether the exact-block mask ``[B, Lq, n_sink + Lq]`` is "every sink visible, the chunk causal"."""
    if mask is None or n_sink < 0 or mask.shape[-1] != n_sink + lq or mask.shape[-2] != lq:
        return False
    tril = torch.ones(lq, lq, dtype=torch.bool, device=mask.device).tril()
    return bool(mask[..., :n_sink].all()) and torch.equal(mask[..., n_sink:], tril.expand_as(mask[..., n_sink:]))


def packed_attention_prefill(
    query: torch.Tensor,
    packed: PackedKV | None,
    exact_k: torch.Tensor,
    exact_v: torch.Tensor,
    exact_mask: torch.Tensor | None,
    *,
    scaling: float,
    inv_freq: torch.Tensor,
    attention_scaling: float = 1.0,
    block_size: int | None = None,
    fused: bool | None = None,
    dequant_kernel: bool | None = None,
) -> torch.Tensor:
    """Attention of a prefill chunk over ``[packed history | exact block]`` for histories every query row sees
    in full (no left padding, no sliding window): same result as :func:`packed_attention_torch`.

    The history is dequantized ``block_size`` tokens at a time into the query dtype, keys rotated (one Triton
    pass per block, :mod:`kvquant_hf.kernels.dequantize`, when a fused kernel is used: ``dequant_kernel``), and
    attended with a fused attention kernel that also returns each row's log-sum-exp (``fused``: on CUDA
    cuDNN or FlashAttention-2 for fp16/bf16 (:data:`PREFILL_FUSED_ORDER`), memory-efficient attention for
    float32; float32 math elsewhere); the GQA
    group is folded into the query rows (every row of a KV head sees the same history). The exact block: when
    its mask is "sinks visible, chunk causal" (what chunked prefill makes), the chunk is one square causal call
    of the fused kernel and the sinks float32 math; any other mask is attended in float32 math. All parts are
    merged by their log-sum-exps. Compared with the split-K kernel, which re-reads the packed history for every
    block of query rows, the history is dequantized once per chunk and the work runs on the tensor cores.
    """
    b, hq, lq, d = query.shape
    h = exact_k.shape[1]
    if hq % h:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({h}).")
    g = hq // h
    block_size = block_size or PREFILL_HISTORY_BLOCK
    op = _lse_op(query.device, query.dtype, d) if fused is not False else None
    if fused and op is None:
        raise RuntimeError(f"fused=True but no fused attention kernel with log-sum-exp passed its check for "
                           f"{query.dtype}, head_dim {d} on {query.device}; pass fused=None (use one where it "
                           f"exists) or fused=False (float32 math).")
    use_kernel = dequant_kernel if dequant_kernel is not None else op is not None
    q = query.reshape(b, h, g * lq, d)  # rows ordered (group member, query row)
    acc: torch.Tensor | None = None  # running normalized output [B, H, M, D] float32 and its log-sum-exp [B, H, M]
    acc_lse: torch.Tensor | None = None

    if use_kernel:  # one fused Triton pass per part (in place), parts in any layout and dtype
        from kvquant_hf.kernels.dequantize import merge_lse_

        acc = torch.zeros(b, h, g * lq, d, dtype=torch.float32, device=query.device)
        acc_lse = torch.full((b, h, g * lq), float("-inf"), dtype=torch.float32, device=query.device)

    def merge(o: torch.Tensor, lse: torch.Tensor) -> None:
        nonlocal acc, acc_lse
        if use_kernel:
            merge_lse_(acc, acc_lse, o, lse, lq)
            return
        o = o.reshape(b, h, g * lq, d).to(torch.float32)
        lse = lse.reshape(b, h, g * lq)
        if acc is None:
            acc, acc_lse = o, lse
            return
        m = torch.maximum(acc_lse, lse)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        w_old, w_new = torch.exp(acc_lse - m), torch.exp(lse - m)  # 0 for a part a row does not see
        den = w_old + w_new
        acc = (acc * w_old.unsqueeze(-1) + o * w_new.unsqueeze(-1)) / den.clamp_min(1e-30).unsqueeze(-1)
        acc_lse = m + torch.log(den)

    for _, _, k, v in _dequantize_blocks(packed, block_size, inv_freq, attention_scaling, query.dtype, use_kernel):
        merge(*(op or attention_lse_math)(q, k, v, scaling))
        del k, v
    if exact_k.shape[2] > 0:
        e = exact_k.shape[2]
        n_sink = e - lq
        if op is not None and _is_sink_causal(exact_mask, n_sink, lq):
            # the chunk itself: a square causal block on the fused kernel (KV heads repeated to the query heads)
            kc = exact_k[:, :, n_sink:].repeat_interleave(g, dim=1).to(query.dtype)
            vc = exact_v[:, :, n_sink:].repeat_interleave(g, dim=1).to(query.dtype)
            o, lse = op(query, kc, vc, scaling, causal=True)
            del kc, vc
            merge(o, lse)  # [B, Hq, Lq, ...]: query heads (h, g)
            if n_sink:  # the sink tokens, seen by every row
                merge(*attention_lse_math(q, exact_k[:, :, :n_sink], exact_v[:, :, :n_sink], scaling))
        else:
            vis = None
            if exact_mask is not None:  # [B, Lq, E] -> rows (g, lq): [B, 1, G*Lq, E]
                vis = exact_mask[:, None].expand(b, g, lq, e).reshape(b, 1, g * lq, e)
            o_parts, l_parts = [], []
            for r0 in range(0, g * lq, _EXACT_ROWS):
                r1 = min(r0 + _EXACT_ROWS, g * lq)
                o, lse = attention_lse_math(q[:, :, r0:r1], exact_k, exact_v, scaling,
                                             None if vis is None else vis[:, :, r0:r1])
                o_parts.append(o)
                l_parts.append(lse)
            merge(torch.cat(o_parts, dim=2), torch.cat(l_parts, dim=2))
    if acc is None:
        return torch.zeros_like(query)
    out = torch.where(torch.isfinite(acc_lse).unsqueeze(-1), acc, torch.zeros_like(acc))
    return out.reshape(b, hq, lq, d).to(query.dtype)

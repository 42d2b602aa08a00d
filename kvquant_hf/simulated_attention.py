"""Attention over two stored sets for the simulated caches: exact and dequantized K/V, chosen per (query, key).

Query ``i`` (a cache slot: tokens stored before the call + its index in the call) attends to stored token ``j``
with the exact key iff ``key_rule`` says so, and with the exact value iff ``value_rule`` says so; everything
else is the dequantized form. The rules (:class:`ExactRule`):

* ``band(R)``: ``i - j <= R`` (``R = 0``: the diagonal; nuq's exact recent window),
* ``block(R)``: ``j >= R * (i // R)`` (KIVI's key residual, flushed in blocks of ``R``).

Every exact pair lies in the band ``j >= i - R``, so a chunk of query rows ``[a, b)`` needs exact keys/values
only for slots ``[a - R, b)``. The attention is one softmax over up to four segments, each a (key set, value set)
pair with a boolean choice per (i, j): ``(hat, hat)`` over all visible slots, ``(hat, exact)``, ``(exact, exact)``
and ``(exact, hat)`` over the band only, computed by SDPA per query chunk (fp32 scores ``chunk x kv_len`` at
most per head).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import KVQuantConfigError
from .quant import NEG_BIG


@dataclass(frozen=True)
class ExactRule:
    """Which stored tokens a query sees exact: ``kind`` "band" (``i - j <= size``) or "block"
    (``j >= size * (i // size)``)."""

    kind: str
    size: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("band", "block") or self.size < 0 or (self.kind == "block" and self.size == 0):
            raise KVQuantConfigError(f"bad exact rule {self.kind}({self.size}); use band(R >= 0) or block(R > 0).")

    @property
    def reach(self) -> int:
        """How far back (in slots) an exact token can lie: every exact ``j`` has ``j >= i - reach``."""
        return self.size

    def mask(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Bool ``[len(rows), len(cols)]``: query slot ``rows[r]`` sees slot ``cols[c]`` exact (``c <= r`` only)."""
        i, j = rows[:, None], cols[None, :]
        causal = j <= i
        if self.kind == "band":
            return causal & (i - j <= self.size)
        return causal & (j >= (i // self.size) * self.size)


def check_attention_mask(mask: torch.Tensor | None, lq: int, total: int) -> None:
    """Refuse an attention mask that is not None or 4D ``[B, 1, q_len, >= kv_len]`` for ``lq`` queries over
    ``total`` keys."""
    if mask is None:
        return
    if mask.dim() != 4:
        raise KVQuantConfigError(
            f"attention_mask must be None or 4D [B, 1, q_len, kv_len], got shape {tuple(mask.shape)}."
        )
    if mask.shape[-1] < total or mask.shape[-2] != lq:
        raise KVQuantConfigError(
            f"attention_mask has shape {tuple(mask.shape)} but this call has q_len={lq} and "
            f"kv_len={total}; build masks with cache.get_mask_sizes()."
        )


def _visibility(inputs, b: int, lq: int, r0: int, r1: int, start: int, cols: int, pos_all: torch.Tensor,
                device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(vis bool [B|1, l, cols] or None, additive float [B, l, cols] or None)`` of query rows ``r0:r1``."""
    mask = inputs.attention_mask
    add = None
    if mask is None:
        rows = torch.arange(start + r0, start + r1, device=device)
        vis = (torch.arange(cols, device=device)[None, :] <= rows[:, None])[None]
    elif mask.dtype == torch.bool:
        vis = mask[:, 0, r0:r1, :cols].to(device)
    else:
        vis = None
        add = mask[:, 0, r0:r1, :cols].to(device, torch.float32).clamp_min(NEG_BIG)
    if inputs.sliding_window is not None:
        qpos = inputs.positions.to(torch.long).expand(b, lq)[:, r0:r1]
        win = (qpos[:, :, None] - pos_all[:, None, :cols]) < inputs.sliding_window
        vis = win if vis is None else vis & win
    return vis, add


def two_set_attention(
    inputs,
    keys_hat: torch.Tensor,
    values_hat: torch.Tensor,
    keys_exact: torch.Tensor,
    values_exact: torch.Tensor,
    exact_offset: int,
    pos_all: torch.Tensor,
    start: int,
    key_rule: ExactRule,
    value_rule: ExactRule,
    exact_from: int | None,
    query_chunk: int,
) -> torch.Tensor:
    """Attention of the call's queries over exact/dequantized K/V chosen per (i, j); ``[B, L, Hq, D]``.

    Args:
        inputs: the call (:class:`~kvquant_hf.layer_api.AttendInputs`; query, mask, scaling, sliding window).
        keys_hat / values_hat: float32 ``[B, H, T, D]`` dequantized post-RoPE keys and values of every slot.
        keys_exact / values_exact: float32 ``[B, H, T - exact_offset, D]`` exact ones of slots ``exact_offset..T``
            (at least every slot within ``max(reach)`` of the call, and the call's own tokens).
        pos_all: ``[B, T]`` positions (sliding window). start: slots stored before this call.
        key_rule / value_rule: when a key / value is exact. exact_from: slots ``>= exact_from`` are exact for
            every query (the call's tokens among themselves in prompt semantics), or None.
        query_chunk: query rows per step.
    """
    query = inputs.query
    b, hq, lq, d = query.shape
    total = keys_hat.shape[2]
    mask = inputs.attention_mask
    check_attention_mask(mask, lq, total)
    q = query.to(torch.float32)
    dev = q.device
    reach = max(key_rule.reach, value_rule.reach)
    out = torch.empty(b, hq, lq, d, dtype=torch.float32, device=dev)
    step = max(1, query_chunk)
    for r0 in range(0, lq, step):
        r1 = min(lq, r0 + step)
        a, cols = start + r0, start + r1
        lo = max(0, a - reach)
        if exact_from is not None and exact_from < cols:
            lo = min(lo, exact_from)
        lo = max(lo, exact_offset)
        rows = torch.arange(a, cols, device=dev)
        band = torch.arange(lo, cols, device=dev)
        mk, mv = key_rule.mask(rows, band), value_rule.mask(rows, band)
        if exact_from is not None:
            late = (band >= exact_from)[None, :] & (band[None, :] <= rows[:, None])
            mk, mv = mk | late, mv | late
        vis, add = _visibility(inputs, b, lq, r0, r1, start, cols, pos_all, dev)
        hat_sel = torch.ones(r1 - r0, cols, dtype=torch.bool, device=dev)
        hat_sel[:, lo:] = ~(mk | mv)
        e0, e1 = lo - exact_offset, cols - exact_offset
        segs = [(keys_hat[:, :, :cols], values_hat[:, :, :cols], hat_sel, slice(0, cols))]
        for sel, ks, vs in (
            (mk & mv, keys_exact[:, :, e0:e1], values_exact[:, :, e0:e1]),
            (~mk & mv, keys_hat[:, :, lo:cols], values_exact[:, :, e0:e1]),
            (mk & ~mv, keys_exact[:, :, e0:e1], values_hat[:, :, lo:cols]),
        ):
            if bool(sel.any()):
                segs.append((ks, vs, sel, slice(lo, cols)))
        k_cat = torch.cat([s[0] for s in segs], dim=2) if len(segs) > 1 else segs[0][0]
        v_cat = torch.cat([s[1] for s in segs], dim=2) if len(segs) > 1 else segs[0][1]
        sel_parts, add_parts = [], []
        for _, _, sel, span in segs:
            part = sel[None] if vis is None else sel[None] & vis[:, :, span]
            sel_parts.append(part)
            if add is not None:
                add_parts.append(add[:, :, span])
        sel_cat = torch.cat(sel_parts, dim=-1)  # [B|1, l, n]
        if add is None and mask is None:
            attn_mask = sel_cat[:, None]  # every row sees its own token: never empty
        else:
            base = torch.cat(add_parts, dim=-1) if add is not None else torch.zeros(sel_cat.shape, device=dev)
            attn_mask = base.masked_fill(~sel_cat, NEG_BIG)[:, None]
        out[:, :, r0:r1] = F.scaled_dot_product_attention(
            q[:, :, r0:r1], k_cat, v_cat, attn_mask=attn_mask, scale=inputs.scaling, enable_gqa=hq != k_cat.shape[1]
        )
    return out.transpose(1, 2).to(query.dtype)


def _flash_with_lse(q, k, v, causal: bool, mask: torch.Tensor | None, scale: float):
    """``(out, logsumexp)`` of attention (keys repeated for GQA), from the CPU flash kernel."""
    g = q.shape[1] // k.shape[1]
    if g > 1:
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    out, lse = _FLASH_CPU(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)
    return out, lse


_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def first_call_fast_path_available(device: torch.device) -> bool:
    """Whether :func:`two_set_attention_first_call` can run here (CPU flash kernel with log-sum-exp)."""
    return _FLASH_CPU is not None and device.type == "cpu"


def two_set_attention_first_call(
    query: torch.Tensor,
    keys_hat: torch.Tensor,
    values_hat: torch.Tensor,
    keys_exact: torch.Tensor,
    values_exact: torch.Tensor,
    scaling: float,
    key_rule: ExactRule,
    value_rule: ExactRule,
    band_chunk: int = 256,
) -> torch.Tensor:
    """:func:`two_set_attention` for a first call with a plain causal mask (the perplexity window), faster.

    Every exact pair lies in ``i - reach <= j <= i``, so query ``i`` sees slots ``j <= i - reach - 1`` dequantized
    (key and value): one causal flash attention of queries ``reach + 1..`` over the dequantized slots ``..L - reach
    - 2``. The band ``[i - reach, i]`` is attended per chunk of rows over its (key, value) segments; the two parts
    are merged by their log-sum-exp. Returns ``[B, L, Hq, D]``.
    """
    b, hq, lq, d = query.shape
    q = query.to(torch.float32)
    dev = q.device
    reach = max(key_rule.reach, value_rule.reach)
    out = torch.empty(b, hq, lq, d, dtype=torch.float32, device=dev)
    lse = torch.empty(b, hq, lq, dtype=torch.float32, device=dev)
    for r0 in range(0, lq, band_chunk):
        r1 = min(lq, r0 + band_chunk)
        lo = max(0, r0 - reach)
        rows, band = torch.arange(r0, r1, device=dev), torch.arange(lo, r1, device=dev)
        near = (band[None, :] <= rows[:, None]) & (band[None, :] >= rows[:, None] - reach)
        mk, mv = key_rule.mask(rows, band), value_rule.mask(rows, band)
        segs = []
        for sel, ks, vs in (
            (near & ~(mk | mv), keys_hat, values_hat),
            (mk & mv, keys_exact, values_exact),
            (~mk & mv, keys_hat, values_exact),
            (mk & ~mv, keys_exact, values_hat),
        ):
            if bool(sel.any()):
                segs.append((ks[:, :, lo:r1], vs[:, :, lo:r1], sel))
        k_cat = torch.cat([x[0] for x in segs], dim=2)
        v_cat = torch.cat([x[1] for x in segs], dim=2)
        add = torch.zeros(r1 - r0, k_cat.shape[2], dtype=torch.float32, device=dev)
        add.masked_fill_(~torch.cat([x[2] for x in segs], dim=-1), NEG_BIG)
        o, l_ = _flash_with_lse(q[:, :, r0:r1].contiguous(), k_cat, v_cat, False, add[None, None], scaling)
        out[:, :, r0:r1], lse[:, :, r0:r1] = o, l_
    f0 = reach + 1  # first query row with a dequantized far part
    if lq > f0:
        n = lq - f0
        o_far, l_far = _flash_with_lse(q[:, :, f0:].contiguous(), keys_hat[:, :, :n].contiguous(),
                                       values_hat[:, :, :n].contiguous(), True, None, scaling)
        l_near = lse[:, :, f0:]
        m = torch.maximum(l_far, l_near)
        w_far, w_near = torch.exp(l_far - m), torch.exp(l_near - m)
        out[:, :, f0:] = (w_far[..., None] * o_far + w_near[..., None] * out[:, :, f0:]) / (w_far + w_near)[..., None]
    return out.transpose(1, 2).to(query.dtype)


__all__ = ["ExactRule", "check_attention_mask", "first_call_fast_path_available", "two_set_attention",
           "two_set_attention_first_call"]

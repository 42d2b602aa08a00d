"""Simulated (quantize-dequantize) KV caches for the perplexity harness: nuqX, intX, KIVI and fp16.

Method specifications, nuq parameters and the fast quantize-dequantize functions are in
:mod:`kvquant_hf.simulated_methods` (re-exported here). A :class:`SimulatedQuantCache` is a transformers ``Cache`` whose layers implement the layer contract of
:mod:`kvquant_hf.layer_api` (``attend``) with float storage: every token is stored as the dequantized
form of *exactly* what the real :class:`~kvquant_hf.cache.KVQuantCache` stores (same
:mod:`kvquant_hf.quant` functions, same outlier slots, same sink, same RoPE on dequantized pre-RoPE keys).

Semantics (the real cache decoding token by token): within one call, query token ``i`` attends to the quantized
K/V of every stored token and of the new tokens ``j < i``, and to its *own* exact K/V (``j == i``);
then the new tokens are stored. A whole window in one forward therefore equals token-by-token decoding
through the real cache, at the cost of one masked attention::

    s_ij = q_i . k_hat_j          (j != i)        s_ii = q_i . k_i
    out_i = sum_j p_ij v_hat_j + p_ii (v_i - v_hat_i)

With an exact recent window (nuq ``recent_window = R``) and for KIVI, the choice between the exact and the
dequantized key (and, separately, value) is made per (i, j) by the layer's ``key_rule`` / ``value_rule``
(:mod:`kvquant_hf.simulated_attention`); nuq: ``i - j <= R`` for both (``R = 0``: the diagonal above).

For a prompt given to the real cache in one call (its tokens see each other exactly), switch the next call
with ``cache.set_within_call("exact")``; ``kvquant_hf.evaluation`` does this for ``--prefill``.

Methods:

* ``nuq``: pre-RoPE keys, per-channel calibrated thresholds ``[H_kv, D]``, nuqX lookup table, outlier
  slots (``quant.quantize_keys``); values per token with online thresholds and slots
  (``quant.quantize_values``); first ``sink_tokens`` tokens exact; optional Q-Norm folded into the
  tables. Research-only variants (``key_granularity="token"``, ``key_rope="post"``) serve the ablation.
* ``int``: uniform asymmetric intX, one scale/zero per head vector, on post-RoPE keys and on values
  (``quant.fake_quant_int_per_token``).
* ``kivi``: KIVI at its published defaults (``kiviX``; ``-g64``/``-g128`` key groups), decode-equivalent:
  post-RoPE keys per channel over groups of ``G`` tokens, values per token in groups of ``min(G, D)`` channels,
  fp16 scale/zero (``quant.kivi_fake_quant_keys/values``), a residual of ``R = 128`` tokens: key ``j`` exact for
  query ``i`` iff ``j >= R * (i // R)`` (flushed in blocks), value ``j`` iff ``i - j <= R`` (sliding).
  ``kiviX-oneshot``: groups formed within each call, no residual (``quant.fake_quant_kivi_keys/values``).
* ``fp16``: no quantization (the model's dtype): equals the unpatched model.

Example:
    >>> from kvquant_hf.models import patch_model
    >>> from kvquant_hf.simulated import build_simulated_cache
    >>> patch_model(model)  # doctest: +SKIP
    >>> cache = build_simulated_cache(model, "nuq4", signposts="/work/signposts/smollm2-1pct")  # doctest: +SKIP
    >>> logits = model(input_ids, cache=cache).logits  # doctest: +SKIP

Paper: KVQuant, https://arxiv.org/abs/2401.18079.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin

from . import quant
from .attention import NEG_BIG, rope_rotate
from .config import default_outlier_slots
from .errors import KVQuantConfigError, SignpostError
from .layer_api import AttendInputs, apply_rope
from .simulated_attention import (
    ExactRule,
    check_attention_mask,
    first_call_fast_path_available,
    two_set_attention,
    two_set_attention_first_call,
)
from .simulated_methods import (
    METHOD_FAMILIES,
    METHOD_NAMES,
    MethodSpec,
    NuqLayerParams,
    fake_quant_keys,
    fake_quant_values,
    load_signposts_for,
    method_avg_bits,
    nuq_params_from_signposts,
    parse_method,
)


# --------------------------------------------------------------------------------------------
# layers
# --------------------------------------------------------------------------------------------
class SimulatedLayer(CacheLayerMixin):
    """One layer of a simulated cache: float storage of the dequantized history + ``attend``.

    ``keys`` holds the dequantized history *after* RoPE (float32 ``[B, H, S, D]``), ``values`` the
    dequantized values, ``positions`` ``[B, S]``. Subclasses implement :meth:`simulate`.
    """

    is_sliding = False
    is_compileable = False
    exact = False  # True: no quantization at all (fp16)
    #: when a query sees a stored key / value exact (None: only its own token, the diagonal fast path)
    key_rule: ExactRule | None = None
    value_rule: ExactRule | None = None

    def __init__(self, spec: MethodSpec, query_chunk: int = 1024):
        super().__init__()
        self.spec = spec
        self.query_chunk = query_chunk
        self.positions: torch.Tensor | None = None
        self.n_real: torch.Tensor | None = None
        #: "quantized": new tokens see earlier new tokens quantized (decode-equivalent, the default);
        #: "exact": they see each other exactly (what the real cache does within a prompt call)
        self.within_call = "quantized"
        self.use_sdpa = True  # fused fast path for a first call without padding (see _attention_sdpa)

    # ---- CacheLayerMixin -------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.device = key_states.device
        self.keys = torch.zeros(b, h, 0, d, dtype=torch.float32, device=self.device)
        self.values = torch.zeros(b, h, 0, value_states.shape[-1], dtype=torch.float32, device=self.device)
        self.positions = torch.zeros(b, 0, dtype=torch.long, device=self.device)
        self.n_real = torch.zeros(b, dtype=torch.long, device=self.device)  # real (non-padding) tokens stored
        # exact post-RoPE keys / values of slots exact_offset.. (the ones a later query may still see exact)
        self.keys_exact = torch.zeros(b, h, 0, d, dtype=torch.float32, device=self.device)
        self.values_exact = torch.zeros(b, h, 0, value_states.shape[-1], dtype=torch.float32, device=self.device)
        self.exact_offset = 0
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        raise KVQuantConfigError(
            "a SimulatedQuantCache only works with kvquant-patched attention (it attends itself); call "
            "kvquant_hf.models.patch_model(model) before the forward."
        )

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return 0 if not self.is_initialized else self.keys.shape[-2]

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = self.positions = self.n_real = None
        self.keys_exact = self.values_exact = None
        self.exact_offset = 0
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.get_seq_length() > 0:
            super().reorder_cache(beam_idx)
            self.positions = self.positions.index_select(0, beam_idx.to(self.positions.device))
            self.n_real = self.n_real.index_select(0, beam_idx.to(self.n_real.device))
            self.keys_exact = self.keys_exact.index_select(0, beam_idx.to(self.keys_exact.device))
            self.values_exact = self.values_exact.index_select(0, beam_idx.to(self.values_exact.device))

    # ---- simulation ------------------------------------------------------------------------
    def simulate(
        self, key: torch.Tensor, key_rot: torch.Tensor, value: torch.Tensor, inputs: AttendInputs, start: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized ``(keys after RoPE, values)`` float32 ``[B, H, L, D]`` of the new tokens.

        Args:
            key: pre-RoPE new keys (model dtype). key_rot: the same after RoPE (as the stock model).
            value: new values. inputs: the call. start: tokens stored before this call.
        """
        raise NotImplementedError

    def _sink_mask(self, inputs: AttendInputs, start: int) -> torch.Tensor | None:
        """Bool ``[B, L]``: new tokens that belong to the sink (the first ``sink_tokens`` *real* tokens of
        each row, padding excluded, as the real cache keeps them), or None when there are none."""
        if self.spec.sink_tokens <= 0 or self.exact:
            return None
        b, lq = inputs.key.shape[0], inputs.key.shape[2]
        mask = inputs.attention_mask
        if mask is None:
            real = torch.ones(b, lq, dtype=torch.bool, device=inputs.key.device)
        else:
            idx = torch.arange(lq, device=mask.device)
            diag = mask[:, 0, idx, start + idx]  # each token sees itself unless it is padding
            real = diag if diag.dtype == torch.bool else diag.to(torch.float32) > NEG_BIG / 2
            real = real.expand(b, lq).to(inputs.key.device)
        rank = self.n_real[:, None] + torch.cumsum(real.to(torch.long), dim=1)
        sink = real & (rank <= self.spec.sink_tokens)
        self.n_real = self.n_real + real.sum(1)
        return sink if bool(sink.any()) else None

    @staticmethod
    def _apply_sink(k_hat: torch.Tensor, v_hat: torch.Tensor, key_rot: torch.Tensor, value: torch.Tensor,
                    sink: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if sink is None:
            return k_hat, v_hat
        sel = sink[:, None, :, None]
        return (torch.where(sel, key_rot.to(torch.float32), k_hat), torch.where(sel, value.to(torch.float32), v_hat))

    def attend(self, inputs: AttendInputs) -> torch.Tensor:
        """Attend (diagonal exact, history and earlier new tokens quantized), then store; ``[B, L, Hq, D]``."""
        query, key, value = inputs.query, inputs.key, inputs.value
        b, hq, lq, _ = query.shape
        h = key.shape[1]
        if hq % h:
            raise KVQuantConfigError(f"query heads ({hq}) must be a multiple of kv heads ({h}).")
        if not self.is_initialized:
            self.lazy_initialization(key, value)
        start = self.get_seq_length()
        cos, sin = inputs.rope.cos, inputs.rope.sin
        key_rot = apply_rope(key, cos.to(key.dtype), sin.to(key.dtype))  # exactly as the stock model
        positions = inputs.positions.to(torch.long).expand(b, lq)
        if self.exact:
            k_hat, v_hat = key_rot.to(torch.float32), value.to(torch.float32)
        else:
            sink = self._sink_mask(inputs, start)
            k_hat, v_hat = self.simulate(key, key_rot, value, inputs, start)
            k_hat, v_hat = self._apply_sink(k_hat, v_hat, key_rot, value, sink)
        keys_all = torch.cat([self.keys, k_hat], dim=2)  # [B, H, T, D]
        values_all = torch.cat([self.values, v_hat], dim=2)
        pos_all = torch.cat([self.positions, positions], dim=1)  # [B, T]
        if self.key_rule is not None and not self.exact:
            out = self._attend_two_sets(inputs, key_rot, value, keys_all, values_all, pos_all, start)
            self.keys, self.values, self.positions = keys_all, values_all, pos_all
            return out
        window = inputs.sliding_window
        if start == 0 and inputs.attention_mask is None and (window is None or window >= lq) and self.use_sdpa:
            exact_call = self.exact or self.within_call == "exact"
            out = self._attention_sdpa(inputs, key_rot, value, k_hat, v_hat, diag_fix=not exact_call)
        elif self.within_call == "exact" and not self.exact:
            # real-cache prompt semantics: the new tokens see each other exactly, the history quantized
            keys_att = torch.cat([self.keys, key_rot.to(torch.float32)], dim=2)
            values_att = torch.cat([self.values, value.to(torch.float32)], dim=2)
            out = self._attention(inputs, key_rot, value, keys_att, values_att, pos_all, start, diag_fix=False)
        else:
            out = self._attention(inputs, key_rot, value, keys_all, values_all, pos_all, start,
                                  diag_fix=not self.exact)
        self.keys, self.values, self.positions = keys_all, values_all, pos_all
        return out

    def _attend_two_sets(self, inputs: AttendInputs, key_rot: torch.Tensor, value: torch.Tensor,
                         keys_all: torch.Tensor, values_all: torch.Tensor, pos_all: torch.Tensor,
                         start: int) -> torch.Tensor:
        """Attention with exact/dequantized K/V per (i, j) by ``key_rule`` / ``value_rule``; keeps the exact tail."""
        k_ex = torch.cat([self.keys_exact, key_rot.to(torch.float32)], dim=2)
        v_ex = torch.cat([self.values_exact, value.to(torch.float32)], dim=2)
        exact_from = start if self.within_call == "exact" else None
        window = inputs.sliding_window
        lq = key_rot.shape[2]
        if (start == 0 and inputs.attention_mask is None and (window is None or window >= lq) and self.use_sdpa
                and exact_from is None and first_call_fast_path_available(keys_all.device)):
            out = two_set_attention_first_call(inputs.query, keys_all, values_all, k_ex, v_ex, inputs.scaling,
                                               self.key_rule, self.value_rule)
        else:
            out = two_set_attention(inputs, keys_all, values_all, k_ex, v_ex, self.exact_offset, pos_all, start,
                                    self.key_rule, self.value_rule, exact_from, self.query_chunk)
        reach = max(self.key_rule.reach, self.value_rule.reach)
        total = keys_all.shape[2]
        keep_from = max(self.exact_offset, total - reach)
        cut = keep_from - self.exact_offset
        self.keys_exact, self.values_exact = k_ex[:, :, cut:], v_ex[:, :, cut:]
        self.exact_offset = keep_from
        return out

    @staticmethod
    def _attention_sdpa(
        inputs: AttendInputs,
        key_rot: torch.Tensor,
        value: torch.Tensor,
        k_hat: torch.Tensor,
        v_hat: torch.Tensor,
        diag_fix: bool,
    ) -> torch.Tensor:
        """Fused path for a first call with a plain causal mask (the perplexity window), via SDPA.

        Without ``diag_fix`` it is causal SDPA over the exact keys. With it, the diagonal-exact attention is one
        causal SDPA over keys shifted by one with an extra channel: key 0 is a *reference* key ``[0, .., 0, 1]``
        and query ``i`` carries ``q_i . k_i`` in the extra channel, so its score with the reference key is the
        exact diagonal score ``s_ii``; keys ``1..L-1`` are ``[k_hat_{0..L-2}, 0]``, so the causal mask lets
        query ``i`` see exactly ``k_hat_{j<i}`` plus the reference. The reference value ``[0, .., 0, 1]`` returns
        ``p_ii`` in the extra channel: ``out_i = o_i[:D] + p_ii * v_i``.
        """
        query = inputs.query
        b, hq, lq, d = query.shape
        h = key_rot.shape[1]
        g = hq // h
        q = query.to(torch.float32)
        k_exact = key_rot.to(torch.float32)
        v_exact = value.to(torch.float32)
        if not diag_fix:
            k, v = k_exact, v_exact
            if g > 1:
                k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=inputs.scaling)
            return out.transpose(1, 2).to(query.dtype)
        qk = (q.reshape(b, h, g, lq, d) * k_exact[:, :, None]).sum(-1).reshape(b, hq, lq, 1)
        q_aug = torch.cat([q, qk], dim=-1)
        ref = torch.zeros(b, h, 1, d + 1, dtype=torch.float32, device=q.device)
        ref[..., d] = 1.0
        zeros = torch.zeros(b, h, lq - 1, 1, dtype=torch.float32, device=q.device)
        k_aug = torch.cat([ref, torch.cat([k_hat[:, :, : lq - 1], zeros], dim=-1)], dim=2)
        v_aug = torch.cat([ref, torch.cat([v_hat[:, :, : lq - 1], zeros], dim=-1)], dim=2)
        if g > 1:
            k_aug, v_aug = k_aug.repeat_interleave(g, dim=1), v_aug.repeat_interleave(g, dim=1)
            v_exact = v_exact.repeat_interleave(g, dim=1)
        o = F.scaled_dot_product_attention(q_aug, k_aug, v_aug, is_causal=True, scale=inputs.scaling)
        out = o[..., :d] + o[..., d:] * v_exact
        return out.transpose(1, 2).to(query.dtype)

    def _attention(
        self,
        inputs: AttendInputs,
        key_rot: torch.Tensor,
        value: torch.Tensor,
        keys_all: torch.Tensor,
        values_all: torch.Tensor,
        pos_all: torch.Tensor,
        start: int,
        diag_fix: bool = True,
    ) -> torch.Tensor:
        query = inputs.query
        b, hq, lq, d = query.shape
        h = keys_all.shape[1]
        g = hq // h
        total = keys_all.shape[2]
        mask = inputs.attention_mask
        check_attention_mask(mask, lq, total)
        if mask is not None:
            mask = mask[..., :total]
        q = query.to(torch.float32).reshape(b, h, g, lq, d)
        k_exact = key_rot.to(torch.float32)  # [B, H, L, D]
        v_exact = value.to(torch.float32)
        v_delta = v_exact - values_all[:, :, start:] if diag_fix else None
        out = torch.empty(b, h, g, lq, d, dtype=torch.float32, device=query.device)
        step = max(1, self.query_chunk)
        for r0 in range(0, lq, step):
            r1 = min(lq, r0 + step)
            cols = start + r1  # keys beyond the last row's own token are never visible (causal)
            qc = q[:, :, :, r0:r1]
            s = torch.einsum("bhgld,bhtd->bhglt", qc, keys_all[:, :, :cols]) * inputs.scaling
            if diag_fix:
                exact = (qc * k_exact[:, :, None, r0:r1]).sum(-1) * inputs.scaling  # [B, H, g, l]
                s[..., start + r0 : start + r1].diagonal(dim1=-2, dim2=-1).copy_(exact)
            rows = torch.arange(r0, r1, device=query.device)
            if mask is None:
                vis = (torch.arange(cols, device=query.device)[None, :] <= (start + rows)[:, None])[None]  # [1, l, t]
            elif mask.dtype == torch.bool:
                vis = mask[:, 0, r0:r1, :cols]
            else:
                vis = None
                s = s + mask[:, :, r0:r1, :cols].to(torch.float32).unsqueeze(1)
            if inputs.sliding_window is not None:
                qpos = inputs.positions.to(torch.long).expand(b, lq)[:, r0:r1]
                win = (qpos[:, :, None] - pos_all[:, None, :cols]) < inputs.sliding_window
                vis = win if vis is None else vis & win
            if vis is not None:
                s = s.masked_fill(~vis[:, None, None], NEG_BIG)
            p = torch.softmax(s, dim=-1)
            o = torch.einsum("bhglt,bhtd->bhgld", p, values_all[:, :, :cols])
            if v_delta is not None:
                p_diag = p[..., start + r0 : start + r1].diagonal(dim1=-2, dim2=-1)  # [B, H, g, l]
                o = o + p_diag.unsqueeze(-1) * v_delta[:, :, None, r0:r1]
            out[:, :, :, r0:r1] = o
        return out.reshape(b, hq, lq, d).transpose(1, 2).to(query.dtype)


class FP16Layer(SimulatedLayer):
    """No quantization: plain causal attention over the exact keys and values."""

    exact = True


class IntLayer(SimulatedLayer):
    """Uniform asymmetric intX per head vector on post-RoPE keys and on values."""

    def simulate(self, key, key_rot, value, inputs, start):
        bits = int(self.spec.bits)
        k_hat = quant.fake_quant_int_per_token(key_rot.to(torch.float32), bits)
        v_hat = quant.fake_quant_int_per_token(value.to(torch.float32), bits)
        return k_hat, v_hat


class KiviOneShotLayer(SimulatedLayer):
    """KIVI-style one-shot baseline (``kiviX-oneshot``): post-RoPE keys per channel in groups of ``kivi_group``
    tokens of the call, values per token, no residual."""

    def simulate(self, key, key_rot, value, inputs, start):
        bits = int(self.spec.bits)
        k_hat = quant.fake_quant_kivi_keys(key_rot.to(torch.float32), bits, group=self.spec.kivi_group)
        v_hat = quant.fake_quant_kivi_values(value.to(torch.float32), bits)
        return k_hat, v_hat


class KiviLayer(SimulatedLayer):
    """KIVI (``kiviX``), decode-equivalent: keys per channel over groups of ``G`` tokens aligned at multiples of
    ``G`` from the first cache slot, quantized once their group is complete (possibly in a later call); values per
    token in groups of ``min(G, D)`` channels; residual ``R``: key ``j`` exact for query ``i`` iff
    ``j >= R * (i // R)``, value ``j`` iff ``i - j <= R``.

    Groups count cache slots, so in a left-padded batch the padding slots count (and join the first groups' ranges)
    as in KIVI's own batched code."""

    def __init__(self, spec: MethodSpec, query_chunk: int = 1024):
        super().__init__(spec, query_chunk)
        r = int(spec.recent_window)
        self.key_rule, self.value_rule = ExactRule("block", r), ExactRule("band", r)

    def simulate(self, key, key_rot, value, inputs, start):
        bits, g = int(self.spec.bits), self.spec.kivi_group
        g0 = (start // g) * g  # first slot of the group still open before this call
        prev = self.keys_exact[:, :, g0 - self.exact_offset : start - self.exact_offset]
        seq = torch.cat([prev, key_rot.to(torch.float32)], dim=2)
        n_full = (seq.shape[2] // g) * g
        hat = seq.clone()  # tokens of an open group are only ever seen exact (they are in the residual)
        if n_full:
            hat[:, :, :n_full] = quant.kivi_fake_quant_keys(seq[:, :, :n_full], bits, g)
        if start > g0:
            self.keys[:, :, g0:start] = hat[:, :, : start - g0]
        v_hat = quant.kivi_fake_quant_values(value, bits, g)
        return hat[:, :, start - g0 :], v_hat


class NuqLayer(SimulatedLayer):
    """KVQuant nuqX: exactly what ``KVQuantCache`` stores, dequantized (see module docstring)."""

    def __init__(self, spec: MethodSpec, params: NuqLayerParams, outlier_fraction: float = 0.01,
                 query_chunk: int = 1024):
        super().__init__(spec, query_chunk)
        self.params = params
        if spec.recent_window:
            self.key_rule = self.value_rule = ExactRule("band", int(spec.recent_window))
        self.outlier_fraction = outlier_fraction
        self.n_clipped = 0  # key outliers beyond the slots, clipped to the threshold (counted)
        self.n_keys = 0
        self._lower, self._upper = params.key_lower, params.key_upper

    def _key_thresholds(self, k: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._lower is None or self._upper is None:
            # uncalibrated: thresholds from the first call's keys (the prompt), sink excluded
            skip = max(0, min(self.spec.sink_tokens - start, k.shape[2] - 1))
            self._lower, self._upper = quant.key_thresholds_from_sample(k[:, :, skip:], self.outlier_fraction)
        return self._lower.to(k.device), self._upper.to(k.device)

    def reset(self) -> None:
        super().reset()
        self._lower, self._upper = self.params.key_lower, self.params.key_upper

    def simulate(self, key, key_rot, value, inputs, start):
        spec, p = self.spec, self.params
        bits, slots = int(spec.bits), spec.outlier_slots
        k_src = key if spec.key_rope == "pre" else key_rot
        k_lut, v_lut = p.key_lut.to(key.device), p.value_lut.to(key.device)
        if spec.key_granularity == "channel":
            lower, upper = self._key_thresholds(k_src, start)
            k_hat, n_clipped = fake_quant_keys(k_src, k_lut, lower, upper, slots, bits)
            self.n_clipped += n_clipped
            self.n_keys += k_src.shape[0] * k_src.shape[1] * k_src.shape[2]
        else:
            k_hat = fake_quant_values(k_src, k_lut, slots, bits)
        if spec.key_rope == "pre":
            # RoPE on the dequantized keys, as the real cache does for its history (float32 math)
            k_hat = rope_rotate(k_hat, inputs.positions.expand(key.shape[0], -1), inputs.rope.inv_freq,
                                inputs.rope.attention_scaling)
        v_hat = fake_quant_values(value, v_lut, slots, bits)
        if spec.quantize == "values":
            k_hat = key_rot.to(torch.float32)
        elif spec.quantize == "keys":
            v_hat = value.to(torch.float32)
        return k_hat, v_hat


# --------------------------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------------------------
class SimulatedQuantCache(Cache):
    """A transformers ``Cache`` of :class:`SimulatedLayer` s (one per decoder layer).

    Use it with a model patched by :func:`kvquant_hf.models.patch_model`; build it with
    :func:`build_simulated_cache`. It supports any sequence of calls (a window in one forward, prefill
    then decode, ...); storage is float, so it is meant for evaluation, not for memory savings.
    """

    def __init__(self, layers: Sequence[SimulatedLayer], spec: MethodSpec):
        super().__init__(layers=list(layers))
        self.spec = spec

    def set_within_call(self, mode: str) -> None:
        """How the new tokens of the next calls see each other: "quantized" (default: one call equals
        token-by-token decoding) or "exact" (the real cache's prompt semantics: exact among themselves)."""
        if mode not in ("quantized", "exact"):
            raise KVQuantConfigError(f"within-call mode {mode!r} is not supported; use 'quantized' or 'exact'.")
        for layer in self.layers:
            layer.within_call = mode

    @property
    def n_clipped(self) -> int:
        """Key outliers beyond the slots (clipped), summed over layers (nuq only)."""
        return int(sum(getattr(layer, "n_clipped", 0) for layer in self.layers))

    @property
    def n_keys(self) -> int:
        return int(sum(getattr(layer, "n_keys", 0) for layer in self.layers))


def _num_layers_and_head_dim(model: Any) -> tuple[int, int]:
    cfg = getattr(model, "config", model)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return int(cfg.num_hidden_layers), int(head_dim)


def build_simulated_cache(
    model: Any,
    method: str | MethodSpec,
    *,
    signposts: Any = None,
    nuq_params: Sequence[NuqLayerParams] | None = None,
    outlier_fraction: float = 0.01,
    outlier_slots: int | None = None,
    sink_tokens: int = 1,
    qnorm: bool = False,
    recent_window: int | None = None,
    query_chunk: int = 1024,
) -> SimulatedQuantCache:
    """Build a :class:`SimulatedQuantCache` for ``model`` (or its config).

    Args:
        model: the (patched) causal LM, or its config.
        method: "fp16", "nuqX", "intX", "kiviX" (also "kiviX-g64", "kiviX-g128", "kiviX-oneshot") or a
            :class:`MethodSpec` (then the nuq keyword
            arguments below are ignored: the spec says it all).
        signposts: for nuq: a folder (``nuqX`` subfolder or its parent), a loaded ``Signposts`` object,
            or ``{bits: Signposts}``. None with ``nuq_params=None`` means uncalibrated: NormalFloat tables
            and key thresholds from the first call (the prompt) at ``outlier_fraction``.
        nuq_params: explicit per-layer :class:`NuqLayerParams` (research/ablation; overrides ``signposts``).
        outlier_fraction: sets the default slots (``ceil(fraction * head_dim)``, 0 for 0%).
        outlier_slots: slots per token and head (overrides the fraction).
        sink_tokens: first tokens kept exact (nuq).
        qnorm: use Q-Norm tables (nuq).
        recent_window: exact recent tokens ``R`` (nuq; None: the cache's default, 128): query ``i`` sees token
            ``j`` exact iff ``i - j <= R``. KIVI keeps its own residual of 128.
        query_chunk: query rows per attention step (bounds memory at ``chunk x kv_len`` scores).
    """
    n_layers, head_dim = _num_layers_and_head_dim(model)
    slots = outlier_slots if outlier_slots is not None else default_outlier_slots(outlier_fraction, head_dim)
    spec = parse_method(method, outlier_slots=slots, sink_tokens=sink_tokens, qnorm=qnorm,
                        recent_window=recent_window)
    if spec.family == "fp16":
        return SimulatedQuantCache([FP16Layer(spec, query_chunk) for _ in range(n_layers)], spec)
    if spec.family == "int":
        return SimulatedQuantCache([IntLayer(spec, query_chunk) for _ in range(n_layers)], spec)
    if spec.family == "kivi":
        cls = KiviOneShotLayer if spec.kivi_oneshot else KiviLayer
        return SimulatedQuantCache([cls(spec, query_chunk) for _ in range(n_layers)], spec)
    bits = int(spec.bits)
    if nuq_params is None:
        if signposts is None:
            nf = quant.normal_float_signposts(bits)
            nuq_params = [NuqLayerParams(nf.clone(), nf.clone()) for _ in range(n_layers)]
        else:
            if isinstance(signposts, dict):
                if bits not in signposts:
                    raise SignpostError(f"no signposts for {bits} bits in the dict (keys {sorted(signposts)}).")
                signposts = signposts[bits]
            if isinstance(signposts, (str, os.PathLike)):
                signposts = load_signposts_for(str(signposts), bits)
            nuq_params = nuq_params_from_signposts(signposts, qnorm=spec.qnorm)
    if len(nuq_params) != n_layers:
        raise SignpostError(f"got quantizer parameters for {len(nuq_params)} layers, the model has {n_layers}.")
    for i, p in enumerate(nuq_params):
        if p.key_lut.numel() != 2**bits or p.value_lut.numel() != 2**bits:
            raise SignpostError(
                f"layer {i}: lookup tables have {p.key_lut.numel()}/{p.value_lut.numel()} entries, nuq{bits} needs "
                f"{2**bits}; load the nuq{bits} signposts."
            )
    layers = [NuqLayer(spec, p, outlier_fraction, query_chunk) for p in nuq_params]
    return SimulatedQuantCache(layers, spec)


__all__ = [
    "METHOD_FAMILIES",
    "METHOD_NAMES",
    "FP16Layer",
    "IntLayer",
    "KiviLayer",
    "KiviOneShotLayer",
    "MethodSpec",
    "NuqLayer",
    "NuqLayerParams",
    "SimulatedLayer",
    "SimulatedQuantCache",
    "build_simulated_cache",
    "fake_quant_keys",
    "fake_quant_values",
    "load_signposts_for",
    "method_avg_bits",
    "nuq_params_from_signposts",
    "parse_method",
]

"""Simulated (quantize-dequantize) KV caches for the perplexity harness: nuqX, intX, KIVI and fp16.

A :class:`SimulatedQuantCache` is a transformers ``Cache`` whose layers implement the layer contract of
:mod:`kvquant_hf.layer_api` (``attend``) with float storage: every token is stored as the dequantized
form of *exactly* what the real :class:`~kvquant_hf.cache.KVQuantCache` stores (same
:mod:`kvquant_hf.quant` functions, same outlier slots, same sink, same RoPE on dequantized pre-RoPE keys).

Semantics (the real cache decoding token by token): within one call, query token ``i`` attends to the quantized
K/V of every stored token and of the new tokens ``j < i``, and to its *own* exact K/V (``j == i``);
then the new tokens are stored. A whole window in one forward therefore equals token-by-token decoding
through the real cache, at the cost of one masked attention::

    s_ij = q_i . k_hat_j          (j != i)        s_ii = q_i . k_i
    out_i = sum_j p_ij v_hat_j + p_ii (v_i - v_hat_i)

For a prompt given to the real cache in one call (its tokens see each other exactly), switch the next call
with ``cache.set_within_call("exact")``; ``kvquant_hf.evaluation`` does this for ``--prefill``.

Methods:

* ``nuq``: pre-RoPE keys, per-channel calibrated thresholds ``[H_kv, D]``, nuqX lookup table, outlier
  slots (``quant.quantize_keys``); values per token with online thresholds and slots
  (``quant.quantize_values``); first ``sink_tokens`` tokens exact; optional Q-Norm folded into the
  tables. Research-only variants (``key_granularity="token"``, ``key_rope="post"``) serve the ablation.
* ``int``: uniform asymmetric intX, one scale/zero per head vector, on post-RoPE keys and on values
  (``quant.fake_quant_int_per_token``).
* ``kivi``: KIVI-style: post-RoPE keys per channel over groups of 32 consecutive tokens of a call,
  values per token (``quant.fake_quant_kivi_keys/values``). Groups are formed within each call (no fp16
  residual window), so KIVI is the usual one-shot fake-quant baseline, not decode-equivalent.
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
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin

from . import quant
from .attention import rope_rotate
from .config import default_outlier_slots
from .errors import KVQuantConfigError, SignpostError
from .layer_api import AttendInputs, apply_rope

NEG_LARGE = -1.0e30
METHOD_FAMILIES = ("fp16", "nuq", "int", "kivi")
_METHOD_RE = re.compile(r"^(fp16|nuq|int|kivi)(\d*)$")


# --------------------------------------------------------------------------------------------
# method specification
# --------------------------------------------------------------------------------------------
@dataclass
class MethodSpec:
    """What one simulated cache does.

    Args:
        family (`str`): "fp16", "nuq", "int" or "kivi".
        bits (`int`, optional): bits per code (2, 3, 4; None for fp16).
        outlier_slots (`int`): exact slots per token and head (nuq only).
        sink_tokens (`int`): first tokens of each sequence kept exact.
        qnorm (`bool`): use the Q-Norm-corrected lookup tables (nuq only).
        kivi_group (`int`): tokens per KIVI key group.
        key_granularity (`str`): "channel" (KVQuant: offline per-channel thresholds) or "token" (online
            per-token range, like values). Only "channel" is storable by the real cache.
        key_rope (`str`): "pre" (KVQuant: quantize before RoPE) or "post". Only "pre" is storable.
        quantize (`str`): "both" (default), or "keys" / "values" to quantize only that side and keep the other
            exact (nuq only; a diagnostic for where the error comes from, not storable).
        name (`str`, optional): label used in results (default: ``family + bits``).
    """

    family: str
    bits: int | None = None
    outlier_slots: int = 0
    sink_tokens: int = 0
    qnorm: bool = False
    kivi_group: int = 32
    key_granularity: str = "channel"
    key_rope: str = "pre"
    quantize: str = "both"
    name: str | None = None

    def __post_init__(self) -> None:
        if self.family not in METHOD_FAMILIES:
            raise KVQuantConfigError(f"unknown method family {self.family!r}; choose one of {METHOD_FAMILIES}.")
        if self.family == "fp16":
            self.bits = None
        elif self.bits not in (2, 3, 4, 8):
            raise KVQuantConfigError(
                f"{self.family} needs bits in (2, 3, 4) (8 for int/kivi), got {self.bits!r}; e.g. 'nuq4', 'int3'."
            )
        if self.family == "nuq" and self.bits == 8:
            raise KVQuantConfigError("nuq8 is not supported; nuqX takes X in (2, 3, 4).")
        if self.key_granularity not in ("channel", "token"):
            raise KVQuantConfigError(f"key_granularity={self.key_granularity!r}; use 'channel' or 'token'.")
        if self.key_rope not in ("pre", "post"):
            raise KVQuantConfigError(f"key_rope={self.key_rope!r}; use 'pre' or 'post'.")
        if self.quantize not in ("both", "keys", "values"):
            raise KVQuantConfigError(f"quantize={self.quantize!r}; use 'both', 'keys' or 'values'.")
        if self.quantize != "both" and self.family != "nuq":
            raise KVQuantConfigError("quantize='keys'/'values' is a nuq diagnostic; use quantize='both' for "
                                     f"{self.family}.")
        if self.sink_tokens < 0 or self.outlier_slots < 0:
            raise KVQuantConfigError("sink_tokens and outlier_slots must be >= 0.")
        if self.name is None:
            self.name = self.family + ("" if self.bits is None else str(self.bits))

    @property
    def storable(self) -> bool:
        """Whether the real ``KVQuantCache`` can store exactly this (nuq with KVQuant's key layout)."""
        return (self.family == "nuq" and self.key_granularity == "channel" and self.key_rope == "pre"
                and self.quantize == "both")


def parse_method(method: str | MethodSpec, **overrides: Any) -> MethodSpec:
    """Parse ``"fp16" | "nuq4" | "int3" | "kivi2" ...`` into a :class:`MethodSpec`.

    Args:
        method: method name or an existing spec (returned as is, ``overrides`` ignored).
        overrides: MethodSpec fields (``outlier_slots``, ``sink_tokens``, ``qnorm`` ...); the nuq-only
            ones are ignored for the baselines, which have no sink and no outliers.
    """
    if isinstance(method, MethodSpec):
        return method
    m = _METHOD_RE.match(str(method).strip().lower())
    if m is None or (m.group(1) != "fp16" and not m.group(2)):
        raise KVQuantConfigError(
            f"unknown method {method!r}; use fp16, nuq2/nuq3/nuq4, int2/int3/int4(/int8), kivi2/kivi4(/kivi3)."
        )
    family, bits = m.group(1), (int(m.group(2)) if m.group(2) and m.group(1) != "fp16" else None)
    kwargs: dict[str, Any] = {"family": family, "bits": bits, "name": str(method).strip().lower()}
    if family == "nuq":
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
    elif family == "kivi" and overrides.get("kivi_group") is not None:
        kwargs["kivi_group"] = overrides["kivi_group"]
    return MethodSpec(**kwargs)


def method_avg_bits(spec: MethodSpec, head_dim: int, seq_len: int | None = None) -> float:
    """Average stored bits per K/V element, counting scales, zeros, outlier slots and the sink.

    * fp16: 16.
    * nuqX: :func:`quant.nuq_avg_bits` (codes, per-token value scale/zero in fp16, slots of fp16 value +
      uint8 channel); per-channel key thresholds are per layer and vanish. The sink's first
      ``sink_tokens`` tokens count 16 bits out of ``seq_len`` tokens.
    * intX: X + 2 * 16 / head_dim (fp16 scale and zero per head vector), keys and values alike.
    * KIVI-X: keys X + 2 * 16 / group (per-channel scale/zero per group of tokens), values X + 32 / head_dim.
    """
    if spec.family == "fp16":
        return 16.0
    bits = int(spec.bits)
    if spec.family == "int":
        return bits + 32.0 / head_dim
    if spec.family == "kivi":
        return ((bits + 32.0 / spec.kivi_group) + (bits + 32.0 / head_dim)) / 2
    avg = quant.nuq_avg_bits(bits, head_dim, spec.outlier_slots)
    if spec.key_granularity == "token":  # keys then carry a per-token scale/zero too
        avg += 16.0 / head_dim
    if spec.sink_tokens and seq_len:
        s = min(spec.sink_tokens, seq_len)
        avg = (avg * (seq_len - s) + 16.0 * s) / seq_len
    return float(avg)


# --------------------------------------------------------------------------------------------
# nuq parameters (from signposts or uncalibrated)
# --------------------------------------------------------------------------------------------
@dataclass
class NuqLayerParams:
    """Quantizer parameters of one layer for the nuq method.

    Args:
        key_lut / value_lut: float32 ``[2**bits]`` lookup tables (Q-Norm already folded in if wanted).
        key_lower / key_upper: float32 ``[H_kv, D]`` per-channel key thresholds (pre-RoPE, or post-RoPE for
            ``key_rope="post"``); None means "take them from the first call's keys" (uncalibrated).
    """

    key_lut: torch.Tensor
    value_lut: torch.Tensor
    key_lower: torch.Tensor | None = None
    key_upper: torch.Tensor | None = None


def _call_lut(obj: Any, name: str, qnorm: bool) -> torch.Tensor:
    attr = getattr(obj, name)
    lut = attr(qnorm) if callable(attr) else attr
    return torch.as_tensor(lut, dtype=torch.float32)


def nuq_params_from_signposts(signposts: Any, qnorm: bool = False) -> list[NuqLayerParams]:
    """Per-layer :class:`NuqLayerParams` from a loaded ``Signposts`` object.

    Accepts anything with ``.layers[i]`` exposing ``key_lut(qnorm)`` / ``value_lut(qnorm)`` (or the
    ``key_signposts`` / ``value_signposts`` tables) and ``key_lower`` / ``key_upper`` ``[H_kv, D]``.
    """
    layers = getattr(signposts, "layers", None)
    if not layers:
        raise SignpostError(
            f"{type(signposts).__name__} has no per-layer signposts; pass kvquant_hf.signposts.load_signposts(...)."
        )
    out = []
    for i, layer in enumerate(layers):
        if hasattr(layer, "key_lut"):
            k_lut, v_lut = _call_lut(layer, "key_lut", qnorm), _call_lut(layer, "value_lut", qnorm)
        else:
            k_lut = quant.apply_qnorm(layer.key_signposts, getattr(layer, "key_qnorm", None) if qnorm else None)
            v_lut = quant.apply_qnorm(layer.value_signposts, getattr(layer, "value_qnorm", None) if qnorm else None)
        lower, upper = getattr(layer, "key_lower", None), getattr(layer, "key_upper", None)
        if lower is None or upper is None:
            raise SignpostError(f"signposts of layer {i} have no key thresholds (key_lower/key_upper).")
        out.append(
            NuqLayerParams(
                k_lut, v_lut, torch.as_tensor(lower, dtype=torch.float32), torch.as_tensor(upper, dtype=torch.float32)
            )
        )
    return out


def load_signposts_for(path: str, bits: int) -> Any:
    """Load signposts for ``bits`` from ``path`` (a ``nuqX`` folder or the parent holding ``nuq{bits}``)."""
    try:
        from .signposts import load_signposts
    except ImportError as exc:  # pragma: no cover - depends on a sibling module
        raise SignpostError(
            "kvquant_hf.signposts is not available in this checkout; pass NuqLayerParams or a Signposts object."
        ) from exc
    sub = os.path.join(path, f"nuq{bits}")
    target = sub if os.path.isdir(sub) else path
    if not os.path.isdir(target):
        raise SignpostError(f"signpost folder {path!r} does not exist; run calibrate.py --output-dir {path} first.")
    return load_signposts(target, bits=bits)


# --------------------------------------------------------------------------------------------
# fast quantize-dequantize (bit-identical to quant.quantize_* + dequantize_*, without the packing)
# --------------------------------------------------------------------------------------------
def _encode(x_norm: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """``#{m : x_norm > mid_m}`` (same as ``quant.encode_nearest``), one compare-and-add per midpoint
    (no ``[..., 2**bits - 1]`` intermediate; faster than bucketize on CPU for these small tables)."""
    mids = quant.signpost_midpoints(lut).to(x_norm.device)
    codes = torch.zeros(x_norm.shape, dtype=torch.uint8, device=x_norm.device)
    for i in range(mids.numel()):
        codes += x_norm > mids[i]
    return codes.long()


def fake_quant_keys(
    k: torch.Tensor, lut: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, n_slots: int, bits: int
) -> tuple[torch.Tensor, int]:
    """Float32 ``dequantize_keys(quantize_keys(k, ...))`` and the clipped-outlier count.

    Bit-identical to the :mod:`kvquant_hf.quant` oracle (tested); a faster path for 0 or 1 slot that skips
    the bit packing and the sort. More slots fall back to the oracle.
    """
    if n_slots > 1:
        packed = quant.quantize_keys(k, lut, lower, upper, n_slots, bits)
        return quant.dequantize_keys(packed, lut, lower, upper, bits, k.shape[-1]), packed.n_clipped
    x = k.to(torch.float32)
    zero, scale = quant.key_zero_scale(lower.to(x.device), upper.to(x.device))
    zero, scale = zero[None, :, None, :], scale[None, :, None, :]
    lo = lower.to(x.device, torch.float32)[None, :, None, :]
    hi = upper.to(x.device, torch.float32)[None, :, None, :]
    excess = torch.maximum(lo - x, x - hi).clamp_min(0.0) / scale
    n_out = int((excess > 0).sum())
    xc = torch.minimum(torch.maximum(x, lo), hi)
    codes = _encode((xc - zero) * (1.0 / scale), lut)
    out = lut.to(x.device, torch.float32)[codes] * scale + zero
    if n_slots == 0:
        return out, n_out
    top, idx = excess.max(dim=-1, keepdim=True)  # first maximum = smallest channel on ties, like the oracle
    used = top > 0
    n_clipped = n_out - int(used.sum())
    exact = torch.gather(k, -1, idx).to(torch.float32)
    hit = used & (torch.arange(x.shape[-1], device=x.device) == idx)
    return torch.where(hit, exact, out), n_clipped


def fake_quant_values(v: torch.Tensor, lut: torch.Tensor, n_slots: int, bits: int) -> torch.Tensor:
    """Float32 ``dequantize_values(quantize_values(v, ...))``; bit-identical fast path for 0 or 1 slot."""
    if n_slots > 1:
        return quant.dequantize_values(quant.quantize_values(v, lut, n_slots, bits), lut, bits, v.shape[-1])
    x = v.to(torch.float32)
    d = x.shape[-1]
    sd = quant.value_scale_dtype(v.dtype)
    if n_slots == 0:
        lo, hi = x.amin(-1), x.amax(-1)
    else:
        ch = torch.arange(d, device=x.device)
        mx, i_mx = x.max(dim=-1, keepdim=True)
        mn, i_mn = x.min(dim=-1, keepdim=True)
        mx2 = x.masked_fill(ch == i_mx, float("-inf")).amax(-1, keepdim=True)  # = mx if the max is tied
        mn2 = x.masked_fill(ch == i_mn, float("inf")).amin(-1, keepdim=True)
        top2, bot2 = torch.cat([mx, mx2], -1), torch.cat([mn, mn2], -1)
        # a = 0: drop the maximum (range max2 - min); a = 1: drop the minimum (range max - min2); ties -> a = 0
        drop_min = (top2[..., 0] - bot2[..., 1]) < (top2[..., 1] - bot2[..., 0])
        lo = torch.where(drop_min, bot2[..., 1], bot2[..., 0])
        hi = torch.where(drop_min, top2[..., 0], top2[..., 1])
    smax = torch.finfo(sd).max  # same range arithmetic as quant.quantize_values
    zero = (hi * 0.5 + lo * 0.5).clamp(-smax, smax).to(sd)
    scale = (hi * 0.5 - lo * 0.5).clamp(quant.MIN_SCALE, smax).to(sd)
    zero32 = zero.to(torch.float32).unsqueeze(-1)
    scale32 = scale.to(torch.float32).clamp_min(quant.MIN_SCALE).unsqueeze(-1)
    codes = _encode((x - zero32) * (1.0 / scale32), lut)
    out = lut.to(x.device, torch.float32)[codes] * scale32 + zero32
    if n_slots == 0:
        return out
    # the slot: the minimum's first occurrence (a = 1) or the maximum's last occurrence (a = 0), as the
    # oracle's stable ascending sort orders ties
    first_min = i_mn  # torch.min/max return the first occurrence
    last_max = d - 1 - torch.argmax((x == mx).to(torch.int8).flip(-1), dim=-1, keepdim=True)
    idx = torch.where(drop_min.unsqueeze(-1), first_min, last_max)
    return torch.where(ch == idx, torch.gather(v, -1, idx).to(torch.float32), out)


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
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.get_seq_length() > 0:
            super().reorder_cache(beam_idx)
            self.positions = self.positions.index_select(0, beam_idx.to(self.positions.device))
            self.n_real = self.n_real.index_select(0, beam_idx.to(self.n_real.device))

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
            real = diag if diag.dtype == torch.bool else diag.to(torch.float32) > NEG_LARGE / 2
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
        if mask is not None:
            if mask.dim() != 4:
                raise KVQuantConfigError(
                    f"attention_mask must be None or 4D [B, 1, q_len, kv_len], got shape {tuple(mask.shape)}."
                )
            if mask.shape[-1] < total or mask.shape[-2] != lq:
                raise KVQuantConfigError(
                    f"attention_mask has shape {tuple(mask.shape)} but this call has q_len={lq} and "
                    f"kv_len={total}; build masks with cache.get_mask_sizes()."
                )
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
                s = s.masked_fill(~vis[:, None, None], NEG_LARGE)
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


class KiviLayer(SimulatedLayer):
    """KIVI-style: post-RoPE keys per channel in groups of ``kivi_group`` tokens of the call, values per token."""

    def simulate(self, key, key_rot, value, inputs, start):
        bits = int(self.spec.bits)
        k_hat = quant.fake_quant_kivi_keys(key_rot.to(torch.float32), bits, group=self.spec.kivi_group)
        v_hat = quant.fake_quant_kivi_values(value.to(torch.float32), bits)
        return k_hat, v_hat


class NuqLayer(SimulatedLayer):
    """KVQuant nuqX: exactly what ``KVQuantCache`` stores, dequantized (see module docstring)."""

    def __init__(self, spec: MethodSpec, params: NuqLayerParams, outlier_fraction: float = 0.01,
                 query_chunk: int = 1024):
        super().__init__(spec, query_chunk)
        self.params = params
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
    query_chunk: int = 1024,
) -> SimulatedQuantCache:
    """Build a :class:`SimulatedQuantCache` for ``model`` (or its config).

    Args:
        model: the (patched) causal LM, or its config.
        method: "fp16", "nuqX", "intX", "kiviX" or a :class:`MethodSpec` (then the nuq keyword
            arguments below are ignored: the spec says it all).
        signposts: for nuq: a folder (``nuqX`` subfolder or its parent), a loaded ``Signposts`` object,
            or ``{bits: Signposts}``. None with ``nuq_params=None`` means uncalibrated: NormalFloat tables
            and key thresholds from the first call (the prompt) at ``outlier_fraction``.
        nuq_params: explicit per-layer :class:`NuqLayerParams` (research/ablation; overrides ``signposts``).
        outlier_fraction: sets the default slots (``ceil(fraction * head_dim)``, 0 for 0%).
        outlier_slots: slots per token and head (overrides the fraction).
        sink_tokens: first tokens kept exact (nuq).
        qnorm: use Q-Norm tables (nuq).
        query_chunk: query rows per attention step (bounds memory at ``chunk x kv_len`` scores).
    """
    n_layers, head_dim = _num_layers_and_head_dim(model)
    slots = outlier_slots if outlier_slots is not None else default_outlier_slots(outlier_fraction, head_dim)
    spec = parse_method(method, outlier_slots=slots, sink_tokens=sink_tokens, qnorm=qnorm)
    if spec.family == "fp16":
        return SimulatedQuantCache([FP16Layer(spec, query_chunk) for _ in range(n_layers)], spec)
    if spec.family == "int":
        return SimulatedQuantCache([IntLayer(spec, query_chunk) for _ in range(n_layers)], spec)
    if spec.family == "kivi":
        return SimulatedQuantCache([KiviLayer(spec, query_chunk) for _ in range(n_layers)], spec)
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
    "FP16Layer",
    "IntLayer",
    "KiviLayer",
    "MethodSpec",
    "NuqLayer",
    "NuqLayerParams",
    "SimulatedLayer",
    "SimulatedQuantCache",
    "build_simulated_cache",
    "fake_quant_keys",
    "fake_quant_values",
    "method_avg_bits",
    "nuq_params_from_signposts",
    "parse_method",
]

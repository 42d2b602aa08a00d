"""`KVQuantLayer`: the packed KVQuant storage of one attention layer, and the attention over it.

Each model layer of a :class:`~kvquant_hf.cache.KVQuantCache` owns one. Its parts, one module each:

* :class:`~kvquant_hf.layer_storage.PackedHistory`: the packed history (quantizer parameters, growth, appends,
  batch-row operations, byte accounting);
* :class:`~kvquant_hf.layer_sink.SinkTokens`: the exact attention sink and left-padding bookkeeping;
* :class:`~kvquant_hf.layer_window.RecentWindow`: the last tokens kept exact next to the sink;
* :class:`~kvquant_hf.routing.AttentionRouting`: ``attend`` and the choice of backend (Triton, prefill, torch);
* :class:`~kvquant_hf.graph_state.GraphDecodeState`: the device-side length of CUDA-graph decode.

This module holds what ties them together: initialization, storing new tokens, the non-finite guard, the
uncalibrated key ranges, and the transformers ``CacheLayerMixin`` API (length, reset, crop).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin

from . import quant
from .config import KVQuantConfig
from .errors import (
    KVQuantConfigError,
    KVQuantError,
    KVQuantNumericalError,
    UncalibratedCacheWarning,
    UnsupportedModelError,
)
from .graph_state import GraphDecodeState
from .layer_sink import SinkTokens
from .layer_storage import HISTORY_TENSORS, ROW_TENSORS, SINK_TENSORS, PackedHistory
from .layer_window import RecentWindow
from .routing import AttentionRouting, device_guard, resolve_backend

UNCALIBRATED_MIN_SAMPLE = 16  # prompt tokens below which uncalibrated key ranges also use the sink tokens


class KVQuantLayer(PackedHistory, SinkTokens, RecentWindow, AttentionRouting, GraphDecodeState, CacheLayerMixin):
    """Packed KVQuant storage of one attention layer, plus the attention over it (:meth:`attend`).

    Args:
        config (`KVQuantConfig`): the cache configuration.
        layer_idx (`int`): index of the model layer (for messages and signposts).
        key_signposts / value_signposts (optional): the calibrated ``LayerSignposts`` of this layer for keys
            (``key_lut``, ``key_lower``, ``key_upper``) and values (``value_lut``). None = uncalibrated: NormalFloat
            tables and key thresholds from the first prompt this layer sees.

    Storage (``B`` batch, ``H`` kv heads, ``D`` head_dim, ``S`` outlier slots, ``cap`` capacity): see
    :class:`kvquant_hf.attention.PackedKV`; sink and recent-window ring ``sink_k/sink_v [B, H, sink_tokens + R, D]``
    (model dtype, pre-RoPE; ``R = recent_window``), ``sink_positions [B, sink_tokens + R]`` int32,
    ``sink_valid [B, sink_tokens + R]`` bool, ``hist_start [B]`` int64.
    """

    is_compileable = False
    is_sliding = False
    is_croppable = True
    #: the patched attention forwards hand over queries *before* RoPE (``AttendInputs.query_rotated=False``): on the
    #: Triton backend one kernel rotates them together with the new keys (:mod:`kvquant_hf.kernels.exact_block`)
    rotates_query = True

    def __init__(
        self,
        config: KVQuantConfig,
        layer_idx: int = 0,
        key_signposts: Any = None,
        value_signposts: Any = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.key_signposts = key_signposts
        self.value_signposts = value_signposts
        self.reserve_tokens = 0
        self.length = 0  # packed history tokens held
        self.n_sink = 0  # sink tokens held (same for every row)
        self.capacity = 0
        self.n_clipped_host = 0
        self.clip_counter = None  # int32 [1] on the device (Triton path: counted without a host sync)
        self.nonfinite_counter = None  # int64 [1] on the device: tokens contained by the "zero" policy
        self.owner = None  # weakref to the KVQuantCache (rolls the other layers back after a numerical error)
        self.uncalibrated_warned = False  # a layer without an owner warns once itself
        self.has_hist_pad = False
        self.sinks_all_valid = None  # host cache of sink_valid[:, :n_sink].all() (None: not known)
        self.window_all_valid = None  # the same for the recent window's slots
        self.placed_padded = False  # the last store went through SinkTokens.place_padded (tokens reordered)
        self._key_thresholds_from_prompt = key_signposts is None
        self.key_ranges_provisional = False  # uncalibrated ranges taken while no row had a real token yet
        self.k_lower = self.k_upper = self.k_zero = self.k_scale = None
        for name in HISTORY_TENSORS + SINK_TENSORS + ROW_TENSORS:
            setattr(self, name, None)

    def __repr__(self) -> str:
        if not self.is_initialized:
            return f"KVQuantLayer(layer_idx={self.layer_idx}, uninitialized)"
        return (
            f"KVQuantLayer(layer_idx={self.layer_idx}, batch={self.batch_size}, heads={self.num_heads}, "
            f"head_dim={self.head_dim}, sink={self.n_sink}, history={self.length}/{self.capacity}, "
            f"backend={self.backend!r})"
        )

    # ---------------------------------------------------------------- initialization
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Take batch, heads, head_dim, dtype and device from the first keys ``[B, H, S, D]`` and allocate."""
        b, h, _, d = key_states.shape
        cfg = self.config
        self.dtype = key_states.dtype
        self.device = key_states.device
        self.batch_size, self.num_heads, self.head_dim = b, h, d
        if self.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise KVQuantConfigError(
                f"layer {self.layer_idx}: keys of dtype {self.dtype} are not supported; load the model in "
                "float16, bfloat16 or float32."
            )
        self.key_bytes = quant.packed_dim(d, cfg.key_bits)
        self.value_bytes = quant.packed_dim(d, cfg.value_bits)
        self.n_slots = cfg.slots_for(d)
        if self.n_slots >= d:
            raise KVQuantConfigError(
                f"outlier_slots={self.n_slots} must be fewer than head_dim={d}; lower outlier_slots or outlier_fraction."
            )
        self.scale_dtype = quant.value_scale_dtype(self.dtype)
        self.backend = resolve_backend(cfg.backend, self.device, d)
        # the Triton value kernel keeps 2 * (slots + 1) <= head_dim extremes in registers; beyond, torch quantizes
        self.triton_quantize = self.backend == "triton" and 2 * (self.n_slots + 1) <= d
        self.clip_counter = torch.zeros(1, dtype=torch.int32, device=self.device) if self.triton_quantize else None
        self.nonfinite_counter = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.load_quantizer_params()
        self.allocate_history()
        self.allocate_sink()
        self.length = self.n_sink = 0
        self.is_initialized = True
        if self.reserve_tokens:
            self.ensure_capacity(max(0, self.reserve_tokens - cfg.sink_tokens))

    # ---------------------------------------------------------------- storing
    def store(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, real: torch.Tensor | None,
              rope=None, positions_written: bool = False, k_rot: torch.Tensor | None = None) -> None:
        """Append new tokens ``[B, H, L, D]``: fill the sink first (rotating its keys once with ``rope``), quantize
        the rest into the history and keep the last of them in the recent window (``positions_written``: CUDA-graph
        decode, the exact-block kernel has already written their positions; ``k_rot``: the new keys rotated in the
        model dtype, when at hand)."""
        self.placed_padded = False
        rest = self.store_sink(k, v, positions, real, rope)
        if rest is None:
            return
        k, v, positions = rest
        if self.k_lower is None or self.key_ranges_provisional:
            self._thresholds_from_prompt(k)
        if self.placed_padded or k_rot is None or k_rot.dtype != self.dtype:
            k_rot = None  # (left padding reorders the tokens: rotate the window's copy from its positions)
        else:
            k_rot = k_rot[:, :, k_rot.shape[2] - k.shape[2]:]  # the tokens that go to the history (after the sink)
        self.store_window(k, v, positions, self.length, rope, k_rot)
        self.append_history(k, v, positions, positions_written)

    def _thresholds_from_prompt(self, k: torch.Tensor) -> None:
        """Uncalibrated mode: per-channel key thresholds from this call's real, non-sink tokens ``[B, H, n, D]``
        (and the real sink tokens when they are few).

        While no row has a real token (an all-zero attention mask, or left padding longer than the first prefill
        chunk in every row), the ranges come from the padding's keys and are *provisional*: they are taken again
        from the first real tokens that reach the history. Only padding (never attended to) is stored under them.
        """
        n = k.shape[2]
        keep = torch.arange(self.length, self.length + n, device=self.device)[None, :] >= self.hist_start[:, None]
        sample = k.permute(0, 2, 1, 3)[keep]  # [N, H, D]
        if sample.shape[0] < UNCALIBRATED_MIN_SAMPLE and self.n_sink:
            sink = self.sink_k[:, :, : self.n_sink].permute(0, 2, 1, 3)[self.sink_valid[:, : self.n_sink]]
            sample = torch.cat([sample, sink], dim=0)
        self.key_ranges_provisional = sample.shape[0] == 0
        if self.key_ranges_provisional:
            sample = k.permute(0, 2, 1, 3).reshape(-1, k.shape[1], k.shape[3])
        else:
            self._warn_uncalibrated(sample.shape[0])
        lower, upper = quant.key_thresholds_from_sample(sample.permute(1, 0, 2).unsqueeze(0), self.config.outlier_fraction)
        self.set_key_thresholds(lower, upper)

    def _warn_uncalibrated(self, n_sample: int) -> None:
        """One :class:`UncalibratedCacheWarning` per cache (per layer for a layer used without a cache)."""
        owner = self.owner() if self.owner is not None else None
        target = owner if owner is not None else self
        if getattr(target, "uncalibrated_warned", False):
            return
        target.uncalibrated_warned = True
        short = ""
        if n_sample < UNCALIBRATED_MIN_SAMPLE:
            short = (f" The key ranges come from only {n_sample} tokens: expect large errors (use calibrated "
                     "signposts or a longer first prompt).")
        warnings.warn(
            "KVQuantCache has no signposts: using NormalFloat tables and key ranges taken from the first prompt. "
            "Calibrating improves accuracy: run `python calibrate.py --model ... --output-dir S` (or "
            "kvquant_hf.calibrate) and pass cache_config={'signposts': S}." + short,
            UncalibratedCacheWarning,
            stacklevel=4,
        )

    # ---------------------------------------------------------------- non-finite keys and values
    def check_finite(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """Apply ``config.nonfinite`` to the new keys/values (see :class:`~kvquant_hf.config.KVQuantConfig`).

        A token is *bad* when any element of its key or value, in any head, is NaN or Inf (the Triton backend zeroes
        and counts in one kernel, in place: :func:`kvquant_hf.kernels.zero_nonfinite_tokens_`). ``"error"`` raises
        :class:`KVQuantNumericalError` before anything is stored and rolls back the layers that already stored this
        forward call (one host sync per layer and call); ``"zero"`` (and CUDA-graph mode, which cannot sync) stores
        bad tokens as zeros in every head and counts them on the device.
        """
        if self.backend == "triton" and (self.graph_mode or self.config.nonfinite != "error"):
            from .kernels import zero_nonfinite_tokens_

            with device_guard(self.device):  # one kernel: detect, zero in place, count
                zero_nonfinite_tokens_(k, v, self.nonfinite_counter)
            return k, v
        # one reduction per tensor (max |x| over heads and channels propagates NaN and Inf): few kernels per step
        good = torch.isfinite(torch.maximum(k.abs().amax(dim=(1, 3)), v.abs().amax(dim=(1, 3))))  # [B, L]
        if self.config.nonfinite == "error" and not self.graph_mode:
            if bool(good.all()):
                return k, v
            bad_k = ~torch.isfinite(k).all(-1).all(1)
            bad_v = ~torch.isfinite(v).all(-1).all(1)
            bad = bad_k | bad_v
            rows = sorted({int(r) for r in bad.nonzero()[:, 0]})
            pos = positions.to(bad.device).expand(bad.shape)[bad][:8].tolist()
            tensors = [name for name, t in (("keys", bad_k), ("values", bad_v)) if bool(t.any())]
            self._rollback_siblings()
            raise KVQuantNumericalError(
                f"layer {self.layer_idx}: NaN or Inf in the new {' and '.join(tensors)} of batch row(s) {rows} at "
                f"position(s) {pos}{' ...' if int(bad.sum()) > 8 else ''}; nothing of this call was stored (the cache "
                "holds what it held before it). Check the model inputs/weights for overflow (e.g. fp16 activations "
                "beyond 65504), or pass cache_config={'nonfinite': 'zero'} to store such tokens as zeros.",
                layer_idx=self.layer_idx, rows=rows, positions=pos, tensors=tensors,
            )
        keep = good[:, None, :, None]
        self.nonfinite_counter += (~good).sum()
        return torch.where(keep, k, 0.0), torch.where(keep, v, 0.0)

    def _rollback_siblings(self) -> None:
        """After a rejected call: give every layer of the cache back the length this layer has (not yet stored)."""
        cache = self.owner() if self.owner is not None else None
        if cache is None:
            return
        target = self.get_seq_length()
        for layer in cache.layers:
            if layer is self or not layer.is_initialized or layer.get_seq_length() <= target:
                continue
            try:
                layer.rollback(target)
            except KVQuantError:  # cannot crop a padded sink: start the sequence again
                for other in cache.layers:
                    other.reset()
                return

    def rollback(self, seq_len: int) -> None:
        """Go back to ``seq_len`` held tokens (``0``: reset)."""
        if seq_len == 0:
            self.reset()
        else:
            self.crop(seq_len)

    @property
    def n_nonfinite(self) -> int:
        """Tokens with NaN/Inf keys or values stored as zeros (``nonfinite="zero"``) since the last reset."""
        return int(self.nonfinite_counter.item()) if self.nonfinite_counter is not None else 0

    # ---------------------------------------------------------------- transformers Cache layer API
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        raise UnsupportedModelError(
            "KVQuantCache stores pre-RoPE keys and attends itself, so it cannot serve the stock attention's "
            "`cache.update(...)`. Patch the model first: `kvquant_hf.patch_model(model)` (generate with "
            "cache_implementation='kvquant' does this for you)."
        )

    def get_seq_length(self) -> int:
        """Tokens held per sequence (sink + history, padding included)."""
        return self.n_sink + self.length if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` for mask creation: every held token plus the new ones, offset 0."""
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:
        return -1

    def reset(self) -> None:
        """Forget every token (allocation kept); uncalibrated key thresholds are taken again from the next prompt."""
        self.length = 0
        self.n_sink = 0
        self.n_clipped_host = 0
        self.has_hist_pad = False
        self.exit_graph_mode()
        if self.clip_counter is not None:
            self.clip_counter.zero_()
        if self.nonfinite_counter is not None:
            self.nonfinite_counter.zero_()
        self.sinks_all_valid = None
        if self.is_initialized:
            self.hist_start.zero_()
            self.sink_valid.zero_()
        if self._key_thresholds_from_prompt:
            self.k_lower = self.k_upper = self.k_zero = self.k_scale = None
            self.key_ranges_provisional = False
        self.window_all_valid = None

    def crop(self, max_length: int) -> None:
        """Drop tokens from the end: ``crop(-n)`` removes ``n`` tokens, ``crop(n >= 0)`` keeps the first ``n``.

        Args:
            max_length (`int`): negative: tokens to remove; non-negative: tokens to keep (``0`` is a no-op, as in
                transformers' ``crop(0)``).
        """
        total = self.get_seq_length()
        if max_length == 0 or total == 0:
            return
        keep = max(total + max_length, 0) if max_length < 0 else min(max_length, total)
        if keep >= self.n_sink:
            old_length, self.length = self.length, keep - self.n_sink
            if self.length < old_length:
                self.refill_window(old_length)
            self.sync_device_length()
            return
        if self.has_hist_pad and self.length > 0:
            raise KVQuantError(
                f"cannot crop a left-padded batch to {keep} tokens (into its attention sink); call reset() instead."
            )
        self.length = 0
        self.n_sink = keep
        self.sink_valid[:, keep:] = False
        self.sinks_all_valid = self.window_all_valid = None

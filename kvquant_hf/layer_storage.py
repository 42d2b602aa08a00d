"""Storage of one :class:`~kvquant_hf.cache.KVQuantLayer`: the packed history, its growth and its accounting.

The packed history holds every token that is not in the attention sink, quantized on arrival in the layout of
:class:`kvquant_hf.attention.PackedKV` (pre-RoPE nuqX key codes with per-channel calibrated thresholds and
outlier slots, nuqX value codes with per-token scale/zero and outlier slots, ``positions [B, cap]`` int32). It
grows geometrically in whole blocks; old data is copied, never re-quantized.

The byte-accounting functions here are the single source of the cache's size: :mod:`kvquant_hf.planner`
predicts allocations with them and the layer reports its footprint with them.
"""

from __future__ import annotations

import math

import torch

from . import quant
from .attention import PackedKV
from .config import KVQuantConfig
from .errors import KVQuantError
from .routing import device_guard, resolve_backend

# storage attributes of a layer: name -> batch-first tensor (reorder/select/offload walk these lists)
HISTORY_TENSORS = (
    "k_codes", "k_out_val", "k_out_idx", "v_codes", "v_scale", "v_zero", "v_out_val", "v_out_idx", "positions",
)
SINK_TENSORS = ("sink_k", "sink_v", "sink_positions", "sink_valid", "sink_k_rot")
ROW_TENSORS = ("hist_start",)
GROWTH_FACTOR = 1.5


def round_up(n: int, block: int) -> int:
    """``n`` rounded up to a multiple of ``block``."""
    return -(-n // block) * block


def element_size(dtype: torch.dtype) -> int:
    """Bytes of one element of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()


def history_token_bytes(config: KVQuantConfig, num_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes one packed history token costs per sequence and layer (the single source of the cache's accounting).

    ``H * (D*key_bits/8 + D*value_bits/8 + 2*scale_bytes + 2*S*(dtype_bytes + 1)) + 4``: key and value codes,
    value scale/zero, K and V outlier slots (value + uint8 channel), int32 position.
    """
    es = element_size(dtype)
    ss = element_size(quant.value_scale_dtype(dtype))
    slot = config.slots_for(head_dim) * (es + 1)
    key_bytes = quant.packed_dim(head_dim, config.key_bits)
    value_bytes = quant.packed_dim(head_dim, config.value_bits)
    return num_heads * (key_bytes + slot + value_bytes + 2 * ss + slot) + 4


def sink_token_bytes(num_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes one sink token costs per sequence and layer: exact K (pre-RoPE and rotated) and V in the model dtype
    + int32 position."""
    return 3 * num_heads * head_dim * element_size(dtype) + 4


def window_token_bytes(num_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes one token of the exact recent window costs per sequence and layer: a ring slot of the sink tensors
    (:func:`sink_token_bytes`). A window token is packed on arrival too, so it also costs
    :func:`history_token_bytes`."""
    return sink_token_bytes(num_heads, head_dim, dtype)


def layer_tensor_bytes(config: KVQuantConfig, batch: int, num_heads: int, head_dim: int, dtype: torch.dtype,
                       capacity: int) -> list[int]:
    """``nbytes`` of every tensor one initialized :class:`~kvquant_hf.cache.KVQuantLayer` allocates at history
    ``capacity``.

    The same tensors as ``KVQuantLayer.lazy_initialization`` / :meth:`PackedHistory.ensure_capacity` create
    (history, sink, per-row state, lookup tables, key thresholds, clip counter), so a planner summing them predicts
    the allocation exactly (``kvquant_hf.planner``). The clip counter and the key thresholds are counted even where
    a layer may not hold them (torch backend, uncalibrated before the first prompt): a few KiB at most.
    """
    es = element_size(dtype)
    ss = element_size(quant.value_scale_dtype(dtype))
    h, d, b, cap = num_heads, head_dim, batch, capacity
    s = config.slots_for(d)
    ns = config.sink_tokens + config.recent_window  # the recent window's ring lives in the sink tensors
    sizes = [
        b * h * cap * quant.packed_dim(d, config.key_bits),  # k_codes
        b * h * cap * s * es, b * h * cap * s,  # k_out_val, k_out_idx
        b * h * cap * quant.packed_dim(d, config.value_bits),  # v_codes
        b * h * cap * ss, b * h * cap * ss,  # v_scale, v_zero
        b * h * cap * s * es, b * h * cap * s,  # v_out_val, v_out_idx
        b * cap * 4,  # positions
        b * h * ns * d * es, b * h * ns * d * es,  # sink_k, sink_v
        b * ns * 4, b * ns,  # sink_positions, sink_valid
        b * h * ns * d * es,  # sink_k_rot
        b * 8,  # hist_start
        4 * 2**config.key_bits, 4 * 2**config.value_bits,  # k_lut, v_lut (float32)
        4 * h * d, 4 * h * d, 4 * h * d, 4 * h * d,  # k_lower, k_upper, k_zero, k_scale (float32)
        4,  # clip_counter
    ]
    return sizes


def reserved_capacity(config: KVQuantConfig, total_tokens: int) -> int:
    """History capacity a layer allocates when ``total_tokens`` per sequence are reserved up front (``reserve``)."""
    hist = int(total_tokens) - config.sink_tokens
    return round_up(hist, config.block_size) if hist > 0 else 0


def grown_capacities(config: KVQuantConfig, history_tokens: int, append: int) -> list[int]:
    """Capacities a layer passes through without a reservation when ``history_tokens`` arrive in appends of
    ``append`` tokens (prefill chunks, or 1 per decode step): the geometric growth of
    :meth:`PackedHistory.ensure_capacity` (each growth copies the old arrays into new ones, so both exist for a
    moment)."""
    caps: list[int] = []
    cap = length = 0
    target, append = max(0, int(history_tokens)), max(1, int(append))
    while length < target:
        end = min(length + append, target)
        if end > cap:
            cap = round_up(max(end, math.ceil(cap * GROWTH_FACTOR)), config.block_size)
            caps.append(cap)
        length = min(end + (cap - end) // append * append, target)
    return caps


class PackedHistory:
    """Packed-history part of ``KVQuantLayer``: quantizer parameters, allocation and growth, appends, batch-row
    operations on every stored tensor, and the byte accounting.

    Attributes it owns (set by :meth:`allocate_history` / :meth:`load_quantizer_params`): the tensors named in
    :data:`HISTORY_TENSORS`, ``capacity``, ``length``, the lookup tables ``k_lut`` / ``v_lut`` and the per-channel
    key thresholds ``k_lower`` / ``k_upper`` / ``k_zero`` / ``k_scale``.
    """

    # ---------------------------------------------------------------- quantizer parameters
    def load_quantizer_params(self) -> None:
        """Lookup tables and key thresholds from the signposts (NormalFloat tables without them)."""
        cfg = self.config
        dev = self.device
        if self.key_signposts is not None:
            lp = self.key_signposts
            self.k_lut = lp.key_lut(cfg.qnorm).to(dev, torch.float32)
            lower = torch.as_tensor(lp.key_lower, dtype=torch.float32)
            upper = torch.as_tensor(lp.key_upper, dtype=torch.float32)
            if lower.shape != (self.num_heads, self.head_dim) or upper.shape != lower.shape:
                raise KVQuantError(
                    f"layer {self.layer_idx}: signpost key thresholds have shape {tuple(lower.shape)}, but the model's "
                    f"keys have {self.num_heads} heads of {self.head_dim}; calibrate signposts for this model."
                )
            self.set_key_thresholds(lower.to(dev), upper.to(dev))
        else:
            self.k_lut = quant.normal_float_signposts(cfg.key_bits).to(dev)
            self.k_lower = self.k_upper = self.k_zero = self.k_scale = None
        if self.value_signposts is not None:
            self.v_lut = self.value_signposts.value_lut(cfg.qnorm).to(dev, torch.float32)
        else:
            self.v_lut = quant.normal_float_signposts(cfg.value_bits).to(dev)
        if self.k_lut.numel() != 2**cfg.key_bits or self.v_lut.numel() != 2**cfg.value_bits:
            raise KVQuantError(
                f"layer {self.layer_idx}: signpost tables have {self.k_lut.numel()} (keys) and {self.v_lut.numel()} "
                f"(values) entries, expected {2**cfg.key_bits} and {2**cfg.value_bits}; load signposts for "
                f"key_bits={cfg.key_bits}, value_bits={cfg.value_bits}."
            )

    def set_key_thresholds(self, lower: torch.Tensor, upper: torch.Tensor) -> None:
        """Per-channel key thresholds ``[H, D]`` (and the zero/scale derived from them)."""
        self.k_lower, self.k_upper = lower.to(torch.float32), upper.to(torch.float32)
        self.k_zero, self.k_scale = quant.key_zero_scale(self.k_lower, self.k_upper)

    # ---------------------------------------------------------------- allocation and growth
    def _empty_history(self, name: str, b: int, cap: int) -> torch.Tensor:
        h, dev, s = self.num_heads, self.device, self.n_slots
        if name == "k_codes":
            return torch.zeros(b, h, cap, self.key_bytes, dtype=torch.uint8, device=dev)
        if name == "v_codes":
            return torch.zeros(b, h, cap, self.value_bytes, dtype=torch.uint8, device=dev)
        if name in ("k_out_val", "v_out_val"):
            return torch.zeros(b, h, cap, s, dtype=self.dtype, device=dev)
        if name in ("k_out_idx", "v_out_idx"):
            return torch.full((b, h, cap, s), quant.UNUSED_SLOT, dtype=torch.uint8, device=dev)
        if name in ("v_scale", "v_zero"):
            return torch.zeros(b, h, cap, dtype=self.scale_dtype, device=dev)
        if name == "positions":
            return torch.zeros(b, cap, dtype=torch.int32, device=dev)
        raise KeyError(name)

    def allocate_history(self) -> None:
        """Empty history tensors (capacity 0) for the layer's batch, heads and dtype."""
        self.capacity = 0
        for name in HISTORY_TENSORS:
            setattr(self, name, self._empty_history(name, self.batch_size, 0))

    def ensure_capacity(self, n_tokens: int) -> None:
        """Grow the history to hold ``n_tokens`` (geometrically, in whole blocks; old data is copied, never re-quantized)."""
        if n_tokens <= self.capacity:
            return
        block = self.config.block_size
        new_cap = round_up(max(n_tokens, math.ceil(self.capacity * GROWTH_FACTOR)), block)
        for name in HISTORY_TENSORS:
            old = getattr(self, name)
            new = self._empty_history(name, self.batch_size, new_cap)
            if self.length:
                if name == "positions":  # [B, cap]
                    new[:, : self.length] = old[:, : self.length]
                else:  # [B, H, cap, ...]
                    new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)
        self.capacity = new_cap

    def reserve(self, total_tokens: int) -> None:
        """Size the history for ``total_tokens`` per sequence up front (sink included); growth still works beyond."""
        self.reserve_tokens = max(self.reserve_tokens, int(total_tokens))
        if self.is_initialized:
            self.ensure_capacity(max(0, self.reserve_tokens - self.config.sink_tokens))

    # ---------------------------------------------------------------- views
    def packed_view(self, length: int | None = None) -> PackedKV | None:
        """The packed history as :class:`~kvquant_hf.attention.PackedKV` (None while it is empty): its first
        ``length`` tokens (default: all)."""
        length = self.length if length is None else length
        if not self.is_initialized or length == 0:
            return None
        return PackedKV(
            k_codes=self.k_codes, k_out_val=self.k_out_val, k_out_idx=self.k_out_idx,
            v_codes=self.v_codes, v_scale=self.v_scale, v_zero=self.v_zero,
            v_out_val=self.v_out_val, v_out_idx=self.v_out_idx,
            k_lut=self.k_lut, v_lut=self.v_lut, k_zero=self.k_zero, k_scale=self.k_scale,
            positions=self.positions, length=length,
            key_bits=self.config.key_bits, value_bits=self.config.value_bits, head_dim=self.head_dim,
        )

    def dequantized_history(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 pre-RoPE keys and values ``[B, H, length, D]`` of the packed history (tests and debugging only)."""
        view = self.packed_view()
        if view is None:
            shape = (self.batch_size, self.num_heads, 0, self.head_dim)
            return torch.zeros(shape, device=self.device), torch.zeros(shape, device=self.device)
        return view.dequantize_block(0, self.length)

    # ---------------------------------------------------------------- appends
    def append_history(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                       positions_written: bool = False) -> None:
        """Quantize new pre-RoPE keys and values ``[B, H, n, D]`` into the history after the held tokens."""
        if self.graph_mode:
            self.append_history_graph(k, v, positions, positions_written)
            return
        n = k.shape[2]
        start, end = self.length, self.length + n
        self.ensure_capacity(end)
        cfg = self.config
        if self.triton_quantize:
            with device_guard(self.device):
                self.quantize_kv(k, v, start)
            self.positions[:, start:end] = positions.to(torch.int32)
            self.length = end
            return
        pk = quant.quantize_keys(k, self.k_lut, self.k_lower, self.k_upper, self.n_slots, cfg.key_bits)
        pv = quant.quantize_values(v, self.v_lut, self.n_slots, cfg.value_bits)
        self.k_codes[:, :, start:end] = pk.codes
        self.k_out_val[:, :, start:end] = pk.out_val
        self.k_out_idx[:, :, start:end] = pk.out_idx
        self.v_codes[:, :, start:end] = pv.codes
        self.v_scale[:, :, start:end] = pv.scale
        self.v_zero[:, :, start:end] = pv.zero
        self.v_out_val[:, :, start:end] = pv.out_val
        self.v_out_idx[:, :, start:end] = pv.out_idx
        self.positions[:, start:end] = positions.to(torch.int32)
        self.n_clipped_host += int(pk.n_clipped)
        self.length = end

    def quantize_kv(self, k: torch.Tensor, v: torch.Tensor, start) -> None:
        """Quantize and pack the new keys and values into the history at ``start`` (int, or the int32 device length
        in graph mode): one Triton launch for both."""
        from .kernels import quantize_kv_triton

        cfg = self.config
        quantize_kv_triton(
            k, v, self.k_lut, self.k_lower, self.k_upper, self.v_lut, self.n_slots, cfg.key_bits, cfg.value_bits,
            k_out=(self.k_codes, self.k_out_val, self.k_out_idx),
            v_out=(self.v_codes, self.v_scale, self.v_zero, self.v_out_val, self.v_out_idx), start=start,
            k_zero=self.k_zero, k_scale=self.k_scale, clip_counter=self.clip_counter,
        )

    @property
    def n_clipped(self) -> int:
        """Key outliers beyond the slots, clipped to the threshold, since the last reset (syncs on CUDA)."""
        extra = int(self.clip_counter.item()) if self.clip_counter is not None else 0
        return self.n_clipped_host + extra

    # ---------------------------------------------------------------- batch rows of every stored tensor
    def batch_tensors(self) -> list[str]:
        """Names of the batch-first tensors the layer stores (empty before initialization)."""
        return list(HISTORY_TENSORS + SINK_TENSORS + ROW_TENSORS) if self.is_initialized else []

    def _map_batch(self, fn) -> None:
        for name in self.batch_tensors():
            setattr(self, name, fn(getattr(self, name)))
        self.sinks_all_valid = self.window_all_valid = None
        if self.is_initialized:
            self.batch_size = self.sink_k.shape[0]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: pick batch rows ``beam_idx`` of every stored tensor."""
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])

    def offload(self) -> None:
        """Move the storage to CPU (`prefetch` brings it back)."""
        for name in self.batch_tensors():
            setattr(self, name, getattr(self, name).to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.is_initialized and self.sink_k.device != self.device:
            for name in self.batch_tensors():
                setattr(self, name, getattr(self, name).to(self.device, non_blocking=True))

    # ---------------------------------------------------------------- accounting
    def bytes_per_history_token(self) -> int:
        """Bytes one packed token costs per sequence: codes, value scale/zero, outlier slots (K and V), position."""
        if not self.is_initialized:
            return 0
        return history_token_bytes(self.config, self.num_heads, self.head_dim, self.dtype)

    def bytes_per_sink_token(self) -> int:
        """Bytes one sink token costs per sequence: exact K and V in the model dtype, plus its int32 position."""
        if not self.is_initialized:
            return 0
        return sink_token_bytes(self.num_heads, self.head_dim, self.dtype)

    def memory_footprint(self, include_spare: bool = False) -> int:
        """Bytes of this layer's token storage (see :meth:`KVQuantCache.get_memory_footprint`)."""
        if not self.is_initialized:
            return 0
        n_hist = self.capacity if include_spare else self.length
        n_sink = self.config.sink_tokens + self.config.recent_window if include_spare else self.n_exact
        return self.batch_size * (n_hist * self.bytes_per_history_token() + n_sink * self.bytes_per_sink_token())

    # ---------------------------------------------------------------- pickling (pickle, torch.save)
    def __getstate__(self) -> dict:
        """Pickled state: every stored tensor, the config and signposts. The weakref to the owning cache is
        dropped (:class:`~kvquant_hf.cache.KVQuantCache` sets it again when it is loaded)."""
        parent = getattr(super(), "__getstate__", None)  # (object.__getstate__ from Python 3.11)
        state = dict(parent() if parent is not None else self.__dict__)
        state["owner"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        """Restore a pickled layer. Loaded onto another device (``torch.load(..., map_location=...)``), the layer
        follows its tensors (the lookup tables tell where: offloading never moves them): device, backend and the
        device-side clip counter are set for where they now are."""
        self.__dict__.update(state)
        if not self.is_initialized or self.k_lut.device == self.device:
            return
        self.device = self.k_lut.device
        self.backend = resolve_backend(self.config.backend, self.device, self.head_dim)
        triton = self.backend == "triton" and 2 * (self.n_slots + 1) <= self.head_dim
        if self.clip_counter is not None and not triton:
            self.n_clipped_host += int(self.clip_counter.item())
            self.clip_counter = None
        elif triton and self.clip_counter is None:
            self.clip_counter = torch.zeros(1, dtype=torch.int32, device=self.device)
        self.triton_quantize = triton

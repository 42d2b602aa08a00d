"""`KVQuantCache`: the packed KVQuant cache for Hugging Face transformers (arXiv 2401.18079).

Each model layer owns a :class:`KVQuantLayer` that stores

* the **attention sink**: the first ``config.sink_tokens`` real tokens of every sequence, exact and *pre-RoPE*
  (``sink_k / sink_v [B, H, n_sink, D]``, positions ``sink_positions [B, n_sink]`` int32), plus the sink keys
  rotated once when they arrive (``sink_k_rot``, model dtype; decode steps do not rotate the sink again);
* the **packed history**: every other token, quantized on arrival in the layout of
  :class:`kvquant_hf.attention.PackedKV` (pre-RoPE nuqX key codes with per-channel calibrated thresholds and
  outlier slots, nuqX value codes with per-token scale/zero and outlier slots, ``positions [B, cap]`` int32).

The patched attention forwards (:mod:`kvquant_hf.models`) call ``cache.layers[i].attend(AttendInputs)``: the
new tokens attend exactly and causally to each other and to the sink, and to the history through its
quantized form (RoPE applied on the fly from the stored positions); then they are stored. Nothing is ever
re-quantized and the history is never dequantized as a whole: the torch backend walks it block by block.

Left padding: the sink of a row holds that row's first *real* tokens; the row's padding goes to the front of
its history and is masked through ``hist_start``. The cache is therefore not stored in arrival order for
padded rows, which is why the history columns of the attention mask are not read: padding is tracked from
the first call (the diagonal of its mask) and the sliding window is applied from the stored positions.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import math
import warnings
import weakref
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from . import quant
from .attention import PackedKV, fused_lse_available, packed_attention_prefill, packed_attention_torch

#: query rows (per KV head: q_len) from which a call counts as a prefill chunk for ``prefill_attention``
PREFILL_MIN_ROWS = 16
from .config import KVQuantConfig
from .errors import (
    BackendUnavailableError,
    CacheMismatchError,
    KVQuantConfigError,
    KVQuantError,
    KVQuantNumericalError,
    UnsupportedModelError,
)
from .layer_api import AttendInputs, apply_rope

logger = logging.getLogger(__name__)

# storage attributes of a layer: name -> batch-first tensor (reorder/select/offload walk this list)
_HISTORY_TENSORS = (
    "k_codes", "k_out_val", "k_out_idx", "v_codes", "v_scale", "v_zero", "v_out_val", "v_out_idx", "positions",
)
_SINK_TENSORS = ("sink_k", "sink_v", "sink_positions", "sink_valid", "sink_k_rot")
_ROW_TENSORS = ("hist_start",)
GROWTH_FACTOR = 1.5
MIN_TRITON_HEAD_DIM = 32
UNCALIBRATED_MIN_SAMPLE = 16  # prompt tokens below which uncalibrated key ranges also use the sink tokens
_UNCALIBRATED_WARNED = False


class UncalibratedCacheWarning(UserWarning):
    """Emitted once per process when a `KVQuantCache` runs without calibrated signposts."""


def _warn_uncalibrated() -> None:
    global _UNCALIBRATED_WARNED
    if _UNCALIBRATED_WARNED:
        return
    _UNCALIBRATED_WARNED = True
    warnings.warn(
        "KVQuantCache has no signposts: using NormalFloat tables and key ranges taken from the first prompt. "
        "Calibrating improves accuracy: run `python calibrate.py --model ... --output-dir S` (or "
        "kvquant_hf.calibrate) and pass cache_config={'signposts': S}.",
        UncalibratedCacheWarning,
        stacklevel=3,
    )


# --------------------------------------------------------------------------------------------
# backend selection
# --------------------------------------------------------------------------------------------
def _triton_module():
    """The kernels package (imported lazily, never at `import kvquant_hf`); None if it cannot be imported."""
    if importlib.util.find_spec("triton") is None:
        return None, "the `triton` package is not installed"
    try:
        module = importlib.import_module("kvquant_hf.kernels")
    except ImportError as exc:
        return None, f"`kvquant_hf.kernels` cannot be imported ({exc})"
    if not hasattr(module, "packed_attention_triton"):
        return None, "`kvquant_hf.kernels` has no `packed_attention_triton`"
    return module, ""


def resolve_backend(backend: str, device: torch.device, head_dim: int | None = None) -> str:
    """Map ``config.backend`` to the backend used on ``device``: ``"torch"`` or ``"triton"``.

    ``"auto"`` picks Triton on CUDA when the kernels import and ``head_dim`` is a power of two >= 32, torch
    otherwise; ``"triton"`` where it cannot run raises :class:`~kvquant_hf.errors.BackendUnavailableError`.
    (The kernels accept head_dim 16, but their no-``tl.dot`` path for ``head_dim < 32`` disagreed with the torch
    reference on an H200 at commit f1309cc, so it is not used.)
    """
    if backend == "torch":
        return "torch"
    module = None
    if device.type != "cuda":
        reason = f"the cache lives on {device.type!r}, and the Triton kernels need a CUDA device"
    elif head_dim is not None and (head_dim < MIN_TRITON_HEAD_DIM or head_dim & (head_dim - 1)):
        reason = f"the Triton path needs a power-of-two head_dim >= {MIN_TRITON_HEAD_DIM}, the model has {head_dim}"
    else:
        module, reason = _triton_module()
    if module is not None:
        return "triton"
    if backend == "triton":
        raise BackendUnavailableError(
            f"backend='triton' cannot run here: {reason}. Use backend='torch' (or 'auto', which falls back to torch)."
        )
    return "torch"


def _mask_to_bool(mask: torch.Tensor) -> torch.Tensor:
    """True = attend, for bool masks and additive float masks (0 = attend, large negative = masked)."""
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point():
        return mask > torch.finfo(mask.dtype).min / 2
    return mask != 0


def _device_guard(device: torch.device):
    """Make ``device`` the current CUDA device while Triton launches there (Triton launches on the current
    device; with an accelerate ``device_map`` a layer's cache lives on another GPU than the current one)."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _round_up(n: int, block: int) -> int:
    return -(-n // block) * block


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def history_token_bytes(config: KVQuantConfig, num_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes one packed history token costs per sequence and layer (the single source of the cache's accounting).

    ``H * (D*key_bits/8 + D*value_bits/8 + 2*scale_bytes + 2*S*(dtype_bytes + 1)) + 4``: key and value codes,
    value scale/zero, K and V outlier slots (value + uint8 channel), int32 position.
    """
    es = _element_size(dtype)
    ss = _element_size(quant.value_scale_dtype(dtype))
    slot = config.slots_for(head_dim) * (es + 1)
    key_bytes = quant.packed_dim(head_dim, config.key_bits)
    value_bytes = quant.packed_dim(head_dim, config.value_bits)
    return num_heads * (key_bytes + slot + value_bytes + 2 * ss + slot) + 4


def sink_token_bytes(num_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes one sink token costs per sequence and layer: exact K (pre-RoPE and rotated) and V in the model dtype
    + int32 position."""
    return 3 * num_heads * head_dim * _element_size(dtype) + 4


def layer_tensor_bytes(config: KVQuantConfig, batch: int, num_heads: int, head_dim: int, dtype: torch.dtype,
                       capacity: int) -> list[int]:
    """``nbytes`` of every tensor one initialized :class:`KVQuantLayer` allocates at history ``capacity``.

    The same tensors as :meth:`KVQuantLayer.lazy_initialization` / ``_ensure_capacity`` create (history, sink,
    per-row state, lookup tables, key thresholds, clip counter), so a planner summing them predicts the
    allocation exactly (``kvquant_hf.planner``). The clip counter and the key thresholds are counted even where
    a layer may not hold them (torch backend, uncalibrated before the first prompt): a few KiB at most.
    """
    es = _element_size(dtype)
    ss = _element_size(quant.value_scale_dtype(dtype))
    h, d, b, cap = num_heads, head_dim, batch, capacity
    s = config.slots_for(d)
    ns = config.sink_tokens
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
    return _round_up(hist, config.block_size) if hist > 0 else 0


def grown_capacities(config: KVQuantConfig, history_tokens: int, append: int) -> list[int]:
    """Capacities a layer passes through without a reservation when ``history_tokens`` arrive in appends of
    ``append`` tokens (prefill chunks, or 1 per decode step): the geometric growth of ``_ensure_capacity``
    (each growth copies the old arrays into new ones, so both exist for a moment)."""
    caps: list[int] = []
    cap = length = 0
    target, append = max(0, int(history_tokens)), max(1, int(append))
    while length < target:
        end = min(length + append, target)
        if end > cap:
            cap = _round_up(max(end, math.ceil(cap * GROWTH_FACTOR)), config.block_size)
            caps.append(cap)
        length = min(end + (cap - end) // append * append, target)
    return caps


# --------------------------------------------------------------------------------------------
# one layer
# --------------------------------------------------------------------------------------------
class KVQuantLayer(CacheLayerMixin):
    """Packed KVQuant storage of one attention layer, plus the attention over it (:meth:`attend`).

    Args:
        config (`KVQuantConfig`): the cache configuration.
        layer_idx (`int`): index of the model layer (for messages and signposts).
        key_signposts / value_signposts (optional): the calibrated ``LayerSignposts`` of this layer for keys
            (``key_lut``, ``key_lower``, ``key_upper``) and values (``value_lut``). None = uncalibrated: NormalFloat
            tables and key thresholds from the first prompt this layer sees.

    Storage (``B`` batch, ``H`` kv heads, ``D`` head_dim, ``S`` outlier slots, ``cap`` capacity): see
    :class:`kvquant_hf.attention.PackedKV`; sink ``sink_k/sink_v [B, H, sink_tokens, D]`` (model dtype, pre-RoPE),
    ``sink_positions [B, sink_tokens]`` int32, ``sink_valid [B, sink_tokens]`` bool, ``hist_start [B]`` int64.
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
        self.has_hist_pad = False
        # CUDA-graph decode (kvquant_hf.cuda_graph): the history length lives on the device and the host
        # mirror `length` is advanced by the graph runner after each replay
        self.graph_mode = False
        self.length_dev = None  # int32 [1]
        self._advance_length = True  # False: length_dev is shared and advanced by its owner (CUDAGraphDecoder)
        self._sinks_all_valid = None  # host cache of sink_valid[:, :n_sink].all() (None: not known)
        self._key_thresholds_from_prompt = key_signposts is None
        self.k_lower = self.k_upper = self.k_zero = self.k_scale = None
        for name in _HISTORY_TENSORS + _SINK_TENSORS + _ROW_TENSORS:
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
        self._load_quantizer_params()
        self.capacity = 0
        for name in _HISTORY_TENSORS:
            setattr(self, name, self._empty_history(name, b, 0))
        ns = cfg.sink_tokens
        self.sink_k = torch.zeros(b, h, ns, d, dtype=self.dtype, device=self.device)
        self.sink_v = torch.zeros(b, h, ns, d, dtype=self.dtype, device=self.device)
        self.sink_positions = torch.zeros(b, ns, dtype=torch.int32, device=self.device)
        self.sink_valid = torch.zeros(b, ns, dtype=torch.bool, device=self.device)
        self.sink_k_rot = torch.zeros(b, h, ns, d, dtype=self.dtype, device=self.device)
        self._sink_rope = None  # (inv_freq object, attention_scaling) sink_k_rot was rotated with; None: stale
        self._sinks_all_valid = None
        self.hist_start = torch.zeros(b, dtype=torch.int64, device=self.device)
        self.length = self.n_sink = 0
        self.has_hist_pad = False
        self.is_initialized = True
        if self.reserve_tokens:
            self._ensure_capacity(max(0, self.reserve_tokens - ns))

    def _load_quantizer_params(self) -> None:
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
            self._set_key_thresholds(lower.to(dev), upper.to(dev))
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

    def _set_key_thresholds(self, lower: torch.Tensor, upper: torch.Tensor) -> None:
        self.k_lower, self.k_upper = lower.to(torch.float32), upper.to(torch.float32)
        self.k_zero, self.k_scale = quant.key_zero_scale(self.k_lower, self.k_upper)

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

    def _ensure_capacity(self, n_tokens: int) -> None:
        """Grow the history to hold ``n_tokens`` (geometrically, in whole blocks; old data is copied, never re-quantized)."""
        if n_tokens <= self.capacity:
            return
        block = self.config.block_size
        new_cap = _round_up(max(n_tokens, math.ceil(self.capacity * GROWTH_FACTOR)), block)
        for name in _HISTORY_TENSORS:
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
            self._ensure_capacity(max(0, self.reserve_tokens - self.config.sink_tokens))

    # ---------------------------------------------------------------- views
    def packed_view(self) -> PackedKV | None:
        """The packed history as :class:`~kvquant_hf.attention.PackedKV` (None while it is empty)."""
        if not self.is_initialized or self.length == 0:
            return None
        return PackedKV(
            k_codes=self.k_codes, k_out_val=self.k_out_val, k_out_idx=self.k_out_idx,
            v_codes=self.v_codes, v_scale=self.v_scale, v_zero=self.v_zero,
            v_out_val=self.v_out_val, v_out_idx=self.v_out_idx,
            k_lut=self.k_lut, v_lut=self.v_lut, k_zero=self.k_zero, k_scale=self.k_scale,
            positions=self.positions, length=self.length,
            key_bits=self.config.key_bits, value_bits=self.config.value_bits, head_dim=self.head_dim,
        )

    def dequantized_history(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 pre-RoPE keys and values ``[B, H, length, D]`` of the packed history (tests and debugging only)."""
        view = self.packed_view()
        if view is None:
            shape = (self.batch_size, self.num_heads, 0, self.head_dim)
            return torch.zeros(shape, device=self.device), torch.zeros(shape, device=self.device)
        return view.dequantize_block(0, self.length)

    # ---------------------------------------------------------------- attention
    def attend(self, inputs: AttendInputs) -> torch.Tensor:
        """Attend ``inputs.query`` over ``[sink | packed history | new tokens]``, then store the new tokens.

        Args:
            inputs (`AttendInputs`): queries ``[B, Hq, L, D]`` (rotated), new pre-RoPE keys and values
                ``[B, H, L, D]``, positions ``[B, L]``, RoPE, the model's attention mask, scaling, sliding window.

        Returns:
            `torch.Tensor`: ``[B, L, Hq, D]`` in the query dtype.
        """
        q, k, v = inputs.query, inputs.key, inputs.value
        if k.dim() != 4 or v.shape != k.shape:
            raise CacheMismatchError(
                f"layer {self.layer_idx}: keys {tuple(k.shape)} and values {tuple(v.shape)} must both be "
                "[batch, kv_heads, seq, head_dim] of the same shape."
            )
        if v.dtype != k.dtype or v.device != k.device:
            raise CacheMismatchError(
                f"layer {self.layer_idx}: keys are {k.dtype} on {k.device} but values are {v.dtype} on {v.device}; "
                "the model's k_proj and v_proj must share a dtype and device."
            )
        b, h, n_new, d = k.shape
        if not self.is_initialized or (self.length == 0 and self.n_sink == 0 and (b, h, d, k.dtype, k.device) != (
                self.batch_size, self.num_heads, self.head_dim, self.dtype, self.device)):
            self.lazy_initialization(k, v)  # first use, or an empty (reset) cache reused with another shape/dtype
        elif (b, h, d) != (self.batch_size, self.num_heads, self.head_dim):
            raise CacheMismatchError(
                f"layer {self.layer_idx}: new keys have batch/heads/head_dim {(b, h, d)} but the cache holds "
                f"{(self.batch_size, self.num_heads, self.head_dim)}; call cache.reset() or use a new KVQuantCache."
            )
        if k.device != self.device:
            raise CacheMismatchError(
                f"layer {self.layer_idx}: keys arrived on {k.device} but this layer's cache lives on {self.device}; "
                "keep each layer on one device for the whole generation (call cache.reset() before moving the model)."
            )
        if k.dtype != self.dtype:
            raise CacheMismatchError(
                f"layer {self.layer_idx}: keys arrived as {k.dtype} but this layer's cache holds {self.dtype}; "
                "do not change the model dtype mid-generation (call cache.reset() or use a new KVQuantCache)."
            )
        window = inputs.sliding_window
        # Triton backend: one kernel makes the exact block (kvquant_hf.kernels.exact_block.decode_prep); the guard goes
        # into it unless nonfinite="error" must raise before anything is stored (a host check, eager mode only)
        fused = self.backend == "triton" and window is None
        guard_in_kernel = fused and (self.graph_mode or self.config.nonfinite != "error")
        if not guard_in_kernel:
            k, v = self._check_finite(k, v, inputs.positions)
        past = self.n_sink + self.length
        positions = inputs.positions.to(self.device, torch.int64).expand(b, n_new)
        if self.graph_mode and n_new == 1 and window is None:
            # CUDA-graph decode: the one new token sees itself, the padding of the prompt is in hist_start and
            # sink_valid (recorded at prefill), and the replayed mask is not read anyway (transformers builds a 4D
            # mask while a graph is captured); no mask kernels in the graph
            new_visible, real = None, None
        else:
            new_visible, real = self._new_block_mask(inputs.attention_mask, past, n_new, positions, window)
        # CUDA-graph decode (the sink is full, every new token goes to the history): the kernel also writes the
        # positions of the new tokens at the device-side length
        write_pos = fused and self.graph_mode

        if fused:
            module, _ = _triton_module()
            cos, sin = inputs.rope.cos.to(q.dtype), inputs.rope.sin.to(q.dtype)
            with _device_guard(self.device):
                q, exact_k, exact_v = module.decode_prep(
                    q, k, v, cos, sin,
                    self._rotated_sink(inputs.rope) if self.n_sink else None,
                    self.sink_v[:, :, : self.n_sink] if self.n_sink else None,
                    rotate_query=not inputs.query_rotated,
                    counter=self.nonfinite_counter if guard_in_kernel else None,
                    positions=positions if write_pos else None,
                    positions_out=self.positions if write_pos else None,
                    length_dev=self.length_dev if write_pos else None,
                )
            exact_mask = self._exact_mask(new_visible, positions, window, b, n_new)
        else:
            if not inputs.query_rotated:  # what the stock attention forward does, in the model dtype
                q = apply_rope(q, inputs.rope.cos.to(q.dtype), inputs.rope.sin.to(q.dtype))
            exact_k, exact_v, exact_mask = self._exact_block_torch(k, v, inputs.rope, new_visible, positions, window)

        out = self._attention(
            q, exact_k, exact_v, exact_mask,
            scaling=inputs.scaling,
            inv_freq=inputs.rope.inv_freq,
            attention_scaling=inputs.rope.attention_scaling,
            hist_start=self.hist_start if self.has_hist_pad else None,
            q_positions=positions if window is not None else None,
            window=window,
        )
        self._store(k, v, positions, real, inputs.rope, positions_written=write_pos)
        return out.transpose(1, 2)

    def _sinks_valid(self) -> bool:
        """Whether every row's sink tokens are real (no left padding in them): then a step with no mask needs no
        exact-block mask at all. Cached on the host (one sync when the sink changed)."""
        if self._sinks_all_valid is None:
            self._sinks_all_valid = bool(self.sink_valid[:, : self.n_sink].all())
        return self._sinks_all_valid

    def _exact_mask(self, new_visible, positions, window, b: int, n_new: int) -> torch.Tensor | None:
        """Visibility of ``[sink | new tokens]`` for the new rows ``[B, L, S + L]`` (None: everything visible)."""
        if not self.n_sink:
            return new_visible
        if new_visible is None and window is None and self._sinks_valid():
            return None
        sink_pos = self.sink_positions[:, : self.n_sink]
        sink_visible = self.sink_valid[:, None, : self.n_sink].expand(b, n_new, self.n_sink)
        if window is not None:
            sink_visible = sink_visible & (positions[:, :, None] - sink_pos[:, None, :].long() < window)
        if new_visible is None:
            new_visible = torch.ones(b, n_new, n_new, dtype=torch.bool, device=self.device)
        return torch.cat([sink_visible, new_visible], dim=-1)

    def _exact_block_torch(self, k, v, rope, new_visible, positions, window):
        """``(exact_k, exact_v, exact_mask)`` with torch ops (the torch backend, and sliding windows)."""
        b, n_new = k.shape[0], k.shape[2]
        # exact block: [sink (rotated on the fly from stored positions) | new tokens (rotated like the model does)]
        # the torch path attends in float32 anyway: rotate in float32 too, so fp16 keys near 65504 cannot overflow
        # in RoPE (the Triton path rotates the exact block in the model dtype, as transformers does)
        rot_dtype = k.dtype if self.backend == "triton" else torch.float32
        k_new_rot = apply_rope(k.to(rot_dtype), rope.cos.to(rot_dtype), rope.sin.to(rot_dtype))
        if not self.n_sink:
            return k_new_rot, v, new_visible
        sink_pos = self.sink_positions[:, : self.n_sink]
        if rot_dtype == self.dtype:  # the sink keys rotated when they arrived (again if the RoPE changed)
            sink_k = self._rotated_sink(rope)
        else:
            cos, sin = rope.cos_sin(sink_pos, dtype=rot_dtype)
            sink_k = apply_rope(self.sink_k[:, :, : self.n_sink].to(rot_dtype), cos, sin)
        exact_k = torch.cat([sink_k, k_new_rot], dim=2)
        exact_v = torch.cat([self.sink_v[:, :, : self.n_sink], v], dim=2)
        return exact_k, exact_v, self._exact_mask(new_visible, positions, window, b, n_new)

    def _rotated_sink(self, rope) -> torch.Tensor:
        """``sink_k_rot[:, :, :n_sink]``: the sink keys rotated to their positions in the model dtype (what the exact
        block needs every step). Rotated when they arrive (:meth:`_store`); rotated again here only if ``rope``
        is not the one they were rotated with (a new ``inv_freq`` object, e.g. dynamic RoPE scaling, or a sink
        written without it)."""
        if not self._sink_rope_is(rope):
            self._rotate_sink(rope, slice(0, self.n_sink))
        return self.sink_k_rot[:, :, : self.n_sink]

    def _sink_rope_is(self, rope) -> bool:
        return (self._sink_rope is not None and self._sink_rope[0] is rope.inv_freq
                and self._sink_rope[1] == rope.attention_scaling)

    def _rotate_sink(self, rope, sl: slice) -> None:
        cos, sin = rope.cos_sin(self.sink_positions[:, sl], dtype=self.dtype)
        self.sink_k_rot[:, :, sl] = apply_rope(self.sink_k[:, :, sl], cos, sin)
        self._sink_rope = (rope.inv_freq, rope.attention_scaling)

    def _check_finite(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """Apply ``config.nonfinite`` to the new keys/values (see :class:`~kvquant_hf.config.KVQuantConfig`).

        A token is *bad* when any element of its key or value, in any head, is NaN or Inf (the Triton backend zeroes
        and counts in one kernel, in place: :func:`kvquant_hf.kernels.zero_nonfinite_tokens_`). ``"error"`` raises
        :class:`KVQuantNumericalError` before anything is stored and rolls back the layers that already stored this
        forward call (one host sync per layer and call); ``"zero"`` (and CUDA-graph mode, which cannot sync) stores
        bad tokens as zeros in every head and counts them on the device.
        """
        if self.backend == "triton" and (self.graph_mode or self.config.nonfinite != "error"):
            module, _ = _triton_module()
            with _device_guard(self.device):  # one kernel: detect, zero in place, count
                module.zero_nonfinite_tokens_(k, v, self.nonfinite_counter)
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
                layer._rollback(target)
            except KVQuantError:  # cannot crop a padded sink: start the sequence again
                for other in cache.layers:
                    other.reset()
                return

    def _rollback(self, seq_len: int) -> None:
        if seq_len == 0:
            self.reset()
        else:
            self.crop(seq_len)

    @property
    def n_nonfinite(self) -> int:
        """Tokens with NaN/Inf keys or values stored as zeros (``nonfinite="zero"``) since the last reset."""
        return int(self.nonfinite_counter.item()) if self.nonfinite_counter is not None else 0

    @property
    def n_clipped(self) -> int:
        """Key outliers beyond the slots, clipped to the threshold, since the last reset (syncs on CUDA)."""
        extra = int(self.clip_counter.item()) if self.clip_counter is not None else 0
        return self.n_clipped_host + extra

    def _prefill_path(self, q: torch.Tensor, kwargs: dict) -> bool:
        """Whether this call takes the dequantize-and-attend prefill path (see ``prefill_attention``)."""
        mode = self.config.prefill_attention
        if (mode == "kernel" or self.graph_mode or self.length == 0 or q.shape[2] < PREFILL_MIN_ROWS
                or kwargs.get("hist_start") is not None or kwargs.get("window") is not None):
            return False
        return mode == "dequant" or (self.backend == "triton" and fused_lse_available(q.device, q.dtype, q.shape[-1]))

    def _attention(self, q, exact_k, exact_v, exact_mask, **kwargs) -> torch.Tensor:
        if self._prefill_path(q, kwargs):
            with _device_guard(self.device):
                return packed_attention_prefill(
                    q, self.packed_view(), exact_k, exact_v, exact_mask, scaling=kwargs["scaling"],
                    inv_freq=kwargs["inv_freq"], attention_scaling=kwargs["attention_scaling"],
                    fused=None if self.device.type == "cuda" else False,
                )
        if self.backend == "triton":
            module, _ = _triton_module()
            mask = exact_mask.contiguous() if exact_mask is not None else None
            if self.graph_mode:
                # fixed grid and a device-side length: one captured graph serves every step
                kwargs.update(length_dev=self.length_dev, num_splits=self.graph_splits)
            with _device_guard(self.device):
                return module.packed_attention_triton(
                    q.contiguous(), self.packed_view(), exact_k.contiguous(), exact_v.contiguous(), mask, **kwargs
                )
        return packed_attention_torch(q, self.packed_view(), exact_k, exact_v, exact_mask, **kwargs)

    def _new_block_mask(
        self, mask: torch.Tensor | None, past: int, n_new: int, positions: torch.Tensor, window: int | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Visibility among the new tokens ``[B, L, L]`` (None = all) and which new tokens are real ``[B, L]``."""
        b, dev = self.batch_size, self.device
        real = None
        if mask is None:
            if n_new == 1:
                return None, None
            visible = torch.ones(n_new, n_new, dtype=torch.bool, device=dev).tril().expand(b, n_new, n_new)
        elif mask.dim() == 4:
            # [stored | new] columns (transformers sizes masks with get_mask_sizes), or only the new block's
            # columns (chunked prefill builds [B, 1, chunk, chunk] so no mask grows with the context)
            new_only = mask.shape[-1] == n_new and past > 0
            if (mask.shape[-1] < past + n_new and not new_only) or mask.shape[-2] != n_new:
                raise KVQuantError(
                    f"layer {self.layer_idx}: the attention mask has shape {tuple(mask.shape)} but the cache holds "
                    f"{past} tokens and {n_new} arrive; the mask must cover [stored | new] (the model must use "
                    "cache.get_mask_sizes, as patched models do) or only the new tokens."
                )
            block = mask[:, 0, :, :n_new] if new_only else mask[:, 0, :, past : past + n_new]
            visible = _mask_to_bool(block).to(dev).expand(b, n_new, n_new)
            real = torch.diagonal(visible, dim1=-2, dim2=-1)
        elif mask.dim() == 2:
            real = _mask_to_bool(mask[:, past : past + n_new]).to(dev).expand(b, n_new)
            causal = torch.ones(n_new, n_new, dtype=torch.bool, device=dev).tril()
            visible = causal & real[:, None, :]
        else:
            raise KVQuantError(
                f"layer {self.layer_idx}: attention masks of shape {tuple(mask.shape)} are not supported; pass a 2D "
                "padding mask [B, kv_len] or a 4D mask [B, 1, q_len, kv_len]."
            )
        if window is not None and (mask is None or mask.dim() == 2):
            visible = visible & (positions[:, :, None] - positions[:, None, :] < window)
        return visible, real

    # ---------------------------------------------------------------- storing
    def _store(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, real: torch.Tensor | None,
               rope=None, positions_written: bool = False) -> None:
        """Append new tokens ``[B, H, L, D]``: fill the sink first (rotating its keys once with ``rope``), quantize
        the rest into the history (``positions_written``: CUDA-graph decode, the exact-block kernel has already
        written their positions)."""
        n_new = k.shape[2]
        room = self.config.sink_tokens - self.n_sink
        take = min(room, n_new)
        first_call = self.n_sink == 0 and self.length == 0
        if take > 0:
            if first_call and real is not None and take < n_new:
                # left padding: row b's sink is its first real tokens; its padding goes first in the history
                n_pad = (~real).to(torch.int64).cumprod(-1).sum(-1)  # leading padding per row
                start = n_pad.clamp(max=n_new - take)
                ar = torch.arange(n_new - take, device=self.device)
                sink_idx = start[:, None] + torch.arange(take, device=self.device)
                hist_idx = ar[None, :] + take * (ar[None, :] >= start[:, None])
                self.hist_start = start
                self.has_hist_pad = bool((start > 0).any())
            else:
                sink_idx = torch.arange(take, device=self.device).expand(self.batch_size, take)
                hist_idx = torch.arange(take, n_new, device=self.device).expand(self.batch_size, n_new - take)
            sink_valid = torch.ones_like(sink_idx, dtype=torch.bool) if real is None else real.gather(1, sink_idx)
            sl = slice(self.n_sink, self.n_sink + take)
            self.sink_k[:, :, sl] = _gather_seq(k, sink_idx)
            self.sink_v[:, :, sl] = _gather_seq(v, sink_idx)
            self.sink_positions[:, sl] = positions.gather(1, sink_idx).to(torch.int32)
            self.sink_valid[:, sl] = sink_valid
            if real is not None:  # padding may have reached the sink: ask again when needed (new real tokens
                self._sinks_all_valid = None  # leave a known answer as it was)
            self.n_sink += take
            if rope is None:
                self._sink_rope = None  # rotated when read
            else:  # the new sink tokens, or all of them if the earlier ones were rotated with another RoPE
                self._rotate_sink(rope, sl if self._sink_rope_is(rope) else slice(0, self.n_sink))
            if take == n_new:
                return
            k, v, positions = _gather_seq(k, hist_idx), _gather_seq(v, hist_idx), positions.gather(1, hist_idx)
        elif first_call and real is not None:
            # no sink: leading padding is masked through hist_start
            self.hist_start = (~real).to(torch.int64).cumprod(-1).sum(-1)
            self.has_hist_pad = bool((self.hist_start > 0).any())
        if self.k_lower is None:
            self._thresholds_from_prompt(k)
        self._append_history(k, v, positions, positions_written)

    def _thresholds_from_prompt(self, k: torch.Tensor) -> None:
        """Uncalibrated mode: per-channel key thresholds from this call's real, non-sink tokens ``[B, H, n, D]``."""
        _warn_uncalibrated()
        n = k.shape[2]
        keep = torch.arange(self.length, self.length + n, device=self.device)[None, :] >= self.hist_start[:, None]
        sample = k.permute(0, 2, 1, 3)[keep]  # [N, H, D]
        if sample.shape[0] < UNCALIBRATED_MIN_SAMPLE and self.n_sink:
            sink = self.sink_k[:, :, : self.n_sink].permute(0, 2, 1, 3)[self.sink_valid[:, : self.n_sink]]
            sample = torch.cat([sample, sink], dim=0)
        if sample.shape[0] < UNCALIBRATED_MIN_SAMPLE:
            logger.warning(
                "KVQuantCache layer %d: uncalibrated key ranges come from only %d tokens; expect large errors. "
                "Use calibrated signposts or a longer first prompt.", self.layer_idx, sample.shape[0]
            )
        lower, upper = quant.key_thresholds_from_sample(sample.permute(1, 0, 2).unsqueeze(0), self.config.outlier_fraction)
        self._set_key_thresholds(lower, upper)

    def _append_history(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                        positions_written: bool = False) -> None:
        if self.graph_mode:
            self._append_history_graph(k, v, positions, positions_written)
            return
        n = k.shape[2]
        start, end = self.length, self.length + n
        self._ensure_capacity(end)
        cfg = self.config
        if self.triton_quantize:
            module, _ = _triton_module()
            with _device_guard(self.device):
                self._quantize_kv(module, k, v, start)
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

    def _quantize_kv(self, module, k: torch.Tensor, v: torch.Tensor, start) -> None:
        """Quantize and pack the new keys and values into the history at ``start`` (int, or the int32 device length
        in graph mode): one Triton launch for both."""
        cfg = self.config
        module.quantize_kv_triton(
            k, v, self.k_lut, self.k_lower, self.k_upper, self.v_lut, self.n_slots, cfg.key_bits, cfg.value_bits,
            k_out=(self.k_codes, self.k_out_val, self.k_out_idx),
            v_out=(self.v_codes, self.v_scale, self.v_zero, self.v_out_val, self.v_out_idx), start=start,
            k_zero=self.k_zero, k_scale=self.k_scale, clip_counter=self.clip_counter,
        )

    # ---------------------------------------------------------------- CUDA-graph decode
    def enter_graph_mode(self, extra_tokens: int, num_splits: int | None = None,
                         length_dev: torch.Tensor | None = None) -> None:
        """Make decode steps capturable: capacity for ``extra_tokens`` more tokens reserved now (no growth later),
        history length mirrored in an int32 device tensor that the kernels read (and this layer's append advances,
        unless the tensor is shared: see ``length_dev``).

        ``length_dev``: an int32 ``[1]`` tensor on this layer's device shared with other layers of the same length
        (set to this layer's length here). The layer then only reads it; whoever shares it advances it once per
        step after the last layer (:class:`~kvquant_hf.cuda_graph.CUDAGraphDecoder` does: one kernel per step
        instead of one per layer).
        """
        if not self.is_initialized or self.length == 0 or self.n_sink < self.config.sink_tokens:
            raise KVQuantError(
                f"layer {self.layer_idx}: CUDA-graph decode starts after the prompt is in the cache (prefill first)."
            )
        if self.backend != "triton" or not self.triton_quantize:
            raise BackendUnavailableError(
                f"layer {self.layer_idx}: CUDA-graph decode needs the Triton backend on CUDA (this layer uses "
                f"{self.backend!r}); use backend='auto' or 'triton' on a GPU, or turn cuda_graph off."
            )
        self._ensure_capacity(self.length + int(extra_tokens))
        if num_splits is None:
            module, _ = _triton_module()
            num_splits = module.default_num_splits(self.batch_size, self.num_heads, 1, self.capacity, self.device)
        self.graph_splits = int(num_splits)
        if length_dev is None:
            self.length_dev = torch.tensor([self.length], dtype=torch.int32, device=self.device)
        else:
            if length_dev.shape != (1,) or length_dev.dtype != torch.int32 or length_dev.device != self.device:
                raise KVQuantError(
                    f"layer {self.layer_idx}: a shared length_dev must be an int32 tensor of shape (1,) on "
                    f"{self.device}; got {length_dev.dtype} {tuple(length_dev.shape)} on {length_dev.device}."
                )
            self.length_dev = length_dev
            self.length_dev.fill_(self.length)
        self._advance_length = length_dev is None
        self._sinks_valid()  # known on the host before capture (it cannot sync)
        self.graph_mode = True

    def exit_graph_mode(self) -> None:
        """Back to host-driven appends (the host length is the truth again)."""
        self.graph_mode = False
        self.length_dev = None

    def sync_device_length(self) -> None:
        """Copy the host length to the device mirror (after crop/rewind on the host)."""
        if self.length_dev is not None:
            self.length_dev.fill_(self.length)

    def _append_history_graph(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                              positions_written: bool = False) -> None:
        """Append at the device-side length without touching the host (graph capture and replay)."""
        n = k.shape[2]
        module, _ = _triton_module()
        self._quantize_kv(module, k, v, self.length_dev)
        if not positions_written:
            idx = self.length_dev.long() if n == 1 else self.length_dev.long() + torch.arange(n, device=self.device)
            self.positions.index_copy_(1, idx, positions.to(torch.int32))
        if self._advance_length:  # (a shared length is advanced once per step by its owner)
            self.length_dev.add_(n)

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
        self._sinks_all_valid = None
        if self.is_initialized:
            self.hist_start.zero_()
            self.sink_valid.zero_()
        if self._key_thresholds_from_prompt:
            self.k_lower = self.k_upper = self.k_zero = self.k_scale = None

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
            self.length = keep - self.n_sink
            self.sync_device_length()
            return
        if self.has_hist_pad and self.length > 0:
            raise KVQuantError(
                f"cannot crop a left-padded batch to {keep} tokens (into its attention sink); call reset() instead."
            )
        self.length = 0
        self.n_sink = keep
        self.sink_valid[:, keep:] = False
        self._sinks_all_valid = None

    def _batch_tensors(self) -> list[str]:
        return list(_HISTORY_TENSORS + _SINK_TENSORS + _ROW_TENSORS) if self.is_initialized else []

    def _map_batch(self, fn) -> None:
        for name in self._batch_tensors():
            setattr(self, name, fn(getattr(self, name)))
        self._sinks_all_valid = None
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
        for name in self._batch_tensors():
            setattr(self, name, getattr(self, name).to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.is_initialized and self.sink_k.device != self.device:
            for name in self._batch_tensors():
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
        n_sink = self.config.sink_tokens if include_spare else self.n_sink
        return self.batch_size * (n_hist * self.bytes_per_history_token() + n_sink * self.bytes_per_sink_token())


def _gather_seq(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x [B, H, S, D]`` gathered along S with per-row indices ``idx [B, n]`` -> ``[B, H, n, D]``."""
    b, h, _, d = x.shape
    return x.gather(2, idx[:, None, :, None].expand(b, h, idx.shape[1], d))


class _LazyLayers(list):
    """Layer list that creates layers on first access when the number of layers was not given."""

    def __init__(self, factory):
        super().__init__()
        self._factory = factory
        self.append(factory(0))  # patched forwards recognise a kvquant cache by its first layer

    def __getitem__(self, idx):
        if isinstance(idx, int) and idx >= len(self):
            while len(self) <= idx:
                self.append(self._factory(len(self)))
        return super().__getitem__(idx)


# --------------------------------------------------------------------------------------------
# the cache
# --------------------------------------------------------------------------------------------
class KVQuantCache(Cache):
    """KVQuant KV cache (nuqX, pre-RoPE per-channel keys, dense-and-sparse outliers, attention sink).

    Works only with patched models (:func:`kvquant_hf.patch_model`), whose attention hands pre-RoPE keys to
    :meth:`KVQuantLayer.attend`. ``generate(..., cache_implementation="kvquant", cache_config={...})`` builds one
    and patches the model for you.

    Args:
        config (`KVQuantConfig` or `dict`, *optional*): cache settings (keys as in :class:`KVQuantConfig`).
        signposts (`Signposts` or `str`, *optional*): calibrated signposts or their folder; defaults to
            ``config.signposts``. None = uncalibrated (NormalFloat tables, key ranges from the first prompt).
        model_config (`PretrainedConfig`, *optional*): gives the number of layers and validates the signposts.
        num_layers (`int`, *optional*): number of layers; without it (and without ``model_config``/signposts)
            layers are created on first use.
        **overrides: any :class:`KVQuantConfig` field, applied on top of ``config``.

    Example:

    ```python
    >>> import kvquant_hf
    >>> model = kvquant_hf.patch_model(model)
    >>> cache = kvquant_hf.KVQuantCache({"bits": 4, "signposts": "signposts/"}, model_config=model.config)
    >>> out = model.generate(ids, past_key_values=cache, max_new_tokens=32)   # `cache=` on transformers >= 5.24
    >>> cache.memory_stats()["avg_bits_per_element"]
    ```
    """

    def __init__(
        self,
        config: KVQuantConfig | dict | None = None,
        signposts: Any = None,
        *,
        model_config: Any = None,
        num_layers: int | None = None,
        **overrides: Any,
    ) -> None:
        if config is None:
            config = KVQuantConfig()
        if isinstance(config, dict):
            config = KVQuantConfig.from_dict(config)
        if not isinstance(config, KVQuantConfig):
            raise KVQuantConfigError(f"config must be a KVQuantConfig or a dict, got {type(config).__name__}.")
        if overrides:
            base = config.to_dict()
            if "bits" in overrides:  # key/value bits that followed `bits` follow the new value
                for name in ("key_bits", "value_bits"):
                    if name not in overrides and base[name] == base["bits"]:
                        base[name] = None
            config = KVQuantConfig.from_dict({**base, **overrides})
        if signposts is None:
            signposts = config.signposts
        self.kvquant_config = config
        self.key_signposts, self.value_signposts = _load_signposts(signposts, config)
        if model_config is not None and self.key_signposts is not None:
            _validate_signposts(self.key_signposts, model_config, config.key_bits)
            if self.value_signposts is not self.key_signposts:
                _validate_signposts(self.value_signposts, model_config, config.value_bits)
        if num_layers is None and model_config is not None:
            text = model_config.get_text_config(decoder=True) if hasattr(model_config, "get_text_config") else model_config
            num_layers = text.num_hidden_layers
        if num_layers is None and self.key_signposts is not None:
            num_layers = len(self.key_signposts.layers)
        if num_layers is not None and self.key_signposts is not None and len(self.key_signposts.layers) != num_layers:
            raise KVQuantError(
                f"the signposts hold {len(self.key_signposts.layers)} layers but the model has {num_layers}; "
                "calibrate signposts for this model."
            )
        if num_layers is None:
            layers = _LazyLayers(self._make_layer)
        else:
            layers = [self._make_layer(i) for i in range(num_layers)]
        super().__init__(layers=layers)

    def _make_layer(self, idx: int) -> KVQuantLayer:
        ks = self.key_signposts.layers[idx] if self.key_signposts is not None else None
        vs = self.value_signposts.layers[idx] if self.value_signposts is not None else None
        layer = KVQuantLayer(self.kvquant_config, idx, ks, vs)
        layer.owner = weakref.ref(self)
        return layer

    @property
    def config(self) -> KVQuantConfig:
        return self.kvquant_config

    @property
    def is_calibrated(self) -> bool:
        return self.key_signposts is not None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Not supported: patched attention calls ``cache.layers[i].attend`` instead (raises a clear error)."""
        return KVQuantLayer.update(None, key_states, value_states)

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def reserve(self, total_tokens: int) -> None:
        """Preallocate every layer for ``total_tokens`` per sequence (for example prompt + max_new_tokens)."""
        for layer in list(self.layers):
            layer.reserve(total_tokens)
        self._reserve_tokens = int(total_tokens)

    def crop(self, max_length: int) -> None:
        """Drop tokens from the end: negative = tokens to remove, positive = tokens to keep (0: no-op)."""
        for layer in self.layers:
            layer.crop(max_length)

    def get_memory_footprint(self, include_spare: bool = False) -> int:
        """Bytes of stored token data across all layers.

        Per layer: ``B * (n_history * bytes_per_history_token + n_sink * bytes_per_sink_token)`` with
        ``bytes_per_history_token = H * (D*key_bits/8 + D*value_bits/8 + 2*scale_bytes + 2*S*(dtype_bytes + 1)) + 4``
        (codes, value scale/zero, K and V outlier slots value+channel, int32 position) and
        ``bytes_per_sink_token = 2*H*D*dtype_bytes + 4``. Per-layer constants (lookup tables, key thresholds) are
        not included.

        Args:
            include_spare (`bool`): also count allocated but unused capacity (history and sink slots).
        """
        return sum(layer.memory_footprint(include_spare) for layer in self.layers)

    def memory_stats(self) -> dict[str, Any]:
        """Storage summary of the cache.

        Returns:
            `dict` with ``layers``, ``batch_size``, ``seq_length`` (tokens per sequence), ``sink_tokens``,
            ``quantized_tokens``, ``bytes`` (see :meth:`get_memory_footprint`), ``bytes_allocated`` (with spare),
            ``fp16_bytes`` (the same tokens as an fp16 K/V cache), ``compression_ratio``,
            ``key_bits_per_element`` / ``value_bits_per_element`` / ``avg_bits_per_element`` (quantized tokens:
            codes, scales and outlier slots per stored element), ``avg_bits_per_element_all`` (every byte of
            ``bytes`` over every held K/V element, sink and positions included), ``n_clipped`` (key outliers beyond
            the slots, clipped to the threshold), ``n_nonfinite`` (tokens with NaN/Inf keys or values stored as
            zeros under ``nonfinite="zero"``; the largest count over layers), ``key_outlier_slot_fill`` (fraction of
            key slots in use),
            ``outlier_slots``, ``calibrated``, ``backend``.
        """
        layers = [layer for layer in self.layers if layer.is_initialized]
        stats: dict[str, Any] = {
            "layers": len(layers), "batch_size": 0, "seq_length": 0, "sink_tokens": 0, "quantized_tokens": 0,
            "bytes": 0, "bytes_allocated": 0, "fp16_bytes": 0, "compression_ratio": float("nan"),
            "key_bits_per_element": float("nan"), "value_bits_per_element": float("nan"),
            "avg_bits_per_element": float("nan"), "avg_bits_per_element_all": float("nan"),
            "n_clipped": 0, "n_nonfinite": 0, "key_outlier_slot_fill": float("nan"), "outlier_slots": None,
            "calibrated": self.is_calibrated, "backend": None,
        }
        if not layers:
            return stats
        first = layers[0]
        k_bits = v_bits = elements = all_elements = 0.0
        slots_used = slots_total = 0
        for layer in layers:
            es = torch.empty((), dtype=layer.dtype).element_size()
            ss = torch.empty((), dtype=layer.scale_dtype).element_size()
            n_el = layer.batch_size * layer.num_heads * layer.length * layer.head_dim
            per_vec_slot = layer.n_slots * (es + 1)
            vecs = layer.batch_size * layer.num_heads * layer.length
            k_bits += 8 * vecs * (layer.key_bytes + per_vec_slot)
            v_bits += 8 * vecs * (layer.value_bytes + 2 * ss + per_vec_slot)
            elements += n_el
            all_elements += 2 * layer.batch_size * layer.num_heads * layer.get_seq_length() * layer.head_dim
            stats["fp16_bytes"] += 2 * 2 * layer.batch_size * layer.num_heads * layer.get_seq_length() * layer.head_dim
            stats["n_clipped"] += layer.n_clipped
            stats["n_nonfinite"] = max(stats["n_nonfinite"], layer.n_nonfinite)
            if layer.n_slots and layer.length:
                slots_used += int((layer.k_out_idx[:, :, : layer.length] != quant.UNUSED_SLOT).sum())
                slots_total += vecs * layer.n_slots
        stats.update(
            batch_size=first.batch_size, seq_length=first.get_seq_length(), sink_tokens=first.n_sink,
            quantized_tokens=first.length, bytes=self.get_memory_footprint(),
            bytes_allocated=self.get_memory_footprint(include_spare=True), outlier_slots=first.n_slots,
            backend=first.backend,
        )
        if elements:
            stats["key_bits_per_element"] = k_bits / elements
            stats["value_bits_per_element"] = v_bits / elements
            stats["avg_bits_per_element"] = (k_bits + v_bits) / (2 * elements)
        if all_elements:
            stats["avg_bits_per_element_all"] = 8 * stats["bytes"] / all_elements
        if stats["bytes"]:
            stats["compression_ratio"] = stats["fp16_bytes"] / stats["bytes"]
        if slots_total:
            stats["key_outlier_slot_fill"] = slots_used / slots_total
        return stats

    def __repr__(self) -> str:
        return f"KVQuantCache(config={self.kvquant_config!r}, calibrated={self.is_calibrated}, layers={len(self.layers)})"


# --------------------------------------------------------------------------------------------
# signposts glue (the signposts module is imported lazily: it is only needed with calibrated caches)
# --------------------------------------------------------------------------------------------
def _load_signposts(signposts: Any, config: KVQuantConfig) -> tuple[Any, Any]:
    """``(key_signposts, value_signposts)`` from a folder or loaded object (both None when uncalibrated)."""
    if signposts is None:
        if config.qnorm:
            raise KVQuantConfigError(
                "qnorm=True needs calibrated signposts (Q-Norm statistics come from calibration); pass "
                "signposts=<folder written by calibrate.py> or set qnorm=False."
            )
        return None, None
    if isinstance(signposts, (str,)) or hasattr(signposts, "__fspath__"):
        from .signposts import load_signposts

        keys = load_signposts(str(signposts), bits=config.key_bits)
        values = keys if config.value_bits == config.key_bits else load_signposts(str(signposts), bits=config.value_bits)
        return keys, values
    if not hasattr(signposts, "layers"):
        raise KVQuantConfigError(
            f"signposts must be a folder written by calibrate.py or a loaded Signposts, got {type(signposts).__name__}."
        )
    bits = getattr(signposts, "bits", None)
    if bits is not None and config.key_bits != config.value_bits:
        raise KVQuantConfigError(
            f"a loaded Signposts object holds one bit width ({bits}) but key_bits={config.key_bits} and "
            f"value_bits={config.value_bits} differ; pass the signposts folder instead."
        )
    if bits is not None and bits != config.key_bits:
        raise KVQuantConfigError(
            f"the signposts were calibrated for {bits} bits but the cache uses bits={config.key_bits}; load "
            f"signposts with bits={config.key_bits} or set bits={bits}."
        )
    return signposts, signposts


def _validate_signposts(signposts: Any, model_or_config: Any, bits: int) -> None:
    from .signposts import validate_signposts

    validate_signposts(signposts, model_or_config, bits)

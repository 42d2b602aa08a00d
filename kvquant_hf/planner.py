"""Memory planner: how many tokens a `KVQuantCache` (or an fp16 cache) can hold on the given devices.

:func:`plan_capacity` takes a model (or its config), a cache config and the free memory of each device (queried
on CUDA, or given explicitly, which is how it is tested on CPU) and returns a :class:`CapacityPlan`: the largest
context per sequence that fits, per device and overall. The arithmetic is the cache's own:

* **cache bytes**: :func:`kvquant_hf.layer_storage.layer_tensor_bytes`, i.e. every tensor a layer allocates (packed
  history at its capacity, sink, per-row state, lookup tables, key thresholds), the same sizes that
  ``get_memory_footprint(include_spare=True)`` / ``memory_stats()["bytes_allocated"]`` count (plus the few KiB of
  per-layer constants); on CUDA each tensor is rounded up like the caching allocator does (512 B, 2 MiB for
  tensors over 1 MiB);
* **capacity policy**: ``generate`` reserves prompt + ``max_new_tokens`` up front, so a layer's capacity is
  ``round_up(tokens - sink_tokens, block_size)``; without a reservation (``reserved=False``) the geometric growth
  is simulated and the moment of a growth (old and new arrays of one layer at once) is counted;
* **weights**: the model's parameters and buffers per device (already resident when a loaded model is given, so
  not subtracted again from the *free* memory; computed from the config when only a config is given);
* **activations**: the peak temporaries of one prefill chunk (``prefill_chunk_size`` tokens, or the whole
  prompt when it is 0) or one decode step through a decoder layer: hidden states, q/k/v, the exact block and its
  mask, the attention kernel's split buffers, the MLP, and the last-position logits;
* **masks**: chunked prefill hands each later chunk a ``[B, 1, chunk, chunk]`` mask of its own tokens (the one
  transformers would build spans the whole context: 12 GiB at 3M tokens with 4096-token chunks), counted with the
  activations, so nothing but the cache grows with the context;
* **headroom**: a fixed reserve per device (CUDA workspaces, allocator fragmentation), 512 MiB by default.

Every layer holds every token, so with layers spread over several devices (accelerate ``device_map``) the
context that fits is the minimum over the devices of what each device's layers can hold.

Example:

```python
>>> plan = kvquant_hf.plan_capacity(model, {"bits": 2}, free_memory={"cuda:0": 130 * 2**30})
>>> plan.max_tokens, plan.per_device_tokens
```
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .attention import PREFILL_HISTORY_BLOCK, TORCH_HISTORY_BLOCK
from .config import KVQuantConfig
from .errors import KVQuantConfigError, KVQuantError
from .layer_storage import element_size, grown_capacities, history_token_bytes, layer_tensor_bytes, reserved_capacity
from .models.layers import decoder_layers
from .planner_checks import MAX_POSITIONS, check_plan_args, free_host_memory
from .routing import PREFILL_MIN_ROWS

GiB = 2**30
DEFAULT_HEADROOM = 512 * 2**20
_SMALL_ROUND = 512
_LARGE_ROUND = 2 * 2**20
_H200_SMS = 132


class CapacityError(KVQuantError, MemoryError):
    """A ``generate`` request whose KV cache cannot fit in the free device memory (raised before allocating)."""


# --------------------------------------------------------------------------------------------
# model facts
# --------------------------------------------------------------------------------------------
@dataclass
class ModelShape:
    """The dimensions the planner needs (from a transformers config)."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        heads = int(cfg.num_attention_heads)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return cls(
            num_layers=int(cfg.num_hidden_layers), hidden_size=int(cfg.hidden_size),
            intermediate_size=int(cfg.intermediate_size), num_heads=heads,
            num_kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads), head_dim=int(head_dim),
            vocab_size=int(cfg.vocab_size), tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            attention_bias=bool(getattr(cfg, "attention_bias", False)), mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
        )

    def layer_params(self) -> int:
        """Parameters of one decoder layer (Llama/Mistral: q/k/v/o projections, gated MLP, two RMSNorms)."""
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_heads * d, self.num_kv_heads * d
        attn = h * q + 2 * h * kv + q * h + (q + 2 * kv + h if self.attention_bias else 0)
        mlp = 3 * h * self.intermediate_size + (2 * self.intermediate_size + h if self.mlp_bias else 0)
        return attn + mlp + 2 * h

    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def head_params(self) -> int:
        """Final norm plus the LM head (0 extra when tied to the embedding)."""
        return self.hidden_size + (0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size)


def _as_device(device: Any) -> torch.device:
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return dev


def _device_key(device: Any) -> str:
    if isinstance(device, int):
        return f"cuda:{device}"
    return str(_as_device(device))


def alloc_round(nbytes: int, device: str) -> int:
    """Bytes the allocator of ``device`` really takes for one tensor of ``nbytes`` (CUDA caching allocator)."""
    if nbytes <= 0:
        return 0
    if not device.startswith("cuda"):
        return int(nbytes)
    step = _LARGE_ROUND if nbytes > 2**20 else _SMALL_ROUND
    return -(-int(nbytes) // step) * step


def free_device_memory(device: str) -> int | None:
    """Bytes the process can still allocate on ``device``: the driver's free memory plus what the caching
    allocator holds unused. None where unknown (CPU, meta): the planner then needs explicit figures."""
    dev = _as_device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(dev)
    cached = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
    return int(free + cached)


def _sm_count(device: str) -> int:
    dev = _as_device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(dev).multi_processor_count
    return _H200_SMS


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------
@dataclass
class DevicePlan:
    """What one device holds and how many tokens per sequence its layers can store.

    ``memory_bytes`` is the free memory the plan started from; ``weights_bytes`` counts the parameters and
    buffers placed there (subtracted only when ``weights_resident`` is False, i.e. they still have to be loaded);
    ``activation_bytes`` the peak temporaries of a prefill chunk / decode step; ``cache_bytes`` the cache at
    ``max_tokens``; ``bytes_per_token`` the marginal cost of one more token per sequence over this device's layers.
    """

    device: str
    layers: list[int]
    memory_bytes: int
    weights_bytes: int
    weights_resident: bool
    activation_bytes: int
    headroom_bytes: int
    bytes_per_token: float
    max_tokens: int
    cache_bytes: int

    @property
    def budget_bytes(self) -> int:
        """Bytes left for the cache on this device."""
        weights = 0 if self.weights_resident else self.weights_bytes
        return self.memory_bytes - weights - self.activation_bytes - self.headroom_bytes

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["budget_bytes"] = self.budget_bytes
        return out


@dataclass
class CapacityPlan:
    """Result of :func:`plan_capacity`.

    ``max_tokens``: the largest context per sequence (prompt + new tokens) that fits on every device;
    ``total_tokens``: ``max_tokens * batch_size``; ``per_device_tokens``: what each device alone could hold;
    ``limiting_device``: the device that sets ``max_tokens``.
    """

    method: str
    batch_size: int
    max_tokens: int
    devices: list[DevicePlan]
    chunk_tokens: int
    reserved: bool
    _cache_bytes_fn: Any = field(default=None, repr=False)

    @property
    def total_tokens(self) -> int:
        return self.max_tokens * self.batch_size

    @property
    def per_device_tokens(self) -> dict[str, int]:
        return {d.device: d.max_tokens for d in self.devices}

    @property
    def limiting_device(self) -> str:
        return min(self.devices, key=lambda d: d.max_tokens).device

    def cache_bytes(self, tokens: int) -> dict[str, int]:
        """Predicted cache allocation per device (allocator rounding included) at ``tokens`` per sequence."""
        return {d.device: self._cache_bytes_fn(d, tokens) for d in self.devices}

    def fits(self, tokens: int) -> bool:
        return int(tokens) <= self.max_tokens

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method, "batch_size": self.batch_size, "max_tokens": self.max_tokens,
            "total_tokens": self.total_tokens, "limiting_device": self.limiting_device,
            "chunk_tokens": self.chunk_tokens, "reserved": self.reserved,
            "devices": [d.to_dict() for d in self.devices],
        }

    def summary(self) -> str:
        lines = [(f"{self.method}: {self.max_tokens:,} tokens per sequence x batch {self.batch_size} "
                 f"(limited by {self.limiting_device})")]
        for d in self.devices:
            lines.append(
                f"  {d.device}: layers {d.layers[0] if d.layers else '-'}..{d.layers[-1] if d.layers else '-'} "
                f"({len(d.layers)}), free {d.memory_bytes / GiB:.2f} GiB, weights {d.weights_bytes / GiB:.2f} GiB"
                f"{' (resident)' if d.weights_resident else ''}, activations {d.activation_bytes / GiB:.2f} GiB, "
                f"cache {d.cache_bytes / GiB:.2f} GiB, {d.bytes_per_token:.0f} B/token -> {d.max_tokens:,} tokens"
            )
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# placement
# --------------------------------------------------------------------------------------------
def _module_device(module: Any) -> str | None:
    for t in list(module.parameters()) + list(module.buffers()):
        return _device_key(t.device)
    return None


def _model_placement(model: Any) -> tuple[list[str], dict[str, int]]:
    """Device of each decoder layer (where its keys, hence its cache, live) and resident bytes per device."""
    layer_devices = [_module_device(layer) for layer in decoder_layers(model)[1]]
    if any(d is None for d in layer_devices):
        raise KVQuantConfigError("a decoder layer holds no parameters; cannot tell its device.")
    resident: dict[str, int] = {}
    seen = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        key = _device_key(t.device)
        resident[key] = resident.get(key, 0) + t.numel() * t.element_size()
    return layer_devices, resident


def _config_placement(shape: ModelShape, dtype: torch.dtype, device_map: Any, default: str) -> tuple[list[str], dict[str, int]]:
    """Layer devices and weight bytes per device from an explicit placement (list per layer or accelerate map)."""
    n = shape.num_layers
    if device_map is None:
        layer_devices = [default] * n
        embed_dev = head_dev = default
    elif isinstance(device_map, (list, tuple)):
        if len(device_map) != n:
            raise KVQuantConfigError(f"device_map lists {len(device_map)} devices but the model has {n} layers.")
        layer_devices = [_device_key(d) for d in device_map]
        embed_dev, head_dev = layer_devices[0], layer_devices[-1]
    elif isinstance(device_map, dict):
        def lookup(name: str) -> str:
            best = None
            for key, dev in device_map.items():
                matches = key == "" or name == key or name.startswith(key + ".")
                if matches and (best is None or len(key) > len(best[0])):
                    best = (key, dev)
            if best is None:
                raise KVQuantConfigError(f"device_map has no entry for {name!r}.")
            return _device_key(best[1])

        layer_devices = [lookup(f"model.layers.{i}") for i in range(n)]
        embed_dev, head_dev = lookup("model.embed_tokens"), lookup("lm_head")
    else:
        raise KVQuantConfigError("device_map must be a list of devices per layer or an accelerate device map dict.")
    es = element_size(dtype)
    weights: dict[str, int] = {}
    for dev in layer_devices:
        weights[dev] = weights.get(dev, 0) + shape.layer_params() * es
    weights[embed_dev] = weights.get(embed_dev, 0) + shape.embedding_params() * es
    weights[head_dev] = weights.get(head_dev, 0) + shape.head_params() * es
    return layer_devices, weights


# --------------------------------------------------------------------------------------------
# activations
# --------------------------------------------------------------------------------------------
def activation_bytes(shape: ModelShape, dtype: torch.dtype, batch: int, chunk: int, method: str = "kvquant",
                     device: str = "cuda:0", logits_tokens: int = 1, sink_tokens: int = 1,
                     prefill_dequant: bool = False) -> int:
    """Peak temporary bytes of one forward of ``chunk`` new tokens per sequence through one decoder layer,
    plus the model-level tensors alive meanwhile (position embeddings, logits of ``logits_tokens`` positions in
    the model dtype and their float32 copy in ``generate``).

    Attention phase: q/k/v projections, rotated q and k, the exact block (``sink_tokens`` exact slots, the sink and
    the recent window, + new tokens) and its bool mask,
    the split-K partial outputs of the attention kernel (float32) and the attention output; MLP phase: gate,
    up, activation and product (intermediate size) plus the down projection. The larger phase counts, on top
    of the residual stream and the normed input.
    """
    es = element_size(dtype)
    t = batch * chunk
    hd, hq, h, d = shape.hidden_size, shape.num_heads, shape.num_kv_heads, shape.head_dim
    stream = 3 * t * hd * es  # residual, normed input, block output
    qkv = t * (hq + 2 * h) * d * es
    rotated = t * (hq + h) * d * es
    if method == "kvquant":  # exact block K/V, its mask and the chunk's own [B, 1, c, c] mask
        exact = 2 * batch * h * (chunk + sink_tokens) * d * es + batch * chunk * (2 * chunk + sink_tokens)
        if device.startswith("cuda"):  # Triton: float32 split-K partial outputs and log-sum-exps
            group = hq // h
            m_rows = group * chunk
            block_m = min(64, max(16, 1 << max(0, (m_rows - 1).bit_length())))
            num_mb = -(-m_rows // block_m)
            programs = batch * h * num_mb
            splits = max(1, min(64, -(-2 * _sm_count(device) // max(programs, 1))))
            partial = batch * h * splits * num_mb * block_m * (d + 1) * 4
            if prefill_dequant and chunk >= PREFILL_MIN_ROWS:  # prefill_attention "auto"/"dequant": a history
                # block dequantized into the model dtype (Triton, K and V), the chunk's K/V repeated to the query
                # heads for its causal call, and the float32 running output, part output and log-sum-exp merges
                partial = max(partial, 2 * batch * h * PREFILL_HISTORY_BLOCK * d * es + 2 * t * hq * d * es
                              + 4 * t * hq * d * 4)
        else:  # torch path: one dequantized history block (int64 codes, float32 K, V, rotated K), its scores
            blk = TORCH_HISTORY_BLOCK
            partial = batch * h * blk * d * (8 + 3 * 4) + 2 * t * hq * (blk + chunk) * 4 + 2 * t * hq * d * 4
    else:  # fp16 cache + SDPA: the new K/V are appended to the cache (counted there); SDPA's own workspace
        exact = 0
        partial = t * hq * 4 * 2  # logsumexp-style row statistics
    attn_out = 2 * t * hq * d * es  # kernel output and the contiguous reshape
    attn_phase = qkv + rotated + exact + partial + attn_out
    mlp_phase = 4 * t * shape.intermediate_size * es + t * hd * es
    model_level = 2 * t * d * es + batch * logits_tokens * shape.vocab_size * (es + 4)
    return int(stream + max(attn_phase, mlp_phase) + model_level)


# --------------------------------------------------------------------------------------------
# the planner
# --------------------------------------------------------------------------------------------
def _fp16_layer_tensor_bytes(batch: int, heads: int, head_dim: int, dtype: torch.dtype, tokens: int) -> list[int]:
    n = batch * heads * tokens * head_dim * element_size(dtype)
    return [n, n]


def plan_capacity(
    model: Any = None,
    cache_config: dict | KVQuantConfig | str | None = None,
    *,
    model_config: Any = None,
    free_memory: dict[str, int] | int | None = None,
    dtype: torch.dtype | None = None,
    batch_size: int = 1,
    device_map: Any = None,
    weights_resident: bool | None = None,
    prompt_tokens: int | None = None,
    prefill_chunk_size: int | None = None,
    reserved: bool = True,
    headroom_bytes: int = DEFAULT_HEADROOM,
    max_tokens_limit: int = 1 << 40,
) -> CapacityPlan:
    """How many tokens per sequence a cache can hold on the available devices.

    Args:
        model: a loaded causal LM (layer devices and resident weights are read from it), or None with
            ``model_config``.
        cache_config: :class:`KVQuantConfig` keys (bits, outlier_fraction/outlier_slots, sink_tokens, block_size,
            prefill_chunk_size), or ``"fp16"`` for a plain fp16/bf16 K/V cache (``DynamicCache``) in ``dtype``.
        model_config: a transformers config when no model is given (weights are then computed from it).
        free_memory: bytes free per device (``{"cuda:0": ...}``), or one int for the single device; None queries
            CUDA (``mem_get_info`` plus the allocator's unused cache). Required on CPU.
        dtype: the model dtype (default: the model's, else bfloat16).
        batch_size: sequences (times beams / returned sequences).
        device_map: without a model: a device per layer (list) or an accelerate device map dict.
        weights_resident: whether the weights already sit in the devices (so ``free_memory`` excludes them).
            Default: True for a loaded model, False for a config.
        prompt_tokens: prompt length, for the prefill activations (default: one full chunk).
        prefill_chunk_size: overrides the config's chunk (0 = the whole prompt in one call).
        reserved: True (what ``generate`` does): capacity reserved up front; False: simulate geometric growth.
        headroom_bytes: reserve per device for workspaces and fragmentation.

    Returns:
        :class:`CapacityPlan`: ``max_tokens`` is at most 2**31 - 1 for a KVQuant cache (int32 positions).

    Raises:
        KVQuantConfigError: an argument of the wrong type or range (named in the message).
    """
    args = check_plan_args(model, cache_config, model_config, free_memory, dtype, batch_size, device_map,
                           weights_resident, prompt_tokens, prefill_chunk_size, reserved, headroom_bytes,
                           max_tokens_limit)
    free_memory, dtype, batch_size = args["free_memory"], args["dtype"], args["batch_size"]
    prompt_tokens, prefill_chunk_size = args["prompt_tokens"], args["prefill_chunk_size"]
    headroom_bytes, max_tokens_limit = args["headroom_bytes"], args["max_tokens_limit"]
    shape = ModelShape.from_config(model_config if model_config is not None else model.config)
    method = "fp16" if isinstance(cache_config, str) and cache_config == "fp16" else "kvquant"
    if method == "kvquant":
        cfg = cache_config if isinstance(cache_config, KVQuantConfig) else KVQuantConfig.from_dict(dict(cache_config or {}))
        if cfg.slots_for(shape.head_dim) >= shape.head_dim:
            raise KVQuantConfigError(f"outlier_slots must be fewer than head_dim={shape.head_dim}.")
    else:
        cfg = None
    if dtype is None:
        dtype = getattr(model, "dtype", None) or torch.bfloat16
    token_cap = MAX_POSITIONS if cfg is not None else max_tokens_limit  # KVQuant positions are int32

    # placement and weights
    if model is not None:
        layer_devices, weights = _model_placement(model)
        resident = True if weights_resident is None else weights_resident
    else:
        default = None
        if isinstance(free_memory, dict) and len(free_memory) == 1:
            default = _device_key(next(iter(free_memory)))
        default = default or ("cuda:0" if torch.cuda.is_available() else "cpu")
        layer_devices, weights = _config_placement(shape, dtype, device_map, default)
        resident = False if weights_resident is None else weights_resident
    devices = list(dict.fromkeys(layer_devices))

    # free memory
    if isinstance(free_memory, int):
        if len(devices) != 1:
            raise KVQuantConfigError(f"the layers sit on {devices}; give free_memory per device as a dict.")
        free_memory = {devices[0]: int(free_memory)}
    mem: dict[str, int] = {}
    given = {_device_key(k): int(v) for k, v in (free_memory or {}).items()}
    for dev in devices:
        if dev in given:
            mem[dev] = given[dev]
            continue
        queried = free_device_memory(dev)
        if queried is None:
            raise KVQuantConfigError(
                f"the free memory of {dev} is unknown; pass free_memory={{'{dev}': bytes}} (the planner only "
                "queries CUDA devices)."
            )
        mem[dev] = queried

    # chunk of the prefill (activations) and growth step
    chunk_cfg = cfg.prefill_chunk_size if cfg is not None else 0
    if prefill_chunk_size is not None:
        chunk_cfg = int(prefill_chunk_size)
    if prompt_tokens is None:
        chunk = chunk_cfg if chunk_cfg > 0 else 1
    else:
        chunk = min(chunk_cfg, int(prompt_tokens)) if chunk_cfg > 0 else int(prompt_tokens)
    chunk = max(1, chunk)
    sink = cfg.sink_tokens + cfg.recent_window if cfg is not None else 0  # exact slots next to each chunk

    def layer_bytes(dev: str, tokens: int) -> int:
        """Peak allocation of one layer holding ``tokens`` per sequence (allocator rounding included)."""
        if cfg is None:
            sizes = _fp16_layer_tensor_bytes(batch_size, shape.num_kv_heads, shape.head_dim, dtype, tokens)
            return sum(alloc_round(s, dev) for s in sizes)
        if reserved:
            cap = reserved_capacity(cfg, tokens)
            return sum(alloc_round(s, dev) for s in
                       layer_tensor_bytes(cfg, batch_size, shape.num_kv_heads, shape.head_dim, dtype, cap))
        caps = grown_capacities(cfg, max(0, tokens - sink), chunk) or [0]
        final = sum(alloc_round(s, dev) for s in
                    layer_tensor_bytes(cfg, batch_size, shape.num_kv_heads, shape.head_dim, dtype, caps[-1]))
        return final

    def growth_transient(dev: str, tokens: int) -> int:
        """Without a reservation: the previous capacity's arrays of one layer, alive while it grows.
        fp16 (``DynamicCache``): every update concatenates, so one layer's K and V exist twice for a moment; for
        GQA models transformers' SDPA path repeats the K/V heads when it passes a mask (``repeat_kv``), a
        ``group``-times larger copy of one layer's K and V (on an H200 an fp16 plan without this term does not
        fit: ``benchmarks/capacity.py``)."""
        if cfg is None:
            return layer_bytes(dev, tokens) * max(1, shape.num_heads // max(1, shape.num_kv_heads))
        if reserved:
            return 0
        caps = grown_capacities(cfg, max(0, tokens - sink), chunk)
        if len(caps) < 2:
            return 0
        sizes = layer_tensor_bytes(cfg, batch_size, shape.num_kv_heads, shape.head_dim, dtype, caps[-2])
        return sum(alloc_round(s, dev) for s in sizes[:9])  # the history tensors are the ones re-allocated

    def device_cache_bytes(dplan: DevicePlan, tokens: int) -> int:
        n = len(dplan.layers)
        return n * layer_bytes(dplan.device, tokens) + (growth_transient(dplan.device, tokens) if n else 0)

    def device_token_bytes(dplan: DevicePlan, tokens: int) -> int:
        return device_cache_bytes(dplan, tokens)

    if cfg is not None:
        per_token = history_token_bytes(cfg, shape.num_kv_heads, shape.head_dim, dtype) * batch_size
    else:
        per_token = 2 * shape.num_kv_heads * shape.head_dim * element_size(dtype) * batch_size

    plans: list[DevicePlan] = []
    for dev in devices:
        layers = [i for i, d in enumerate(layer_devices) if d == dev]
        act = activation_bytes(shape, dtype, batch_size, chunk, method, dev, sink_tokens=sink,
                               prefill_dequant=cfg is not None and cfg.prefill_attention != "kernel")
        dp = DevicePlan(device=dev, layers=layers, memory_bytes=mem[dev], weights_bytes=weights.get(dev, 0),
                        weights_resident=resident, activation_bytes=act, headroom_bytes=int(headroom_bytes),
                        bytes_per_token=per_token * len(layers), max_tokens=0, cache_bytes=0)
        budget = dp.budget_bytes
        # largest token count whose allocation fits the budget (monotone: binary search)
        lo, hi = 0, 1
        while hi < max_tokens_limit and device_token_bytes(dp, hi) <= budget:
            lo, hi = hi, hi * 2
        if device_token_bytes(dp, lo) > budget:
            lo = -1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if device_token_bytes(dp, mid) <= budget:
                lo = mid
            else:
                hi = mid
        dp.max_tokens = min(max(0, lo), token_cap)
        dp.cache_bytes = device_cache_bytes(dp, dp.max_tokens)
        plans.append(dp)
    max_tokens = min(p.max_tokens for p in plans)
    return CapacityPlan(method="fp16" if cfg is None else f"nuq{cfg.key_bits}", batch_size=batch_size,
                        max_tokens=max_tokens, devices=plans, chunk_tokens=chunk, reserved=reserved,
                        _cache_bytes_fn=device_cache_bytes)


def check_request(model: Any, cache_config: dict | KVQuantConfig, total_tokens: int, batch_size: int,
                  prompt_tokens: int | None = None) -> CapacityPlan | None:
    """Raise :class:`CapacityError` when ``total_tokens`` per sequence cannot fit (``generate`` calls this).

    CUDA devices are checked against their free memory, CPU against the host's available memory
    (:func:`kvquant_hf.planner_checks.free_host_memory`); devices whose memory cannot be queried (meta, MPS) are
    not checked. Returns the plan, or None when no device could be checked.
    """
    try:
        layer_devices, _ = _model_placement(model)
    except KVQuantConfigError:
        return None
    devices = list(dict.fromkeys(layer_devices))
    free = {d: free_device_memory(d) for d in devices}
    free = {d: free_host_memory() if v is None and d == "cpu" else v for d, v in free.items()}
    if any(v is None for v in free.values()):
        return None
    plan = plan_capacity(model, cache_config, free_memory=free, batch_size=batch_size, prompt_tokens=prompt_tokens)
    if total_tokens > plan.max_tokens:
        dev = next(d for d in plan.devices if d.device == plan.limiting_device)
        need = plan.cache_bytes(total_tokens)[dev.device]
        cfg = cache_config if isinstance(cache_config, KVQuantConfig) else KVQuantConfig.from_dict(dict(cache_config))
        reserved = reserved_capacity(cfg, total_tokens)
        block = ""
        if reserved > 2 * max(total_tokens, 1):
            block = (f"block_size={cfg.block_size:,} rounds the reservation up to {reserved:,} tokens per layer: lower "
                     f"block_size (default 256). ")
        raise CapacityError(
            f"this request needs a KV cache of {total_tokens:,} tokens per sequence x batch {batch_size} "
            f"(prompt + max_new_tokens), but only {plan.max_tokens:,} tokens fit: on {dev.device} the cache would "
            f"take {need / GiB:.2f} GiB of {dev.budget_bytes / GiB:.2f} GiB left after weights, activations and "
            f"headroom ({dev.memory_bytes / GiB:.2f} GiB free). Fix: {block}lower max_new_tokens or the prompt length "
            f"or the batch, use fewer bits (cache_config bits=2), a smaller prefill_chunk_size, or spread the model "
            f"over more GPUs (device_map='auto'); kvquant_hf.plan_capacity(model, cache_config) shows the plan."
        )
    return plan


__all__ = ["CapacityError", "CapacityPlan", "DevicePlan", "ModelShape", "activation_bytes", "alloc_round",
           "check_request", "free_device_memory", "plan_capacity"]

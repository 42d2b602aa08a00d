"""`KVQuantCache`: the packed KVQuant cache for Hugging Face transformers (arXiv 2401.18079).

Each model layer owns a :class:`~kvquant_hf.layer.KVQuantLayer` that stores

* the **attention sink**: the first ``config.sink_tokens`` real tokens of every sequence, exact and *pre-RoPE*
  (:mod:`kvquant_hf.layer_sink`);
* the **packed history**: every other token, quantized on arrival in the layout of
  :class:`kvquant_hf.attention.PackedKV` (:mod:`kvquant_hf.layer_storage`).

The patched attention forwards (:mod:`kvquant_hf.models`) call ``cache.layers[i].attend(AttendInputs)``: the
new tokens attend exactly and causally to each other and to the sink, and to the history through its
quantized form (RoPE applied on the fly from the stored positions); then they are stored
(:mod:`kvquant_hf.routing`). Nothing is ever re-quantized and the history is never dequantized as a whole.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from transformers.cache_utils import Cache

from . import quant
from .config import KVQuantConfig
from .errors import KVQuantConfigError, KVQuantError, UncalibratedCacheWarning
from .layer import KVQuantLayer
from .planner_checks import MAX_POSITIONS, is_count
from .routing import resolve_backend

class LazyLayers(list):
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
    >>> out = model.generate(ids, cache=cache, max_new_tokens=32)   # past_key_values=cache before transformers 5.24
    >>> cache.memory_stats()["avg_bits_per_element"]
    ```

    A filled cache pickles (``torch.save(cache, path)``; ``torch.load(path, weights_only=False)``, as for
    ``DynamicCache``), for example to keep a long prompt's cache on disk: generation continues from the loaded cache
    given the whole sequence so far, ``model.generate(ids_so_far, cache=loaded, max_new_tokens=...)``, with the
    tokens it would have produced without the stop.
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
            layers = LazyLayers(self._make_layer)
        else:
            layers = [self._make_layer(i) for i in range(num_layers)]
        self.uncalibrated_warned = False  # one UncalibratedCacheWarning per cache
        super().__init__(layers=layers)

    def _make_layer(self, idx: int) -> KVQuantLayer:
        ks = self.key_signposts.layers[idx] if self.key_signposts is not None else None
        vs = self.value_signposts.layers[idx] if self.value_signposts is not None else None
        layer = KVQuantLayer(self.kvquant_config, idx, ks, vs)
        layer.owner = weakref.ref(self)
        return layer

    def __setstate__(self, state: dict) -> None:
        """Restore a pickled cache (``pickle``, ``torch.save``/``torch.load(weights_only=False)``): every layer gets
        its weakref to this cache back (the layers drop it when pickled)."""
        self.__dict__.update(state)
        for layer in self.layers:
            layer.owner = weakref.ref(self)

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
        """Preallocate every layer for ``total_tokens`` per sequence (for example prompt + max_new_tokens), at most
        2**31 - 1 (positions are stored as int32)."""
        if not is_count(total_tokens) or not 0 <= total_tokens <= MAX_POSITIONS:
            raise KVQuantConfigError(
                f"reserve({total_tokens!r}): give the tokens per sequence to reserve as an int in "
                f"[0, {MAX_POSITIONS:,}] (a KVQuantCache stores positions as int32)."
            )
        for layer in list(self.layers):
            layer.reserve(total_tokens)
        self._reserve_tokens = int(total_tokens)

    def crop(self, max_length: int) -> None:
        """Drop tokens from the end: negative = tokens to remove, positive = tokens to keep (0: no-op)."""
        for layer in self.layers:
            layer.crop(max_length)

    def get_memory_footprint(self, include_spare: bool = False) -> int:
        """Bytes of stored token data across all layers.

        Per layer: ``B * (n_history * bytes_per_history_token + n_exact * bytes_per_sink_token)`` (``n_exact``: the
        sink tokens plus the recent window's, which are packed in the history too) with
        ``bytes_per_history_token = H * (D*key_bits/8 + D*value_bits/8 + 2*scale_bytes + 2*S*(dtype_bytes + 1)) + 4``
        (codes, value scale/zero, K and V outlier slots value+channel, int32 position) and
        ``bytes_per_sink_token = 3*H*D*dtype_bytes + 4`` (pre-RoPE and rotated keys, values, position). Per-layer constants (lookup tables, key thresholds) are
        not included.

        Args:
            include_spare (`bool`): also count allocated but unused capacity (history and sink slots).
        """
        return sum(layer.memory_footprint(include_spare) for layer in self.layers)

    def memory_stats(self) -> dict[str, Any]:
        """Storage summary of the cache.

        Returns:
            `dict` with ``layers``, ``batch_size``, ``seq_length`` (tokens per sequence), ``sink_tokens``,
            ``window_tokens`` (history tokens also held exact in the recent window),
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
            "layers": len(layers), "batch_size": 0, "seq_length": 0, "sink_tokens": 0, "window_tokens": 0, "quantized_tokens": 0,
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
            batch_size=first.batch_size, seq_length=first.get_seq_length(), sink_tokens=first.n_sink, window_tokens=first.n_window,
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


__all__ = ["KVQuantCache", "KVQuantLayer", "LazyLayers", "UncalibratedCacheWarning", "resolve_backend"]

"""transformers' own ``QuantizedCache`` as a perplexity baseline (``quanto2``, ``quanto4``, ``hqqX``).

The cache is :class:`transformers.cache_utils.QuantizedCache` at its defaults except ``nbits`` (transformers
5.25: ``q_group_size=64``, ``residual_length=128``, ``axis_key=axis_value=0``). It keeps up to
``residual_length`` recent tokens in the model dtype; when the residual fills up, the dequantized history, the
residual and the new tokens are quantized again together (groups of ``q_group_size`` consecutive elements of the
``[B, H, S, D]`` states, one float scale and shift per group). Its first call quantizes every prompt token at once.

Scoring is decode-equivalent: every window goes through a real ``QuantizedCache``, the first token as a 1-token
prefill and then one token per forward (the harness's ``prefill`` / ``chunk`` change the calls as for the real
KVQuant cache), with the model's stock attention (the kvquant-patched attention falls back to it for caches that
are not kvquant caches). Several windows of equal length are scored as the rows of one batch, without padding:
the cache quantizes each row on its own (a group never spans two rows), so a row's NLL does not depend on the
others.

Storage (``avg_bits``): :func:`cache_storage` sums the bytes of every tensor a cache holds (packed codes,
scales, shifts, the full-precision residual), found by walking its layers' attributes, and divides by the K/V
elements it stands for. :func:`quantized_cache_avg_bits` measures that on the exact state a decode of
``seq_len`` tokens leaves (:func:`decode_token_split`), so the 32K figure is measured, not extrapolated.
"""

from __future__ import annotations

import importlib.util
import math
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import BackendUnavailableError, KVQuantConfigError
from ..generation import cache_kwarg_name
from ..simulated_methods import method_avg_bits

#: backends of transformers' QuantizedCache -> (bits its layer accepts, package that provides it, pip name)
BACKENDS = {"quanto": ((2, 4), "optimum.quanto", "optimum-quanto"), "hqq": ((1, 2, 3, 4, 8), "hqq", "hqq")}
#: the method names :func:`parse_quantized_cache_method` accepts, as said in messages and ``--help``
QUANTIZED_CACHE_NAMES = "quanto2/quanto4 (transformers QuantizedCache through optimum.quanto), hqq2/hqq3/hqq4/hqq8 (hqq)"
#: windows scored as the rows of one batch by default
DEFAULT_WINDOW_BATCH = 8
NAME_RE = re.compile(r"^(quanto|hqq)(\d+)$")


@dataclass
class QuantizedCacheSpec:
    """One transformers ``QuantizedCache`` baseline: ``backend`` ("quanto" or "hqq") at ``nbits``; the other
    settings stay at the cache's defaults. ``name`` labels the results (default ``backend + nbits``)."""

    backend: str
    nbits: int
    name: str | None = None
    family: str = "quantized_cache"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise KVQuantConfigError(f"QuantizedCache backend {self.backend!r}; choose one of {tuple(BACKENDS)}.")
        bits, module, pip_name = BACKENDS[self.backend]
        if self.nbits not in bits:
            raise KVQuantConfigError(
                f"{self.backend}{self.nbits}: transformers' QuantizedCache takes nbits in {bits} for the "
                f"{self.backend} backend; use one of {', '.join(f'{self.backend}{b}' for b in bits)}."
            )
        if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
            raise BackendUnavailableError(
                f"{self.backend}{self.nbits} needs the {pip_name} package, which is not installed: "
                f"pip install {pip_name}"
            )
        if self.name is None:
            self.name = f"{self.backend}{self.nbits}"


def is_quantized_cache_method(method: Any) -> bool:
    """Whether ``method`` names (or is) a transformers ``QuantizedCache`` baseline."""
    return isinstance(method, QuantizedCacheSpec) or (
        isinstance(method, str) and NAME_RE.match(method.strip().lower()) is not None
    )


def parse_quantized_cache_method(method: str | QuantizedCacheSpec) -> QuantizedCacheSpec:
    """``"quanto4"`` -> ``QuantizedCacheSpec("quanto", 4)``; a spec is returned as is. Bits the backend does not
    take, and a backend whose package is missing, raise an error saying what to use or install."""
    if isinstance(method, QuantizedCacheSpec):
        return method
    m = NAME_RE.match(str(method).strip().lower())
    if m is None:
        raise KVQuantConfigError(f"unknown QuantizedCache method {method!r}; use {QUANTIZED_CACHE_NAMES}.")
    return QuantizedCacheSpec(m.group(1), int(m.group(2)), name=str(method).strip().lower())


def new_quantized_cache(config: Any, spec: QuantizedCacheSpec) -> Any:
    """A fresh ``transformers.cache_utils.QuantizedCache`` for a model ``config``, at its defaults except nbits."""
    from transformers.cache_utils import QuantizedCache

    return QuantizedCache(spec.backend, config, nbits=spec.nbits)


# --------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def score_windows_decode(
    model: Any, windows: torch.Tensor, cache: Any, prefill: int = 0, chunk: int = 1
) -> list[tuple[float, int]]:
    """Next-token NLL sums of the windows ``[B, L]`` (rows of one batch) decoded through ``cache``.

    The first call holds ``prefill`` tokens (at least 1; with ``prefill=0`` and ``chunk > 1``, the first chunk),
    then calls of ``chunk`` tokens follow (1: token by token). Returns ``[(nll_sum, L - 1)]`` per row. Per-token
    losses are kept, not the logits, so memory stays ``O(B * L)``.
    """
    if not isinstance(chunk, int) or chunk < 1:
        raise KVQuantConfigError(f"chunk={chunk!r} must be an int >= 1 (tokens per call after the prefill).")
    ids = windows.reshape(-1, windows.shape[-1]).to(next(model.parameters()).device)
    b, n = ids.shape
    kw = cache_kwarg_name(model)
    first = max(1, min(prefill if prefill > 0 or chunk == 1 else chunk, n))

    def losses(logits: torch.Tensor, s: int, e: int) -> torch.Tensor:
        lg = logits[:, : e - s].float()
        return F.cross_entropy(lg.reshape(-1, lg.shape[-1]), ids[:, s + 1: e + 1].reshape(-1), reduction="none")

    out = [losses(model(input_ids=ids[:, :first], use_cache=True, **{kw: cache}).logits, 0, min(first, n - 1))
           .view(b, -1)]
    for t in range(first, n - 1, chunk):
        e = min(t + chunk, n - 1)
        pos = torch.arange(t, e, device=ids.device)[None].expand(b, -1)
        logits = model(input_ids=ids[:, t:e], position_ids=pos, use_cache=True, **{kw: cache}).logits
        out.append(losses(logits, t, e).view(b, -1))
    per_token = torch.cat(out, 1)
    return [(float(row.sum()), n - 1) for row in per_token]


class QuantizedCacheRunner:
    """Scores windows of one :class:`QuantizedCacheSpec`, ``window_batch`` windows per batch, with a fresh
    cache per batch; ``storage`` is :func:`cache_storage` of the last batch's cache."""

    def __init__(self, model: Any, spec: QuantizedCacheSpec, prefill: int = 0, chunk: int = 1,
                 window_batch: int = DEFAULT_WINDOW_BATCH):
        if not isinstance(window_batch, int) or window_batch < 1:
            raise KVQuantConfigError(f"window_batch={window_batch!r} must be an int >= 1 (windows per batch).")
        self.model, self.spec, self.prefill, self.chunk = model, spec, prefill, chunk
        self.window_batch = window_batch
        self.info: dict[str, Any] = {"cache_class": f"transformers QuantizedCache({spec.backend}, nbits={spec.nbits})",
                                     "window_batch": window_batch}
        self.n_clipped = self.n_keys = 0
        self.storage: dict[str, Any] | None = None

    def score(self, window: torch.Tensor) -> tuple[float, int]:
        return self.score_many(window.reshape(1, -1))[0]

    def score_many(self, windows: torch.Tensor) -> list[tuple[float, int]]:
        cache = new_quantized_cache(self.model.config, self.spec)
        res = score_windows_decode(self.model, windows, cache, self.prefill, self.chunk)
        self.storage = cache_storage(cache, self.model.config, batch=windows.shape[0])
        return res


# --------------------------------------------------------------------------------------------
# storage
# --------------------------------------------------------------------------------------------
def stored_tensors(obj: Any) -> list[torch.Tensor]:
    """Every plain tensor ``obj`` holds: tensor subclasses (quanto's packed and quantized tensors) are opened
    through ``__tensor_flatten__``; dicts, lists and tuples are walked."""
    if isinstance(obj, torch.Tensor):
        flatten = getattr(obj, "__tensor_flatten__", None)
        if type(obj) is not torch.Tensor and flatten is not None:
            return [t for name in flatten()[0] for t in stored_tensors(getattr(obj, name))]
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in stored_tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in stored_tensors(v)]
    return []


def kv_shape(config: Any) -> tuple[int, int, int]:
    """``(layers, kv heads, head_dim)`` of a model config."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers, heads, head_dim


def cache_storage(cache: Any, config: Any, batch: int = 1, float_bits: int | None = 16,
                  layers: Any = None) -> dict[str, Any]:
    """Bytes of everything a quantized cache stores, per K/V element.

    Sums every tensor reachable from the attributes of each layer (``layers``, default ``cache.layers``): codes,
    scales, shifts and the residual. Float tensors count ``float_bits`` bits per element (16: as a float16 model
    stores them, whatever dtype this run used; None: the run's element size); integer ones their element size.
    The K/V elements are ``2 * layers * batch * kv_heads * tokens * head_dim`` with ``tokens`` the cache's length.

    Returns ``{"avg_bits", "bytes", "kv_elements", "tokens", "quantized_bytes", "float_bytes"}``.
    """
    layers = list(cache.layers if layers is None else layers)
    _, heads, head_dim = kv_shape(config)
    float_bytes = int_bytes = 0.0
    seen: set[tuple[int, int]] = set()
    for layer in layers:
        for t in stored_tensors(list(vars(layer).values())):
            key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else (id(t), 0)
            if key in seen:
                continue
            seen.add(key)
            if t.is_floating_point():
                float_bytes += t.numel() * (t.element_size() if float_bits is None else float_bits / 8)
            else:
                int_bytes += t.numel() * t.element_size()
    tokens = int(layers[0].get_seq_length()) if layers else 0
    elements = 2 * len(layers) * batch * heads * tokens * head_dim
    total = float_bytes + int_bytes
    return {"avg_bits": 8.0 * total / elements if elements else float("nan"), "bytes": total,
            "kv_elements": elements, "tokens": tokens, "quantized_bytes": int_bytes, "float_bytes": float_bytes}


def decode_token_split(seq_len: int, residual_length: int, prefill: int = 1) -> tuple[int, int]:
    """``(quantized tokens, residual tokens)`` a ``QuantizedCache`` layer holds after a first call of ``prefill``
    tokens (all quantized at once) and then one token per call: the residual empties into the quantized states
    each time it would reach ``residual_length``."""
    if seq_len < 1 or not 1 <= prefill <= seq_len:
        raise KVQuantConfigError(f"seq_len={seq_len}, prefill={prefill}: need 1 <= prefill <= seq_len.")
    rest = seq_len - prefill
    return prefill + residual_length * (rest // residual_length), rest % residual_length


def quantized_cache_avg_bits(config: Any, spec: QuantizedCacheSpec, seq_len: int, float_bits: int | None = 16,
                             prefill: int = 1, seed: int = 0) -> dict[str, Any]:
    """:func:`cache_storage` of one ``QuantizedCache`` layer in the state a decode of ``seq_len`` tokens (first call
    ``prefill`` tokens) leaves, built in two calls on random K/V of the config's shape: the quantized tokens
    (:func:`decode_token_split`) as a first call, then the residual. Every layer stores the same shapes, so one
    layer's bits per element are the cache's. The bytes are measured on that state at any ``seq_len`` (32768
    included): the quantized part grows affinely in its tokens (codes plus one scale and shift per group, packed
    rows rounded up), the residual stays below ``residual_length`` tokens of float16.
    """
    cache = new_quantized_cache(config, spec)
    layer = cache.layers[0]
    quantized, residual = decode_token_split(seq_len, layer.residual_length, prefill)
    _, heads, head_dim = kv_shape(config)
    g = torch.Generator().manual_seed(seed)
    for n in (quantized, residual):
        if n:
            k, v = (torch.randn(1, heads, n, head_dim, generator=g) for _ in range(2))
            layer.update(k, v)
    out = cache_storage(cache, config, float_bits=float_bits, layers=[layer])
    out.update(quantized_tokens=quantized, residual_tokens=residual)
    return out


def avg_bits_at(config: Any, spec: QuantizedCacheSpec, seq_len: int) -> float:
    """Average stored bits per K/V element after decoding ``seq_len`` tokens (float16 scales and residual)."""
    bits = quantized_cache_avg_bits(config, spec, seq_len)["avg_bits"]
    return float(bits) if math.isfinite(bits) else float("nan")


def any_avg_bits(config: Any, spec: Any, seq_len: int) -> float:
    """Stored bits per K/V element at ``seq_len`` tokens of a :class:`QuantizedCacheSpec` (:func:`avg_bits_at`) or
    of a simulated method's ``MethodSpec`` (:func:`kvquant_hf.simulated.method_avg_bits`, with the config's head_dim
    and number of kv heads)."""
    if isinstance(spec, QuantizedCacheSpec):
        return avg_bits_at(config, spec, seq_len)
    _, heads, head_dim = kv_shape(config)
    return method_avg_bits(spec, head_dim, seq_len, num_kv_heads=heads)


__all__ = [
    "BACKENDS",
    "DEFAULT_WINDOW_BATCH",
    "QUANTIZED_CACHE_NAMES",
    "QuantizedCacheRunner",
    "QuantizedCacheSpec",
    "any_avg_bits",
    "avg_bits_at",
    "cache_storage",
    "decode_token_split",
    "is_quantized_cache_method",
    "new_quantized_cache",
    "parse_quantized_cache_method",
    "quantized_cache_avg_bits",
    "score_windows_decode",
    "stored_tensors",
]

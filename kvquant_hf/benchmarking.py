"""Benchmark helpers: fill a `KVQuantCache` fast with synthetic packed data, time decode steps.

A decode step's cost depends on how many bytes the cache holds, not on their values, so speed and
memory benchmarks at 128K-10M tokens fill the packed storage directly with random codes, scales and
outlier slots ("fast fill") instead of running a prefill that would take minutes. Accuracy is never
measured this way.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from . import quant
from .cache import KVQuantCache, KVQuantLayer
from .config import KVQuantConfig
from .generation import cache_kwarg_name


def fast_fill_layer(layer: KVQuantLayer, batch: int, heads: int, head_dim: int, tokens: int, dtype: torch.dtype,
                    device: torch.device | str, seed: int = 0, spare: int | None = None, slab: int = 1 << 16) -> None:
    """Give ``layer`` ``tokens`` tokens per sequence (sink + packed history) of random but well-formed data.

    Codes are uniform random, value scales/zeros of unit size, about 1% of slots used per vector, positions
    ``0..tokens-1``, key thresholds +-1 per channel. Capacity is what is needed plus ``spare`` tokens (default one
    block), or what ``layer.reserve`` asked for if that is more. ``slab``: tokens written per step (bounds the
    random generator's temporaries to about ``slab * heads * (key_bytes + 40)`` bytes per sequence).
    """
    g = torch.Generator(device=device).manual_seed(seed)
    sample = torch.randn(batch, heads, 1, head_dim, dtype=dtype, device=device)
    layer.lazy_initialization(sample, sample)
    ones = torch.ones(heads, head_dim, device=device)
    layer.set_key_thresholds(-ones, ones)
    n_sink = min(layer.config.sink_tokens, tokens)
    hist = tokens - n_sink
    layer.ensure_capacity(hist + (layer.config.block_size if spare is None else spare))
    if n_sink:
        layer.sink_k[:, :, :n_sink].normal_(generator=g)
        layer.sink_rope = None  # sink_k written directly: rotate it again when read
        layer.sink_v[:, :, :n_sink].normal_(generator=g)
        layer.sink_positions[:, :n_sink] = torch.arange(n_sink, dtype=torch.int32, device=device)
        layer.sink_valid[:, :n_sink] = True
    layer.n_sink = n_sink
    # fill in slabs to bound the temporary memory of the random generator
    for s0 in range(0, hist, slab):
        s1 = min(hist, s0 + slab)
        for name in ("k_codes", "v_codes"):
            t = getattr(layer, name)[:, :, s0:s1]
            t.copy_(torch.randint(0, 256, t.shape, dtype=torch.uint8, device=device, generator=g))
        layer.v_scale[:, :, s0:s1].uniform_(0.5, 1.5, generator=g)
        layer.v_zero[:, :, s0:s1].uniform_(-0.1, 0.1, generator=g)
        for kind in ("k", "v"):
            val = getattr(layer, f"{kind}_out_val")[:, :, s0:s1]
            idx = getattr(layer, f"{kind}_out_idx")[:, :, s0:s1]
            if val.numel():
                val.normal_(generator=g).mul_(4)
                ch = torch.randint(0, head_dim, idx.shape, device=device, generator=g)
                unused = torch.rand(idx.shape, device=device, generator=g) < 0.35
                idx.copy_(torch.where(unused, torch.full_like(ch, quant.UNUSED_SLOT), ch).to(torch.uint8))
        layer.positions[:, s0:s1] = torch.arange(n_sink + s0, n_sink + s1, dtype=torch.int32, device=device)
    layer.length = hist
    w = layer.n_window  # the recent window's ring: the last w history tokens, exact
    if w:
        shape = (batch, heads, w, head_dim)
        k = torch.randn(shape, generator=g, device=device).to(dtype)
        v = torch.randn(shape, generator=g, device=device).to(dtype)
        layer.store_ring_slots(torch.arange(hist - w, hist, device=device), k, v)
        layer.window_all_valid = True
    if hasattr(layer, "sync_device_length"):
        layer.sync_device_length()


#: signpost tables of a fast-filled cache: "nf" = what an uncalibrated cache uses (NormalFloat; calibrated k-means
#: tables take the same gathered decode path), "uniform" = the intX grid (``calibrate.py --key-table uniform
#: --value-table uniform``; the decode kernels fold it into scale and zero)
FAST_FILL_TABLES = ("nf", "uniform")


def fast_filled_cache(model, batch: int, tokens: int, cache_config: dict | KVQuantConfig | None = None,
                      seed: int = 0, reserve: int | None = None, slab: int = 1 << 16,
                      tables: str = "nf") -> KVQuantCache:
    """A `KVQuantCache` for ``model`` whose every layer holds ``tokens`` tokens per sequence (see module doc).

    Each layer lives on the device of its decoder layer (accelerate ``device_map`` placements included).
    ``reserve``: allocate the capacity ``generate`` would for ``reserve`` tokens per sequence (``cache.reserve``,
    no extra block), which is what :func:`kvquant_hf.plan_capacity` predicts. ``tables``: one of
    ``FAST_FILL_TABLES`` (the lookup tables the decode kernels see; speed only, the data are random anyway).
    """
    if tables not in FAST_FILL_TABLES:
        raise ValueError(f"tables={tables!r} is not supported; choose one of {FAST_FILL_TABLES}.")
    from .models import patch_model

    patch_model(model)
    cfg = model.config
    cache = KVQuantCache(cache_config or {}, model_config=cfg)
    if reserve is not None:
        cache.reserve(max(int(reserve), tokens))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    layers = model.model.layers
    for i, layer in enumerate(cache.layers):
        device = next(layers[i].parameters()).device
        fast_fill_layer(layer, batch, cfg.num_key_value_heads, head_dim, tokens, model.dtype, device, seed + i,
                        spare=0 if reserve is not None else None, slab=slab)
        if tables == "uniform":
            layer.k_lut = quant.uniform_signposts(layer.config.key_bits).to(device, torch.float32)
            layer.v_lut = quant.uniform_signposts(layer.config.value_bits).to(device, torch.float32)
    return cache


def median_ms(fn, warmup: int = 2, iters: int = 5, device: torch.device | str = "cuda") -> float:
    """Median time of ``fn()`` in ms after ``warmup`` calls: CUDA events around each call on a GPU, wall time on
    the CPU."""
    for _ in range(warmup):
        fn()
    if torch.device(device).type != "cuda":
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def step_breakdown(step, categories: dict[str, tuple[str, ...]]) -> dict[str, float]:
    """CUDA kernel time (ms) of one call of ``step`` grouped by kernel-name substrings, plus ``other``."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    out = {name: 0.0 for name in categories}
    out["other"] = 0.0
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        ms = evt.device_time / 1000.0 if hasattr(evt, "device_time") else evt.cuda_time / 1000.0
        for name, keys in categories.items():
            if any(k in evt.name for k in keys):
                out[name] += ms
                break
        else:
            out["other"] += ms
    return out


def kvquant_decode_benchmark(model, batch: int, context: int, bits: int, cuda_graph: bool = False,
                             outlier_fraction: float = 0.01, warmup: int = 2, iters: int = 10,
                             fused_norms: bool = False, fused_projections: bool = False,
                             tables: str = "nf", recent_window: int = 0) -> dict[str, Any]:
    """Time one decode step of ``model`` with a fast-filled nuq``bits`` `KVQuantCache` at ``context`` tokens
    (``fused_norms``: the model's RMSNorms on one Triton kernel each; ``fused_projections``: one GEMV for q/k/v and
    one for gate/up; both undone afterwards; ``tables``: see :func:`fast_filled_cache`; ``recent_window``: the
    cache's exact window). Each timed step appends a token (the capacity has room for them).

    Returns ms per step (CUDA events, median), the cache size, and for eager steps a profiler breakdown
    into attention / append / other kernel time.
    """
    from .models.norms import fuse_rms_norms, unfuse_rms_norms
    from .models.projections import fuse_projections, unfuse_projections

    cache = fast_filled_cache(model, batch, context, {"bits": bits, "outlier_fraction": outlier_fraction,
                                                      "recent_window": recent_window}, tables=tables)
    if fused_norms:
        fuse_rms_norms(model)
    if fused_projections:
        fuse_projections(model)
    try:
        return _decode_benchmark(model, cache, batch, context, cuda_graph, warmup, iters)
    finally:
        if fused_norms:
            unfuse_rms_norms(model)
        if fused_projections:
            unfuse_projections(model)


def _decode_benchmark(model, cache, batch: int, context: int, cuda_graph: bool, warmup: int, iters: int
                      ) -> dict[str, Any]:
    ids = torch.randint(0, model.config.vocab_size, (batch, 1), device=model.device)
    pos = torch.full((batch, 1), context, dtype=torch.long, device=model.device)
    result: dict[str, Any] = {"cache_gib": cache.get_memory_footprint() / 2**30,
                              "backend": cache.layers[0].backend}
    if cuda_graph:
        from .cuda_graph import CUDAGraphDecoder

        decoder = CUDAGraphDecoder(model, cache, batch_size=batch, max_steps=warmup + iters + 8)

        def step():
            decoder.step(ids, pos)

        with torch.inference_mode():
            result["ms_per_step"] = median_ms(step, warmup, iters)
        decoder.close()
    else:
        def step():
            model(input_ids=ids, position_ids=pos, **{cache_kwarg_name(model): cache})

        with torch.inference_mode():
            result["ms_per_step"] = median_ms(step, warmup, iters, model.device)
            if model.device.type == "cuda":  # kernel times need the CUDA profiler
                cats = {"attention_ms": ("packed_attn", "kvq_packed_decode"), "append_ms": ("quantize",)}
                bd = step_breakdown(step, cats)
                result.update(attention_ms=bd["attention_ms"], append_ms=bd["append_ms"],
                              other_kernels_ms=bd["other"])
                result["other_ms"] = result["ms_per_step"] - bd["attention_ms"] - bd["append_ms"]
    return result

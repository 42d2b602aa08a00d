"""Capacity benchmark: the longest context one GPU holds, predicted by the planner and measured, plus decode
steps at that length and prefill throughput (Llama-3-8B shape, random bf16 weights).

Per method (``fp16`` = ``DynamicCache`` + SDPA, ``nuq4``/``nuq3``/``nuq2`` = ``KVQuantCache`` with 1% outliers):

1. **predicted**: ``kvquant_hf.plan_capacity`` from the free memory with the model loaded (decode scenario:
   the cache filled, then one token per step; also the ``generate`` scenario with a 4096-token prefill chunk);
2. **measured**: the largest context whose cache can be allocated *and* then decoded: starting at the
   prediction, a bisection (``--search-steps``) over sizes between ``lo`` and ``hi`` (``--search-span`` around
   the prediction), each attempt allocating the cache at that size (``generate``'s reservation, zero data) and
   running one decode step, an out-of-memory error meaning "does not fit";
3. at the measured maximum the cache is **filled** (fast fill: random packed codes, scales, outlier slots and
   positions; fp16: random K/V) and ``--decode-steps`` steps are timed with CUDA events; each GPU's memory is
   recorded.

Prefill (``--prefill-lengths``): tokens/s of ``generate(max_new_tokens=1)`` with nuq4 chunked prefill
(``prefill_chunk_size=4096``, Triton kernels) vs fp16 SDPA prefill into a ``DynamicCache``. A length whose
estimated time (quadratic extrapolation from the previous one) exceeds the time left (``--time-budget``) is
skipped and reported as such.

Results: ``benchmarks/results/capacity.{md,json}`` (copied to ``$OUT`` when set), rewritten after every row.
On CPU (smoke test, ``--shape tiny --device cpu --free-mib N``) the GPU-only parts (the out-of-memory search,
CUDA events, per-GPU memory) are skipped and marked so.

Usage (one H200, < 8 min)::

    PYTHONPATH=. python benchmarks/capacity.py                  # everything (time budget 420 s)
    PYTHONPATH=. python benchmarks/capacity.py --quick          # fewer search/decode steps, prefill 32K only
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import md_table, random_model, write_results

import kvquant_hf
from kvquant_hf import attention as kv_attention
from kvquant_hf.benchmarking import fast_filled_cache
from kvquant_hf.planner import GiB, ModelShape, free_device_memory

METHODS = ("fp16", "nuq4", "nuq3", "nuq2")


def cache_config(method: str, chunk: int = 4096) -> dict | str:
    if method == "fp16":
        return "fp16"
    return {"bits": int(method[3:]), "outlier_fraction": 0.01, "prefill_chunk_size": chunk}


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)


def gpu_memory() -> dict[str, dict[str, float]]:
    """Per GPU: allocated, peak allocated, reserved by torch, and used as the driver sees it (GiB)."""
    out = {}
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        free, total = torch.cuda.mem_get_info(i)
        out[f"cuda:{i}"] = {
            "allocated_gib": torch.cuda.memory_allocated(i) / GiB,
            "peak_allocated_gib": torch.cuda.max_memory_allocated(i) / GiB,
            "reserved_gib": torch.cuda.memory_reserved(i) / GiB,
            "driver_used_gib": (total - free) / GiB,
            "total_gib": total / GiB,
        }
    return out


# --------------------------------------------------------------------------------------------
# caches at a given size
# --------------------------------------------------------------------------------------------
def _layer_devices(model) -> list[torch.device]:
    return [next(layer.parameters()).device for layer in model.model.layers]


def allocate_cache(model, method: str, tokens: int, filled: int, fill: bool):
    """A cache holding ``filled`` tokens per sequence with room reserved for ``tokens`` (``generate``'s policy).

    ``fill=False`` allocates only (zero codes, unused outlier slots: the memory and the decode work are the same);
    ``fill=True`` writes random data (fast fill)."""
    cfg = model.config
    if method == "fp16":
        from transformers import DynamicCache

        cache = DynamicCache(config=cfg)
        shape = (1, cfg.num_key_value_heads, filled, cfg.head_dim)
        for i, dev in enumerate(_layer_devices(model)):
            k = torch.empty(shape, dtype=model.dtype, device=dev)
            v = torch.empty(shape, dtype=model.dtype, device=dev)
            if fill:
                k.normal_()
                v.normal_()
            cache.update(k, v, i)
            del k, v
        return cache
    ccfg = cache_config(method)
    if fill:  # small slabs: the fill's temporaries (a few MiB) must fit next to a cache at the measured maximum
        return fast_filled_cache(model, 1, filled, ccfg, reserve=tokens, slab=4096)
    cache = kvquant_hf.KVQuantCache(ccfg, model_config=cfg)
    kvquant_hf.patch_model(model)
    cache.reserve(tokens)
    for layer, dev in zip(cache.layers, _layer_devices(model)):
        x = torch.zeros(1, cfg.num_key_value_heads, 1, cfg.head_dim, dtype=model.dtype, device=dev)
        layer.lazy_initialization(x, x)
        ones = torch.ones(cfg.num_key_value_heads, cfg.head_dim, device=dev)
        layer._set_key_thresholds(-ones, ones)
        layer.n_sink = min(layer.config.sink_tokens, filled)
        layer.sink_valid[:, : layer.n_sink] = True
        layer.length = filled - layer.n_sink
    return cache


def decode_steps(model, cache, start: int, steps: int, device: str) -> list[float]:
    """``steps`` single-token forwards appending to ``cache`` from position ``start``; ms each."""
    from kvquant_hf.generation import _cache_kwarg_name

    kw = _cache_kwarg_name(model)
    first = next(model.parameters()).device
    times = []
    for s in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (1, 1), device=first)
        pos = torch.full((1, 1), start + s, dtype=torch.long, device=first)
        if device.startswith("cuda") and len({d.index for d in _layer_devices(model)}) == 1:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            with torch.inference_mode():
                model(input_ids=ids, position_ids=pos, **{kw: cache}, logits_to_keep=1)
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:  # CPU, or layers on several GPUs: wall time between full synchronizations
            _sync(device)
            t0 = time.perf_counter()
            with torch.inference_mode():
                model(input_ids=ids, position_ids=pos, **{kw: cache}, logits_to_keep=1)
            _sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def fits(model, method: str, tokens: int, device: str) -> bool:
    """Allocate at ``tokens`` (one token of room left) and decode one step; False on out-of-memory."""
    _free(device)
    cache = None
    try:
        cache = allocate_cache(model, method, tokens, tokens - 1, fill=False)
        decode_steps(model, cache, tokens - 1, 1, device)
        _sync(device)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        del cache
        _free(device)


def plan(model, method: str, free_memory, prompt_tokens: int, headroom: int):
    return kvquant_hf.plan_capacity(model, cache_config(method), free_memory=free_memory, prompt_tokens=prompt_tokens,
                                    headroom_bytes=headroom)


# --------------------------------------------------------------------------------------------
# the benchmark
# --------------------------------------------------------------------------------------------
class Budget:
    def __init__(self, seconds: float):
        self.start, self.seconds = time.time(), seconds

    @property
    def left(self) -> float:
        return self.seconds - (time.time() - self.start)


def capacity_row(model, method: str, args, device: str, budget: Budget) -> dict:
    _free(device)
    if device.startswith("cuda"):
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)
    free = {d: free_device_memory(d) for d in {str(x) for x in _layer_devices(model)}}
    if any(v is None for v in free.values()):
        free = {str(_layer_devices(model)[0]): int(args.free_mib * 2**20)}
    headroom = int(args.headroom_mib * 2**20)
    p_dec = plan(model, method, free, 1, headroom)
    p_gen = plan(model, method, free, 4096, headroom)
    predicted = int(p_dec.max_tokens * args.scale)
    row = {"section": "capacity", "method": method, "free_gib": sum(free.values()) / GiB,
           "predicted_tokens": p_dec.max_tokens, "predicted_generate_tokens": p_gen.max_tokens,
           "bytes_per_token": sum(d.bytes_per_token for d in p_dec.devices),
           "predicted_per_device": p_dec.per_device_tokens,
           "layers_per_device": {d.device: len(d.layers) for d in p_dec.devices},
           "predicted_cache_gib": sum(p_dec.cache_bytes(predicted).values()) / GiB}
    if predicted < args.decode_steps + 2:
        row["error"] = "the planner predicts no room for the cache"
        return row
    # measured maximum (GPU): bisection on "allocates and decodes"
    if device.startswith("cuda") and args.search_steps > 0:
        lo, hi = int(predicted * (1 - args.search_span)), int(predicted * (1 + args.search_span))
        probes = []
        if fits(model, method, predicted, device):
            lo = predicted
            if fits(model, method, hi, device):
                lo = hi
                probes.append(("hi fits", hi))
        else:
            hi = predicted
            if not fits(model, method, lo, device):
                row["error"] = f"even {lo} tokens ({1 - args.search_span:.0%} of the prediction) do not fit"
                return row
        for _ in range(args.search_steps):
            if hi - lo <= max(256, lo // 2000) or lo == hi:
                break
            mid = (lo + hi) // 2
            if fits(model, method, mid, device):
                lo = mid
            else:
                hi = mid
        measured = lo
        row["measured_tokens"] = measured
        row["measured_is_lower_bound"] = bool(probes)
        row["predicted_vs_measured"] = p_dec.max_tokens / measured - 1.0
    else:
        measured = predicted
        row["measured_tokens"] = "skipped (CPU: no out-of-memory search)"
    # fill for real at the measured maximum and decode
    steps = args.decode_steps
    _free(device)
    t0 = time.time()
    try:
        cache = allocate_cache(model, method, measured, measured - steps, fill=True)
    except torch.OutOfMemoryError:  # the fill's few MiB of temporaries did not fit: 0.5% lower
        _free(device)
        measured = int(measured * 0.995)
        row["fill_note"] = "filled at 99.5% of the measured maximum (the fill's temporaries did not fit)"
        cache = allocate_cache(model, method, measured, measured - steps, fill=True)
    _sync(device)
    row["fill_s"] = time.time() - t0
    row["context"] = measured
    row["cache_gib"] = (cache.get_memory_footprint(include_spare=True) / GiB if method != "fp16" else
                        sum(lay.keys.numel() * lay.keys.element_size() * 2 for lay in cache.layers) / GiB)
    times = decode_steps(model, cache, measured - steps, steps, device)
    row["decode_ms"] = statistics.median(times[1:] if len(times) > 1 else times)
    row["decode_ms_all"] = [round(t, 2) for t in times]
    row["held_tokens"] = cache.get_seq_length()
    if device.startswith("cuda"):
        row["gpu_memory"] = gpu_memory()
        row["peak_gib"] = max(m["peak_allocated_gib"] for m in row["gpu_memory"].values())
    else:
        row["gpu_memory"] = "skipped (CPU)"
    del cache
    _free(device)
    return row


def prefill_row(model, method: str, length: int, device: str, chunk: int, prefill_attention: str = "kernel") -> dict:
    """Time ``generate(max_new_tokens=1)`` on a random prompt of ``length`` tokens (prefill + one step)."""
    first = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, length), device=first)
    kwargs = {"max_new_tokens": 1, "do_sample": False, "pad_token_id": 0, "attention_mask": torch.ones_like(ids)}
    if method != "fp16":
        kwargs.update(cache_implementation="kvquant",
                      cache_config={**cache_config(method, chunk), "prefill_attention": prefill_attention})
    _free(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, **kwargs)
    _sync(device)
    sec = time.perf_counter() - t0
    row = {"section": "prefill",
           "method": method if method == "fp16" else f"{method} chunked ({chunk})"
           + f", prefill_attention={prefill_attention}",
           "prompt": length, "prefill_s": sec, "tokens_per_s": length / sec}
    if device.startswith("cuda"):
        row["peak_gib"] = torch.cuda.max_memory_allocated() / GiB
        if method != "fp16" and prefill_attention != "kernel":
            row["fused_op"] = kv_attention.fused_lse_name(torch.device(device), next(model.parameters()).dtype,
                                                          ModelShape.from_config(model.config).head_dim)
    _free(device)
    return row


def render(rows: list[dict], args) -> str:
    cap = [r for r in rows if r["section"] == "capacity"]
    pre = [r for r in rows if r["section"] == "prefill"]
    md = [(f"# Capacity on one GPU: {args.shape}"
          f"{f' ({args.layers} layers)' if args.layers else ''}, random {args.dtype} weights\n"),
          ("Predicted = `plan_capacity` in the decode scenario (cache filled, then one token per step); "
          "predicted (generate) = with a 4096-token prefill chunk's activations. Measured = the largest context "
          "that allocates and decodes one step (bisection with out-of-memory as the test); the cache is then "
          "filled (fast fill) at that size and the decode steps timed (CUDA events, median after the first).\n"),
          md_table(cap, ["method", "free_gib", "bytes_per_token", "predicted_tokens", "predicted_generate_tokens",
                         "measured_tokens", "predicted_vs_measured", "context", "cache_gib", "decode_ms",
                         "peak_gib", "fill_s", "error"])]
    if pre:
        md += ["\n## Prefill throughput (`generate(max_new_tokens=1)`)\n",
               md_table(pre, ["method", "prompt", "prefill_s", "tokens_per_s", "peak_gib", "fused_op", "error"])]
    mem = [r for r in cap if isinstance(r.get("gpu_memory"), dict)]
    if mem:
        md.append("\n## Memory per GPU after the decode steps (GiB)\n")
        for r in mem:
            md.append(f"- {r['method']} at {r['context']:,} tokens: " + "; ".join(
                f"{d}: allocated {m['allocated_gib']:.2f}, peak {m['peak_allocated_gib']:.2f}, driver used "
                f"{m['driver_used_gib']:.2f} of {m['total_gib']:.2f}" for d, m in r["gpu_memory"].items()))
    return "\n".join(md)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers (faster; capacities scale up)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--methods", nargs="*", default=list(METHODS), help="capacity rows (none: prefill only)")
    ap.add_argument("--decode-steps", type=int, default=5)
    ap.add_argument("--search-steps", type=int, default=7, help="bisection steps for the measured maximum (0: off)")
    ap.add_argument("--search-span", type=float, default=0.05, help="search within +-span of the prediction")
    ap.add_argument("--scale", type=float, default=1.0, help="try this fraction of the predicted capacity")
    ap.add_argument("--prefill-lengths", type=int, nargs="*", default=[32768, 131072])
    ap.add_argument("--prefill-methods", nargs="*", default=["nuq4", "fp16"])
    ap.add_argument("--prefill-chunk", type=int, default=4096)
    ap.add_argument("--prefill-attention", default="auto", choices=["kernel", "auto"],
                    help="cache_config prefill_attention of the nuq prefill rows")
    ap.add_argument("--prefill-fused", nargs="+", default=None, choices=["cudnn", "flash", "efficient"],
                    help="fused attention ops of the prefill path, in the order tried "
                         "(kvquant_hf.attention.PREFILL_FUSED_ORDER)")
    ap.add_argument("--prefill-block", type=int, default=None,
                    help="history tokens dequantized per block on the prefill_attention=auto path "
                         "(kvquant_hf.attention.PREFILL_HISTORY_BLOCK)")
    ap.add_argument("--free-mib", type=float, default=64.0, help="CPU only: the memory figure given to the planner")
    ap.add_argument("--headroom-mib", type=float, default=512.0, help="planner headroom per device")
    ap.add_argument("--time-budget", type=float, default=420.0, help="seconds; later stages are skipped past it")
    ap.add_argument("--quick", action="store_true", help="3 search steps, 3 decode steps, prefill at 32K only")
    ap.add_argument("--name", default="capacity", help="result file name (benchmarks/results/NAME.{md,json})")
    args = ap.parse_args(argv)
    if args.quick:
        args.search_steps = min(args.search_steps, 3)
        args.decode_steps = min(args.decode_steps, 3)
        args.prefill_lengths = [n for n in args.prefill_lengths if n <= 32768] or [32768]
    dtype = getattr(torch, args.dtype)
    if args.prefill_block:
        kv_attention.PREFILL_HISTORY_BLOCK = args.prefill_block
    if args.prefill_fused:
        kv_attention.PREFILL_FUSED_ORDER = tuple(args.prefill_fused)
    budget = Budget(args.time_budget)
    model = random_model(args.shape, dtype=dtype, device=args.device, num_layers=args.layers)
    kvquant_hf.patch_model(model)
    rows: list[dict] = []
    meta = {"shape": args.shape, "layers": model.config.num_hidden_layers, "dtype": args.dtype,
            "prefill_history_block": kv_attention.PREFILL_HISTORY_BLOCK,
            "prefill_fused_order": list(kv_attention.PREFILL_FUSED_ORDER)}

    def save():
        write_results(args.name, rows, render(rows, args), meta, repo_and_out=True)

    for method in args.methods:
        if budget.left < 30:
            rows.append({"section": "capacity", "method": method, "error": "skipped: time budget"})
            continue
        try:
            row = capacity_row(model, method, args, args.device, budget)
        except torch.OutOfMemoryError as exc:
            row = {"section": "capacity", "method": method, "error": f"OOM: {str(exc).splitlines()[0][:100]}"}
            _free(args.device)
        print(row, flush=True)
        rows.append(row)
        save()
    for method in args.prefill_methods:
        prev = None
        if args.prefill_lengths and budget.left > 60:
            try:  # compile the prefill kernels (first chunk and chunks with history) and warm cuBLAS
                prefill_row(model, method, min(2 * args.prefill_chunk, min(args.prefill_lengths)), args.device,
                            args.prefill_chunk, args.prefill_attention)
            except torch.OutOfMemoryError:
                _free(args.device)
        for length in sorted(args.prefill_lengths):
            if prev is not None:
                estimate = prev[1] * (length / prev[0]) ** 2
                if estimate > budget.left - 10:
                    rows.append({"section": "prefill", "method": method, "prompt": length,
                                 "error": f"skipped: estimated {estimate:.0f} s > {budget.left:.0f} s left"})
                    save()
                    continue
            try:
                row = prefill_row(model, method, length, args.device, args.prefill_chunk, args.prefill_attention)
                prev = (length, row["prefill_s"])
            except torch.OutOfMemoryError as exc:
                row = {"section": "prefill", "method": method, "prompt": length,
                       "error": f"OOM: {str(exc).splitlines()[0][:100]}"}
                _free(args.device)
            print(row, flush=True)
            rows.append(row)
            save()
    save()
    return rows


if __name__ == "__main__":
    main()

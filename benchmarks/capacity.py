"""Capacity: the longest context one GPU (and several GPUs) holds, predicted by the planner and measured, with
decode steps at that length (Llama-3-8B shape, random bf16 weights).

Per method (``fp16`` = ``DynamicCache`` + SDPA, ``nuq4``/``nuq3``/``nuq2`` = ``KVQuantCache`` with 1% outliers):

1. **predicted**: ``kvquant_hf.plan_capacity`` from the free memory with the model loaded (decode scenario:
   the cache filled, then one token per step; also the ``generate`` scenario with a 4096-token prefill chunk);
2. **measured**: the largest context whose cache can be allocated *and* then decoded: starting at the
   prediction, a bisection (``--search-steps``) over sizes between ``lo`` and ``hi`` (``--search-span`` around
   the prediction), each attempt allocating the cache at that size (``generate``'s reservation, zero data) and
   running one decode step, an out-of-memory error meaning "does not fit";
3. at the measured maximum the cache is **filled** (fast fill: random packed codes, scales, outlier slots and
   positions; fp16: random K/V) and ``--decode-steps`` steps are timed; each GPU's memory is recorded.

**Several GPUs** (``--multi-methods``, when more than one GPU is visible or ``--devices`` names several): the model
spread over the devices with accelerate (``device_map``), each layer's packed cache on its layer's GPU; the planner
counts each device (its layers, its share of the weights) and the context is the minimum over the devices; the
same three steps (decode steps timed as wall time between synchronizations of every GPU).

**Planner table**: predictions for Llama-3-8B (bf16) on 1 and 2 GPUs and Llama-2-7B (fp16) on 1, 2 and 8 GPUs of
``--plan-gib`` free memory each (139.8 GiB: an H200 as PyTorch reports it), layers split evenly in order as
accelerate's ``device_map="auto"`` does for equal GPUs. No GPU needed.

On CPU (``--smoke``: tiny model, a planner memory figure of ``--free-mib``) the GPU-only parts (the out-of-memory
search, per-GPU memory) are skipped and marked so.

Usage (about 3 minutes on one H100; stages past ``--time-budget`` are skipped and reported)::

    PYTHONPATH=. python -m benchmarks.capacity
    python -m benchmarks.capacity --smoke
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig

import kvquant_hf
from benchmarks.common import (md_table, random_model, random_model_device_map, release_memory, synchronize,
                               write_result)
from kvquant_hf.benchmarking import fast_filled_cache
from kvquant_hf.generation import cache_kwarg_name
from kvquant_hf.planner import GiB, free_device_memory

NAME = "capacity"
METHODS = ("fp16", "nuq4", "nuq3", "nuq2")


def cache_config(method: str, chunk: int = 4096) -> dict | str:
    if method == "fp16":
        return "fp16"
    return {"bits": int(method[3:]), "outlier_fraction": 0.01, "prefill_chunk_size": chunk}


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
        layer.set_key_thresholds(-ones, ones)
        layer.n_sink = min(layer.config.sink_tokens, filled)
        layer.sink_valid[:, : layer.n_sink] = True
        layer.length = filled - layer.n_sink
    return cache


def decode_steps(model, cache, start: int, steps: int, device: str) -> list[float]:
    """``steps`` single-token forwards appending to ``cache`` from position ``start``; ms each."""
    kw = cache_kwarg_name(model)
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
            synchronize(device)
            t0 = time.perf_counter()
            with torch.inference_mode():
                model(input_ids=ids, position_ids=pos, **{kw: cache}, logits_to_keep=1)
            synchronize(device)
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def fits(model, method: str, tokens: int, device: str) -> bool:
    """Allocate at ``tokens`` (one token of room left) and decode one step; False on out-of-memory."""
    release_memory(device)
    cache = None
    try:
        cache = allocate_cache(model, method, tokens, tokens - 1, fill=False)
        decode_steps(model, cache, tokens - 1, 1, device)
        synchronize(device)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        del cache
        release_memory(device)


def plan(model, method: str, free_memory, prompt_tokens: int, headroom: int):
    """``plan_capacity`` of ``model`` with ``method``'s cache."""
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
    """Predicted, measured (GPU) and filled-and-decoded capacity of ``model`` with ``method``'s cache."""
    release_memory(device)
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
    row = {"section": args.section, "method": method, "free_gib": sum(free.values()) / GiB,
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
    release_memory(device)
    t0 = time.time()
    try:
        cache = allocate_cache(model, method, measured, measured - steps, fill=True)
    except torch.OutOfMemoryError:  # the fill's few MiB of temporaries did not fit: 0.5% lower
        release_memory(device)
        measured = int(measured * 0.995)
        row["fill_note"] = "filled at 99.5% of the measured maximum (the fill's temporaries did not fit)"
        cache = allocate_cache(model, method, measured, measured - steps, fill=True)
    synchronize(device)
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
    release_memory(device)
    return row


def plan_rows(gib_per_gpu: float) -> list[dict]:
    """Planner predictions for the published shapes on 1/2/8 GPUs of ``gib_per_gpu`` free memory each."""
    shapes = {
        "Llama-3-8B (bf16)": (LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                          num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8),
                              torch.bfloat16, (1, 2)),
        "Llama-2-7B (fp16)": (LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                          num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
                              torch.float16, (1, 2, 8)),
    }
    rows = []
    for name, (cfg, dtype, counts) in shapes.items():
        for n in counts:
            devs = [f"cuda:{i}" for i in range(n)]
            dm = [devs[i * n // cfg.num_hidden_layers] for i in range(cfg.num_hidden_layers)]
            for method in METHODS:
                p = kvquant_hf.plan_capacity(None, cache_config(method), model_config=cfg, dtype=dtype, device_map=dm,
                                             free_memory={d: int(gib_per_gpu * GiB) for d in devs}, prompt_tokens=1)
                rows.append({"section": "plan", "model": name, "gpus": n,
                             "method": method if method == "fp16" else f"{method}-1%",
                             "bytes_per_token": sum(d.bytes_per_token for d in p.devices),
                             "predicted_tokens": p.max_tokens, "limiting_device": p.limiting_device})
    return rows


def render(rows: list[dict], meta: dict) -> str:
    cap = [r for r in rows if r["section"] == "capacity"]
    multi = [r for r in rows if r["section"] == "multi_gpu"]
    plan_ = [r for r in rows if r["section"] == "plan"]
    layers = f" ({meta['layers']} layers)" if meta.get("layers") else ""
    md = [f"# Capacity: {meta['shape']}{layers}, random {meta['dtype']} weights\n",
          ("Predicted = `plan_capacity` in the decode scenario (cache filled, then one token per step); "
           "predicted (generate) = with a 4096-token prefill chunk's activations. Measured = the largest context "
           "that allocates and decodes one step (bisection with out-of-memory as the test); the cache is then "
           "filled (fast fill) at that size and the decode steps timed (median after the first).\n"),
          "## One GPU\n",
          md_table(cap, ["method", "free_gib", "bytes_per_token", "predicted_tokens", "predicted_generate_tokens",
                         "measured_tokens", "predicted_vs_measured", "context", "cache_gib", "decode_ms",
                         "peak_gib", "fill_s", "error"])]
    if multi:
        md += [f"\n## Several GPUs (`device_map` over {meta.get('devices')})\n",
               md_table(multi, ["method", "free_gib", "predicted_per_device", "predicted_tokens", "measured_tokens",
                                "predicted_vs_measured", "context", "cache_gib", "decode_ms", "fill_s", "error"])]
    mem = [r for r in cap + multi if isinstance(r.get("gpu_memory"), dict)]
    if mem:
        md.append("\n## Memory per GPU after the decode steps (GiB)\n")
        for r in mem:
            md.append(f"- {r['section']} {r['method']} at {r['context']:,} tokens: " + "; ".join(
                f"{d}: allocated {m['allocated_gib']:.2f}, peak {m['peak_allocated_gib']:.2f}, driver used "
                f"{m['driver_used_gib']:.2f} of {m['total_gib']:.2f}" for d, m in r["gpu_memory"].items()))
    if plan_:
        md += [f"\n## Planner predictions ({meta['plan_gib']} GiB free per GPU before the weights)\n",
               md_table(plan_, ["model", "gpus", "method", "bytes_per_token", "predicted_tokens", "limiting_device"])]
    return "\n".join(md)


def run_methods(model, methods, args, device: str, budget: Budget, rows: list[dict], save) -> None:
    for method in methods:
        if budget.left < 30:
            rows.append({"section": args.section, "method": method, "error": "skipped: time budget"})
            continue
        try:
            row = capacity_row(model, method, args, device, budget)
        except torch.OutOfMemoryError as exc:
            row = {"section": args.section, "method": method, "error": f"OOM: {str(exc).splitlines()[0][:100]}"}
            release_memory(device)
        print(row, flush=True)
        rows.append(row)
        save()


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers (faster; capacities scale up)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--methods", nargs="*", default=list(METHODS), help="one-GPU rows")
    ap.add_argument("--devices", nargs="*", default=None,
                    help="devices of the several-GPU rows (default: every visible GPU when there are several)")
    ap.add_argument("--multi-methods", nargs="*", default=["nuq2"], help="several-GPU rows")
    ap.add_argument("--decode-steps", type=int, default=3)
    ap.add_argument("--search-steps", type=int, default=4, help="bisection steps for the measured maximum (0: off)")
    ap.add_argument("--search-span", type=float, default=0.05, help="search within +-span of the prediction")
    ap.add_argument("--scale", type=float, default=1.0, help="try this fraction of the predicted capacity")
    ap.add_argument("--free-mib", type=float, default=64.0, help="CPU only: the memory figure given to the planner")
    ap.add_argument("--headroom-mib", type=float, default=512.0, help="planner headroom per device")
    ap.add_argument("--plan-gib", type=float, default=139.8, help="free memory per GPU of the planner table")
    ap.add_argument("--time-budget", type=float, default=170.0, help="seconds; later stages are skipped past it")
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU (checks the script, not the GPU)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.shape, args.device, args.dtype, args.layers = "tiny", "cpu", "float32", None
        args.free_mib, args.headroom_mib, args.decode_steps = 8.0, 0.0, 2
        args.methods = ["fp16", "nuq4", "nuq2"]
        args.devices = args.devices or ["cpu"]
        args.scale = 0.5 if args.scale == 1.0 else args.scale
    devices = args.devices
    if devices is None and args.device.startswith("cuda") and torch.cuda.device_count() > 1:
        devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    dtype = getattr(torch, args.dtype)
    budget = Budget(args.time_budget)
    rows: list[dict] = []
    meta = {"shape": args.shape, "layers": args.layers, "dtype": args.dtype, "devices": devices,
            "plan_gib": args.plan_gib, "search_steps": args.search_steps, "decode_steps": args.decode_steps}

    def save(history: bool = False):
        write_result(NAME, rows, render(rows, meta), meta, device=args.device, history=history)

    if args.methods:
        model = random_model(args.shape, dtype=dtype, device=args.device, num_layers=args.layers)
        kvquant_hf.patch_model(model)
        args.section = "capacity"
        one = argparse.Namespace(**{**vars(args), "scale": 1.0 if args.smoke else args.scale})
        run_methods(model, args.methods, one, args.device, budget, rows, save)
        del model
        release_memory(args.device)
    if devices and args.multi_methods:
        model, dmap = random_model_device_map(args.shape, devices, dtype=dtype, num_layers=args.layers)
        kvquant_hf.patch_model(model)
        meta["layers_per_device"] = {d: sum(1 for k, v in dmap.items() if k.startswith("model.layers.") and v == d)
                                     for d in devices}
        args.section = "multi_gpu"
        run_methods(model, args.multi_methods, args, devices[0], budget, rows, save)
        del model
        release_memory(devices[0])
    rows += plan_rows(args.plan_gib)
    save(history=True)
    return rows


if __name__ == "__main__":
    main()

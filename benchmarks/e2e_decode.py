"""End-to-end decode step time: a Llama-3-8B-shaped model (random bf16 weights) at long context.

Compares, per (context, batch): bf16 ``DynamicCache`` + SDPA, ``StaticCache`` + ``torch.compile``,
transformers' ``QuantizedCache`` (optimum-quanto int4) and ``KVQuantCache`` (nuq4-1%, nuq2-1%), eager and
CUDA-graph decode, with NormalFloat tables (an uncalibrated cache; calibrated k-means tables take the same gathered
decode path) and uniform tables (``calibrate.py --key-table uniform --value-table uniform``). Method names:
``kvquant_nuq4`` (eager), ``kvquant_nuq4_graph`` (CUDA graph), suffix ``_fn`` = ``fused_norms``, ``_fp`` =
``fused_projections``, ``_ff`` = both, then ``_wR`` = ``recent_window=R`` (e.g. ``kvquant_nuq4_graph_w128``). Caches are filled with random tensors of the right shape ("fast fill":
decode time depends on the bytes held, not on their values), then decode steps are timed with CUDA events
(median). An eager KVQuant step is broken down with the profiler into attention, append and the rest.

Usage (about 3 minutes on one H100)::

    PYTHONPATH=. python -m benchmarks.e2e_decode [--contexts 32768 131072] [--extra 131072x4] [--methods ...]
    python -m benchmarks.e2e_decode --smoke        # tiny model on CPU, eager steps only
"""

from __future__ import annotations

import argparse
import gc
import re

import torch

from benchmarks.common import md_table, random_model, time_ms, write_result
from kvquant_hf.benchmarking import kvquant_decode_benchmark
from kvquant_hf.generation import cache_kwarg_name
from kvquant_hf.models import unpatch_model

NAME = "e2e_decode"
DEFAULT_METHODS = ["kvquant_nuq4_graph", "kvquant_nuq4_graph_w128", "kvquant_nuq4_graph_ff", "kvquant_nuq2_graph",
                   "kvquant_nuq2_graph_w128", "kvquant_nuq2_graph_ff",
                   "kvquant_nuq4", "dynamic", "static_compile", "quanto_int4"]
#: cases left out of the default run (the compile takes a minute; quanto's step at 128K is slow and known)
DEFAULT_SKIP = ["static_compile@32768x1"]

def _free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _step_inputs(model, batch, context):
    ids = torch.randint(0, model.config.vocab_size, (batch, 1), device=model.device)
    pos = torch.full((batch, 1), context, dtype=torch.long, device=model.device)
    return ids, pos


def _fill(cache, model, batch, length):
    """Fill every layer of a transformers cache with ``length`` random K/V tokens (one update per layer)."""
    cfg = model.config
    shape = (batch, cfg.num_key_value_heads, length, cfg.head_dim)
    for i in range(cfg.num_hidden_layers):
        k = torch.randn(shape, dtype=model.dtype, device=model.device)
        v = torch.randn(shape, dtype=model.dtype, device=model.device)
        cache.update(k, v, i)
        del k, v
    return cache


def bench_dynamic(model, batch, context):
    from transformers import DynamicCache

    cache = _fill(DynamicCache(config=model.config), model, batch, context)
    ids, pos = _step_inputs(model, batch, context)

    def step():
        model(input_ids=ids, position_ids=pos, **{cache_kwarg_name(model): cache})
        cache.crop(-1)  # drop the token the step appended

    with torch.inference_mode():
        ms = time_ms(step, device=model.device)
    return ms


def bench_static_compile(model, batch, context):
    from transformers import StaticCache

    cache = _fill(StaticCache(config=model.config, max_cache_len=context + 16), model, batch, context)
    ids, pos = _step_inputs(model, batch, context)
    compiled = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    lengths = [layer.cumulative_length for layer in cache.layers]

    def step():
        compiled(input_ids=ids, position_ids=pos, **{cache_kwarg_name(model): cache})
        for t in lengths:
            t.fill_(context)

    with torch.inference_mode():
        ms = time_ms(step, warmup=3)
    torch._dynamo.reset()
    return ms


def bench_quanto(model, batch, context):
    from transformers import QuantizedCache

    cache = _fill(QuantizedCache(backend="quanto", config=model.config, nbits=4), model, batch, context)
    ids, pos = _step_inputs(model, batch, context)

    def step():
        model(input_ids=ids, position_ids=pos, **{cache_kwarg_name(model): cache})

    with torch.inference_mode():
        ms = time_ms(step, warmup=1, iters=3, device=model.device)
    return ms


def bench_kvquant(model, batch, context, bits, cuda_graph, fused_norms=False, fused_projections=False, tables="nf",
                  recent_window=0):
    """KVQuantCache decode step (eager or CUDA graph) and its breakdown."""
    return kvquant_decode_benchmark(model, batch=batch, context=context, bits=bits, cuda_graph=cuda_graph,
                                    fused_norms=fused_norms, fused_projections=fused_projections, tables=tables,
                                    recent_window=recent_window)


#: method suffix -> (fused_norms, fused_projections)
FUSION_SUFFIXES = {"_fn": (True, False), "_fp": (False, True), "_ff": (True, True)}


METHODS = {
    "dynamic": bench_dynamic,
    "static_compile": bench_static_compile,
    "quanto_int4": bench_quanto,
}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--extra", nargs="*", default=[], help="more CONTEXTxBATCH cases, e.g. 131072x4")
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    ap.add_argument("--layers", type=int, default=None, help="fewer layers")
    ap.add_argument("--skip", nargs="*", default=DEFAULT_SKIP, help="METHOD@CONTEXTxBATCH cases to skip")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="model dtype")
    ap.add_argument("--tables", nargs="+", default=["nf", "uniform"], choices=["nf", "uniform"],
                    help="signpost tables of the CUDA-graph kvquant rows (eager rows: the first)")
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU, eager kvquant and DynamicCache only")
    args = ap.parse_args(argv)
    device = "cuda"
    if args.smoke:
        device, args.shape, args.dtype = "cpu", "tiny", "float32"
        args.contexts, args.extra = [64], []
        args.methods = ["kvquant_nuq4", "kvquant_nuq4_w16", "kvquant_nuq2", "dynamic"]

    model = random_model(args.shape, num_layers=args.layers, dtype=getattr(torch, args.dtype), device=device)
    cases = [(c, args.batch) for c in args.contexts] + [tuple(int(x) for x in e.split("x")) for e in args.extra]
    rows = []
    for context, batch in cases:
        for method in args.methods:
            tables_of = args.tables if "_graph" in method else args.tables[:1] if method.startswith("kvquant") else [""]
            for tables in tables_of:
                if f"{method}@{context}x{batch}" in args.skip:
                    continue
                rows.append(run_case(model, method, tables, context, batch, device))
                print(rows[-1], flush=True)
                write_result(NAME, rows, render(rows, args), meta=vars(args), device=device, history=False)
    write_result(NAME, rows, render(rows, args), meta=vars(args), device=device)
    return rows


def run_case(model, method: str, tables: str, context: int, batch: int, device: str) -> dict:
    _free()
    row = {"method": method, "tables": tables, "context": context, "batch": batch}
    if not method.startswith("kvquant"):
        unpatch_model(model)  # baselines run the stock attention (dynamo traces it)
    try:
        if method.startswith("kvquant"):
            bits = int(method.split("_")[1][3:])
            win = re.search(r"_w(\d+)$", method)
            base = method[: win.start()] if win else method
            suffix = base[-3:] if base[-3:] in FUSION_SUFFIXES else ""
            norms, projections = FUSION_SUFFIXES.get(suffix, (False, False))
            base = base[: len(base) - len(suffix)]
            row.update(bench_kvquant(model, batch, context, bits, cuda_graph=base.endswith("_graph"),
                                     fused_norms=norms, fused_projections=projections, tables=tables,
                                     recent_window=int(win.group(1)) if win else 0))
        else:
            row["ms_per_step"] = METHODS[method](model, batch, context)
    except torch.OutOfMemoryError as exc:
        row["error"] = f"OOM: {str(exc).splitlines()[0][:80]}"
    except Exception as exc:  # noqa: BLE001 -- a baseline failing must not hide the others; the error is reported
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    if device == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    return row


def render(rows: list[dict], args) -> str:
    cols = ["method", "tables", "context", "batch", "ms_per_step", "attention_ms", "append_ms", "other_ms",
            "cache_gib", "peak_gib", "error"]
    return (f"# End-to-end decode step, {args.shape} (random {args.dtype} weights)\n\n"
            "ms per decode step (CUDA events, median); `_graph` = CUDA-graph decode, `_ff` = fused_norms + "
            "fused_projections; tables: nf = NormalFloat (uncalibrated), uniform = uniform key/value tables.\n\n"
            + md_table(rows, cols))


if __name__ == "__main__":
    main()

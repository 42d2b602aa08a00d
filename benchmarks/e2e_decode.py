"""End-to-end decode step time: a Llama-3-8B-shaped model (random bf16 weights) at long context.

Compares, per (context, batch): fp16/bf16 ``DynamicCache`` + SDPA, ``StaticCache`` + ``torch.compile``,
transformers' ``QuantizedCache`` (optimum-quanto int4) and ``KVQuantCache`` (nuq4-1%, nuq2-1%),
eager and CUDA-graph decode. Caches are filled with random tensors of the right shape ("fast fill":
decode time depends on the bytes held, not on their values), then decode steps are timed with CUDA
events (median). One KVQuant step is broken down with the profiler into attention, append and the
rest.

Usage (H200): ``PYTHONPATH=. python benchmarks/e2e_decode.py --contexts 32768 131072 524288 --batch 1
--extra 131072x4``
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import cuda_time_ms, md_table, random_model, results_dir, write_results

CACHE_KW = "past_key_values"  # accepted by 5.17 and (deprecated alias) by newer 5.x


def _free():
    gc.collect()
    torch.cuda.empty_cache()


def _step_inputs(model, batch, context):
    ids = torch.randint(0, model.config.vocab_size, (batch, 1), device="cuda")
    pos = torch.full((batch, 1), context, dtype=torch.long, device="cuda")
    return ids, pos


def _fill(cache, model, batch, length):
    """Fill every layer of a transformers cache with ``length`` random K/V tokens (one update per layer)."""
    cfg = model.config
    shape = (batch, cfg.num_key_value_heads, length, cfg.head_dim)
    for i in range(cfg.num_hidden_layers):
        k = torch.randn(shape, dtype=model.dtype, device="cuda")
        v = torch.randn(shape, dtype=model.dtype, device="cuda")
        cache.update(k, v, i)
        del k, v
    return cache


def bench_dynamic(model, batch, context):
    from transformers import DynamicCache

    cache = _fill(DynamicCache(config=model.config), model, batch, context)
    ids, pos = _step_inputs(model, batch, context)

    def step():
        model(input_ids=ids, position_ids=pos, **{CACHE_KW: cache})
        cache.crop(context)

    with torch.inference_mode():
        ms = cuda_time_ms(step)
    return ms


def bench_static_compile(model, batch, context):
    from transformers import StaticCache

    cache = _fill(StaticCache(config=model.config, max_cache_len=context + 16), model, batch, context)
    ids, pos = _step_inputs(model, batch, context)
    compiled = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    lengths = [layer.cumulative_length for layer in cache.layers]

    def step():
        compiled(input_ids=ids, position_ids=pos, **{CACHE_KW: cache})
        for t in lengths:
            t.fill_(context)

    with torch.inference_mode():
        ms = cuda_time_ms(step, warmup=3)
    torch._dynamo.reset()
    return ms


def bench_quanto(model, batch, context):
    from transformers import QuantizedCache

    cache = _fill(QuantizedCache(backend="quanto", config=model.config, nbits=4), model, batch, context)
    ids, pos = _step_inputs(model, batch, context)

    def step():
        model(input_ids=ids, position_ids=pos, **{CACHE_KW: cache})

    with torch.inference_mode():
        ms = cuda_time_ms(step, warmup=1, iters=3)
    return ms


def bench_kvquant(model, batch, context, bits, cuda_graph, fused_norms=False, fused_projections=False, tables="nf"):
    """KVQuantCache decode step (eager or CUDA graph) and its breakdown."""
    from kvquant_hf.benchmarking import kvquant_decode_benchmark

    return kvquant_decode_benchmark(model, batch=batch, context=context, bits=bits, cuda_graph=cuda_graph,
                                    fused_norms=fused_norms, fused_projections=fused_projections, tables=tables)


#: method suffix -> (fused_norms, fused_projections)
FUSION_SUFFIXES = {"_fn": (True, False), "_fp": (False, True), "_ff": (True, True)}


METHODS = {
    "dynamic": bench_dynamic,
    "static_compile": bench_static_compile,
    "quanto_int4": bench_quanto,
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072, 524288])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--extra", nargs="*", default=["131072x4"], help="more CONTEXTxBATCH cases")
    ap.add_argument("--methods", nargs="+",
                    default=["kvquant_nuq4_graph", "kvquant_nuq2_graph", "kvquant_nuq4", "dynamic",
                             "static_compile", "quanto_int4"])
    ap.add_argument("--layers", type=int, default=None, help="fewer layers (smoke tests)")
    ap.add_argument("--skip", nargs="*", default=[], help="METHOD@CONTEXTxBATCH cases to skip")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"],
                    help="model dtype (the Triton decode fast path covers float16)")
    ap.add_argument("--name", default="e2e_decode", help="result file name (benchmarks/results/NAME.{md,json})")
    ap.add_argument("--tables", nargs="+", default=["nf"], choices=["nf", "uniform"],
                    help="signpost tables of the kvquant caches: nf (uncalibrated; k-means tables take the same "
                    "gathered path) and/or uniform (calibrate.py --key-table uniform --value-table uniform)")
    args = ap.parse_args(argv)

    model = random_model(args.shape, num_layers=args.layers, dtype=getattr(torch, args.dtype))
    cases = [(c, args.batch) for c in args.contexts] + [tuple(int(x) for x in e.split("x")) for e in args.extra]
    rows = []
    for context, batch in cases:
        for method, tables in [(m, t) for m in args.methods for t in (args.tables if m.startswith("kvquant") else [""])]:
            tag = f"{method}@{context}x{batch}"
            if tag in args.skip:
                continue
            _free()
            row = {"method": method, "tables": tables, "context": context, "batch": batch}
            if not method.startswith("kvquant"):
                from kvquant_hf.models import unpatch_model

                unpatch_model(model)  # baselines run the stock attention (dynamo traces it)
            try:
                if method.startswith("kvquant"):
                    bits = int(method.split("_")[1][3:])
                    # kvquant_nuq4_graph, kvquant_nuq4, ...; suffix "_fn": with fused_norms (kvquant_nuq4_graph_fn),
                    # "_fp": with fused_projections, "_ff": with both
                    suffix = method[-3:] if method[-3:] in FUSION_SUFFIXES else ""
                    norms, projections = FUSION_SUFFIXES.get(suffix, (False, False))
                    base = method[: len(method) - len(suffix)]
                    row.update(bench_kvquant(model, batch, context, bits, cuda_graph=base.endswith("_graph"),
                                             fused_norms=norms, fused_projections=projections, tables=tables))
                else:
                    row["ms_per_step"] = METHODS[method](model, batch, context)
            except torch.OutOfMemoryError as exc:
                row["error"] = f"OOM: {str(exc).splitlines()[0][:80]}"
            except Exception as exc:  # noqa: BLE001 -- a baseline failing must not hide the others; the error is reported
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
            print(row, flush=True)
            rows.append(row)
            with open(os.path.join(results_dir(), "e2e_decode_partial.jsonl"), "a") as fh:
                fh.write(json.dumps(row) + "\n")
    cols = ["method", "tables", "context", "batch", "ms_per_step", "attention_ms", "append_ms", "other_ms", "cache_gib",
            "peak_gib", "error"]
    md = f"# End-to-end decode step, {args.shape} (random {args.dtype} weights)\n\n" + md_table(rows, cols)
    print(write_results(args.name, rows, md, meta={"dtype": args.dtype}, repo_and_out=True))


if __name__ == "__main__":
    main()

"""Where one KVQuantCache decode step spends its time: every CUDA kernel of one eager step (profiler), grouped by
name, plus the CUDA-graph step time at a short and a long context (the difference is the context-dependent part).

Llama-3-8B shape with random weights, batch 1. The eager step's kernel times are GPU busy time (launch gaps are not
counted), so their sum is what a CUDA graph of the same step can at best reach.

Usage (H200): ``PYTHONPATH=. python benchmarks/step_profile.py --dtype float16 --contexts 1024 131072``
(``--graph-kernels``: the kernels of one CUDA-graph replay; ``--fused norms projections``: the opt-in fusions).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import md_table, random_model, write_results

from kvquant_hf.benchmarking import cuda_median_ms, fast_filled_cache, kvquant_decode_benchmark


def kernel_table(model, context: int, bits: int, graph: bool = False, tables: str = "nf") -> list[dict]:
    """Kernels of one decode step, grouped by name: an eager step, or (``graph``) one CUDA-graph replay (the
    profiler lists the kernels a graph launch runs)."""
    from torch.profiler import ProfilerActivity, profile

    cache = fast_filled_cache(model, 1, context, {"bits": bits, "outlier_fraction": 0.01}, tables=tables)
    ids = torch.randint(0, model.config.vocab_size, (1, 1), device="cuda")
    pos = torch.full((1, 1), context, dtype=torch.long, device="cuda")

    if graph:
        from kvquant_hf.cuda_graph import CUDAGraphDecoder

        decoder = CUDAGraphDecoder(model, cache, batch_size=1, max_steps=8)

        def step():
            decoder.step(ids, pos)
            decoder.rewind(1)
    else:
        def step():
            model(input_ids=ids, position_ids=pos, past_key_values=cache)
            cache.crop(-1)

    with torch.inference_mode():
        cuda_median_ms(step, 2, 2)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
    agg = collections.defaultdict(lambda: [0.0, 0])
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = evt.device_time if hasattr(evt, "device_time") else evt.cuda_time
        a = agg[evt.name[:90]]
        a[0] += us / 1000.0
        a[1] += 1
    rows = [{"kernel": k, "ms": v[0], "count": v[1], "us_each": 1000.0 * v[0] / v[1]} for k, v in agg.items()]
    rows.sort(key=lambda r: -r["ms"])
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 131072])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--name", default=None)
    ap.add_argument("--graph-kernels", action="store_true",
                    help="list the kernels of one CUDA-graph replay instead of one eager step")
    ap.add_argument("--tables", default="nf", choices=["nf", "uniform"],
                    help="signpost tables of the cache (nf: uncalibrated / k-means path; uniform: calibrate.py "
                    "--key-table uniform --value-table uniform)")
    ap.add_argument("--fused", nargs="*", default=[], choices=["norms", "projections"],
                    help="opt-in model fusions applied for every measurement (fused_norms, fused_projections)")
    args = ap.parse_args(argv)
    model = random_model(args.shape, dtype=getattr(torch, args.dtype))
    if "norms" in args.fused:
        from kvquant_hf.models.norms import fuse_rms_norms

        fuse_rms_norms(model)
    if "projections" in args.fused:
        from kvquant_hf.models.projections import fuse_projections

        fuse_projections(model)
    name = args.name or f"step_profile_{args.dtype}"
    fused = f", fused: {', '.join(args.fused)}" if args.fused else ""
    md = [f"# One decode step, {args.shape} (random {args.dtype} weights), batch 1, nuq{args.bits}-1%, "
          f"{args.tables} tables{fused}\n"]
    all_rows = []
    graph = []
    for ctx in args.contexts:
        g = kvquant_decode_benchmark(model, batch=1, context=ctx, bits=args.bits, cuda_graph=True, tables=args.tables)
        graph.append({"context": ctx, "graph_ms_per_step": g["ms_per_step"]})
        print(graph[-1], flush=True)
        torch.cuda.empty_cache()
    md.append("## CUDA-graph step\n\n" + md_table(graph, ["context", "graph_ms_per_step"]) + "\n")
    for ctx in args.contexts:
        rows = kernel_table(model, ctx, args.bits, graph=args.graph_kernels, tables=args.tables)
        total = sum(r["ms"] for r in rows)
        for r in rows:
            r["context"] = ctx
        all_rows += rows
        print(ctx, f"total kernel ms {total:.3f}", flush=True)
        for r in rows[:25]:
            print(f"  {r['ms']:8.3f} ms {r['count']:5d} x {r['us_each']:8.2f} us  {r['kernel']}", flush=True)
        kind = "CUDA-graph replay" if args.graph_kernels else "Eager step"
        md.append(f"## {kind} kernels at {ctx} tokens (GPU busy time {total:.3f} ms, {sum(r['count'] for r in rows)}"
                  " kernels)\n\n" + md_table(rows[:40], ["kernel", "count", "us_each", "ms"]) + "\n")
        torch.cuda.empty_cache()
    print(write_results(name, all_rows + graph, "\n".join(md), meta={"dtype": args.dtype}, repo_and_out=True))


if __name__ == "__main__":
    main()

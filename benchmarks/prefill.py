"""Chunked prefill: time and peak memory of ``generate(max_new_tokens=1)`` on a long random prompt (Llama-3-8B
shape, random bf16 weights), ``KVQuantCache`` with chunked prefill (``prefill_chunk_size``, the default
``prefill_attention="auto"``: dequantized history blocks + PyTorch's fused attention, or ``"kernel"``: the Triton
split-K kernel) vs fp16 SDPA prefill into a ``DynamicCache``.

Each method is run once on a short prompt first (kernel compilation, cuBLAS warm-up). A length whose estimated
time (quadratic extrapolation from the previous one) exceeds the time left (``--time-budget``) is skipped and
reported as such.

Usage (about 2 minutes on one H100)::

    PYTHONPATH=. python -m benchmarks.prefill [--lengths 32768 131072] [--methods nuq4 nuq2 fp16]
    python -m benchmarks.prefill --smoke      # tiny model on CPU
"""

from __future__ import annotations

import argparse
import time

import torch

import kvquant_hf
from benchmarks.capacity import Budget, cache_config
from benchmarks.common import md_table, random_model, release_memory, synchronize, write_result
from kvquant_hf import attention as kv_attention
from kvquant_hf.planner import GiB, ModelShape

NAME = "prefill"


def prefill_row(model, method: str, length: int, device: str, chunk: int, prefill_attention: str = "kernel") -> dict:
    """Time ``generate(max_new_tokens=1)`` on a random prompt of ``length`` tokens (prefill + one step)."""
    first = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, length), device=first)
    kwargs = {"max_new_tokens": 1, "do_sample": False, "pad_token_id": 0, "attention_mask": torch.ones_like(ids)}
    if method != "fp16":
        kwargs.update(cache_implementation="kvquant",
                      cache_config={**cache_config(method, chunk), "prefill_attention": prefill_attention})
    release_memory(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    synchronize(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, **kwargs)
    synchronize(device)
    sec = time.perf_counter() - t0
    row = {"method": method if method == "fp16" else f"{method} chunked ({chunk})"
           + f", prefill_attention={prefill_attention}",
           "prompt": length, "prefill_s": sec, "tokens_per_s": length / sec}
    if device.startswith("cuda"):
        row["peak_gib"] = torch.cuda.max_memory_allocated() / GiB
        if method != "fp16" and prefill_attention != "kernel":
            row["fused_op"] = kv_attention.fused_lse_name(torch.device(device), next(model.parameters()).dtype,
                                                          ModelShape.from_config(model.config).head_dim)
    release_memory(device)
    return row


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--methods", nargs="+", default=["nuq4", "nuq2", "fp16"])
    ap.add_argument("--chunk", type=int, default=4096, help="prefill_chunk_size of the nuq rows")
    ap.add_argument("--prefill-attention", default="auto", choices=["kernel", "auto"],
                    help="cache_config prefill_attention of the nuq rows")
    ap.add_argument("--time-budget", type=float, default=170.0, help="seconds; longer prompts are skipped past it")
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU (checks the script, not the GPU)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.shape, args.device, args.dtype = "tiny", "cpu", "float32"
        args.lengths, args.chunk, args.methods = [160], 64, ["nuq4", "fp16"]
    budget = Budget(args.time_budget)
    model = random_model(args.shape, dtype=getattr(torch, args.dtype), device=args.device, num_layers=args.layers)
    kvquant_hf.patch_model(model)
    rows: list[dict] = []
    meta = {"shape": args.shape, "layers": model.config.num_hidden_layers, "dtype": args.dtype, "chunk": args.chunk,
            "prefill_attention": args.prefill_attention,
            "prefill_history_block": kv_attention.PREFILL_HISTORY_BLOCK,
            "prefill_fused_order": list(kv_attention.PREFILL_FUSED_ORDER)}

    def save(history: bool = False):
        write_result(NAME, rows, render(rows, meta), meta, device=args.device, history=history)

    for method in args.methods:
        prev = None
        try:  # compile the prefill kernels (first chunk and chunks with history) and warm cuBLAS
            prefill_row(model, method, min(2 * args.chunk, min(args.lengths)), args.device, args.chunk,
                        args.prefill_attention)
        except torch.OutOfMemoryError:
            release_memory(args.device)
        for length in sorted(args.lengths):
            if prev is not None:
                estimate = prev[1] * (length / prev[0]) ** 2
                if estimate > budget.left - 10:
                    rows.append({"method": method, "prompt": length,
                                 "error": f"skipped: estimated {estimate:.0f} s > {budget.left:.0f} s left"})
                    save()
                    continue
            try:
                row = prefill_row(model, method, length, args.device, args.chunk, args.prefill_attention)
                prev = (length, row["prefill_s"])
            except torch.OutOfMemoryError as exc:
                row = {"method": method, "prompt": length, "error": f"OOM: {str(exc).splitlines()[0][:100]}"}
                release_memory(args.device)
            print(row, flush=True)
            rows.append(row)
            save()
    save(history=True)
    return rows


def render(rows: list[dict], meta: dict) -> str:
    return (f"# Chunked prefill: {meta['shape']}, random {meta['dtype']} weights, `generate(max_new_tokens=1)`\n\n"
            "Seconds for the prompt (prefill plus one decode step), tokens per second, peak GPU memory; fused_op = "
            "PyTorch's fused attention that the `prefill_attention=\"auto\"` path picked.\n\n"
            + md_table(rows, ["method", "prompt", "prefill_s", "tokens_per_s", "peak_gib", "fused_op", "error"]))


if __name__ == "__main__":
    main()

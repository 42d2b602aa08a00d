"""Compile-time variants of the CUDA decode kernel, one layer at 128K (Llama-3-8B shape, batch 1, fp16, H200).

Each variant is a set of ``#define`` overrides (``KVQUANT_CUDA_DEFINES``, see ``triton_kernels/cuda_decode.py``);
times are CUDA-graph replays (``triton.testing.do_bench_cudagraph`` medians) of the whole packed attention call
(stage 1 + merge), for uniform and NormalFloat tables at 4 and 2 bits.

Usage: ``PYTHONPATH=. python benchmarks/cuda_decode_variants.py "" "TB=64"``
"""

from __future__ import annotations

import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(__file__))
import decode_attention as da
from common import md_table, write_results

from triton_kernels.decode_attention import packed_attention_triton


def main(argv=None):
    variants = (argv if argv is not None else sys.argv[1:]) or [""]
    length = int(os.environ.get("CTX", "131072"))
    q = torch.randn(1, da.HQ, 1, da.D, dtype=torch.float16, device="cuda")
    ek = torch.randn(1, da.H, da.SINK + 1, da.D, dtype=torch.float16, device="cuda")
    freq = da.inv_freq()
    caches = {}
    for lut in ("uniform", "nf"):
        da.LUT = lut
        for bits in (4, 2):
            caches[(lut, bits)] = da.make_packed(1, length, bits, da.SLOTS)
    rows = []
    for var in variants:
        os.environ["KVQUANT_CUDA_DEFINES"] = var
        row = {"variant": var or "default"}
        for (lut, bits), p in caches.items():
            fn = lambda p=p: packed_attention_triton(q, p, ek, ek, None, scaling=da.D ** -0.5, inv_freq=freq,
                                                    decode_backend="cuda")
            fn()
            row[f"{lut} nuq{bits}"] = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3
        print(row, flush=True)
        rows.append(row)
    cols = ["variant"] + [f"{lut} nuq{b}" for lut in ("uniform", "nf") for b in (4, 2)]
    md = (f"# CUDA decode kernel variants, one layer, {length} tokens, batch 1 (us, CUDA-graph median)\n\n"
          + md_table(rows, cols))
    print(write_results("cuda_decode_variants", rows, md, repo_and_out=True))


if __name__ == "__main__":
    main()

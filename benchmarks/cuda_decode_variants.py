"""Compile-time variants of the CUDA decode kernel, one layer at 128K (Llama-3-8B shape, batch 1, fp16, H200).

Each variant is a set of ``#define`` overrides (``KVQUANT_CUDA_DEFINES``, see ``triton_kernels/cuda_decode.py``);
times are CUDA-graph replays (``triton.testing.do_bench_cudagraph`` medians) of the whole packed attention call
(stage 1 + merge), for uniform and NormalFloat tables at 4 and 2 bits.

Usage: ``PYTHONPATH=. python benchmarks/cuda_decode_variants.py "" "TB=64"``

``--name=NAME``: result file name. ``--prof``: also build each variant with ``PROF=1`` (per-phase SM clock cycles of every warp's tile loop, see
``packed_decode.cu``) and report the mean cycles per 16-token tile per phase.
"""

from __future__ import annotations

import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(__file__))
import decode_attention as da
from common import md_table, write_results

from kvquant_hf.kernels import cuda_decode
from kvquant_hf.kernels.decode_attention import packed_attention_triton

PHASES = ["data+dequant+staging", "slot patch", "K frags+RoPE+MMA", "softmax", "V MMA", "end of tile", "per block",
          "setup", "combine"]


def phase_profile(run, nw: int = 4) -> dict:
    """Run ``run()`` once with the PROF kernel; mean cycles per tile per phase over all warps (weighted by tiles)."""
    captured = {}
    orig = cuda_decode.packed_decode_cuda

    def spy(*args, **kw):
        captured["o_part"] = args[8]
        return orig(*args, **kw)

    cuda_decode.packed_decode_cuda = spy
    try:
        run()
        torch.cuda.synchronize()
    finally:
        cuda_decode.packed_decode_cuda = orig
    rows = captured["o_part"][:, :, :, 15, : nw * 10].reshape(-1, nw, 10).reshape(-1, 10).double()
    tiles = rows[:, 9].sum().item()
    out = {name: rows[:, i].sum().item() / max(tiles, 1) for i, name in enumerate(PHASES)}
    out["tiles per warp"] = tiles / rows.shape[0]
    return out


def main(argv=None):
    argv = list(argv if argv is not None else sys.argv[1:])
    prof = "--prof" in argv
    name = next((a.split("=", 1)[1] for a in argv if a.startswith("--name=")), "cuda_decode_variants")
    variants = [a for a in argv if a != "--prof" and not a.startswith("--name=")] or [""]
    length = int(os.environ.get("CTX", "131072"))
    q = torch.randn(1, da.HQ, 1, da.D, dtype=torch.float16, device="cuda")
    ek = torch.randn(1, da.H, da.SINK + 1, da.D, dtype=torch.float16, device="cuda")
    freq = da.inv_freq()
    caches = {}
    for lut in ("uniform", "nf"):
        da.LUT = lut
        for bits in (4, 2):
            caches[(lut, bits)] = da.make_packed(1, length, bits, da.SLOTS)
    rows, prof_rows = [], []
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
        if prof:
            os.environ["KVQUANT_CUDA_DEFINES"] = (var + " PROF=1").strip()
            for (lut, bits), p in caches.items():
                r = phase_profile(lambda p=p: packed_attention_triton(q, p, ek, ek, None, scaling=da.D ** -0.5,
                                                                      inv_freq=freq, decode_backend="cuda"))
                prow = {"variant": f"PROF {var or 'default'} {lut} nuq{bits}", **r}
                print(prow, flush=True)
                prof_rows.append(prow)
    cols = ["variant"] + [f"{lut} nuq{b}" for lut in ("uniform", "nf") for b in (4, 2)]
    md = (f"# CUDA decode kernel variants, one layer, {length} tokens, batch 1 (us, CUDA-graph median)\n\n"
          + md_table(rows, cols))
    if prof_rows:
        md += ("\n\n## SM clock cycles per 16-token tile per warp, by phase (PROF=1 build; clock reads perturb the "
               "schedule a little)\n\n" + md_table(prof_rows, ["variant"] + PHASES + ["tiles per warp"]))
    rows = rows + prof_rows
    print(write_results(name, rows, md, repo_and_out=True))


if __name__ == "__main__":
    main()

"""The CUDA decode kernel (triton_kernels/cuda_decode.py) vs the torch oracle and the Triton fast path, on a GPU.

Each case builds a packed cache with the quantize kernels (uniform grids, or NormalFloat tables), runs
``packed_attention_triton(..., decode_backend="cuda")`` and ``decode_backend="triton"`` and compares both with
``packed_attention_torch`` (float32 oracle): max abs error and ||out - ref|| / ||ref||, pass below 1e-2.

Usage (H200): ``PYTHONPATH=. python benchmarks/check_cuda_decode.py [--name check_cuda_decode]``
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(__file__))
import check_kernels_gpu as ck
from common import md_table, write_results

from kvquant_hf import attention
from kvquant_hf.kernels.decode_attention import packed_attention_triton

REL_TOL = 1e-2


def run_case(name, bits, b, hq, h, d, length, lq, sink, pad=None, gap=None, n_slots=2, seed=0, len_dev=False,
             num_splits=None, vbits=None, uniform=True, dtype=torch.float16):
    dev = "cuda"
    packed = ck.build_cache(b, h, length, d, bits, n_slots, dtype, seed, pad=pad, gap=gap, uniform=uniform)
    if vbits is not None and vbits != bits:  # mixed bits: values from a second cache
        other = ck.build_cache(b, h, length, d, vbits, n_slots, dtype, seed + 7, pad=pad, gap=gap,
                               uniform=uniform)
        packed.v_codes, packed.v_scale, packed.v_zero = other.v_codes, other.v_scale, other.v_zero
        packed.v_out_val, packed.v_out_idx, packed.v_lut, packed.value_bits = (
            other.v_out_val, other.v_out_idx, other.v_lut, other.value_bits)
    q, ek, ev, mask, kw = ck.attention_inputs(b, hq, h, d, lq, sink, dtype, seed, pad)
    ref = attention.packed_attention_torch(q, packed, ek, ev, mask, **kw).float()
    extra = {}
    if len_dev:
        extra = dict(length_dev=torch.tensor([length], dtype=torch.int32, device=dev), num_splits=num_splits or 7)
    elif num_splits:
        extra = dict(num_splits=num_splits)
    row = dict(case=name, bits=f"{bits}/{vbits or bits}", batch=b, q_heads=hq, kv_heads=h, head_dim=d, history=length,
               q_len=lq, slots=n_slots)
    for backend in ("cuda", "triton"):
        out = packed_attention_triton(q, packed, ek, ev, mask, decode_backend=backend, **kw, **extra).float()
        rel = ((out - ref).norm() / ref.norm()).item()
        row[f"{backend}_max_abs"] = (out - ref).abs().max().item()
        row[f"{backend}_rel"] = rel
        row[f"{backend}_ok"] = bool(torch.isfinite(out).all()) and rel < REL_TOL
    return row


CASES = [
    # name, bits, b, hq, h, d, length, lq, sink, kwargs
    ("decode nuq4", 4, 2, 32, 8, 128, 8192, 1, 4, dict(pad=[0, 1000])),
    ("decode nuq2", 2, 2, 32, 8, 128, 8192, 1, 4, dict(pad=[0, 1000])),
    ("gqa8 + position gap", 2, 1, 64, 8, 128, 5000, 1, 1, dict(gap=1003)),
    ("gqa8 + position gap", 4, 1, 64, 8, 128, 5000, 1, 1, dict(gap=1003)),
    # a jump at offset 100 of a 128-token rotation block (the kernel checked only a block's first 64 positions
    # before 2026-11-30 session 5; 40000 tokens = 33 splits of 1280, warps of 320, so block 0 of warp 0 holds it)
    ("position gap at block offset 100", 4, 1, 32, 8, 128, 40000, 1, 1, dict(gap=100)),
    ("position gap at block offset 100", 2, 1, 32, 8, 128, 40000, 1, 1, dict(gap=100, uniform=False)),
    ("head_dim 64", 4, 1, 8, 2, 64, 16384, 1, 1, {}),
    ("short (37 tokens)", 4, 1, 32, 8, 128, 37, 1, 1, {}),
    ("one token", 4, 1, 32, 8, 128, 1, 1, 1, {}),
    ("no outlier slots", 4, 1, 32, 8, 128, 3000, 1, 1, dict(n_slots=0)),
    ("one slot", 2, 1, 32, 8, 128, 3000, 1, 1, dict(n_slots=1)),
    ("q_len 2 (8 rows)", 4, 1, 32, 8, 128, 4096, 2, 1, {}),
    ("length on device", 4, 2, 32, 8, 128, 6000, 1, 1, dict(len_dev=True, num_splits=5)),
    ("mixed bits 4/2", 4, 1, 32, 8, 128, 4096, 1, 1, dict(vbits=2)),
    ("many splits (empty ones)", 4, 1, 32, 8, 128, 700, 1, 1, dict(num_splits=16)),
    ("NormalFloat tables", 4, 2, 32, 8, 128, 8192, 1, 4, dict(pad=[0, 1000], uniform=False)),
    ("NormalFloat tables", 2, 2, 32, 8, 128, 8192, 1, 4, dict(pad=[0, 1000], uniform=False)),
    ("NF + gap + gqa8", 4, 1, 64, 8, 128, 5000, 1, 1, dict(gap=1003, uniform=False)),
    ("NF mixed bits 4/2", 4, 1, 32, 8, 128, 4096, 1, 1, dict(vbits=2, uniform=False)),
    ("NF head_dim 64", 4, 1, 8, 2, 64, 16384, 1, 1, dict(uniform=False)),
    ("long 128K NF", 4, 1, 32, 8, 128, 131072, 1, 4, dict(uniform=False)),
    ("long 128K", 4, 1, 32, 8, 128, 131072, 1, 4, {}),
    ("long 128K", 2, 1, 32, 8, 128, 131072, 1, 4, {}),
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="check_cuda_decode")
    ap.add_argument("--skip-long", action="store_true")
    ap.add_argument("--bf16", action="store_true", help="bfloat16 caches and queries (the kernel's opt-in bf16 inputs)")
    args = ap.parse_args(argv)
    rows, failures = [], 0
    for name, bits, b, hq, h, d, length, lq, sink, kw in CASES:
        if args.skip_long and length > 20000:
            continue
        try:
            row = run_case(name, bits, b, hq, h, d, length, lq, sink,
                           dtype=torch.bfloat16 if args.bf16 else torch.float16, **kw)
        except Exception as exc:  # noqa: BLE001 -- a crash is a failed case in the report
            traceback.print_exc()
            row = dict(case=name, bits=bits, cuda_ok=False, error=f"{type(exc).__name__}: {str(exc)[:200]}")
        failures += not row.get("cuda_ok", False)
        rows.append(row)
        print({k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    cols = ["case", "bits", "batch", "q_heads", "kv_heads", "head_dim", "history", "q_len", "slots", "cuda_max_abs",
            "cuda_rel", "cuda_ok", "triton_rel", "triton_ok", "error"]
    fmt = [{k: (f"{v:.2e}" if k.endswith(("_rel", "_max_abs")) and isinstance(v, float) else v) for k, v in r.items()}
           for r in rows]
    md = (f"# CUDA decode kernel vs the torch oracle ({'bfloat16' if args.bf16 else 'float16'}; uniform grids unless "
          "the case says NormalFloat)\n\n"
          f"Pass: finite and ||out - ref|| / ||ref|| < {REL_TOL}. Failures: {failures}.\n\n" + md_table(fmt, cols))
    print(write_results(args.name, rows, md, repo_and_out=True))
    print("FAILURES:", failures)
    return failures


if __name__ == "__main__":
    sys.exit(1 if main() else 0)

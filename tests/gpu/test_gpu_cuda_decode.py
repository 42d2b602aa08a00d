"""The CUDA decode kernel (``kvquant_hf.kernels.cuda_decode``) against the float32 torch reference, and the Triton
decode path on the same inputs: a packed cache built by the quantize kernels (uniform grids or NormalFloat tables),
``packed_attention_triton(..., decode_backend="cuda")`` and ``decode_backend="triton"`` each compared with
``packed_attention_torch``: the CUDA kernel's output finite and ``||out - ref|| / ||ref|| < REL_TOL``, fp16 inputs in
every case and bf16 inputs (the kernel's bf16 path) in the cases up to 20K tokens; the Triton path finite."""

from __future__ import annotations

import pytest
import torch

from kvquant_hf import attention
from kvquant_hf.kernels.decode_attention import packed_attention_triton

from .gpu_helpers import REL_TOL, attention_inputs, build_cache, rel_err

pytestmark = pytest.mark.gpu

CASES = [
    # name, bits, b, hq, h, d, length, lq, sink, kwargs
    ("decode nuq4", 4, 2, 32, 8, 128, 8192, 1, 4, dict(pad=[0, 1000])),
    ("decode nuq2", 2, 2, 32, 8, 128, 8192, 1, 4, dict(pad=[0, 1000])),
    ("gqa8 + position gap", 2, 1, 64, 8, 128, 5000, 1, 1, dict(gap=1003)),
    ("gqa8 + position gap", 4, 1, 64, 8, 128, 5000, 1, 1, dict(gap=1003)),
    # a jump at offset 100 of a 128-token rotation block (40000 tokens = 33 splits of 1280, warps of 320, so block 0
    # of warp 0 holds it)
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


def run_case(bits, b, hq, h, d, length, lq, sink, pad=None, gap=None, n_slots=2, seed=0, len_dev=False,
             num_splits=None, vbits=None, uniform=True, dtype=torch.float16) -> dict[str, float]:
    """``{backend: relative error}`` of both decode backends against the torch reference."""
    packed = build_cache(b, h, length, d, bits, n_slots, dtype, seed, pad=pad, gap=gap, uniform=uniform)
    if vbits is not None and vbits != bits:  # mixed bits: values from a second cache
        other = build_cache(b, h, length, d, vbits, n_slots, dtype, seed + 7, pad=pad, gap=gap, uniform=uniform)
        packed.v_codes, packed.v_scale, packed.v_zero = other.v_codes, other.v_scale, other.v_zero
        packed.v_out_val, packed.v_out_idx, packed.v_lut, packed.value_bits = (
            other.v_out_val, other.v_out_idx, other.v_lut, other.value_bits)
    q, ek, ev, mask, kw = attention_inputs(b, hq, h, d, lq, sink, dtype, seed, pad)
    ref = attention.packed_attention_torch(q, packed, ek, ev, mask, **kw).float()
    extra = {}
    if len_dev:
        extra = dict(length_dev=torch.tensor([length], dtype=torch.int32, device="cuda"), num_splits=num_splits or 7)
    elif num_splits:
        extra = dict(num_splits=num_splits)
    errs = {}
    for backend in ("cuda", "triton"):
        out = packed_attention_triton(q, packed, ek, ev, mask, decode_backend=backend, **kw, **extra).float()
        assert torch.isfinite(out).all(), backend
        errs[backend] = rel_err(out, ref)
    return errs


def _id(case) -> str:
    return f"{case[0]}-nuq{case[1]}".replace(" ", "_")


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_cuda_decode_matches_reference_fp16(case):
    name, bits, b, hq, h, d, length, lq, sink, kw = case
    errs = run_case(bits, b, hq, h, d, length, lq, sink, dtype=torch.float16, **kw)
    assert errs["cuda"] < REL_TOL, errs


@pytest.mark.parametrize("case", [c for c in CASES if c[6] <= 20000], ids=_id)
def test_cuda_decode_matches_reference_bf16(case):
    name, bits, b, hq, h, d, length, lq, sink, kw = case
    errs = run_case(bits, b, hq, h, d, length, lq, sink, dtype=torch.bfloat16, **kw)
    assert errs["cuda"] < REL_TOL, errs

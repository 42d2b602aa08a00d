"""The Triton kernels at real sizes against the torch reference (``kvquant_hf.quant``, ``kvquant_hf.attention``).

* ``quantize_keys_triton`` / ``quantize_values_triton``: bit identity with ``kvquant_hf.quant`` (codes, slots,
  scales, clip count) for a prefill chunk and a one-token append, fp16 and bf16, 2/3/4 bits.
* ``packed_attention_triton`` vs ``packed_attention_torch`` (float32 math): ``||out - ref|| / ||ref||`` below
  ``REL_TOL`` for fp16 and bf16: decode (GQA 4, sink + new token, left padding with a position reset), a prefill chunk
  over the history with a sliding window, head_dim 64, uniform tables (the affine fast path), and the bf16 decode
  fast path (``decode_kernel=True``).
"""

from __future__ import annotations

import pytest
import torch

from kvquant_hf import attention, quant
from kvquant_hf.kernels import packed_attention_triton, quantize_keys_triton, quantize_values_triton

from .gpu_helpers import DEV, REL_TOL, attention_inputs, build_cache, rel_err

pytestmark = pytest.mark.gpu

DTYPES = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("b,h,s,d,n_slots", [(2, 8, 4096, 128, 2), (3, 8, 1, 128, 2), (1, 4, 777, 64, 1)])
def test_quantize_kernels_bit_identical(dtype, bits, b, h, s, d, n_slots):
    g = torch.Generator(device=DEV).manual_seed(bits + s)
    k = torch.randn(b, h, s, d, device=DEV, generator=g) * 2
    k[..., 7] += 6
    k = k.to(dtype)
    v = (torch.randn(b, h, s, d, device=DEV, generator=g) * 3).to(dtype)
    lut = quant.normal_float_signposts(bits).to(DEV)
    lo, hi = quant.key_thresholds_from_sample(k.float(), 0.02)
    rk = quant.quantize_keys(k, lut, lo, hi, n_slots, bits)
    rv = quant.quantize_values(v, lut, n_slots, bits)
    counter = torch.zeros(1, dtype=torch.int32, device=DEV)
    gk = quantize_keys_triton(k, lut, lo, hi, n_slots, bits, clip_counter=counter)
    gv = quantize_values_triton(v, lut, n_slots, bits)
    for f in ("codes", "out_val", "out_idx"):
        assert torch.equal(getattr(gk, f), getattr(rk, f)), f"keys: {f}"
    for f in ("codes", "scale", "zero", "out_val", "out_idx"):
        assert torch.equal(getattr(gv, f), getattr(rv, f)), f"values: {f}"
    assert int(counter) == rk.n_clipped


CASES = [
    # name, bits, b, hq, h, d, length, lq, sink, window, pad
    ("decode", 4, 2, 32, 8, 128, 32768, 1, 4, None, [0, 1000]),
    ("decode", 3, 2, 32, 8, 128, 32768, 1, 4, None, [0, 1000]),
    ("decode", 2, 2, 32, 8, 128, 32768, 1, 4, None, [0, 1000]),
    ("decode-gqa8+gap", 4, 1, 64, 8, 128, 5000, 1, 1, None, None),
    ("decode-d64", 3, 1, 8, 2, 64, 16384, 1, 1, None, None),
    ("prefill-chunk+window", 4, 1, 32, 8, 128, 8192, 64, 4, 4096, None),
    ("prefill-chunk", 2, 2, 32, 8, 128, 3000, 16, 0, None, [0, 17]),
    ("decode-short", 4, 1, 32, 8, 128, 37, 1, 1, None, None),
    ("decode-uniform", 4, 2, 32, 8, 128, 32768, 1, 4, None, [0, 1000]),
    ("decode-uniform+gap", 2, 1, 64, 8, 128, 5000, 1, 1, None, None),
    ("decode-d64-uniform", 4, 1, 8, 2, 64, 16384, 1, 1, None, None),
]


def check_attention(name, dtype, bits, b, hq, h, d, length, lq, sink, window, pad, **kernel_kw) -> float:
    gap = 1003 if "gap" in name else None
    packed = build_cache(b, h, length, d, bits, 2, dtype, 0, pad=pad, gap=gap, uniform="uniform" in name)
    q, ek, ev, mask, kw = attention_inputs(b, hq, h, d, lq, sink, dtype, 0, pad)
    if window is not None:
        q_pos = packed.positions[:, length - 1:length].long() + 1 + torch.arange(lq, device=DEV)[None]
        kw.update(q_positions=q_pos, window=window)
    ref = attention.packed_attention_torch(q, packed, ek, ev, mask, **kw).float()
    out = packed_attention_triton(q, packed, ek, ev, mask, **kw, **kernel_kw).float()
    assert torch.isfinite(out).all()
    return rel_err(out, ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-nuq{c[1]}")
def test_packed_attention_matches_reference(dtype, case):
    assert check_attention(case[0], dtype, *case[1:]) < REL_TOL


@pytest.mark.parametrize("case", [c for c in CASES if c[7] == 1 and c[1] in (2, 4)], ids=lambda c: f"{c[0]}-nuq{c[1]}")
def test_bf16_decode_fast_path_matches_reference(case):
    assert check_attention(case[0], torch.bfloat16, *case[1:], decode_kernel=True) < REL_TOL

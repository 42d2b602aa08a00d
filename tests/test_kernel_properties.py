"""Triton kernels under the interpreter (issue #7): bit-identical to ``kvquant_hf.quant`` on edge values (all equal,
all zero, -0.0, +-65504, tiny, huge float32) and on random shapes/lengths/offsets (hypothesis), never writing outside
the tokens they are given; the packed attention equals the torch reference on random small problems.

Example counts are small: every example runs the kernels in the Triton interpreter on CPU.
"""

from __future__ import annotations

# (TRITON_INTERPRET=1 is set by conftest.py on machines without a GPU; on a GPU machine these modules skip)
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

triton = pytest.importorskip("triton")

from conftest import interpreted_kernel_modules

from kvquant_hf import quant
from kvquant_hf.attention import PackedKV, packed_attention_torch

_qz, _da = interpreted_kernel_modules()


def _interpreter_rounds_bf16_to_nearest() -> bool:
    """The Triton interpreter (3.9) truncates float32 -> bfloat16 casts (round toward zero; ``fp_downcast_rounding``
    is ignored) where compiled kernels and torch round to nearest even, so bf16 scale/zero can differ by one ulp
    under the interpreter only. bf16 bit identity is checked on the GPU (tests/gpu/test_gpu_kernels.py and the
    edge-case check at the start of benchmarks/soak.py)."""

    @triton.jit
    def _cast(x_ptr, y_ptr):
        tl = triton.language
        tl.store(y_ptr, tl.load(x_ptr).to(tl.bfloat16))

    x = torch.tensor([1.0 + 2**-8 + 2**-12])
    y = torch.empty(1, dtype=torch.bfloat16)
    _cast[(1,)](x, y)
    return torch.equal(y, x.to(torch.bfloat16))


BF16_OK = _interpreter_rounds_bf16_to_nearest()
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if BF16_OK else [])
SETTINGS = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KEY_FIELDS = ("codes", "out_val", "out_idx")
VALUE_FIELDS = ("codes", "scale", "zero", "out_val", "out_idx")


def _edge(name: str, shape, g) -> torch.Tensor:
    _, _, s, d = shape
    if name == "all_equal":
        return torch.full(shape, 3.25)
    if name == "all_zero":
        return torch.zeros(shape)
    if name == "neg_zero":
        return torch.full(shape, -0.0)
    if name == "fp16_max":
        x = (torch.randn(shape, generator=g) * 30000).clamp(-65504, 65504)
        x[..., 0] = 65504.0
        x[..., 1] = -65504.0
        x[..., 2] = 65504.0  # a tie at the top
        return x
    if name == "tiny":
        return torch.randn(shape, generator=g) * 1e-6
    if name == "mixed_rows":  # one of each kind, token by token
        x = torch.randn(shape, generator=g)
        x[:, :, 0] = 0.0
        x[:, :, 1 % s] = 7.0
        x[:, :, 2 % s, : d // 2] = 65504.0
        return x
    if name == "huge_fp32":  # only representable in float32: scales saturate, nothing overflows
        x = torch.randn(shape, generator=g) * 1e6
        x[..., 0] = 3e38
        x[..., 1] = -3e38
        return x
    raise KeyError(name)


EDGES = ["all_equal", "all_zero", "neg_zero", "fp16_max", "tiny", "mixed_rows", "huge_fp32"]


def _check_keys(k, lut, lo, hi, n_slots, bits):
    got = _qz.quantize_keys_triton(k, lut, lo, hi, n_slots, bits, clip_counter=torch.zeros(1, dtype=torch.int32))
    ref = quant.quantize_keys(k, lut, lo, hi, n_slots, bits)
    for f in KEY_FIELDS:
        assert torch.equal(getattr(got, f), getattr(ref, f)), f


def _check_values(v, lut, n_slots, bits):
    got = _qz.quantize_values_triton(v, lut, n_slots, bits)
    ref = quant.quantize_values(v, lut, n_slots, bits)
    for f in VALUE_FIELDS:
        a, b = getattr(got, f), getattr(ref, f)
        # bit identity, including the sign of zero and (for huge fp32) the saturated scale
        assert torch.equal(a.view(torch.int16) if a.dtype in (torch.float16, torch.bfloat16) else a,
                           b.view(torch.int16) if b.dtype in (torch.float16, torch.bfloat16) else b), f
    assert torch.isfinite(got.scale).all() and torch.isfinite(got.zero).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", EDGES)
def test_quantize_kernels_bit_identical_on_edge_values(name, dtype):
    if name == "huge_fp32" and dtype != torch.float32:
        pytest.skip("not representable")
    g = torch.Generator().manual_seed(0)
    shape = (1, 2, 5, 64)
    x = _edge(name, shape, g).to(dtype)
    for bits in (2, 3, 4):
        lut = quant.normal_float_signposts(bits)
        _check_values(x, lut, 2, bits)
        # keys: thresholds from the same data (in range) and from a narrow range (everything an outlier, clipped)
        lo, hi = quant.key_thresholds_from_sample(x.float(), 0.0)
        _check_keys(x, lut, lo, hi, 2, bits)
        _check_keys(x, lut, torch.full_like(lo, -0.5), torch.full_like(hi, 0.5), 1, bits)


def test_huge_fp32_value_scales_saturate_in_the_kernel():
    v = torch.zeros(1, 1, 1, 64)
    v[..., :32] = 1e6
    v[..., 32:] = -1e6
    got = _qz.quantize_values_triton(v, quant.normal_float_signposts(4), 1, 4)
    assert got.scale.dtype == torch.float16 and float(got.scale) == 65504.0


# ----------------------------------------------------------------------------------------------
# random shapes, lengths and offsets
# ----------------------------------------------------------------------------------------------
@st.composite
def _problem(draw):
    b = draw(st.integers(1, 2))
    h = draw(st.integers(1, 3))
    s = draw(st.integers(1, 20))
    d = draw(st.sampled_from([16, 32, 64, 128]))
    bits = draw(st.sampled_from([2, 3, 4]))
    dtype = draw(st.sampled_from(DTYPES))
    n_slots = draw(st.integers(0, min(3, d // 2 - 1)))
    start = draw(st.integers(0, 7))
    spare = draw(st.integers(0, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    return b, h, s, d, bits, dtype, n_slots, start, spare, seed


def _guarded(shape, dtype, fill):
    """A destination ``[B, H, cap, ...]`` that is a view into a larger buffer whose extra tokens hold ``fill``:
    a write outside ``[0, cap)`` would change the buffer outside the view."""
    b, h, cap = shape[:3]
    big = torch.full((b, h, cap + 4, *shape[3:]), fill, dtype=dtype)
    return big, big[:, :, :cap]


@given(_problem())
@SETTINGS
def test_quantize_keys_kernel_equals_reference_in_place(p):
    b, h, s, d, bits, dtype, n_slots, start, spare, seed = p
    g = torch.Generator().manual_seed(seed)
    k = (torch.randn(b, h, s, d, generator=g) * 3).to(dtype)
    lut = torch.sort(torch.cat([torch.tensor([-1.0, 1.0]), torch.rand(2**bits - 2, generator=g) * 2 - 1])).values
    lo, hi = quant.key_thresholds_from_sample(torch.randn(1, h, 16, d, generator=g) * 2, 0.1)
    cap = start + s + spare
    bufs = [_guarded((b, h, cap, d * bits // 8), torch.uint8, 77), _guarded((b, h, cap, n_slots), dtype, 5.0),
            _guarded((b, h, cap, n_slots), torch.uint8, 66)]
    before = [big.clone() for big, _ in bufs]
    counter = torch.zeros(1, dtype=torch.int32)
    got = _qz.quantize_keys_triton(k, lut, lo, hi, n_slots, bits, out=tuple(v for _, v in bufs), start=start,
                                   clip_counter=counter)
    ref = quant.quantize_keys(k, lut, lo, hi, n_slots, bits)
    for f in KEY_FIELDS:
        assert torch.equal(getattr(got, f), getattr(ref, f)), f
    assert int(counter) == ref.n_clipped
    for (big, _), old in zip(bufs, before, strict=True):  # nothing outside [start, start + s) changed
        assert torch.equal(big[:, :, :start], old[:, :, :start]) and torch.equal(big[:, :, start + s:],
                                                                                  old[:, :, start + s:])


@given(_problem())
@SETTINGS
def test_quantize_values_kernel_equals_reference_in_place(p):
    b, h, s, d, bits, dtype, n_slots, start, spare, seed = p
    g = torch.Generator().manual_seed(seed)
    v = (torch.randn(b, h, s, d, generator=g) * 2 + torch.randn(b, h, s, 1, generator=g)).to(dtype)
    if seed % 3 == 0:
        v[:, :, 0] = v[:, :, 0, :1]  # an all-equal token
    lut = torch.sort(torch.cat([torch.tensor([-1.0, 1.0]), torch.rand(2**bits - 2, generator=g) * 2 - 1])).values
    sd = quant.value_scale_dtype(dtype)
    cap = start + s + spare
    bufs = [_guarded((b, h, cap, d * bits // 8), torch.uint8, 77), _guarded((b, h, cap), sd, 3.0),
            _guarded((b, h, cap), sd, 4.0), _guarded((b, h, cap, n_slots), dtype, 5.0),
            _guarded((b, h, cap, n_slots), torch.uint8, 66)]
    before = [big.clone() for big, _ in bufs]
    got = _qz.quantize_values_triton(v, lut, n_slots, bits, out=tuple(x for _, x in bufs), start=start)
    ref = quant.quantize_values(v, lut, n_slots, bits)
    for f in VALUE_FIELDS:
        assert torch.equal(getattr(got, f), getattr(ref, f)), f
    for (big, _), old in zip(bufs, before, strict=True):
        assert torch.equal(big[:, :, :start], old[:, :, :start]) and torch.equal(big[:, :, start + s:],
                                                                                  old[:, :, start + s:])


@st.composite
def _attention_problem(draw):
    b = draw(st.integers(1, 2))
    h = draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 2, 4]))
    d = draw(st.sampled_from([32, 64]))
    length = draw(st.integers(1, 80))
    lq = draw(st.integers(1, 3))
    e = draw(st.integers(0, 3))
    kbits = draw(st.sampled_from([2, 3, 4]))
    vbits = draw(st.sampled_from([2, 3, 4]))
    slots = draw(st.integers(0, 2))
    splits = draw(st.sampled_from([None, 1, 3]))
    seed = draw(st.integers(0, 2**31 - 1))
    return b, h, group, d, length, lq, e, kbits, vbits, slots, splits, seed


@given(_attention_problem())
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_packed_attention_kernel_equals_reference_on_random_problems(p):
    b, h, group, d, length, lq, e, kbits, vbits, slots, splits, seed = p
    g = torch.Generator().manual_seed(seed)
    cap = length + 3
    k = torch.randn(b, h, cap, d, generator=g) * 2
    v = torch.randn(b, h, cap, d, generator=g)
    klut, vlut = quant.normal_float_signposts(kbits), quant.normal_float_signposts(vbits)
    lo, hi = quant.key_thresholds_from_sample(k, 0.02)
    pk = quant.quantize_keys(k, klut, lo, hi, slots, kbits)
    pv = quant.quantize_values(v, vlut, slots, vbits)
    zero, scale = quant.key_zero_scale(lo, hi)
    positions = (torch.arange(cap, dtype=torch.int32)[None].repeat(b, 1) + 2)
    packed = PackedKV(pk.codes, pk.out_val, pk.out_idx, pv.codes, pv.scale, pv.zero, pv.out_val, pv.out_idx,
                      klut, vlut, zero, scale, positions, length, kbits, vbits, d)
    q = torch.randn(b, h * group, lq, d, generator=g)
    ek = torch.randn(b, h, e, d, generator=g)
    ev = torch.randn(b, h, e, d, generator=g)
    em = None
    if e:
        em = torch.rand(b, lq, e, generator=g) > 0.3
        em[:, :, -1] = True
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    kw = dict(scaling=d**-0.5, inv_freq=inv_freq, attention_scaling=1.0)
    ref = packed_attention_torch(q, packed, ek, ev, em, **kw)
    got = _da.packed_attention_triton(q, packed, ek, ev, em, num_splits=splits, **kw)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)

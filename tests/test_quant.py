"""The math oracle (kvquant_hf.quant): packing, nearest-signpost encoding, outliers, baselines."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvquant_hf import quant as q
from kvquant_hf.errors import KVQuantConfigError


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("shape", [(1, 16), (3, 5, 64), (2, 3, 7, 128), (48,)])
def test_pack_roundtrip(bits, shape):
    codes = torch.randint(0, 2**bits, shape)
    packed = q.pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape[-1] == shape[-1] * bits // 8
    assert torch.equal(q.unpack_codes(packed, bits, shape[-1]), codes)


def test_pack_layout_is_little_endian_bit_stream():
    # code i occupies bits [bits*i, bits*i+bits) of the byte stream
    codes = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0])
    packed = q.pack_codes(codes, 3)
    stream = sum(int(b) << (8 * i) for i, b in enumerate(packed.tolist()))
    assert [(stream >> (3 * i)) & 7 for i in range(8)] == codes.tolist()
    assert q.pack_codes(torch.tensor([0xA, 0x5]), 4).tolist() == [0x5A]
    assert q.pack_codes(torch.tensor([1, 2, 3, 0]), 2).tolist() == [1 | (2 << 2) | (3 << 4)]


def test_pack_rejects_bad_input():
    with pytest.raises(KVQuantConfigError, match="bits"):
        q.pack_codes(torch.zeros(16, dtype=torch.long), 5)
    with pytest.raises(KVQuantConfigError, match="head_dim"):
        q.packed_dim(72, 4)


@given(st.integers(2, 4), st.integers(1, 6), st.sampled_from([16, 32, 64, 128]), st.integers(0, 2**31 - 1))
@settings(max_examples=40, deadline=None)
def test_pack_roundtrip_property(bits, rows, d, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, d), generator=g)
    assert torch.equal(q.unpack_codes(q.pack_codes(codes, bits), bits, d), codes)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_encode_picks_nearest_signpost(bits):
    lut = torch.sort(torch.rand(2**bits) * 2 - 1).values
    x = torch.linspace(-1.5, 1.5, 1001)
    codes = q.encode_nearest(x, lut)
    brute = (x[:, None] - lut[None, :]).abs().argmin(-1)
    # identical except at exact ties (measure zero here)
    assert torch.equal(codes, brute)


def test_signpost_tables():
    for bits in (2, 3, 4):
        u = q.uniform_signposts(bits)
        nf = q.normal_float_signposts(bits)
        assert u.numel() == nf.numel() == 2**bits
        assert torch.all(nf[1:] > nf[:-1]) and nf.abs().max() == 1.0
        # NF is denser near zero than the uniform grid
        assert (nf[1:] - nf[:-1]).min() < (u[1:] - u[:-1]).min()


def _keys(b=2, h=3, s=33, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, h, s, d, generator=g)
    k[..., 5] *= 8  # an outlier channel
    return k


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_key_error_bounded_by_signpost_spacing(bits):
    k = _keys()
    lo, hi = q.key_thresholds_from_sample(k, 0.0)  # no outliers: everything inside [lo, hi]
    lut = q.uniform_signposts(bits)
    pk = q.quantize_keys(k, lut, lo, hi, 0, bits)
    kd = q.dequantize_keys(pk, lut, lo, hi, bits, 64)
    _, scale = q.key_zero_scale(lo, hi)
    half_gap = (2.0 / (2**bits - 1)) / 2
    bound = scale[None, :, None, :] * half_gap * 1.0001 + 1e-6
    assert torch.all((kd - k).abs() <= bound)
    assert pk.n_clipped == 0


def test_key_outliers_exact_and_capped():
    k = _keys()
    lo, hi = q.key_thresholds_from_sample(k, 0.05)
    lut = q.normal_float_signposts(4)
    pk = q.quantize_keys(k, lut, lo, hi, 2, 4)
    kd = q.dequantize_keys(pk, lut, lo, hi, 4, 64)
    used = pk.out_idx != q.UNUSED_SLOT
    assert used.any()
    idx = pk.out_idx.long().clamp_max(63)
    exact = torch.gather(k, -1, idx)
    got = torch.gather(kd, -1, idx)
    assert torch.equal(got[used], exact[used])  # outliers reproduced exactly
    outside = ((k < lo[None, :, None]) | (k > hi[None, :, None])).sum(-1)
    assert int(used.sum(-1).max()) <= 2
    assert pk.n_clipped == int((outside - used.sum(-1)).clamp_min(0).sum())
    # kept slots are the largest normalized excursions
    _, scale = q.key_zero_scale(lo, hi)
    excess = torch.maximum(lo[None, :, None] - k, k - hi[None, :, None]).clamp_min(0) / scale[None, :, None]
    kept = torch.gather(excess, -1, idx).masked_fill(~used, float("inf")).amin(-1)
    dropped = excess.scatter(-1, idx, 0.0 * excess[..., :2]).amax(-1)
    assert torch.all(dropped <= kept)


@pytest.mark.parametrize("slots", [0, 1, 2, 4])
def test_value_outliers_minimize_range(slots):
    g = torch.Generator().manual_seed(1)
    v = torch.randn(2, 2, 9, 64, generator=g)
    v[0, 0, 0, 3] = 40.0
    v[1, 1, 4, 7] = -30.0
    lut = q.normal_float_signposts(4)
    pv = q.quantize_values(v, lut, slots, 4)
    vd = q.dequantize_values(pv, lut, 4, 64)
    if slots:
        exact = torch.gather(v, -1, pv.out_idx.long())
        assert torch.equal(torch.gather(vd, -1, pv.out_idx.long()), exact)
        assert pv.out_idx[0, 0, 0].tolist().count(3) == 1 and pv.out_idx[1, 1, 4].tolist().count(7) == 1
    # the dense range is the best achievable by removing `slots` extremes
    srt = torch.sort(v, -1).values
    best = torch.stack([srt[..., 63 - (slots - a)] - srt[..., a] for a in range(slots + 1)], -1).amin(-1)
    assert torch.allclose(pv.scale.float() * 2, best, rtol=2e-3, atol=1e-4)
    assert (vd - v).abs().max() < 0.6 * float(pv.scale.float().max())


def test_values_edge_cases_round_trip():
    lut = q.normal_float_signposts(3)
    const = torch.full((1, 1, 2, 64), 3.25)
    zeros = torch.zeros(1, 1, 2, 64)
    huge = torch.randn(1, 1, 2, 64) * 20000
    for v in (const, zeros, huge):
        pv = q.quantize_values(v, lut, 1, 3)
        vd = q.dequantize_values(pv, lut, 3, 64)
        assert torch.isfinite(vd).all()
        tol = 1e-3 + 0.3 * float(v.abs().max())
        assert (vd - v).abs().max() <= (tol if v is huge else 1e-3)


def test_qnorm_matches_moments():
    lut = q.normal_float_signposts(2)
    stats = torch.tensor([0.1, 0.5, 0.0, 0.25])
    out = q.apply_qnorm(lut, stats)
    assert torch.allclose(out, (lut - 0.0) / 0.25 * 0.5 + 0.1)
    assert torch.equal(q.apply_qnorm(lut, None), lut)


def test_baselines():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 70, 64, generator=g)
    for bits in (2, 3, 4):
        y = q.fake_quant_int_per_token(x, bits)
        assert y.shape == x.shape
        assert len(torch.unique(y[0, 0, 0])) <= 2**bits
        kv = q.fake_quant_kivi_keys(x, bits, group=32)
        # each channel of each 32-token group takes at most 2**bits distinct values
        assert len(torch.unique(kv[0, 0, :32, 0])) <= 2**bits
    err4 = (q.fake_quant_int_per_token(x, 4) - x).abs().mean()
    err2 = (q.fake_quant_int_per_token(x, 2) - x).abs().mean()
    assert err4 < err2


def test_avg_bits():
    assert q.nuq_avg_bits(4, 64, 1) == pytest.approx((4 + 24 / 64 + 4 + 32 / 64 + 24 / 64) / 2)
    assert q.nuq_avg_bits(2, 128, 2) == pytest.approx(2.5)


# --------------------------------------------------------------------------------------------
# property-based (issue #7): any shape, any table, any thresholds
# --------------------------------------------------------------------------------------------
_shapes = st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 9), st.sampled_from([16, 32, 64, 128]))


@given(st.integers(2, 4), st.lists(st.integers(1, 3), min_size=0, max_size=3), st.sampled_from([8, 16, 48, 64, 128]),
       st.integers(0, 2**31 - 1))
@settings(max_examples=25, deadline=None)
def test_pack_roundtrip_any_leading_shape(bits, lead, d, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (*lead, d), generator=g)
    packed = q.pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (*lead, d * bits // 8)
    assert torch.equal(q.unpack_codes(packed, bits, d), codes)


def _random_lut(bits, g):
    """A sorted table on [-1, 1] with distinct entries, both ends included."""
    inner = torch.rand(2**bits - 2, generator=g) * 2 - 1
    return torch.sort(torch.cat([torch.tensor([-1.0, 1.0]), inner])).values


@given(st.integers(2, 4), _shapes, st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       st.floats(1e-3, 1e3), st.integers(0, 2**31 - 1))
@settings(max_examples=20, deadline=None)
def test_key_error_bounded_by_spacing_and_outliers_exact_property(bits, shape, dtype, mag, seed):
    b, h, s, d = shape
    g = torch.Generator().manual_seed(seed)
    k = (torch.randn(b, h, s, d, generator=g) * mag).to(dtype)
    lut = _random_lut(bits, g)
    lo, hi = q.key_thresholds_from_sample(torch.randn(1, h, 32, d, generator=g) * mag, 0.1)
    n_slots = int(torch.randint(0, 4, (1,), generator=g))
    pk = q.quantize_keys(k, lut, lo, hi, n_slots, bits)
    kd = q.dequantize_keys(pk, lut, lo, hi, bits, d)
    zero, scale = q.key_zero_scale(lo, hi)
    half_gap = float((lut[1:] - lut[:-1]).max()) / 2
    x = k.float()
    clipped = torch.minimum(torch.maximum(x, lo[None, :, None]), hi[None, :, None])
    used = pk.out_idx != q.UNUSED_SLOT
    idx = pk.out_idx.long().clamp_max(d - 1)
    # outliers in slots are exact; every other element is within half the largest gap of its clipped value
    assert torch.equal(torch.gather(kd, -1, idx)[used], torch.gather(x, -1, idx)[used])
    in_slot = ((idx.unsqueeze(-1) == torch.arange(d)) & used.unsqueeze(-1)).any(-2)
    err = (kd - clipped).abs()
    bound = scale[None, :, None, :] * half_gap * (1 + 1e-5) + 1e-6 * (1 + zero.abs()[None, :, None, :])
    assert torch.all(err[~in_slot] <= bound.expand_as(err)[~in_slot])
    outside = ((x < lo[None, :, None]) | (x > hi[None, :, None])).sum(-1)
    assert pk.n_clipped == int((outside - used.sum(-1)).clamp_min(0).sum())


@given(st.integers(2, 4), _shapes, st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       st.floats(1e-4, 1e4), st.integers(0, 2**31 - 1))
@settings(max_examples=20, deadline=None)
def test_value_error_bounded_by_spacing_and_outliers_exact_property(bits, shape, dtype, mag, seed):
    b, h, s, d = shape
    g = torch.Generator().manual_seed(seed)
    v = (torch.randn(b, h, s, d, generator=g) * mag + torch.randn(1, generator=g) * mag).to(dtype)
    lut = _random_lut(bits, g)
    n_slots = int(torch.randint(0, min(4, d // 2), (1,), generator=g))
    pv = q.quantize_values(v, lut, n_slots, bits)
    vd = q.dequantize_values(pv, lut, bits, d)
    x = v.float()
    idx = pv.out_idx.long()
    assert torch.equal(torch.gather(vd, -1, idx), torch.gather(x, -1, idx))  # the n_slots extremes are exact
    assert torch.isfinite(pv.scale).all() and torch.isfinite(pv.zero).all()
    half_gap = float((lut[1:] - lut[:-1]).max()) / 2
    scale = pv.scale.float().clamp_min(q.MIN_SCALE).unsqueeze(-1)
    zero = pv.zero.float().unsqueeze(-1)
    # the remaining values lie in [zero - scale, zero + scale] up to the rounding of scale/zero to their dtype
    eps = torch.finfo(pv.scale.dtype).eps
    bound = scale * half_gap * (1 + 1e-5) + (scale + zero.abs()) * eps * 2 + 1e-6
    assert torch.all((vd - x).abs() <= bound)

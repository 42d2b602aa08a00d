"""Triton kernels under the interpreter (CPU): pack-on-append bit-identical to ``kvquant_hf.quant`` and the
fused packed attention against ``kvquant_hf.attention.packed_attention_torch``.

``TRITON_INTERPRET=1`` must be set before the kernels are decorated; if another test module imported
``triton_kernels`` first without it, the kernel modules are reloaded here.
"""

from __future__ import annotations

# (TRITON_INTERPRET=1 is set by conftest.py on machines without a GPU; on a GPU machine these modules skip)
import pytest
import torch

triton = pytest.importorskip("triton")

from conftest import interpreted_kernel_modules

from kvquant_hf import quant
from kvquant_hf.attention import PackedKV, packed_attention_torch

_qz, _da = interpreted_kernel_modules()

quantize_keys_triton = _qz.quantize_keys_triton
quantize_values_triton = _qz.quantize_values_triton
packed_attention_triton = _da.packed_attention_triton


def test_shared_constants_match_quant():
    assert _qz.UNUSED_SLOT == quant.UNUSED_SLOT
    assert _qz.MIN_SCALE == quant.MIN_SCALE == _da.MIN_SCALE


# ----------------------------------------------------------------------------------------------
# quantize kernels: bit identity
# ----------------------------------------------------------------------------------------------
def _key_setup(b, h, s, d, bits, dtype, seed, ties=False):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, h, s, d, generator=g) * 2
    k[..., 3] += 4.0  # an outlier channel
    if ties:
        k = torch.round(k * 2) / 2  # many equal values and equal excesses
    k = k.to(dtype)
    lut = quant.normal_float_signposts(bits)
    lo, hi = quant.key_thresholds_from_sample(torch.randn(b, h, 64, d, generator=g) * 2, 0.05)
    if ties:
        lo, hi = torch.round(lo), torch.round(hi)
    return k, lut, lo, hi


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("n_slots", [0, 2])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_quantize_keys_bit_identical(bits, d, n_slots, dtype):
    k, lut, lo, hi = _key_setup(2, 3, 21, d, bits, dtype, seed=bits * 7 + d + n_slots)
    ref = quant.quantize_keys(k, lut, lo, hi, n_slots, bits)
    counter = torch.zeros(1, dtype=torch.int32)
    got = quantize_keys_triton(k, lut, lo, hi, n_slots, bits, clip_counter=counter)
    assert torch.equal(got.codes, ref.codes)
    assert torch.equal(got.out_idx, ref.out_idx)
    assert torch.equal(got.out_val, ref.out_val) and got.out_val.dtype == dtype
    assert int(counter) == ref.n_clipped
    if n_slots:
        assert (ref.out_idx != quant.UNUSED_SLOT).any()  # the test really exercises slots


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_quantize_keys_ties_and_one_token(bits):
    k, lut, lo, hi = _key_setup(1, 2, 9, 64, bits, torch.float32, seed=3, ties=True)
    for s in (1, 9):
        ref = quant.quantize_keys(k[:, :, :s], lut, lo, hi, 3, bits)
        got = quantize_keys_triton(k[:, :, :s], lut, lo, hi, 3, bits)
        assert torch.equal(got.codes, ref.codes)
        assert torch.equal(got.out_idx, ref.out_idx)
        assert torch.equal(got.out_val, ref.out_val)


def test_quantize_keys_writes_in_place_at_offset():
    b, h, s, d, bits, n_slots, cap, start = 2, 2, 5, 64, 3, 2, 16, 7
    k, lut, lo, hi = _key_setup(b, h, s, d, bits, torch.float16, seed=11)
    k_bshd = k.transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous input
    codes = torch.full((b, h, cap, d * bits // 8), 0xAB, dtype=torch.uint8)
    oval = torch.full((b, h, cap, n_slots), -7.0, dtype=torch.float16)
    oidx = torch.full((b, h, cap, n_slots), 0xCD, dtype=torch.uint8)
    zero, scale = quant.key_zero_scale(lo, hi)
    got = quantize_keys_triton(k_bshd, lut, lo, hi, n_slots, bits, out=(codes, oval, oidx), start=start,
                               k_zero=zero, k_scale=scale)
    ref = quant.quantize_keys(k, lut, lo, hi, n_slots, bits)
    assert got.codes.data_ptr() == codes[:, :, start].data_ptr()
    assert torch.equal(codes[:, :, start:start + s], ref.codes)
    assert torch.equal(oidx[:, :, start:start + s], ref.out_idx)
    assert torch.equal(oval[:, :, start:start + s], ref.out_val)
    untouched = torch.ones(cap, dtype=torch.bool)
    untouched[start:start + s] = False
    assert (codes[:, :, untouched] == 0xAB).all() and (oidx[:, :, untouched] == 0xCD).all()
    assert (oval[:, :, untouched] == -7.0).all()


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("n_slots", [0, 1, 2, 5])
def test_quantize_values_bit_identical(bits, d, n_slots):
    g = torch.Generator().manual_seed(bits * 13 + d + n_slots)
    for dtype in (torch.float16, torch.float32):
        v = (torch.randn(2, 3, 19, d, generator=g) * 3).to(dtype)
        v[0, 0, 0] = 1.5  # constant vector: scale floor
        lut = quant.normal_float_signposts(bits)
        ref = quant.quantize_values(v, lut, n_slots, bits)
        got = quantize_values_triton(v, lut, n_slots, bits)
        for f in ("codes", "scale", "zero", "out_val", "out_idx"):
            assert torch.equal(getattr(got, f), getattr(ref, f)), (f, dtype)
        assert got.scale.dtype == quant.value_scale_dtype(dtype)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_quantize_values_ties_in_place(bits):
    """Integer-valued vectors: many equal extremes, so the stable-sort tie rules decide the slots."""
    b, h, s, d, n_slots, cap, start = 1, 2, 11, 64, 3, 20, 4
    g = torch.Generator().manual_seed(bits)
    v = torch.randint(-3, 4, (b, h, s, d), generator=g).to(torch.float16)
    lut = quant.uniform_signposts(bits)
    sd = quant.value_scale_dtype(v.dtype)
    out = (
        torch.zeros(b, h, cap, d * bits // 8, dtype=torch.uint8),
        torch.zeros(b, h, cap, dtype=sd),
        torch.zeros(b, h, cap, dtype=sd),
        torch.zeros(b, h, cap, n_slots, dtype=v.dtype),
        torch.zeros(b, h, cap, n_slots, dtype=torch.uint8),
    )
    got = quantize_values_triton(v, lut, n_slots, bits, out=out, start=start)
    ref = quant.quantize_values(v, lut, n_slots, bits)
    for f in ("codes", "scale", "zero", "out_val", "out_idx"):
        assert torch.equal(getattr(got, f), getattr(ref, f)), f
    assert (out[0][:, :, :start] == 0).all() and (out[0][:, :, start + s:] == 0).all()


def _kv_dest(b, h, cap, d, kbits, vbits, n_slots, dtype):
    sd = quant.value_scale_dtype(dtype)
    kd = (torch.zeros(b, h, cap, d * kbits // 8, dtype=torch.uint8), torch.zeros(b, h, cap, n_slots, dtype=dtype),
          torch.zeros(b, h, cap, n_slots, dtype=torch.uint8))
    vd = (torch.zeros(b, h, cap, d * vbits // 8, dtype=torch.uint8), torch.zeros(b, h, cap, dtype=sd),
          torch.zeros(b, h, cap, dtype=sd), torch.zeros(b, h, cap, n_slots, dtype=dtype),
          torch.zeros(b, h, cap, n_slots, dtype=torch.uint8))
    return kd, vd


@pytest.mark.parametrize("kbits,vbits", [(4, 4), (3, 2), (2, 4)])
@pytest.mark.parametrize("n_slots", [0, 1, 2])
@pytest.mark.parametrize("s,device_start", [(1, True), (5, False), (17, False), (3, True)])
def test_quantize_kv_one_launch_equals_two(kbits, vbits, n_slots, s, device_start):
    """One launch for keys and values (the cache's append) writes exactly what the two separate launches write,
    at an int or a device-side start, and counts the same clipped outliers."""
    b, h, d, cap, start = 2, 3, 64, 40, 6
    dtype = torch.float16 if kbits != 2 else torch.bfloat16
    k, klut, lo, hi = _key_setup(b, h, s, d, kbits, dtype, seed=kbits * 11 + s)
    v = (torch.randn(b, h, s, d, generator=torch.Generator().manual_seed(s)) * 3).to(dtype)
    vlut = quant.normal_float_signposts(vbits)
    st = torch.tensor([start], dtype=torch.int32) if device_start else start
    kd1, vd1 = _kv_dest(b, h, cap, d, kbits, vbits, n_slots, dtype)
    kd2, vd2 = _kv_dest(b, h, cap, d, kbits, vbits, n_slots, dtype)
    c1, c2 = torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    quantize_keys_triton(k, klut, lo, hi, n_slots, kbits, out=kd1, start=st, clip_counter=c1)
    quantize_values_triton(v, vlut, n_slots, vbits, out=vd1, start=st)
    kres, vres = _qz.quantize_kv_triton(k, v, klut, lo, hi, vlut, n_slots, kbits, vbits, k_out=kd2, v_out=vd2,
                                        start=st, clip_counter=c2)
    for a, b_ in zip(kd1 + vd1, kd2 + vd2):
        assert torch.equal(a, b_)
    assert int(c1) == int(c2)
    assert (kd2[0][:, :, start:start + s] != 0).any() and (kd2[0][:, :, :start] == 0).all()
    if dtype == torch.float16:  # and both equal the torch reference (bf16: the interpreter truncates the scales)
        sl = slice(None) if not device_start else slice(start, start + s)  # views of the new tokens / full storage
        assert torch.equal(vres.codes[:, :, sl], quant.quantize_values(v, vlut, n_slots, vbits).codes)
        assert torch.equal(kres.codes[:, :, sl], quant.quantize_keys(k, klut, lo, hi, n_slots, kbits).codes)
    if n_slots == 0 and s == 17:
        assert int(c2) > 0  # the outlier channel of _key_setup is clipped without slots


def test_quantize_kv_rejects_mismatched_shapes():
    k, klut, lo, hi = _key_setup(1, 2, 4, 64, 4, torch.float16, seed=0)
    kd, vd = _kv_dest(1, 2, 8, 64, 4, 4, 1, torch.float16)
    with pytest.raises(ValueError, match="same shape"):
        _qz.quantize_kv_triton(k, k[:, :, :3], klut, lo, hi, klut, 1, 4, 4, k_out=kd, v_out=vd)


def test_quantize_launchers_validate():
    k, lut, lo, hi = _key_setup(1, 2, 3, 64, 4, torch.float32, seed=0)
    with pytest.raises(ValueError, match="bits"):
        quantize_keys_triton(k, quant.normal_float_signposts(3), lo, hi, 1, 5)
    with pytest.raises(ValueError, match="lookup table"):
        quantize_keys_triton(k, quant.normal_float_signposts(3), lo, hi, 1, 4)
    with pytest.raises(ValueError, match="thresholds"):
        quantize_keys_triton(k, lut, lo[:1], hi[:1], 1, 4)
    with pytest.raises(ValueError, match="head_dim"):
        quantize_keys_triton(k[..., :48], lut, lo[:, :48], hi[:, :48], 1, 4)
    with pytest.raises(ValueError, match="capacity"):
        dest = (torch.zeros(1, 2, 4, 32, dtype=torch.uint8), torch.zeros(1, 2, 4, 1),
                torch.zeros(1, 2, 4, 1, dtype=torch.uint8))
        quantize_keys_triton(k, lut, lo, hi, 1, 4, out=dest, start=2)
    with pytest.raises(ValueError, match="dtype"):
        dest = (torch.zeros(1, 2, 4, 32, dtype=torch.uint8), torch.zeros(1, 2, 4, 1, dtype=torch.float16),
                torch.zeros(1, 2, 4, 1, dtype=torch.uint8))
        quantize_keys_triton(k, lut, lo, hi, 1, 4, out=dest)
    with pytest.raises(ValueError, match="n_slots"):
        quantize_values_triton(k[..., :16], quant.normal_float_signposts(4), 8, 4)


# ----------------------------------------------------------------------------------------------
# fused attention vs the torch reference
# ----------------------------------------------------------------------------------------------
def _make_packed(b, h, length, d, kbits, vbits, n_slots, dtype, seed, cap_extra=5, positions=None):
    g = torch.Generator().manual_seed(seed)
    cap = length + cap_extra
    k = torch.randn(b, h, cap, d, generator=g) * 2
    v = torch.randn(b, h, cap, d, generator=g)
    if n_slots:
        k[..., 5] *= 4  # outlier channel for the keys
    klut = quant.normal_float_signposts(kbits)
    vlut = quant.normal_float_signposts(vbits)
    lo, hi = quant.key_thresholds_from_sample(k, 0.02)
    pk = quant.quantize_keys(k.to(dtype), klut, lo, hi, n_slots, kbits)
    pv = quant.quantize_values(v.to(dtype), vlut, n_slots, vbits)
    zero, scale = quant.key_zero_scale(lo, hi)
    if positions is None:
        positions = torch.arange(cap, dtype=torch.int32)[None].repeat(b, 1) + 3
    return PackedKV(pk.codes, pk.out_val, pk.out_idx, pv.codes, pv.scale, pv.zero, pv.out_val, pv.out_idx,
                    klut, vlut, zero, scale, positions.to(torch.int32), length, kbits, vbits, d)


def _inv_freq(d, base=10000.0):
    return 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))


# (bits, group, d, length, q_len, exact, slots, hist, window, splits, dtype, kv_heads, batch)
CASES = [
    (4, 1, 64, 1, 1, 0, 2, False, None, None, torch.float32, 2, 1),  # one history token, no exact block
    (4, 4, 128, 150, 1, 3, 2, False, None, 3, torch.float32, 2, 1),  # decode with sink + new token
    (3, 4, 64, 70, 1, 2, 1, True, None, 8, torch.float32, 1, 2),  # empty splits, left padding
    (2, 8, 64, 33, 1, 0, 0, False, None, 2, torch.float16, 1, 1),  # shorter than a block, fp16, no slots
    (3, 1, 128, 100, 3, 4, 2, True, 40, 3, torch.float32, 1, 2),  # prefill chunk over history, window
    (2, 4, 64, 130, 2, 5, 1, False, 25, None, torch.float16, 2, 1),  # default splits, window
    (4, 8, 128, 64, 1, 1, 0, True, None, 1, torch.float16, 1, 2),  # exactly one block, one split
    (4, 2, 32, 45, 5, 6, 1, False, None, 2, torch.float32, 2, 1),  # Lq > 1 and group 2 (rows = 10)
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}g{c[1]}d{c[2]}L{c[3]}q{c[4]}e{c[5]}s{c[6]}")
def test_packed_attention_matches_reference(case):
    bits, group, d, length, lq, e, slots, hist, window, splits, dtype, h, b = case
    seed = sum(c if isinstance(c, int) else 0 for c in case)
    g = torch.Generator().manual_seed(seed)
    packed = _make_packed(b, h, length, d, bits, bits, slots, dtype, seed)
    q = (torch.randn(b, h * group, lq, d, generator=g)).to(dtype)
    ek = torch.randn(b, h, e, d, generator=g).to(dtype)
    ev = torch.randn(b, h, e, d, generator=g).to(dtype)
    em = (torch.rand(b, lq, e, generator=g) > 0.3) if e else None
    if em is not None:
        em[:, :, -1] = True  # every row sees at least its own token
    q_pos = packed.positions[:, length - 1:length].long() + 1 + torch.arange(lq)[None]
    kw = dict(scaling=d ** -0.5, inv_freq=_inv_freq(d), attention_scaling=1.0 if e % 2 else 1.25)
    if hist:
        kw["hist_start"] = torch.tensor([0, min(length - 1, 37)][:b] if b > 1 else [min(length - 1, 7)])
    if window is not None:
        kw.update(q_positions=q_pos, window=window)
    ref = packed_attention_torch(q, packed, ek, ev, em, **kw)
    got = packed_attention_triton(q, packed, ek, ev, em, num_splits=splits, **kw)
    assert got.dtype == dtype and got.shape == q.shape
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), ref.float(), atol=tol, rtol=tol)
    rel = (got.float() - ref.float()).norm() / ref.float().norm()
    assert rel < (1e-5 if dtype == torch.float32 else 5e-3)


@pytest.mark.parametrize("bits", [(2, 4), (4, 3)])
def test_packed_attention_irregular_positions_and_mixed_bits(bits):
    """Positions with gaps and reversals: blocks that are not consecutive take the exact-RoPE path."""
    kb, vb = bits
    b, h, group, d, length = 2, 2, 4, 64, 140
    g = torch.Generator().manual_seed(kb * 10 + vb)
    cap = length + 5
    pos = torch.arange(cap)[None].repeat(b, 1) * 3 + 1000  # strided positions (non-consecutive)
    pos[1, 64:128] = torch.arange(64).flip(0)  # reversed block for the second sequence
    pos[0, 70] = 5  # one odd token in an otherwise consecutive block
    pos[0, 64:70] = torch.arange(6) + 2000
    packed = _make_packed(b, h, length, d, kb, vb, 2, torch.float32, 5, positions=pos)
    q = torch.randn(b, h * group, 1, d, generator=g)
    ek = torch.randn(b, h, 2, d, generator=g)
    ev = torch.randn(b, h, 2, d, generator=g)
    kw = dict(scaling=d ** -0.5, inv_freq=_inv_freq(d, 500000.0), attention_scaling=1.0)
    ref = packed_attention_torch(q, packed, ek, ev, None, **kw)
    got = packed_attention_triton(q, packed, ek, ev, None, num_splits=2, **kw)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_packed_attention_large_positions():
    """Positions near 500K: the fast path (R(p0) on queries) and the reduced cos/sin stay accurate."""
    b, h, group, d, length = 1, 1, 4, 128, 96
    pos = torch.arange(length + 5)[None] + 500_000
    packed = _make_packed(b, h, length, d, 4, 4, 2, torch.float32, 9, positions=pos)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(b, h * group, 1, d, generator=g) * 2
    ek = torch.zeros(b, h, 0, d)
    kw = dict(scaling=d ** -0.5, inv_freq=_inv_freq(d, 500000.0), attention_scaling=1.0)
    ref = packed_attention_torch(q, packed, ek, ek, None, **kw)
    got = packed_attention_triton(q, packed, ek, ek, None, num_splits=2, **kw)
    # the reference rounds pos * inv_freq to float32 (angle error up to ~0.03 rad at 5e5)
    assert ((got - ref).norm() / ref.norm()) < 1e-2


def test_packed_attention_without_history_and_fully_masked_rows():
    b, h, group, d, e = 2, 2, 2, 64, 4
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, h * group, 2, d, generator=g)
    ek = torch.randn(b, h, e, d, generator=g)
    ev = torch.randn(b, h, e, d, generator=g)
    em = torch.ones(b, 2, e, dtype=torch.bool)
    em[1, 0] = False  # nothing visible for this row: output 0 like the reference
    kw = dict(scaling=0.125, inv_freq=_inv_freq(d))
    empty = _make_packed(b, h, 0, d, 4, 4, 1, torch.float32, 0)
    for packed in (None, empty):
        ref = packed_attention_torch(q, packed, ek, ev, em, **kw)
        got = packed_attention_triton(q, packed, ek, ev, em, **kw)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        assert (got[1, :, 0] == 0).all()


def test_packed_attention_tuple_table_cache_follows_the_lut():
    """Repeated calls reuse the cached code-tuple table; an in-place change of the lut invalidates it."""
    packed = _make_packed(1, 2, 50, 64, 4, 3, 1, torch.float32, 4)
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 4, 1, 64, generator=g)
    ek = torch.zeros(1, 2, 0, 64)
    kw = dict(scaling=0.125, inv_freq=_inv_freq(64))
    first = packed_attention_triton(q, packed, ek, ek, None, **kw)
    again = packed_attention_triton(q, packed, ek, ek, None, **kw)
    assert torch.equal(first, again)
    packed.v_lut.mul_(0.5)  # in place: same tensor object, new version
    packed.k_lut.add_(0.1)
    ref = packed_attention_torch(q, packed, ek, ek, None, **kw)
    got = packed_attention_triton(q, packed, ek, ek, None, **kw)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, first)


def test_packed_attention_tiny_head_dim_without_dot():
    """head_dim 16 (tiny test models): the RoPE halves are 8 wide, below tl.dot's minimum."""
    packed = _make_packed(1, 2, 40, 16, 4, 2, 1, torch.float32, 2)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 1, 16, generator=g)
    ek = torch.randn(1, 2, 1, 16, generator=g)
    kw = dict(scaling=0.25, inv_freq=_inv_freq(16))
    ref = packed_attention_torch(q, packed, ek, ek, None, **kw)
    got = packed_attention_triton(q, packed, ek, ek, None, num_splits=2, **kw)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_packed_attention_validates():
    packed = _make_packed(1, 2, 10, 64, 4, 4, 1, torch.float32, 0)
    q = torch.randn(1, 4, 1, 64)
    ek = torch.randn(1, 2, 1, 64)
    kw = dict(scaling=0.125, inv_freq=_inv_freq(64))
    with pytest.raises(ValueError, match="multiple of kv heads"):
        packed_attention_triton(torch.randn(1, 3, 1, 64), packed, ek, ek, None, **kw)
    with pytest.raises(ValueError, match="q_positions"):
        packed_attention_triton(q, packed, ek, ek, None, window=4, **kw)
    with pytest.raises(ValueError, match="exact_mask"):
        packed_attention_triton(q, packed, ek, ek, torch.ones(1, 1, 2, dtype=torch.bool), **kw)
    with pytest.raises(ValueError, match="inv_freq"):
        packed_attention_triton(q, packed, ek, ek, None, scaling=0.125, inv_freq=_inv_freq(32))
    bad = PackedKV(**{**packed.__dict__, "positions": packed.positions.long()})
    with pytest.raises(ValueError, match="positions"):
        packed_attention_triton(q, bad, ek, ek, None, **kw)
    with pytest.raises(ValueError, match="capacity"):
        packed_attention_triton(q, PackedKV(**{**packed.__dict__, "length": 99}), ek, ek, None, **kw)


# ----------------------------------------------------------------------------------------------
# device-side offsets (CUDA-graph decode): the same results as host-side ints
# ----------------------------------------------------------------------------------------------
def test_quantize_with_device_start_equals_host_start():
    b, h, s, d, bits, n_slots, cap, start = 1, 2, 1, 64, 4, 1, 12, 5
    k, lut, lo, hi = _key_setup(b, h, s, d, bits, torch.float16, seed=21)
    v = torch.randn(b, h, s, d).to(torch.float16)
    dests = []
    for st in (start, torch.tensor([start], dtype=torch.int32)):
        kd = (torch.zeros(b, h, cap, d * bits // 8, dtype=torch.uint8), torch.zeros(b, h, cap, n_slots,
              dtype=torch.float16), torch.zeros(b, h, cap, n_slots, dtype=torch.uint8))
        vd = (torch.zeros(b, h, cap, d * bits // 8, dtype=torch.uint8), torch.zeros(b, h, cap, dtype=torch.float16),
              torch.zeros(b, h, cap, dtype=torch.float16), torch.zeros(b, h, cap, n_slots, dtype=torch.float16),
              torch.zeros(b, h, cap, n_slots, dtype=torch.uint8))
        quantize_keys_triton(k, lut, lo, hi, n_slots, bits, out=kd, start=st)
        quantize_values_triton(v, lut, n_slots, bits, out=vd, start=st)
        dests.append(kd + vd)
    for host, dev in zip(*dests):
        assert torch.equal(host, dev)
    assert dests[1][0][:, :, start].any() and not dests[1][0][:, :, start + 1:].any()
    with pytest.raises(ValueError, match="int32"):
        quantize_keys_triton(k, lut, lo, hi, n_slots, bits, out=dests[0][:3], start=torch.tensor([1]))


@pytest.mark.parametrize("held", [1, 37, 70])
def test_packed_attention_device_length(held):
    """`length_dev` (read by the kernel) decides how much history is attended, whatever packed.length says."""
    b, h, group, d, cap_len = 1, 2, 4, 64, 70
    g = torch.Generator().manual_seed(held)
    packed = _make_packed(b, h, cap_len, d, 3, 3, 1, torch.float32, 9)
    q = torch.randn(b, h * group, 1, d, generator=g)
    ek = torch.randn(b, h, 2, d, generator=g)
    ev = torch.randn(b, h, 2, d, generator=g)
    kw = dict(scaling=d ** -0.5, inv_freq=_inv_freq(d), attention_scaling=1.0)
    ref_packed = PackedKV(**{**packed.__dict__, "length": held})
    ref = packed_attention_torch(q, ref_packed, ek, ev, None, **kw)
    got = packed_attention_triton(q, packed, ek, ev, None, num_splits=4,
                                  length_dev=torch.tensor([held], dtype=torch.int32), **kw)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="num_splits"):
        packed_attention_triton(q, packed, ek, ev, None, length_dev=torch.tensor([held], dtype=torch.int32), **kw)


# ----------------------------------------------------------------------------------------------
# decode fast path (_packed_decode_kernel): fp16 (bf16: GPU only), <= 16 query rows per kv head, 2/4-bit codes
# ----------------------------------------------------------------------------------------------
def _with_luts(packed, lut_kind):
    """Requantize nothing: swap the tables (the codes stay valid indices; the reference reads the same tables)."""
    if lut_kind == "uniform":
        return PackedKV(**{**packed.__dict__, "k_lut": quant.uniform_signposts(packed.key_bits),
                           "v_lut": quant.uniform_signposts(packed.value_bits) * 0.75 + 0.125})
    return packed


@pytest.mark.parametrize("lut_kind", ["uniform", "nf"])
@pytest.mark.parametrize("bits,d,group,slots,dtype", [((4, 4), 128, 4, 2, torch.float16), ((2, 2), 64, 8, 1, torch.float16),
                                                       ((2, 4), 64, 16, 3, torch.float16),
                                                       ((4, 2), 32, 2, 0, torch.float16)])
def test_decode_fast_path_matches_reference(lut_kind, bits, d, group, slots, dtype):
    kb, vb = bits
    b, h, length = 2, 2, 77
    seed = kb * 100 + vb * 10 + d + group + slots
    g = torch.Generator().manual_seed(seed)
    packed = _with_luts(_make_packed(b, h, length, d, kb, vb, slots, dtype, seed), lut_kind)
    if slots >= 2:  # duplicate channels (the later slot wins), unused slots and a channel >= head_dim
        packed.k_out_idx[0, 0, 3, 1] = packed.k_out_idx[0, 0, 3, 0]
        packed.k_out_val[0, 0, 3, 1] = 7.0
        packed.v_out_idx[1, 1, 9, 1] = packed.v_out_idx[1, 1, 9, 0]
        packed.k_out_idx[1, 0, 11, 0] = 255
        packed.k_out_idx[0, 1, 12, 0] = d + 3
        packed.k_out_idx[0, 1, 13, 1] = d - 1  # last channel of the second RoPE half
        packed.k_out_val[0, 1, 13, 1] = -5.0
    q = torch.randn(b, h * group, 1, d, generator=g).to(dtype)
    ek = torch.randn(b, h, 3, d, generator=g).to(dtype)
    ev = torch.randn(b, h, 3, d, generator=g).to(dtype)
    kw = dict(scaling=d ** -0.5, inv_freq=_inv_freq(d), attention_scaling=1.25,
              hist_start=torch.tensor([0, 9]))
    ref = packed_attention_torch(q, packed, ek, ev, None, **kw)
    tol = 5e-3  # the bf16 variant is checked on the GPU (benchmarks/check_kernels_gpu.py): no bf16 math here
    outs = []
    for lut_gather, sparse, key_f32 in ((False, False, True), (True, True, False), (False, True, True),
                                        (True, False, False)):
        got = packed_attention_triton(q, packed, ek, ev, None, num_splits=3, decode_kernel=True,
                                      lut_gather=lut_gather, sparse_key_slots=sparse, key_f32=key_f32, **kw)
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), ref.float(), atol=4 * tol, rtol=4 * tol)
        assert ((got.float() - ref.float()).norm() / ref.float().norm()) < tol
        outs.append(got)
    old = packed_attention_triton(q, packed, ek, ev, None, num_splits=3, decode_kernel=False, **kw)
    assert ((outs[0].float() - old.float()).norm() / old.float().norm()) < tol
    assert _da.affine_grid(packed.k_lut) is not None if lut_kind == "uniform" else _da.affine_grid(packed.k_lut) is None


def test_decode_fast_path_positions_length_and_blocks():
    """Non-consecutive positions (exact RoPE arm), a device-side length, several blocks per split."""
    b, h, group, d, length = 1, 2, 4, 64, 150
    cap = length + 5
    pos = torch.arange(cap)[None] * 2 + 100
    pos[0, 40:70] = torch.arange(30).flip(0) + 5000
    packed = _make_packed(b, h, length, d, 4, 4, 2, torch.float16, 31, positions=pos)
    g = torch.Generator().manual_seed(31)
    q = torch.randn(b, h * group, 1, d, generator=g).half()
    ek = torch.randn(b, h, 1, d, generator=g).half()
    kw = dict(scaling=d ** -0.5, inv_freq=_inv_freq(d, 500000.0))
    for held, bn, prefetch, sparse, key_f32 in ((150, 16, True, True, True), (61, 32, False, False, True),
                                                (150, 32, False, True, False), (150, 64, True, False, False)):
        ref = packed_attention_torch(q, PackedKV(**{**packed.__dict__, "length": held}), ek, ek, None, **kw)
        got = packed_attention_triton(q, packed, ek, ek, None, num_splits=2, decode_kernel=True, block_n=bn,
                                      prefetch=prefetch, sparse_key_slots=sparse, key_f32=key_f32,
                                      length_dev=torch.tensor([held], dtype=torch.int32), **kw)
        assert ((got.float() - ref.float()).norm() / ref.float().norm()) < 5e-3


def test_decode_fast_path_dispatch_and_affine_detection():
    packed = _make_packed(1, 2, 20, 64, 3, 3, 1, torch.float16, 1)
    q = torch.randn(1, 4, 1, 64).half()
    ek = torch.zeros(1, 2, 0, 64).half()
    kw = dict(scaling=0.125, inv_freq=_inv_freq(64))
    with pytest.raises(ValueError, match="bits"):
        packed_attention_triton(q, packed, ek, ek, None, decode_kernel=True, **kw)
    with pytest.raises(ValueError, match="dtype"):
        packed_attention_triton(q.float(), packed, ek.float(), ek.float(), None, decode_kernel=True, **kw)
    assert _da.affine_grid(torch.linspace(-1, 1, 16)) is not None
    assert _da.affine_grid(quant.uniform_signposts(2) * 3 + 1) is not None
    lut = torch.linspace(-1, 1, 16)
    assert _da.affine_grid(lut) is not None
    assert _da.affine_grid(quant.normal_float_signposts(4)) is None
    lut[5] += 1e-3  # in place: the cached answer follows the version counter
    assert _da.affine_grid(lut) is None


def test_decode_fast_path_pair_table_follows_the_lut():
    """The half2 pair tables of the gather path are cached per table tensor and version (in-place edits)."""
    packed = _make_packed(1, 2, 40, 64, 4, 2, 1, torch.float16, 8)
    g = torch.Generator().manual_seed(8)
    q = torch.randn(1, 4, 1, 64, generator=g).half()
    ek = torch.zeros(1, 2, 0, 64).half()
    kw = dict(scaling=0.125, inv_freq=_inv_freq(64), decode_kernel=True)
    first = packed_attention_triton(q, packed, ek, ek, None, **kw)
    packed.k_lut.mul_(0.5)
    packed.v_lut.add_(0.25)
    ref = packed_attention_torch(q, packed, ek, ek, None, scaling=0.125, inv_freq=_inv_freq(64))
    got = packed_attention_triton(q, packed, ek, ek, None, **kw)
    assert ((got.float() - ref.float()).norm() / ref.float().norm()) < 5e-3
    assert not torch.allclose(got, first)


@pytest.mark.parametrize("lq,group,bits", [(3, 4, 4), (2, 8, 2)])
def test_decode_fast_path_several_query_rows(lq, group, bits):
    """q_len > 1 with q_len * group <= 16 (speculative / short chunks) also takes the decode path."""
    b, h, d, length = 1, 2, 64, 90
    packed = _make_packed(b, h, length, d, bits, bits, 2, torch.float16, lq * 10 + group)
    g = torch.Generator().manual_seed(lq)
    q = torch.randn(b, h * group, lq, d, generator=g).half()
    ek = torch.randn(b, h, lq + 1, d, generator=g).half()
    ev = torch.randn(b, h, lq + 1, d, generator=g).half()
    em = torch.ones(b, lq, lq + 1, dtype=torch.bool)
    em[:, :, 1:] = torch.tril(torch.ones(lq, lq, dtype=torch.bool))
    kw = dict(scaling=d ** -0.5, inv_freq=_inv_freq(d))
    ref = packed_attention_torch(q, packed, ek, ev, em, **kw)
    got = packed_attention_triton(q, packed, ek, ev, em, num_splits=2, decode_kernel=True, **kw)
    assert ((got.float() - ref.float()).norm() / ref.float().norm()) < 5e-3


def test_bf16_decode_fast_path_is_opt_in(monkeypatch):
    """bf16 queries take the general kernel unless decode_kernel=True (the interpreter has no bf16 arithmetic, so
    the bf16 fast path is checked on a GPU before it becomes the default); the dispatch itself is checked here."""
    packed = _make_packed(1, 2, 20, 64, 4, 4, 1, torch.bfloat16, 2)
    q = torch.randn(1, 4, 1, 64).bfloat16()
    ek = torch.zeros(1, 2, 0, 64).bfloat16()
    kw = dict(scaling=0.125, inv_freq=_inv_freq(64))
    assert _da._decode_path_blocker(q, packed, 2, None, 4, 4, 64) == ""
    launched = []
    real = _da._packed_decode_kernel

    class Spy:
        def __getitem__(self, grid):
            launched.append(grid)
            return real[grid]

    monkeypatch.setattr(_da, "_packed_decode_kernel", Spy())
    packed_attention_triton(q, packed, ek, ek, None, **kw)
    assert launched == []
    fp16 = _make_packed(1, 2, 20, 64, 4, 4, 1, torch.float16, 2)
    packed_attention_triton(q.half(), fp16, ek.half(), ek.half(), None, **kw)
    assert len(launched) == 1  # fp16: the fast path by default
    mixed = PackedKV(**{**packed.__dict__, "v_scale": packed.v_scale.half()})
    assert "v_scale" in _da._decode_path_blocker(q, mixed, 2, None, 4, 4, 64)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("bf16", [False, True])
def test_magic_number_code_pairs_decode_exactly(bits, bf16):
    """The integer half of the decode fast path's code extraction (:func:`_shift_pair`), for both 16-bit float types:
    every 16-bit half is the float ``BASE + code * 2**(bits*k)`` with the code inside the mantissa, so scaling by
    ``2**-(bits*k)`` and removing the base gives the code exactly (bf16 has 7 mantissa bits, fp16 10). Integer ops
    only, so the interpreter checks it for bf16 too (it has no bf16 arithmetic)."""
    import triton
    import triton.language as tl

    ni = 16 // bits

    @triton.jit
    def probe(w_ptr, o_ptr, BITS: tl.constexpr, BF16: tl.constexpr, NI: tl.constexpr):
        w = tl.load(w_ptr + tl.arange(0, 64))
        for i in tl.static_range(NI):
            tl.store(o_ptr + i * 64 + tl.arange(0, 64), _da._shift_pair(w, i, BITS, BF16))

    g = torch.Generator().manual_seed(bits)
    words = torch.randint(-2**31, 2**31 - 1, (64,), dtype=torch.int64, generator=g).to(torch.int32)
    out = torch.empty(ni, 64, dtype=torch.int32)
    probe[(1,)](words, out, BITS=bits, BF16=bf16, NI=ni)
    ftype, base, mant = (torch.bfloat16, 128.0, 7) if bf16 else (torch.float16, 1024.0, 10)
    ns = 1 if bits == 4 else mant // bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    for i in range(ni):
        k = i % ns
        for half, code_index in ((0, i), (1, i + ni)):  # low half: code i, high half: code i + CPW/2
            h16 = ((out[i].to(torch.int64) & 0xFFFFFFFF) >> (16 * half)) & 0xFFFF
            val = h16.to(torch.int16).view(ftype).to(torch.float64)
            code = (w >> (bits * code_index)) & ((1 << bits) - 1)
            assert torch.equal(val * 2.0 ** -(bits * k) - base * 2.0 ** -(bits * k), code.to(torch.float64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pair_table_holds_both_signposts_in_the_model_dtype(dtype):
    lut = quant.normal_float_signposts(4) * 1.7
    tab = _da._pair_table(lut, 4, dtype)
    u = torch.arange(256)
    lo = (tab & 0xFFFF).to(torch.int16).view(dtype)
    hi = ((tab >> 16) & 0xFFFF).to(torch.int16).view(dtype)
    assert torch.equal(lo, lut.to(dtype)[u & 15]) and torch.equal(hi, lut.to(dtype)[u >> 4])
    assert _da._pair_table(lut, 4, dtype) is tab  # cached per table, version and dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_zero_nonfinite_tokens_matches_the_torch_rule(dtype):
    from kvquant_hf.kernels import zero_nonfinite_tokens_

    g = torch.Generator().manual_seed(0)
    b, h, n, d = 2, 3, 5, 16
    # non-contiguous views, as the attention forward passes them ([B, L, H, D] projections transposed)
    k = torch.randn(b, n, h, d, generator=g).to(dtype).transpose(1, 2)
    v = torch.randn(b, n, h, d, generator=g).to(dtype).transpose(1, 2)
    k[0, 2, 1, 7] = float("nan")     # row 0, token 1: a NaN in one head's key
    v[1, 0, 4, 0] = float("inf")     # row 1, token 4: an Inf in one head's value
    k[1, 1, 2, 3] = float("-inf")    # row 1, token 2
    v[1, 1, 2, 5] = float("nan")     # ... and a NaN in its value too (still one bad token)
    bad = ~(torch.isfinite(k).all(-1).all(1) & torch.isfinite(v).all(-1).all(1))  # [B, L]
    assert bad.sum() == 3
    keep = ~bad[:, None, :, None]
    want_k, want_v = torch.where(keep, k, 0.0), torch.where(keep, v, 0.0)
    counter = torch.full((1,), 5, dtype=torch.int64)
    zero_nonfinite_tokens_(k, v, counter)
    assert torch.equal(k, want_k) and torch.equal(v, want_v)  # in place, every head of a bad token
    assert counter.item() == 5 + 3
    zero_nonfinite_tokens_(k, v, counter)  # all finite now: nothing changes
    assert torch.equal(k, want_k) and counter.item() == 8
    with pytest.raises(ValueError, match="int64"):
        zero_nonfinite_tokens_(k, v, torch.zeros(1, dtype=torch.int32))

"""The pack-on-append kernels (``kvquant_hf.kernels.quantize``) under the Triton interpreter (CPU): bit-identical to
the torch reference :func:`kvquant_hf.quant.quantize_keys` / :func:`kvquant_hf.quant.quantize_values` (codes, outlier
slots, scales, tie rules), in place at host- or device-side offsets.
"""

from __future__ import annotations

# (TRITON_INTERPRET=1 is set by conftest.py on machines without a GPU; on a GPU machine these modules skip)
import pytest
import torch

triton = pytest.importorskip("triton")

from conftest import interpreted_kernel_modules

from kvquant_hf import quant

_qz, _da = interpreted_kernel_modules()

quantize_keys_triton = _qz.quantize_keys_triton
quantize_values_triton = _qz.quantize_values_triton


def test_kernel_constants_come_from_the_reference():
    from kvquant_hf.kernels import common, cuda_decode

    from kvquant_hf import attention

    assert common.UNUSED_SLOT is quant.UNUSED_SLOT and common.MIN_SCALE is quant.MIN_SCALE
    assert common.NEG_BIG is quant.NEG_BIG is attention.NEG_BIG
    assert common.K_UNUSED_SLOT.value == quant.UNUSED_SLOT and common.K_MIN_SCALE.value == quant.MIN_SCALE
    src = cuda_decode.source(128, 4, 4, 2, 2, 4, False, False)
    assert f"#define MIN_SCALE ({quant.MIN_SCALE!r}f)" in src and f"#define NEG_BIG ({common.NEG_BIG!r}f)" in src


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


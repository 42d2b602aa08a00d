"""The attention kernels over the packed cache (``kvquant_hf.kernels.decode_attention`` and its split, decode and
merge kernels) under the Triton interpreter (CPU) against the torch reference
:func:`kvquant_hf.attention.packed_attention_torch`.

``TRITON_INTERPRET=1`` must be set before the kernels are decorated; if another test module imported
``kvquant_hf.kernels`` first without it, the kernel modules are reloaded here.
"""

from __future__ import annotations

# (TRITON_INTERPRET=1 is set by conftest.py on machines without a GPU; on a GPU machine these modules skip)
import pytest
import torch

triton = pytest.importorskip("triton")

from conftest import interpreted_kernel_modules, interpreted_module
from kernel_helpers import inv_freq, make_packed

from kvquant_hf import quant
from kvquant_hf.attention import PackedKV, packed_attention_torch

_qz, _da = interpreted_kernel_modules()
_common = interpreted_module("common", "replace_slots")
_dk = interpreted_module("decode_kernel", "packed_decode_kernel")

packed_attention_triton = _da.packed_attention_triton


# ----------------------------------------------------------------------------------------------
# fused attention vs the torch reference
# ----------------------------------------------------------------------------------------------

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
    packed = make_packed(b, h, length, d, bits, bits, slots, dtype, seed)
    q = (torch.randn(b, h * group, lq, d, generator=g)).to(dtype)
    ek = torch.randn(b, h, e, d, generator=g).to(dtype)
    ev = torch.randn(b, h, e, d, generator=g).to(dtype)
    em = (torch.rand(b, lq, e, generator=g) > 0.3) if e else None
    if em is not None:
        em[:, :, -1] = True  # every row sees at least its own token
    q_pos = packed.positions[:, length - 1:length].long() + 1 + torch.arange(lq)[None]
    kw = dict(scaling=d ** -0.5, inv_freq=inv_freq(d), attention_scaling=1.0 if e % 2 else 1.25)
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
    packed = make_packed(b, h, length, d, kb, vb, 2, torch.float32, 5, positions=pos)
    q = torch.randn(b, h * group, 1, d, generator=g)
    ek = torch.randn(b, h, 2, d, generator=g)
    ev = torch.randn(b, h, 2, d, generator=g)
    kw = dict(scaling=d ** -0.5, inv_freq=inv_freq(d, 500000.0), attention_scaling=1.0)
    ref = packed_attention_torch(q, packed, ek, ev, None, **kw)
    got = packed_attention_triton(q, packed, ek, ev, None, num_splits=2, **kw)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_packed_attention_large_positions():
    """Positions near 500K: the fast path (R(p0) on queries) and the reduced cos/sin stay accurate."""
    b, h, group, d, length = 1, 1, 4, 128, 96
    pos = torch.arange(length + 5)[None] + 500_000
    packed = make_packed(b, h, length, d, 4, 4, 2, torch.float32, 9, positions=pos)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(b, h * group, 1, d, generator=g) * 2
    ek = torch.zeros(b, h, 0, d)
    kw = dict(scaling=d ** -0.5, inv_freq=inv_freq(d, 500000.0), attention_scaling=1.0)
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
    kw = dict(scaling=0.125, inv_freq=inv_freq(d))
    empty = make_packed(b, h, 0, d, 4, 4, 1, torch.float32, 0)
    for packed in (None, empty):
        ref = packed_attention_torch(q, packed, ek, ev, em, **kw)
        got = packed_attention_triton(q, packed, ek, ev, em, **kw)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        assert (got[1, :, 0] == 0).all()


def test_packed_attention_tuple_table_cache_follows_the_lut():
    """Repeated calls reuse the cached code-tuple table; an in-place change of the lut invalidates it."""
    packed = make_packed(1, 2, 50, 64, 4, 3, 1, torch.float32, 4)
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 4, 1, 64, generator=g)
    ek = torch.zeros(1, 2, 0, 64)
    kw = dict(scaling=0.125, inv_freq=inv_freq(64))
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
    packed = make_packed(1, 2, 40, 16, 4, 2, 1, torch.float32, 2)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 1, 16, generator=g)
    ek = torch.randn(1, 2, 1, 16, generator=g)
    kw = dict(scaling=0.25, inv_freq=inv_freq(16))
    ref = packed_attention_torch(q, packed, ek, ek, None, **kw)
    got = packed_attention_triton(q, packed, ek, ek, None, num_splits=2, **kw)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_packed_attention_validates():
    packed = make_packed(1, 2, 10, 64, 4, 4, 1, torch.float32, 0)
    q = torch.randn(1, 4, 1, 64)
    ek = torch.randn(1, 2, 1, 64)
    kw = dict(scaling=0.125, inv_freq=inv_freq(64))
    with pytest.raises(ValueError, match="multiple of kv heads"):
        packed_attention_triton(torch.randn(1, 3, 1, 64), packed, ek, ek, None, **kw)
    with pytest.raises(ValueError, match="q_positions"):
        packed_attention_triton(q, packed, ek, ek, None, window=4, **kw)
    with pytest.raises(ValueError, match="exact_mask"):
        packed_attention_triton(q, packed, ek, ek, torch.ones(1, 1, 2, dtype=torch.bool), **kw)
    with pytest.raises(ValueError, match="inv_freq"):
        packed_attention_triton(q, packed, ek, ek, None, scaling=0.125, inv_freq=inv_freq(32))
    bad = PackedKV(**{**packed.__dict__, "positions": packed.positions.long()})
    with pytest.raises(ValueError, match="positions"):
        packed_attention_triton(q, bad, ek, ek, None, **kw)
    with pytest.raises(ValueError, match="capacity"):
        packed_attention_triton(q, PackedKV(**{**packed.__dict__, "length": 99}), ek, ek, None, **kw)



@pytest.mark.parametrize("held", [1, 37, 70])
def test_packed_attention_device_length(held):
    """`length_dev` (read by the kernel) decides how much history is attended, whatever packed.length says."""
    b, h, group, d, cap_len = 1, 2, 4, 64, 70
    g = torch.Generator().manual_seed(held)
    packed = make_packed(b, h, cap_len, d, 3, 3, 1, torch.float32, 9)
    q = torch.randn(b, h * group, 1, d, generator=g)
    ek = torch.randn(b, h, 2, d, generator=g)
    ev = torch.randn(b, h, 2, d, generator=g)
    kw = dict(scaling=d ** -0.5, inv_freq=inv_freq(d), attention_scaling=1.0)
    ref_packed = PackedKV(**{**packed.__dict__, "length": held})
    ref = packed_attention_torch(q, ref_packed, ek, ev, None, **kw)
    got = packed_attention_triton(q, packed, ek, ev, None, num_splits=4,
                                  length_dev=torch.tensor([held], dtype=torch.int32), **kw)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="num_splits"):
        packed_attention_triton(q, packed, ek, ev, None, length_dev=torch.tensor([held], dtype=torch.int32), **kw)


# ----------------------------------------------------------------------------------------------
# decode fast path (packed_decode_kernel): fp16 (bf16: GPU only), <= 16 query rows per kv head, 2/4-bit codes
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
    packed = _with_luts(make_packed(b, h, length, d, kb, vb, slots, dtype, seed), lut_kind)
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
    kw = dict(scaling=d ** -0.5, inv_freq=inv_freq(d), attention_scaling=1.25,
              hist_start=torch.tensor([0, 9]))
    ref = packed_attention_torch(q, packed, ek, ev, None, **kw)
    tol = 5e-3  # the bf16 variant is checked on the GPU (tests/gpu): the interpreter has no bf16 math
    outs = []
    for lut_gather in (False, True):
        got = packed_attention_triton(q, packed, ek, ev, None, num_splits=3, decode_kernel=True,
                                      lut_gather=lut_gather, **kw)
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
    packed = make_packed(b, h, length, d, 4, 4, 2, torch.float16, 31, positions=pos)
    g = torch.Generator().manual_seed(31)
    q = torch.randn(b, h * group, 1, d, generator=g).half()
    ek = torch.randn(b, h, 1, d, generator=g).half()
    kw = dict(scaling=d ** -0.5, inv_freq=inv_freq(d, 500000.0))
    for held, bn in ((150, 16), (61, 32), (150, 64)):
        ref = packed_attention_torch(q, PackedKV(**{**packed.__dict__, "length": held}), ek, ek, None, **kw)
        got = packed_attention_triton(q, packed, ek, ek, None, num_splits=2, decode_kernel=True, block_n=bn,
                                      length_dev=torch.tensor([held], dtype=torch.int32), **kw)
        assert ((got.float() - ref.float()).norm() / ref.float().norm()) < 5e-3


def test_decode_fast_path_dispatch_and_affine_detection():
    packed = make_packed(1, 2, 20, 64, 3, 3, 1, torch.float16, 1)
    q = torch.randn(1, 4, 1, 64).half()
    ek = torch.zeros(1, 2, 0, 64).half()
    kw = dict(scaling=0.125, inv_freq=inv_freq(64))
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
    packed = make_packed(1, 2, 40, 64, 4, 2, 1, torch.float16, 8)
    g = torch.Generator().manual_seed(8)
    q = torch.randn(1, 4, 1, 64, generator=g).half()
    ek = torch.zeros(1, 2, 0, 64).half()
    kw = dict(scaling=0.125, inv_freq=inv_freq(64), decode_kernel=True)
    first = packed_attention_triton(q, packed, ek, ek, None, **kw)
    packed.k_lut.mul_(0.5)
    packed.v_lut.add_(0.25)
    ref = packed_attention_torch(q, packed, ek, ek, None, scaling=0.125, inv_freq=inv_freq(64))
    got = packed_attention_triton(q, packed, ek, ek, None, **kw)
    assert ((got.float() - ref.float()).norm() / ref.float().norm()) < 5e-3
    assert not torch.allclose(got, first)


@pytest.mark.parametrize("lq,group,bits", [(3, 4, 4), (2, 8, 2)])
def test_decode_fast_path_several_query_rows(lq, group, bits):
    """q_len > 1 with q_len * group <= 16 (speculative / short chunks) also takes the decode path."""
    b, h, d, length = 1, 2, 64, 90
    packed = make_packed(b, h, length, d, bits, bits, 2, torch.float16, lq * 10 + group)
    g = torch.Generator().manual_seed(lq)
    q = torch.randn(b, h * group, lq, d, generator=g).half()
    ek = torch.randn(b, h, lq + 1, d, generator=g).half()
    ev = torch.randn(b, h, lq + 1, d, generator=g).half()
    em = torch.ones(b, lq, lq + 1, dtype=torch.bool)
    em[:, :, 1:] = torch.tril(torch.ones(lq, lq, dtype=torch.bool))
    kw = dict(scaling=d ** -0.5, inv_freq=inv_freq(d))
    ref = packed_attention_torch(q, packed, ek, ev, em, **kw)
    got = packed_attention_triton(q, packed, ek, ev, em, num_splits=2, decode_kernel=True, **kw)
    assert ((got.float() - ref.float()).norm() / ref.float().norm()) < 5e-3


def test_bf16_decode_fast_path_is_opt_in(monkeypatch):
    """bf16 queries take the general kernel unless decode_kernel=True (the interpreter has no bf16 arithmetic, so
    the bf16 fast path is checked on a GPU before it becomes the default); the dispatch itself is checked here."""
    packed = make_packed(1, 2, 20, 64, 4, 4, 1, torch.bfloat16, 2)
    q = torch.randn(1, 4, 1, 64).bfloat16()
    ek = torch.zeros(1, 2, 0, 64).bfloat16()
    kw = dict(scaling=0.125, inv_freq=inv_freq(64))
    assert _da.decode_path_blocker(q, packed, 2, None, 4, 4, 64) == ""
    launched = []
    real = _da.packed_decode_kernel

    class Spy:
        def __getitem__(self, grid):
            launched.append(grid)
            return real[grid]

    monkeypatch.setattr(_da, "packed_decode_kernel", Spy())
    packed_attention_triton(q, packed, ek, ek, None, **kw)
    assert launched == []
    fp16 = make_packed(1, 2, 20, 64, 4, 4, 1, torch.float16, 2)
    packed_attention_triton(q.half(), fp16, ek.half(), ek.half(), None, **kw)
    assert len(launched) == 1  # fp16: the fast path by default
    mixed = PackedKV(**{**packed.__dict__, "v_scale": packed.v_scale.half()})
    assert "v_scale" in _da.decode_path_blocker(q, mixed, 2, None, 4, 4, 64)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("bf16", [False, True])
def test_magic_number_code_pairs_decode_exactly(bits, bf16):
    """The integer half of the decode fast path's code extraction (``decode_kernel.shift_pair``), for both 16-bit float types:
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
            tl.store(o_ptr + i * 64 + tl.arange(0, 64), _dk.shift_pair(w, i, BITS, BF16))

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
    tab = _common.pair_table(lut, 4, dtype)
    u = torch.arange(256)
    lo = (tab & 0xFFFF).to(torch.int16).view(dtype)
    hi = ((tab >> 16) & 0xFFFF).to(torch.int16).view(dtype)
    assert torch.equal(lo, lut.to(dtype)[u & 15]) and torch.equal(hi, lut.to(dtype)[u >> 4])
    assert _common.pair_table(lut, 4, dtype) is tab  # cached per table, version and dtype


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

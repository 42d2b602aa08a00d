"""The CUDA decode kernel's host side (CI has no GPU): dispatch rules, errors, source configuration, and that the
kernel compiles for sm_90 without register spills in several configurations (NVRTC from the ``nvidia-cuda-nvrtc``
wheel of the test extras, or ``KVQUANT_NVRTC_LIB``). The kernel's numerics are checked on a GPU by
``tests/gpu/test_cuda_decode_gpu.py``."""

from __future__ import annotations

import re

import nvrtc_offline  # the offline NVRTC compile
import pytest
import torch
from kernel_helpers import inv_freq, make_packed
from kvquant_hf.kernels import cuda_decode
from kvquant_hf.kernels.decode_attention import packed_attention_triton


def _q(dtype=torch.float16, d=128):
    return torch.zeros(1, 4, 1, d, dtype=dtype)


@pytest.mark.parametrize(
    "kw,needle",
    [
        (dict(query=_q(torch.bfloat16)), "bf16 inputs are turned off"),
        (dict(query=_q(torch.bfloat16), allow_bf16=True), "not a CUDA tensor"),
        (dict(query=_q(torch.float32)), "needs float16 or bfloat16"),
        (dict(m_rows=9), "q_len * group <= 8"),
        (dict(window=128), "sliding window"),
        (dict(kb=3), "bits 3/4"),
        (dict(query=_q(d=64), d=64, vb=2), "head_dim 64 with bits 4/2"),
        (dict(k_slots=3), "3/2 outlier slots"),
        (dict(), "not a CUDA tensor"),  # every format check passes; the device check is last
    ],
)
def test_blocker_names_the_reason(kw, needle):
    args = dict(query=_q(), m_rows=4, window=None, kb=4, vb=4, d=128, k_slots=2, v_slots=2)
    args.update(kw)
    assert needle in cuda_decode.cuda_decode_blocker(**args)


def test_decode_backend_errors_on_cpu():
    p = make_packed(1, 2, 40, 128, 4, 4, 2, torch.float16, seed=0)
    q = torch.randn(1, 8, 1, 128).half()
    ek = torch.randn(1, 2, 1, 128).half()
    kw = dict(scaling=0.1, inv_freq=inv_freq(128))
    with pytest.raises(ValueError, match="CUDA decode kernel does not apply: not a CUDA tensor"):
        packed_attention_triton(q, p, ek, ek, None, decode_backend="cuda", **kw)
    with pytest.raises(ValueError, match="decode_backend='gpu' must be None, 'cuda' or 'triton'"):
        packed_attention_triton(q, p, ek, ek, None, decode_backend="gpu", **kw)
    p32 = make_packed(1, 2, 40, 128, 4, 4, 2, torch.float32, seed=0)
    with pytest.raises(ValueError, match="decode fast path does not apply"):
        packed_attention_triton(q.float(), p32, ek.float(), ek.float(), None, decode_backend="cuda", **kw)


def test_source_carries_the_configuration():
    src = cuda_decode.source(128, 4, 2, 2, 1, 4, True, False, k_lut=True, v_lut=False, bf16=True)
    for line in ("#define D 128", "#define KB 4", "#define VB 2", "#define KS 2", "#define VS 1", "#define MR 4",
                 "#define HAS_HIST 1", "#define LEN_DEV 0", "#define K_LUT 1", "#define V_LUT 0", "#define BF16IN 1",
                 "#define VEC 0"):
        assert line in src
    assert 'extern "C" __global__' in src and cuda_decode.KERNEL in src


def test_shared_memory_layout_size():
    """shared_bytes must match the kernel's layout: recompute it from the layout's pieces."""
    d, ks, mr, kb, vb, nw = 128, 2, 4, 4, 2, cuda_decode.NUM_WARPS
    kr, tb = d // 16, cuda_decode.TB
    perw = 2 * 32 * (2 * kr + 4) + 32 * (4 * d // 16 + 4)  # staged key fragments [2][32][KPAD], values [32][VPAD]
    rw = 2 * kr + 4  # R(j) table row: cos, sin, 4 words of padding
    qwords = (mr * (d + 1) + 3) // 4 * 4  # query rows D + 1 floats apart, padded to 16 bytes
    words = tb * 4 * rw + qwords + 2 * d + nw * perw + 2 * nw * mr + 32 + 2 ** (2 * kb) + 2 ** (2 * vb)
    assert cuda_decode.shared_bytes(d, ks, mr, kb, vb) == 4 * words
    # the largest config: two CTAs (the launch bounds' target) fit an H100/H200 SM (228 KB, 1 KB reserved per CTA)
    assert 2 * (cuda_decode.shared_bytes(128, 2, 8, 4, 4) + 1024) <= 228 * 1024
    with open(cuda_decode.SOURCE_PATH) as fh:
        src = fh.read()
    assert "const int PERW = 2 * 32 * KPAD + 32 * VPAD;" in src
    assert "#define QWORDS ((MR * QROW + 3) / 4 * 4)" in src and "float* kzs = qs + QWORDS;" in src
    assert "#define RW (2 * KR + 4)" in src and "float* qs = smem + TB * 4 * RW;" in src
    assert "static_assert(MR * D <= 2 * 32 * KPAD" in src  # the warp result (corr) reuses the key staging rows


def test_vector_loads_follow_the_layout():
    """64-bit code loads only where every key and value code row starts 8-byte aligned."""
    import dataclasses

    p = make_packed(1, 2, 40, 128, 4, 4, 2, torch.float16, seed=0)
    assert p.k_codes.stride(2) == 64 and p.v_codes.stride(2) == 64
    assert cuda_decode.vector_loads(p) is True
    shifted = torch.zeros(1, 2, p.k_codes.shape[2], p.k_codes.shape[3] + 4, dtype=torch.uint8)[..., 4:]
    assert shifted.data_ptr() % 8 == 4
    assert cuda_decode.vector_loads(dataclasses.replace(p, k_codes=shifted)) is False
    odd_rows = torch.zeros(1, 2, p.v_codes.shape[2], p.v_codes.shape[3] + 4, dtype=torch.uint8)[..., :-4]
    assert odd_rows.stride(2) == 68  # 4-byte aligned rows (the kernel's minimum), not 8
    assert cuda_decode.vector_loads(dataclasses.replace(p, v_codes=odd_rows)) is False
    assert cuda_decode.vector_loads(make_packed(1, 2, 40, 128, 2, 2, 2, torch.float16, seed=0)) is True


@pytest.mark.filterwarnings("ignore::kvquant_hf.cache.UncalibratedCacheWarning")
@pytest.mark.parametrize("bits,head_dim", [(4, 128), (2, 128), (4, 64)])
def test_the_cache_storage_takes_the_64_bit_loads(bits, head_dim):
    """KVQuantCache's own packed storage (every layout the CUDA kernel serves) qualifies for the 64-bit code loads,
    also after it grew: the fast loads are not only for the benchmark's hand-made caches."""
    from kvquant_hf.cache import KVQuantLayer
    from kvquant_hf.config import KVQuantConfig
    from kvquant_hf.layer_api import AttendInputs, RopeContext, apply_rope

    layer = KVQuantLayer(KVQuantConfig(bits=bits, outlier_slots=2, sink_tokens=1, block_size=16))
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    for pos0, n in ((0, 21), (21, 1), (22, 40)):  # prefill, one decode step, then a chunk that grows the storage
        g = torch.Generator().manual_seed(pos0)
        positions = torch.arange(pos0, pos0 + n)[None]
        rope = RopeContext(cos=None, sin=None, inv_freq=inv_freq)
        rope.cos, rope.sin = rope.cos_sin(positions, torch.float16)
        q = apply_rope(torch.randn(1, 4, n, head_dim, generator=g).half(), rope.cos, rope.sin)
        k, v = (torch.randn(1, 2, n, head_dim, generator=g).half() for _ in range(2))
        layer.attend(AttendInputs(q, k, v, positions, rope, None, head_dim**-0.5, None))
        view = layer.packed_view()
        assert view is not None and view.length == pos0 + n - 1
        assert cuda_decode.vector_loads(view) is True, (view.k_codes.stride(), view.v_codes.stride())


NVRTC = nvrtc_offline.nvrtc_lib()


@pytest.mark.skipif(not NVRTC, reason="no libnvrtc: pip install nvidia-cuda-nvrtc (test extras) or set KVQUANT_NVRTC_LIB")
@pytest.mark.parametrize("cfg", [
    dict(d=128, kb=4, vb=4, ks=2, vs=2, mr=4, has_hist=False, len_dev=True, vec=True),
    dict(d=128, kb=4, vb=4, ks=2, vs=2, mr=4, has_hist=False, len_dev=True),
    dict(d=128, kb=2, vb=2, ks=2, vs=2, mr=4, has_hist=True, len_dev=False, k_lut=True, v_lut=True),
    dict(d=128, kb=4, vb=2, ks=0, vs=0, mr=8, has_hist=False, len_dev=False),
    dict(d=64, kb=4, vb=4, ks=1, vs=1, mr=3, has_hist=True, len_dev=False, k_lut=True),
    dict(d=128, kb=4, vb=4, ks=2, vs=2, mr=4, has_hist=False, len_dev=True, k_lut=True, v_lut=True, bf16=True,
         vec=True),
    dict(d=64, kb=4, vb=4, ks=1, vs=1, mr=3, has_hist=True, len_dev=False, vec=True),
])
def test_kernel_compiles_for_sm90(cfg, tmp_path):
    res, cubin, log = nvrtc_offline.compile_cubin(cuda_decode.source(**cfg), NVRTC)
    assert res == 0, log
    path = tmp_path / "k.cubin"
    path.write_bytes(cubin)
    import subprocess

    usage = subprocess.run([nvrtc_offline.cuobjdump(), "--dump-resource-usage", str(path)], capture_output=True,
                           text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    local = int(re.search(r"LOCAL:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))  # spills and locally indexed arrays live here
    assert regs <= 255 and local == 0 and stack == 0, usage


@pytest.mark.parametrize("env,expected", [(None, True), ("0", False), ("1", True)])
def test_bf16_default_follows_the_environment(monkeypatch, env, expected):
    import importlib

    if env is None:
        monkeypatch.delenv("KVQUANT_CUDA_BF16", raising=False)
    else:
        monkeypatch.setenv("KVQUANT_CUDA_BF16", env)
    try:
        assert importlib.reload(cuda_decode).CUDA_BF16_DEFAULT is expected
    finally:
        monkeypatch.undo()
        importlib.reload(cuda_decode)


@pytest.mark.parametrize("batch,length,expected", [
    (1, 131072, 33),   # 8 (batch, head) programs x 33 = 264 = two per SM on 132 SMs
    (4, 131072, 8),    # 32 x 8 = 256 (not 9: 288 programs would start a second, nearly empty wave)
    (8, 131072, 4),    # 64 x 4 = 256 (not 5: 320)
    (64, 131072, 1),   # more programs than two per SM: no split
    (1, 1000, 4),      # bounded by the 256-token blocks
])
def test_default_splits_fill_whole_waves(monkeypatch, batch, length, expected):
    from kvquant_hf.kernels import decode_attention as da

    monkeypatch.setattr(da, "sm_count", lambda device: 132)
    splits = da.default_num_splits(batch, 8, 1, length, torch.device("cpu"), block_n=256, max_splits=128)
    assert splits == expected
    assert batch * 8 * splits <= 2 * 132 or splits == 1


@pytest.mark.parametrize("per_sm,expected", [
    (cuda_decode.CTAS_PER_SM, 33),  # the CUDA kernel's residency: 8 (batch, head) programs x 33 = 264 CTAs
    (3, 49),  # 392 CTAs = one wave of three per SM
    (4, 66),  # 528 CTAs
])
def test_splits_follow_the_resident_ctas_per_sm(monkeypatch, per_sm, expected):
    from kvquant_hf.kernels import decode_attention as da

    monkeypatch.setattr(da, "sm_count", lambda device: 132)
    assert da.default_num_splits(1, 8, 1, 131072, torch.device("cpu"), 256, 128, per_sm) == expected

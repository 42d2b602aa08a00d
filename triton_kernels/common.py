"""Pieces shared by the attention kernels over the packed cache: constants, device helpers and signpost tables.

Imported by the split kernels (:mod:`.split_kernel`, :mod:`.decode_kernel`), the merge kernel
(:mod:`.merge_kernel`), the history dequantization (:mod:`.dequantize`), the CUDA decode kernel's host side
(:mod:`.cuda_decode`) and the launcher (:mod:`.decode_attention`). The method's constants (``MIN_SCALE``,
``UNUSED_SLOT``, ``NEG_BIG``) come from :mod:`kvquant_hf.quant`, the torch reference every kernel mirrors.
"""

from __future__ import annotations

import math
import weakref

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from kvquant_hf.quant import MIN_SCALE, NEG_BIG, UNUSED_SLOT

LOG2E = 1.4426950408889634

# 2 pi split into three float32 parts (Cody-Waite range reduction of RoPE angles; the CUDA kernel's cos_sin in
# packed_decode.cu reduces with its own three-part split, fused into its fmaf chain)
TWO_PI = 2.0 * math.pi
TWO_PI_C1 = float(torch.tensor(TWO_PI, dtype=torch.float32))
TWO_PI_C2 = float(torch.tensor(TWO_PI - TWO_PI_C1, dtype=torch.float32))
TWO_PI_C3 = float(torch.tensor(TWO_PI - TWO_PI_C1 - TWO_PI_C2, dtype=torch.float32))
_K_TWO_PI_C1 = tl.constexpr(TWO_PI_C1)
_K_TWO_PI_C2 = tl.constexpr(TWO_PI_C2)
_K_TWO_PI_C3 = tl.constexpr(TWO_PI_C3)
_K_INV_TWO_PI = tl.constexpr(1.0 / TWO_PI)
# the same constants inside kernels
K_NEG_BIG = tl.constexpr(NEG_BIG)
K_MIN_SCALE = tl.constexpr(MIN_SCALE)
K_UNUSED_SLOT = tl.constexpr(UNUSED_SLOT)

#: the per-token tensors of a ``PackedKV`` (``[B, H, cap, ...]``)
PER_TOKEN = ("k_codes", "k_out_val", "k_out_idx", "v_codes", "v_scale", "v_zero", "v_out_val", "v_out_idx")


# ----------------------------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def cos_sin_small(angle, FAST: tl.constexpr):
    """cos/sin of angles already in about [-100 pi, 100 pi]: MUFU approximations on the GPU (FAST)."""
    if FAST:
        return libdevice.fast_cosf(angle), libdevice.fast_sinf(angle)
    else:
        return tl.cos(angle), tl.sin(angle)


@triton.jit
def cos_sin(angle, FAST: tl.constexpr):
    """cos/sin of float32 angles of any size (Cody-Waite reduction to [-pi, pi], error ~1e-6)."""
    k = tl.floor(angle * _K_INV_TWO_PI + 0.5)
    r = tl.fma(-k, _K_TWO_PI_C1, angle)
    r = tl.fma(-k, _K_TWO_PI_C2, r)
    r = tl.fma(-k, _K_TWO_PI_C3, r)
    return cos_sin_small(r, FAST)


@triton.jit
def matmul(a, b, USE_DOT: tl.constexpr, IEEE: tl.constexpr):
    """``a [M, K] @ b [K, N]`` in float32; ``tl.dot`` when every dim is >= 16, else broadcast-sum."""
    if USE_DOT:
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        else:
            return tl.dot(a, b)
    else:
        return tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)



@triton.jit
def replace_slots(x, ch, oval_rows, oidx_rows, row_mask, N_SLOTS: tl.constexpr):
    """Replace ``x [BLOCK_N, N]`` (channels ``ch [N]``) by the exact outlier values named in the slots.

    Mirrors :func:`kvquant_hf.quant.apply_slots` (a later slot naming the same channel wins)."""
    for s in tl.static_range(N_SLOTS):
        idx = tl.load(oidx_rows + s, mask=row_mask, other=K_UNUSED_SLOT).to(tl.int32)  # [BLOCK_N, 1]
        val = tl.load(oval_rows + s, mask=row_mask, other=0.0).to(tl.float32)
        x = tl.where(ch[None, :] == idx, val, x)
    return x



# ----------------------------------------------------------------------------------------------
# signpost tables (host)
# ----------------------------------------------------------------------------------------------
_TABLES: dict = {}  # id(lut) -> (weakref to lut, lut._version, bits, table)


def _version_of(lut: torch.Tensor) -> int:
    """In-place version of a tensor; inference tensors (made under torch.inference_mode) keep none."""
    return -1 if lut.is_inference() else lut._version


def tuple_table(lut: torch.Tensor, bits: int) -> torch.Tensor:
    """Signpost values of every code tuple that one gather reads, float32 and flat.

    4 bits: ``[256, 2]`` (both codes of a byte, low nibble first); 2 bits: ``[256, 4]``; 3 bits: ``[64, 2]``
    (6-bit pairs of codes). Cached per lookup-table tensor and its in-place version counter.
    """
    hit = _TABLES.get(id(lut))
    if hit is not None and hit[0]() is lut and hit[1] == _version_of(lut) and hit[2] == bits:
        return hit[3]
    per = 2 if bits in (3, 4) else 4
    idx = torch.arange(1 << (bits * per), device=lut.device)
    codes = torch.stack([(idx >> (bits * i)) & ((1 << bits) - 1) for i in range(per)], dim=-1)
    tab = lut.to(torch.float32)[codes].reshape(-1).contiguous()
    if len(_TABLES) > 1024:
        for key in [k for k, v in _TABLES.items() if v[0]() is None]:
            del _TABLES[key]
    _TABLES[id(lut)] = (weakref.ref(lut), _version_of(lut), bits, tab)
    return tab


def pair_table(lut: torch.Tensor, bits: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """int32 ``[2**(2*bits)]``: entry ``u`` packs the ``dtype`` (float16 or bfloat16) signposts of codes
    ``u & (2**bits-1)`` (low half) and ``u >> bits`` (high half) -- one gather per two codes in the decode fast
    path. Cached like :func:`tuple_table`."""
    key = ("pair", id(lut), dtype)
    hit = _TABLES.get(key)
    if hit is not None and hit[0]() is lut and hit[1] == _version_of(lut) and hit[2] == bits:
        return hit[3]
    u = torch.arange(1 << (2 * bits), device=lut.device)
    h = lut.to(dtype)
    lo = h[u & ((1 << bits) - 1)].view(torch.int16).to(torch.int32) & 0xFFFF
    hi = h[u >> bits].view(torch.int16).to(torch.int32) & 0xFFFF
    tab = (lo | (hi << 16)).contiguous()
    _TABLES[key] = (weakref.ref(lut), _version_of(lut), bits, tab)
    return tab


_GRIDS: dict = {}  # id(lut) -> (weakref to lut, lut._version, (a, b) or None)


def affine_grid(lut: torch.Tensor) -> tuple[float, float] | None:
    """``(a, b)`` when the lookup table is a uniform grid ``lut[c] == a + b * c`` (to float32 rounding), else None.

    Decided on the host once per table tensor and in-place version (one device sync, cached); during CUDA-graph
    capture an unseen table is treated as non-uniform (no sync allowed).
    """
    hit = _GRIDS.get(id(lut))
    if hit is not None and hit[0]() is lut and hit[1] == _version_of(lut):
        return hit[2]
    if lut.is_cuda and torch.cuda.is_current_stream_capturing():
        return None
    vals = [float(x) for x in lut.detach().to("cpu", torch.float64).tolist()]
    n = len(vals)
    a, b = vals[0], (vals[-1] - vals[0]) / max(n - 1, 1)
    tol = 4.0 * 2.0 ** -24 * max(max(abs(x) for x in vals), 1e-30)
    ok = n >= 2 and b != 0.0 and all(abs(x - (a + b * c)) <= tol for c, x in enumerate(vals))
    res = (a, b) if ok else None
    if len(_GRIDS) > 1024:
        for key in [k for k, v in _GRIDS.items() if v[0]() is None]:
            del _GRIDS[key]
    _GRIDS[id(lut)] = (weakref.ref(lut), _version_of(lut), res)
    return res


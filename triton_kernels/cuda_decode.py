"""CUDA (tensor-core) decode attention over the packed cache: the first stage of the split-K decode.

``cuda/packed_decode.cu`` is compiled at first use with NVRTC (the runtime compiler that ships with PyTorch's
CUDA wheels, through ``torch.cuda._compile_kernel``), once per configuration (head_dim, bits, slots, query
rows per KV head) and device; no build step at install time. It writes the same per-split partial outputs and
log-sum-exps as :func:`kvquant_hf.kernels.decode_kernel.packed_decode_kernel`, so the Triton merge kernel
(:mod:`.merge_kernel`: splits + exact block) is shared. docs/kernels.md describes the kernel's design.

What it covers (:func:`cuda_decode_blocker` says why not otherwise): float16 and bfloat16 queries (bfloat16 inputs
are dequantized and multiplied in float16 inside; :data:`CUDA_BF16_DEFAULT`), head_dim 128 (or 64 with
4-bit codes), 2/4-bit keys and values (uniform grids folded into scale and zero, other signpost tables gathered
per code pair from shared memory), up to 2 outlier slots per token, ``q_len * group <= 8``, no sliding window,
4-byte aligned code rows. The rest takes the Triton kernels.

Mirrors :func:`kvquant_hf.attention.packed_attention_torch` (dequantization and outlier slots: :mod:`kvquant_hf.quant`).
"""

from __future__ import annotations

import ctypes
import functools
import os
import warnings

import torch

from .common import MIN_SCALE, NEG_BIG, PER_TOKEN, pair_table

SOURCE_PATH = os.path.join(os.path.dirname(__file__), "cuda", "packed_decode.cu")
KERNEL = "kvq_packed_decode"
NUM_WARPS = 4
TB = 128  # tokens per rotation block (rows of the shared R(j) table)
#: CTAs of the kernel resident per SM (249 registers, 4 warps), which sizes the split grid
CTAS_PER_SM = 2

#: use the CUDA decode kernel where it applies (``KVQUANT_CUDA_DECODE=0`` in the environment turns it off).
CUDA_DECODE_DEFAULT = os.environ.get("KVQUANT_CUDA_DECODE", "1") == "1"
#: bfloat16 models through the CUDA kernel (bf16 inputs, float16 dequantization and MMA operands) by default.
#: Queries, scales and zero points beyond the float16 range (|x| > 65504) would become inf inside the kernel (inf/NaN
#: outputs, never finite wrong ones); ``KVQUANT_CUDA_BF16=0`` sends bf16 models to the Triton kernel instead.
CUDA_BF16_DEFAULT = os.environ.get("KVQUANT_CUDA_BF16", "1") == "1"


def _float_literal(x: float) -> str:
    """A CUDA float literal that reads back as ``x`` rounded to float32."""
    return f"({x!r}f)"


def source(d: int, kb: int, vb: int, ks: int, vs: int, mr: int, has_hist: bool, len_dev: bool,
           num_warps: int = NUM_WARPS, k_lut: bool = False, v_lut: bool = False,
           bf16: bool = False, vec: bool = False) -> str:
    """The kernel source with its configuration as ``#define`` lines (``vec``: 8-byte aligned code rows, loaded in
    64-bit words), and the constants it shares with the Triton kernels (:mod:`.common`)."""
    with open(SOURCE_PATH) as fh:
        body = fh.read()
    defs = dict(D=d, KB=kb, VB=vb, KS=ks, VS=vs, MR=mr, NW=num_warps, HAS_HIST=int(has_hist), LEN_DEV=int(len_dev),
                K_LUT=int(k_lut), V_LUT=int(v_lut), BF16IN=int(bf16), VEC=int(vec), TB=TB,
                NEG_BIG=_float_literal(NEG_BIG), MIN_SCALE=_float_literal(MIN_SCALE))
    return "".join(f"#define {k} {v}\n" for k, v in defs.items()) + body


def shared_bytes(d: int, ks: int, mr: int, kb: int = 4, vb: int = 4, num_warps: int = NUM_WARPS) -> int:
    """Dynamic shared memory of one CTA (must match the layout in packed_decode.cu)."""
    kr = d // 16
    tb = TB
    perw = 2 * 32 * (2 * kr + 4) + 32 * (4 * (d // 16) + 4)  # per warp: staged key (KPAD) and value (VPAD) fragments
    rw = 2 * kr + 4  # R(j) table row: cos, sin, padding (RW)
    qwords = (mr * (d + 1) + 3) // 4 * 4  # query rows D + 1 floats apart (QWORDS)
    floats = tb * 4 * rw + qwords + 2 * d + num_warps * perw + 2 * num_warps * mr + 32 + (1 << 2 * kb) + (1 << 2 * vb)
    return 4 * floats


def vector_loads(packed) -> bool:
    """Whether the kernel may load code words 64 bits at a time: the key and value code rows of every (batch, head,
    token) start at 8-byte aligned addresses."""
    return all(t.data_ptr() % 8 == 0 and all(st % 8 == 0 for st in t.stride()[:3])
               for t in (packed.k_codes, packed.v_codes))


_BROKEN: list[str] = []  # the reason, once compiling or loading the kernel failed (then Triton is used)


def cuda_decode_blocker(query: torch.Tensor, m_rows: int, window, kb: int, vb: int, d: int, k_slots: int = 0,
                        v_slots: int = 0, allow_bf16: bool = False) -> str:
    """Why the CUDA decode kernel does not apply ("" when it does), for a case the Triton decode fast path takes
    (:func:`.decode_attention.decode_path_blocker` has checked the cache layout). The shape/format checks come first
    (they run anywhere); the device checks last."""
    if query.dtype == torch.bfloat16 and not allow_bf16:
        return ("query dtype torch.bfloat16 (bf16 inputs are turned off: KVQUANT_CUDA_BF16=0 in the environment; "
                "decode_backend='cuda' forces the kernel)")
    if query.dtype not in (torch.float16, torch.bfloat16):
        return f"query dtype {query.dtype} (needs float16 or bfloat16)"
    if m_rows > 8:
        return f"{m_rows} query rows per kv head (needs q_len * group <= 8)"
    if window is not None:
        return "sliding window"
    if kb not in (2, 4) or vb not in (2, 4):
        return f"bits {kb}/{vb} (needs 2 or 4)"
    if d != 128 and not (d == 64 and kb == 4 and vb == 4):
        return f"head_dim {d} with bits {kb}/{vb} (needs 128, or 64 with 4-bit keys and values)"
    if k_slots > 2 or v_slots > 2:
        return f"{k_slots}/{v_slots} outlier slots per token (needs <= 2: one lane per token and slot)"
    if not query.is_cuda:
        return "not a CUDA tensor"
    if _BROKEN:
        return f"the CUDA kernel failed to compile or load here ({_BROKEN[0]})"
    if torch.cuda.get_device_capability(query.device) < (8, 0):
        return "needs compute capability 8.0+ (mma.sync m16n8k16)"
    if not hasattr(torch.cuda, "_compile_kernel"):
        return "this PyTorch has no torch.cuda._compile_kernel (NVRTC)"
    return ""


@functools.cache
def _kernel(device_index: int, d: int, kb: int, vb: int, ks: int, vs: int, mr: int, has_hist: bool, len_dev: bool,
            k_lut: bool, v_lut: bool, bf16: bool = False, vec: bool = False):
    src = source(d, kb, vb, ks, vs, mr, has_hist, len_dev, k_lut=k_lut, v_lut=v_lut, bf16=bf16, vec=vec)
    with torch.cuda.device(device_index):
        major, minor = torch.cuda.get_device_capability(device_index)
        kern = torch.cuda._compile_kernel(src, KERNEL, compute_capability=f"{major}{minor}",
                                          nvcc_options=["-std=c++17"])
        smem = shared_bytes(d, ks, mr, kb, vb)
        if smem >= 48 * 1024:
            kern.set_shared_memory_config(smem)
    return kern, smem


@functools.cache
def _driver():
    """The CUDA driver library (torch's helper opens it anew on every call)."""
    from torch.cuda._utils import _get_gpu_runtime_library

    return _get_gpu_runtime_library()


def _launch(kern, grid, block, smem, args, stream) -> None:
    from torch.cuda._utils import _check_cuda

    keep = []
    for kind, val in args:
        if kind == "p":
            keep.append(ctypes.c_void_p(val.data_ptr() if isinstance(val, torch.Tensor) else int(val)))
        elif kind == "i":
            keep.append(ctypes.c_int(int(val)))
        elif kind == "q":
            keep.append(ctypes.c_longlong(int(val)))
        else:
            keep.append(ctypes.c_float(float(val)))
    arr = (ctypes.c_void_p * len(keep))(*[ctypes.cast(ctypes.byref(k), ctypes.c_void_p) for k in keep])
    _check_cuda(_driver().cuLaunchKernel(kern.func, grid[0], grid[1], grid[2], block[0], block[1], block[2], smem,
                                         stream._as_parameter_, arr, None))


def packed_decode_cuda(query, packed, kzero, kscale, freq, hist, length: int, length_dev, o_part, lse_part,
                       num_splits: int, qk_scale: float, klut, vlut, kgrid, vgrid, required: bool = False) -> bool:
    """Stage 1 of the decode on tensor cores: fills ``o_part [B, H, num_splits, 16, D]`` and ``lse_part``.

    Arguments as prepared by :func:`kvquant_hf.kernels.decode_attention.packed_attention_triton` (``kzero``/``kscale``
    float32 ``[H, D]``, ``freq`` float32 ``[D/2]``, ``hist`` int ``[B]`` or None, ``klut``/``vlut`` float32
    signposts, ``kgrid``/``vgrid`` their uniform grid ``(a, b)`` or None = gathered). Returns False (nothing written)
    if the kernel cannot be compiled or loaded on this machine -- with a warning, once; the caller then takes the
    Triton kernel -- or raises RuntimeError if ``required``.
    """
    bsz, hq, lq, d = query.shape
    h = packed.k_codes.shape[1]
    group = hq // h
    mr = group * lq
    ks = packed.k_out_idx.shape[-1]
    vs = packed.v_out_idx.shape[-1]
    vec = vector_loads(packed)
    try:
        kern, smem = _kernel(query.device.index if query.device.index is not None else torch.cuda.current_device(),
                             d, packed.key_bits, packed.value_bits, ks, vs, mr, hist is not None, length_dev is not None,
                             kgrid is None, vgrid is None, query.dtype == torch.bfloat16, vec)
    except Exception as exc:  # NVRTC / driver errors come in many types; all mean "use Triton"
        msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        if required:
            raise RuntimeError(f"decode_backend='cuda': the CUDA decode kernel could not be built here ({msg}); "
                               "use decode_backend='triton' (or None).") from exc
        if not _BROKEN:
            _BROKEN.append(msg)
            warnings.warn(f"kvquant_hf: the CUDA decode kernel could not be built ({msg}); using the Triton kernel.",
                          RuntimeWarning, stacklevel=3)
        return False
    if hist is not None and hist.dtype != torch.int32:
        hist = hist.to(torch.int32)
    pk = packed
    # float16 pair tables whatever the model dtype: the kernel dequantizes in float16
    kpair = pair_table(pk.k_lut.to(query.device), pk.key_bits) if kgrid is None else klut
    vpair = pair_table(pk.v_lut.to(query.device), pk.value_bits) if vgrid is None else vlut
    args = [("p", query), ("p", pk.k_codes), ("p", pk.k_out_val), ("p", pk.k_out_idx), ("p", pk.v_codes),
            ("p", pk.v_scale), ("p", pk.v_zero), ("p", pk.v_out_val), ("p", pk.v_out_idx), ("p", kzero),
            ("p", kscale), ("p", pk.positions), ("p", freq), ("p", hist if hist is not None else pk.positions),
            ("p", length_dev if length_dev is not None else pk.positions),
            ("p", klut), ("p", vlut), ("p", kpair), ("p", vpair), ("p", o_part), ("p", lse_part),
            ("i", length), ("i", h), ("i", num_splits), ("i", group)]
    args += [("q", s) for s in query.stride()[:3]]
    for name in PER_TOKEN:
        st = getattr(pk, name).stride()
        args += [("q", st[0]), ("q", st[1]), ("i", st[2])]  # per-token offsets in 32 bits (decode_path_blocker)
    args.append(("q", pk.positions.stride(0)))
    ka, kb_ = kgrid if kgrid is not None else (0.0, 1.0)  # tables: the grid folded into scale/zero, or gathered
    va, vb_ = vgrid if vgrid is not None else (0.0, 1.0)
    args += [("f", qk_scale), ("f", ka), ("f", kb_), ("f", va), ("f", vb_)]
    with torch.cuda.device(query.device):  # the module was loaded in this device's context (multi-GPU device maps)
        _launch(kern, (bsz * h, num_splits, 1), (NUM_WARPS * 32, 1, 1), smem, args,
                torch.cuda.current_stream(query.device))
    return True


"""Split-K flash decoding over the packed KVQuant cache (decode and prefill chunks over a packed history): the host
launcher :func:`packed_attention_triton`.

Stage 1 reads the packed history once per KV head in ``num_splits`` independent splits and writes per-split partial
outputs and log-sum-exps; three kernels can do it: the general Triton kernel (:mod:`.split_kernel`), the Triton
decode fast path (:mod:`.decode_kernel`) and the CUDA tensor-core kernel (:mod:`.cuda_decode`). Stage 2
(:mod:`.merge_kernel`) merges the splits and attends to the exact block (attention-sink tokens and the new tokens).
docs/kernels.md describes the design.

The torch reference with the same contract is :func:`kvquant_hf.attention.packed_attention_torch`.
"""

from __future__ import annotations

import functools
import os

import torch
import triton

from . import cuda_decode
from .common import LOG2E, PER_TOKEN, affine_grid, pair_table, tuple_table
from .decode_kernel import packed_decode_kernel
from .merge_kernel import packed_attn_merge_kernel
from .split_kernel import packed_attn_split_kernel

LAST_KERNELS: dict = {}  # the last compiled kernels (register/spill reports in the benchmarks)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # interpreter: a few splits exercise the merge


def default_num_splits(batch: int, kv_heads: int, row_blocks: int, length: int, device: torch.device,
                       block_n: int = 64, max_splits: int = 64, per_sm: int = 2) -> int:
    """Splits so that stage 1 fills ``per_sm`` programs per SM in whole waves, bounded by the number of token blocks.

    Rounded down: 64 (batch, head) programs on 132 SMs take 4 splits (256 programs, one wave of two per SM), not 5
    (320 programs: a second wave that is a fifth full doubles the time of the one before it).
    """
    programs = batch * kv_heads * row_blocks
    want = max(1, (per_sm * sm_count(device)) // max(programs, 1))
    return int(max(1, min(want, max_splits, triton.cdiv(max(length, 1), block_n))))


#: take the Triton decode fast path for bfloat16 queries by default (False: only with ``decode_kernel=True``). The
#: Triton interpreter has no bf16 arithmetic, so this variant is checked on a GPU only; its error against the reference
#: exceeds the 1e-2 tolerance the other paths meet, so it stays opt-in. ``KVQUANT_BF16_DECODE=1`` in the environment
#: turns it on.
BF16_DECODE_DEFAULT = os.environ.get("KVQUANT_BF16_DECODE", "0") == "1"


def decode_path_blocker(query, packed, m_rows, window, kb, vb, d) -> str:
    """Why the decode fast path (:func:`packed_decode_kernel`) does not apply; "" when it does."""
    if query.dtype not in (torch.float16, torch.bfloat16):
        return f"query dtype {query.dtype} (needs float16 or bfloat16)"
    if m_rows > 16:
        return f"{m_rows} query rows per kv head (needs q_len * group <= 16)"
    if window is not None:
        return "sliding window"
    if kb not in (2, 4) or vb not in (2, 4):
        return f"bits {kb}/{vb} (needs 2 or 4)"
    if d < 32:
        return f"head_dim {d} (needs >= 32)"
    for name in ("k_codes", "v_codes"):
        t = getattr(packed, name)
        if t.data_ptr() % 4 or any(st % 4 for st in t.stride()[:3]):
            return f"packed.{name} rows are not 4-byte aligned"
    for name in PER_TOKEN:  # both decode kernels address a (batch, head)'s tokens with 32-bit offsets
        t = getattr(packed, name)
        if t.shape[2] * t.stride(2) >= 2**31:
            return f"packed.{name} is too long for 32-bit per-token offsets"
    for name in ("k_out_val", "v_out_val", "v_scale", "v_zero"):
        if getattr(packed, name).dtype != query.dtype:
            return f"packed.{name} is {getattr(packed, name).dtype}, the query {query.dtype}"
    if packed.positions.stride(1) != 1:
        return "packed.positions is not contiguous in its last dimension"
    return ""


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def packed_attention_triton(
    query: torch.Tensor,
    packed,
    exact_k: torch.Tensor,
    exact_v: torch.Tensor,
    exact_mask: torch.Tensor | None,
    *,
    scaling: float,
    inv_freq: torch.Tensor,
    attention_scaling: float = 1.0,
    hist_start: torch.Tensor | None = None,
    q_positions: torch.Tensor | None = None,
    window: int | None = None,
    num_splits: int | None = None,
    block_n: int = 32,
    num_warps: int = 4,
    num_stages: int = 1,
    maxnreg: int | None = None,
    length_dev: torch.Tensor | None = None,
    decode_kernel: bool | None = None,
    lut_gather: bool = False,
    decode_backend: str | None = None,
) -> torch.Tensor:
    """Attention over ``[packed history | exact block]``: the fused Triton version of
    :func:`kvquant_hf.attention.packed_attention_torch` (same arguments and result).

    Args:
        query (`torch.Tensor`): ``[batch_size, num_q_heads, q_len, head_dim]`` with RoPE applied
            (fp16, bf16 or fp32).
        packed (`PackedKV` or None): the layer's packed history (see ``kvquant_hf.attention.PackedKV``);
            None or ``length == 0``: no history.
        exact_k / exact_v (`torch.Tensor`): ``[batch_size, num_kv_heads, E, head_dim]`` exact keys
            (rotated) and values (attention-sink tokens and the new tokens), ``E`` may be 0.
        exact_mask (`torch.Tensor`, optional): bool ``[batch_size, q_len, E]``, True = attend; None = all.
        scaling (`float`): softmax scale.
        inv_freq (`torch.Tensor`): float32 ``[head_dim / 2]`` RoPE frequencies of the history keys.
        attention_scaling (`float`): factor on cos/sin (1.0 except yarn/longrope).
        hist_start (`torch.Tensor`, optional): int ``[batch_size]``; history tokens ``j < hist_start[b]``
            are masked (left padding).
        q_positions (`torch.Tensor`, optional): int ``[batch_size, q_len]`` positions of the query rows.
        window (`int`, optional): sliding window: history token ``j`` is visible to row ``r`` iff
            ``q_positions[b, r] - positions[b, j] < window`` (needs ``q_positions``).
        num_splits (`int`, optional): split-K factor of the history (grid dimension). Fix it for
            CUDA-graph capture; default: enough programs to fill the GPU twice.
        block_n, num_warps, num_stages, maxnreg: tuning knobs of the Triton history kernels
            (tokens per block, warps, software-pipelining stages, register cap).
        length_dev (`torch.Tensor`, optional): int32 ``[1]`` on the device: the history length read by the
            kernel instead of ``packed.length`` (CUDA-graph decode; give a fixed ``num_splits`` too). The caller
            guarantees it does not exceed the capacity.
        decode_kernel (`bool`, optional): use the Triton decode fast path (:mod:`.decode_kernel`: fp16 queries,
            ``q_len * group <= 16``, 2/4-bit codes, no window, 4-byte aligned code rows); None = whenever it
            applies, False = never, True = required (ValueError if it does not apply).
        lut_gather (`bool`): decode fast path only: gather the signposts even when a table is a uniform grid
            (the affine shortcut is taken by default; the gather path serves every non-uniform table).
        decode_backend (`str`, optional): first stage of the decode fast path: ``"cuda"`` (the tensor-core kernel
            of :mod:`.cuda_decode`; ValueError if it does not apply), ``"triton"``, or None = CUDA where it applies
            and :data:`.cuda_decode.CUDA_DECODE_DEFAULT` is set, else Triton.

    Returns:
        `torch.Tensor`: ``[batch_size, num_q_heads, q_len, head_dim]`` in the query dtype; rows with
        nothing visible are 0.
    """
    _need(query.dim() == 4, f"query must be [batch, q_heads, q_len, head_dim]; got {tuple(query.shape)}.")
    _need(query.dtype in (torch.float16, torch.bfloat16, torch.float32),
          f"query dtype {query.dtype} is not supported; use float16, bfloat16 or float32.")
    bsz, hq, lq, d = query.shape
    dev = query.device
    _need(exact_k.dim() == 4 and exact_k.shape[0] == bsz and exact_k.shape[3] == d,
          f"exact_k must be [batch, kv_heads, E, head_dim] = [{bsz}, H, E, {d}]; got {tuple(exact_k.shape)}.")
    h = exact_k.shape[1]
    e = exact_k.shape[2]
    _need(exact_v.shape == exact_k.shape,
          f"exact_v shape {tuple(exact_v.shape)} != exact_k shape {tuple(exact_k.shape)}.")
    _need(h > 0 and hq % h == 0, f"query heads ({hq}) must be a multiple of kv heads ({h}).")
    _need(d >= 16 and d & (d - 1) == 0, f"head_dim={d} is not supported by the Triton kernel; use a power of 2 >= 16.")
    group = hq // h
    if exact_mask is not None:
        _need(exact_mask.shape == (bsz, lq, e) and exact_mask.dtype == torch.bool,
              f"exact_mask must be bool [batch, q_len, E] = {(bsz, lq, e)}; got {exact_mask.dtype} "
              f"{tuple(exact_mask.shape)}.")
    _need(inv_freq.shape == (d // 2,), f"inv_freq must have shape ({d // 2},); got {tuple(inv_freq.shape)}.")
    if window is not None:
        _need(q_positions is not None, "window needs q_positions (the positions of the query rows).")
        _need(isinstance(window, int) and window > 0, f"window={window!r} must be a positive int.")
    if q_positions is not None:
        _need(q_positions.shape == (bsz, lq) and not q_positions.dtype.is_floating_point and q_positions.device == dev,
              f"q_positions must be an integer tensor [batch, q_len] = {(bsz, lq)} on {dev}; got "
              f"{q_positions.dtype} {tuple(q_positions.shape)} on {q_positions.device}.")
    if hist_start is not None:
        _need(hist_start.shape == (bsz,) and not hist_start.dtype.is_floating_point and hist_start.device == dev,
              f"hist_start must be an integer tensor [batch] = ({bsz},) on {dev}; got {hist_start.dtype} "
              f"{tuple(hist_start.shape)} on {hist_start.device}.")

    length = 0 if packed is None else int(packed.length)
    if length_dev is not None:
        _need(length_dev.shape == (1,) and length_dev.dtype == torch.int32 and length_dev.device == dev,
              f"length_dev must be an int32 tensor of shape (1,) on {dev}.")
        _need(num_splits is not None, "length_dev needs a fixed num_splits (the grid cannot follow the length).")
    m_rows = group * lq
    block_m = min(64, max(16, triton.next_power_of_2(m_rows)))
    num_mb = triton.cdiv(m_rows, block_m)
    # dot operands: fp16 for fp16 models; float32 (tf32 on the GPU) for bf16 models, whose 8-bit mantissa
    # would cost ~1e-2 relative error on the dequantized K/V and the probabilities; IEEE float32 for fp32.
    dot_f32 = query.dtype != torch.float16
    ieee = query.dtype == torch.float32
    out = torch.empty_like(query)

    if length > 0:
        kb, vb = packed.key_bits, packed.value_bits
        _need(kb in (2, 3, 4) and vb in (2, 3, 4), f"bits must be 2, 3 or 4; got key_bits={kb}, value_bits={vb}.")
        _need(packed.head_dim == d, f"packed head_dim {packed.head_dim} != query head_dim {d}.")
        cap = packed.k_codes.shape[2]
        _need(length <= cap, f"packed.length={length} exceeds the capacity {cap}.")
        expect = {
            "k_codes": ((bsz, h, cap, d * kb // 8), torch.uint8),
            "v_codes": ((bsz, h, cap, d * vb // 8), torch.uint8),
            "k_out_idx": ((bsz, h, cap, packed.k_out_idx.shape[-1]), torch.uint8),
            "v_out_idx": ((bsz, h, cap, packed.v_out_idx.shape[-1]), torch.uint8),
            "k_out_val": ((bsz, h, cap, packed.k_out_idx.shape[-1]), None),
            "v_out_val": ((bsz, h, cap, packed.v_out_idx.shape[-1]), None),
            "v_scale": ((bsz, h, cap), None),
            "v_zero": ((bsz, h, cap), None),
            "positions": ((bsz, cap), torch.int32),
        }
        for name, (shape, dtype) in expect.items():
            t = getattr(packed, name)
            _need(tuple(t.shape) == shape, f"packed.{name} has shape {tuple(t.shape)}, expected {shape}.")
            _need(dtype is None or t.dtype == dtype, f"packed.{name} has dtype {t.dtype}, expected {dtype}.")
            _need(t.device == dev, f"packed.{name} is on {t.device}, the query on {dev}.")
            _need(t.dim() < 4 or t.shape[3] <= 1 or t.stride(3) == 1,
                  f"packed.{name} must be contiguous in its last dimension (strides {t.stride()}).")
        _need(packed.k_lut.shape == (2**kb,) and packed.v_lut.shape == (2**vb,), "lookup tables have wrong sizes.")
        k_slots = packed.k_out_idx.shape[-1]
        v_slots = packed.v_out_idx.shape[-1]
        why = decode_path_blocker(query, packed, m_rows, window, kb, vb, d)
        if decode_kernel and why:
            raise ValueError(f"decode_kernel=True but the decode fast path does not apply: {why}.")
        use_decode = decode_kernel is not False and not why
        _need(decode_backend in (None, "cuda", "triton"),
              f"decode_backend={decode_backend!r} must be None, 'cuda' or 'triton'.")
        use_cuda = False
        if use_decode and decode_backend != "triton":
            why_c = cuda_decode.cuda_decode_blocker(query, m_rows, window, kb, vb, d, k_slots, v_slots,
                                                    allow_bf16=decode_backend == "cuda" or cuda_decode.CUDA_BF16_DEFAULT)
            if decode_backend == "cuda" and why_c:
                raise ValueError(f"decode_backend='cuda' but the CUDA decode kernel does not apply: {why_c}.")
            use_cuda = not why_c and (decode_backend == "cuda" or cuda_decode.CUDA_DECODE_DEFAULT)
        elif decode_backend == "cuda":
            raise ValueError(f"decode_backend='cuda' but the decode fast path does not apply: {why}.")
        if (use_decode and not use_cuda and decode_kernel is None and query.dtype == torch.bfloat16
                and not BF16_DECODE_DEFAULT):
            use_decode = False  # bf16 Triton fast path: opt-in (BF16_DECODE_DEFAULT)
        if use_decode:
            block_m = 16
            num_mb = 1
        ktab = vtab = None
        if not use_decode:
            ktab = tuple_table(packed.k_lut.to(dev), kb)
            vtab = tuple_table(packed.v_lut.to(dev), vb)
        kzero = packed.k_zero.to(dev, torch.float32).contiguous()
        kscale = packed.k_scale.to(dev, torch.float32).contiguous()
        _need(kzero.shape == (h, d) and kscale.shape == (h, d), f"k_zero/k_scale must be [{h}, {d}].")
        freq = inv_freq.to(dev, torch.float32).contiguous()
        if num_splits is None:  # the CUDA kernel: 256+ tokens per CTA (4 warps); more splits cost more in the merge
            num_splits = default_num_splits(bsz, h, num_mb, length, dev, 256 if use_cuda else block_n,
                                            128 if use_cuda else 64, cuda_decode.CTAS_PER_SM if use_cuda else 2)
        _need(isinstance(num_splits, int) and num_splits >= 1, f"num_splits={num_splits!r} must be an int >= 1.")
        o_part = torch.empty(bsz, h, num_splits, num_mb * block_m, d, dtype=torch.float32, device=dev)
        lse_part = torch.empty(bsz, h, num_splits, num_mb * block_m, dtype=torch.float32, device=dev)
        hist = hist_start if hist_start is not None else packed.positions
        qpos = q_positions if q_positions is not None else packed.positions
        pk = packed
        if use_decode:  # signposts of both fast paths: a uniform grid folds into scale/zero, other tables are gathered
            klut = packed.k_lut.to(dev, torch.float32).contiguous()
            vlut = packed.v_lut.to(dev, torch.float32).contiguous()
            kgrid = None if lut_gather else affine_grid(packed.k_lut)
            vgrid = None if lut_gather else affine_grid(packed.v_lut)
        if use_cuda:  # False afterwards only if the kernel could not be compiled here (then Triton below)
            use_cuda = cuda_decode.packed_decode_cuda(
                query, packed, kzero, kscale, freq, hist_start, length, length_dev, o_part, lse_part, num_splits,
                float(scaling * attention_scaling * LOG2E), klut, vlut, kgrid, vgrid, required=decode_backend == "cuda")
        if use_cuda:
            LAST_KERNELS["split"] = None
        elif use_decode:
            kpair = klut if kgrid is not None else pair_table(packed.k_lut.to(dev), kb, query.dtype)
            vpair = vlut if vgrid is not None else pair_table(packed.v_lut.to(dev), vb, query.dtype)
            LAST_KERNELS["split"] = packed_decode_kernel[(bsz * h, num_splits)](
                query, pk.k_codes, pk.k_out_val, pk.k_out_idx, pk.v_codes, pk.v_scale, pk.v_zero,
                pk.v_out_val, pk.v_out_idx, kpair, vpair, kzero, kscale, pk.positions, freq, hist,
                o_part, lse_part,
                length, length_dev if length_dev is not None else pk.positions, lq, h, num_splits,
                float(scaling * attention_scaling * LOG2E),
                *(kgrid or (0.0, 1.0)), *(vgrid or (0.0, 1.0)),
                *query.stride()[:3],
                *(st // 4 for st in pk.k_codes.stride()[:3]), *pk.k_out_val.stride()[:3], *pk.k_out_idx.stride()[:3],
                *(st // 4 for st in pk.v_codes.stride()[:3]), *pk.v_scale.stride()[:3], *pk.v_zero.stride()[:3],
                *pk.v_out_val.stride()[:3], *pk.v_out_idx.stride()[:3],
                pk.positions.stride(0),
                HEAD_DIM=d, GROUP=group, K_BITS=kb, V_BITS=vb, K_SLOTS=k_slots, V_SLOTS=v_slots,
                K_AFFINE=kgrid is not None, V_AFFINE=vgrid is not None,
                BLOCK_M=block_m, BLOCK_N=block_n, HAS_HIST=hist_start is not None,
                FAST=query.is_cuda, LEN_ON_DEVICE=length_dev is not None, BF16=query.dtype == torch.bfloat16,
                num_warps=num_warps, num_stages=num_stages, **({"maxnreg": maxnreg} if maxnreg else {}),
            )
        else:
            LAST_KERNELS["split"] = packed_attn_split_kernel[(bsz * h * num_mb, num_splits)](
                query, pk.k_codes, pk.k_out_val, pk.k_out_idx, pk.v_codes, pk.v_scale, pk.v_zero,
                pk.v_out_val, pk.v_out_idx, ktab, vtab, kzero, kscale, pk.positions, freq, hist, qpos,
                o_part, lse_part,
                length, length_dev if length_dev is not None else pk.positions, lq, h, num_mb, num_splits,
                float(scaling * attention_scaling * LOG2E), int(window) if window is not None else 0,
                *query.stride(),
                *pk.k_codes.stride()[:3], *pk.k_out_val.stride()[:3], *pk.k_out_idx.stride()[:3],
                *pk.v_codes.stride()[:3], *pk.v_scale.stride()[:3], *pk.v_zero.stride()[:3],
                *pk.v_out_val.stride()[:3], *pk.v_out_idx.stride()[:3],
                *pk.positions.stride()[:2],
                *(qpos.stride()[:2] if q_positions is not None else (0, 0)),
                HEAD_DIM=d, GROUP=group, K_BITS=kb, V_BITS=vb, K_SLOTS=k_slots, V_SLOTS=v_slots,
                BLOCK_M=block_m, BLOCK_N=block_n, HAS_HIST=hist_start is not None, HAS_WINDOW=window is not None,
                USE_DOT=d // 2 >= 16, DOT_F32=dot_f32, IEEE=ieee,
                FAST=query.is_cuda, LEN_ON_DEVICE=length_dev is not None,
                num_warps=num_warps, num_stages=num_stages, **({"maxnreg": maxnreg} if maxnreg else {}),
            )
    else:
        num_splits = 0
        o_part = torch.empty(1, dtype=torch.float32, device=dev)
        lse_part = o_part

    em = exact_mask if exact_mask is not None else out
    ek, ev = (exact_k, exact_v) if e > 0 else (query, query)
    block_e = min(64, max(16, triton.next_power_of_2(max(e, 1))))
    # decode (few exact keys): the output channels split over programs and 8 splits merged per step; prefill-sized
    # exact blocks keep one program per row block (each program recomputes the exact-block scores)
    block_d = min(d, 16) if e <= 64 else 0
    packed_attn_merge_kernel[(bsz * h * num_mb, d // block_d if block_d else 1)](
        query, ek, ev, em, o_part, lse_part, out,
        e, lq, h, num_mb, num_splits, float(scaling * LOG2E),
        *query.stride(),
        *(exact_k.stride() if e > 0 else (0, 0, 0, 0)),
        *(exact_v.stride() if e > 0 else (0, 0, 0, 0)),
        *(exact_mask.stride() if exact_mask is not None else (0, 0, 0)),
        *out.stride(),
        HEAD_DIM=d, GROUP=group, BLOCK_M=block_m, BLOCK_E=block_e, HAS_EMASK=exact_mask is not None,
        USE_DOT=d >= 16 and block_e >= 16, DOT_F32=dot_f32, IEEE=ieee, BLOCK_D=block_d,
        BLOCK_S=8 if block_d else 1,
        num_warps=4,
    )
    return out

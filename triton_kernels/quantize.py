"""Pack-on-append: nuqX encode + bit packing + outlier slots for new keys and values (host launchers).

Both kernels (:mod:`.quantize_kernels`) are bit-identical to :func:`kvquant_hf.quant.quantize_keys` and
:func:`kvquant_hf.quant.quantize_values` (codes, slots, scales, tie rules) and write straight into the
cache's preallocated storage at a token offset, so appending ``S`` new tokens costs one launch per
tensor kind and no allocation. See the module docstring of ``kvquant_hf/quant.py`` for the format.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from kvquant_hf.quant import key_zero_scale, value_scale_dtype

from .quantize_kernels import quantize_keys_kernel, quantize_kv_kernel, quantize_values_kernel

SUPPORTED_BITS = (2, 3, 4)  # code widths the kernels pack


class KeyCodes(NamedTuple):
    """Packed keys of the tokens just written (views into the destination storage).

    Field names match :class:`kvquant_hf.quant.PackedKeys` (without ``n_clipped``: counting clipped
    outliers would need a host sync; pass ``clip_counter`` to accumulate it on the device instead).
    """

    codes: torch.Tensor  # uint8 [B, H, S, D*bits/8]
    out_val: torch.Tensor  # model dtype [B, H, S, n_slots]
    out_idx: torch.Tensor  # uint8 [B, H, S, n_slots], 255 = unused


class ValueCodes(NamedTuple):
    """Packed values of the tokens just written; field names match :class:`kvquant_hf.quant.PackedValues`."""

    codes: torch.Tensor  # uint8 [B, H, S, D*bits/8]
    scale: torch.Tensor  # fp16/bf16 [B, H, S]
    zero: torch.Tensor  # fp16/bf16 [B, H, S]
    out_val: torch.Tensor  # model dtype [B, H, S, n_slots]
    out_idx: torch.Tensor  # uint8 [B, H, S, n_slots]


# ----------------------------------------------------------------------------------------------
# host launchers
# ----------------------------------------------------------------------------------------------
def _check_common(x: torch.Tensor, lut: torch.Tensor, n_slots: int, bits: int, what: str) -> tuple[int, ...]:
    if x.dim() != 4:
        raise ValueError(f"{what} must be [batch, kv_heads, seq, head_dim]; got shape {tuple(x.shape)}.")
    b, h, s, d = x.shape
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"{what} dtype {x.dtype} is not supported; use float16, bfloat16 or float32.")
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r} is not supported; choose one of {SUPPORTED_BITS}.")
    if d < 16 or d & (d - 1):
        raise ValueError(f"head_dim={d} is not supported by the Triton kernels; use a power of two >= 16 (64, 128).")
    if lut.shape != (2**bits,):
        raise ValueError(f"lookup table has shape {tuple(lut.shape)}, expected ({2**bits},) for {bits} bits.")
    if lut.device != x.device:
        raise ValueError(f"lookup table is on {lut.device} but {what} are on {x.device}.")
    if not isinstance(n_slots, int) or n_slots < 0:
        raise ValueError(f"n_slots={n_slots!r} must be a non-negative int.")
    return b, h, s, d


def _check_dest(t: torch.Tensor, name: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
    """``t`` is a destination ``[B, H, cap, ...]``: check all but the capacity dim, dtype and device."""
    if t.dim() != len(shape) or t.shape[:2] != shape[:2] or tuple(t.shape[3:]) != tuple(shape[3:]):
        raise ValueError(f"destination {name} has shape {tuple(t.shape)}, expected {shape} (cap = any).")
    if t.dtype != dtype:
        raise ValueError(f"destination {name} has dtype {t.dtype}, expected {dtype}.")
    if t.device != device:
        raise ValueError(f"destination {name} is on {t.device}, expected {device}.")
    if t.dim() == 4 and t.shape[3] > 1 and t.stride(3) != 1:
        raise ValueError(f"destination {name} must be contiguous in its last dimension (stride {t.stride()}).")


def _device_start(start, out, dev: torch.device):
    """``start`` may be an int32 ``[1]`` device tensor (CUDA-graph decode): the offset is then read by the
    kernel, and the caller guarantees ``start + seq_len <= capacity`` (no host sync to check it)."""
    if not isinstance(start, torch.Tensor):
        return start, None
    if out is None:
        raise ValueError("a device-side start needs `out` (the storage to write into).")
    if start.shape != (1,) or start.dtype != torch.int32 or start.device != dev:
        raise ValueError(f"a device-side start must be an int32 tensor of shape (1,) on {dev}; got "
                         f"{start.dtype} {tuple(start.shape)} on {start.device}.")
    return 0, start


def _check_range(cap: int, start: int, s: int) -> None:
    if not isinstance(start, int) or start < 0 or start + s > cap:
        raise ValueError(f"cannot write {s} tokens at offset start={start!r} into a capacity of {cap} tokens.")


def _block_t(s: int) -> int:
    return max(1, min(16, triton.next_power_of_2(max(s, 1))))


def _prepare_keys(
    k: torch.Tensor,
    k_lut: torch.Tensor,
    k_lower: torch.Tensor,
    k_upper: torch.Tensor,
    n_slots: int,
    bits: int,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    start: int = 0,
    *,
    k_zero: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    clip_counter: torch.Tensor | None = None,
) -> tuple[KeyCodes, tuple | None]:
    """Checks, destinations and launch ``(grid, args, constexprs)`` of :func:`quantize_keys_triton`."""
    b, h, s, d = _check_common(k, k_lut, n_slots, bits, "keys")
    if k_lower.shape != (h, d) or k_upper.shape != (h, d):
        raise ValueError(
            f"key thresholds have shapes {tuple(k_lower.shape)}/{tuple(k_upper.shape)}, expected {(h, d)}."
        )
    nbytes = d * bits // 8
    dev = k.device
    start, start_dev = _device_start(start, out, dev)
    lower = k_lower.to(dev, torch.float32).contiguous()
    upper = k_upper.to(dev, torch.float32).contiguous()
    if k_zero is None or k_scale is None:
        k_zero, k_scale = key_zero_scale(lower, upper)
    else:
        if k_zero.shape != (h, d) or k_scale.shape != (h, d):
            raise ValueError(f"k_zero/k_scale must have shape {(h, d)}.")
        k_zero = k_zero.to(dev, torch.float32).contiguous()
        k_scale = k_scale.to(dev, torch.float32).contiguous()
    lut = k_lut.to(torch.float32).contiguous()
    if out is None:
        codes = torch.empty(b, h, s, nbytes, dtype=torch.uint8, device=dev)
        oval = torch.empty(b, h, s, n_slots, dtype=k.dtype, device=dev)
        oidx = torch.empty(b, h, s, n_slots, dtype=torch.uint8, device=dev)
        start = 0
    else:
        if len(out) != 3:
            raise ValueError("out must be (codes, out_val, out_idx).")
        codes, oval, oidx = out
        _check_dest(codes, "codes", (b, h, -1, nbytes), torch.uint8, dev)
        _check_dest(oval, "out_val", (b, h, -1, n_slots), k.dtype, dev)
        _check_dest(oidx, "out_idx", (b, h, -1, n_slots), torch.uint8, dev)
        cap = codes.shape[2]
        if oval.shape[2] != cap or oidx.shape[2] != cap:
            raise ValueError("codes, out_val and out_idx must have the same capacity (dim 2).")
        _check_range(cap, start, s)
    if clip_counter is not None and (clip_counter.dtype != torch.int32 or clip_counter.device != dev):
        raise ValueError("clip_counter must be an int32 tensor on the keys' device.")
    launch = None
    if s > 0:
        block_t = _block_t(s)
        grid = (b * h, triton.cdiv(s, block_t))
        args = (
            k, lut, lower, upper, k_zero, k_scale, codes, oval, oidx,
            clip_counter if clip_counter is not None else codes,
            s, start, start_dev if start_dev is not None else codes, h,
            k.stride(0), k.stride(1), k.stride(2), k.stride(3),
            codes.stride(0), codes.stride(1), codes.stride(2),
            oval.stride(0), oval.stride(1), oval.stride(2),
            oidx.stride(0), oidx.stride(1), oidx.stride(2),
        )
        consts = dict(HEAD_DIM=d, BITS=bits, N_SLOTS=n_slots, BLOCK_T=block_t,
                      COUNT_CLIPPED=clip_counter is not None, START_ON_DEVICE=start_dev is not None)
        launch = (grid, args, consts)
    if start_dev is not None:
        return KeyCodes(codes, oval, oidx), launch
    sl = slice(start, start + s)
    return KeyCodes(codes[:, :, sl], oval[:, :, sl], oidx[:, :, sl]), launch


def _prepare_values(
    v: torch.Tensor,
    v_lut: torch.Tensor,
    n_slots: int,
    bits: int,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    start: int = 0,
) -> tuple[ValueCodes, tuple | None]:
    """Checks, destinations and launch ``(grid, args, constexprs)`` of :func:`quantize_values_triton`."""
    b, h, s, d = _check_common(v, v_lut, n_slots, bits, "values")
    if 2 * (n_slots + 1) > d:
        raise ValueError(f"n_slots={n_slots} is too many for head_dim={d}; need 2 * (n_slots + 1) <= head_dim.")
    nbytes = d * bits // 8
    dev = v.device
    start, start_dev = _device_start(start, out, dev)
    sd = value_scale_dtype(v.dtype)
    lut = v_lut.to(torch.float32).contiguous()
    if out is None:
        codes = torch.empty(b, h, s, nbytes, dtype=torch.uint8, device=dev)
        scale = torch.empty(b, h, s, dtype=sd, device=dev)
        zero = torch.empty(b, h, s, dtype=sd, device=dev)
        oval = torch.empty(b, h, s, n_slots, dtype=v.dtype, device=dev)
        oidx = torch.empty(b, h, s, n_slots, dtype=torch.uint8, device=dev)
        start = 0
    else:
        if len(out) != 5:
            raise ValueError("out must be (codes, scale, zero, out_val, out_idx).")
        codes, scale, zero, oval, oidx = out
        _check_dest(codes, "codes", (b, h, -1, nbytes), torch.uint8, dev)
        _check_dest(scale, "scale", (b, h, -1), sd, dev)
        _check_dest(zero, "zero", (b, h, -1), sd, dev)
        _check_dest(oval, "out_val", (b, h, -1, n_slots), v.dtype, dev)
        _check_dest(oidx, "out_idx", (b, h, -1, n_slots), torch.uint8, dev)
        cap = codes.shape[2]
        if any(t.shape[2] != cap for t in (scale, zero, oval, oidx)):
            raise ValueError("all value destinations must have the same capacity (dim 2).")
        _check_range(cap, start, s)
    launch = None
    if s > 0:
        block_t = _block_t(s)
        grid = (b * h, triton.cdiv(s, block_t))
        args = (
            v, lut, codes, scale, zero, oval, oidx,
            s, start, start_dev if start_dev is not None else codes, h,
            v.stride(0), v.stride(1), v.stride(2), v.stride(3),
            codes.stride(0), codes.stride(1), codes.stride(2),
            scale.stride(0), scale.stride(1), scale.stride(2),
            zero.stride(0), zero.stride(1), zero.stride(2),
            oval.stride(0), oval.stride(1), oval.stride(2),
            oidx.stride(0), oidx.stride(1), oidx.stride(2),
        )
        consts = dict(HEAD_DIM=d, BITS=bits, N_SLOTS=n_slots, KP=triton.next_power_of_2(n_slots + 1),
                      SCALE_MAX=float(torch.finfo(sd).max), BLOCK_T=block_t, START_ON_DEVICE=start_dev is not None)
        launch = (grid, args, consts)
    if start_dev is not None:
        return ValueCodes(codes, scale, zero, oval, oidx), launch
    sl = slice(start, start + s)
    return ValueCodes(codes[:, :, sl], scale[:, :, sl], zero[:, :, sl], oval[:, :, sl], oidx[:, :, sl]), launch


def quantize_keys_triton(
    k: torch.Tensor,
    k_lut: torch.Tensor,
    k_lower: torch.Tensor,
    k_upper: torch.Tensor,
    n_slots: int,
    bits: int,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    start: int = 0,
    *,
    k_zero: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    clip_counter: torch.Tensor | None = None,
) -> KeyCodes:
    """Quantize pre-RoPE keys per channel (nuqX + outlier slots), bit-identical to ``quant.quantize_keys``.

    Args:
        k (`torch.Tensor`): ``[batch_size, kv_heads, seq_len, head_dim]`` pre-RoPE keys (fp16/bf16/fp32,
            any strides).
        k_lut (`torch.Tensor`): float32 ``[2**bits]`` sorted signposts.
        k_lower, k_upper (`torch.Tensor`): float32 ``[kv_heads, head_dim]`` calibrated thresholds.
        n_slots (`int`): outlier slots per token and head.
        bits (`int`): 2, 3 or 4.
        out (`tuple`, optional): destination storage ``(codes uint8 [B, H, cap, D*bits/8],
            out_val k.dtype [B, H, cap, n_slots], out_idx uint8 [B, H, cap, n_slots])``; the tokens are
            written at ``[start, start + seq_len)`` of the capacity dimension. New tensors if None.
        start (`int` or `torch.Tensor`): token offset in ``out``; an int32 ``[1]`` device tensor is read by
            the kernel (CUDA-graph decode; the full destination tensors are returned then).
        k_zero, k_scale (`torch.Tensor`, optional): ``quant.key_zero_scale(k_lower, k_upper)`` if
            already computed (saves two tiny launches per call).
        clip_counter (`torch.Tensor`, optional): int32 ``[1]`` on the device; the number of outliers
            clipped because a token had more than ``n_slots`` is added to it (no host sync).

    Returns:
        `KeyCodes`: views of the written tokens ``(codes, out_val, out_idx)``.
    """
    result, launch = _prepare_keys(k, k_lut, k_lower, k_upper, n_slots, bits, out, start, k_zero=k_zero,
                                   k_scale=k_scale, clip_counter=clip_counter)
    if launch is not None:
        grid, args, consts = launch
        quantize_keys_kernel[grid](*args, **consts, num_warps=4)
    return result


def quantize_values_triton(
    v: torch.Tensor,
    v_lut: torch.Tensor,
    n_slots: int,
    bits: int,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    start: int = 0,
) -> ValueCodes:
    """Quantize values per token (nuqX, ``n_slots`` extremes kept exact), bit-identical to ``quant.quantize_values``.

    Args:
        v (`torch.Tensor`): ``[batch_size, kv_heads, seq_len, head_dim]`` values (fp16/bf16/fp32).
        v_lut (`torch.Tensor`): float32 ``[2**bits]`` sorted signposts.
        n_slots (`int`): outlier slots per token and head; ``2 * (n_slots + 1) <= head_dim``.
        bits (`int`): 2, 3 or 4.
        out (`tuple`, optional): destination storage ``(codes uint8 [B, H, cap, D*bits/8], scale [B, H, cap],
            zero [B, H, cap], out_val v.dtype [B, H, cap, n_slots], out_idx uint8 [B, H, cap, n_slots])``
            with scale/zero in bf16 for bf16 values and fp16 otherwise (``quant.value_scale_dtype``).
        start (`int` or `torch.Tensor`): token offset in ``out``; an int32 ``[1]`` device tensor is read by
            the kernel (CUDA-graph decode; the full destination tensors are returned then).

    Returns:
        `ValueCodes`: views of the written tokens ``(codes, scale, zero, out_val, out_idx)``.
    """
    result, launch = _prepare_values(v, v_lut, n_slots, bits, out, start)
    if launch is not None:
        grid, args, consts = launch
        quantize_values_kernel[grid](*args, **consts, num_warps=4)
    return result


def quantize_kv_triton(
    k: torch.Tensor,
    v: torch.Tensor,
    k_lut: torch.Tensor,
    k_lower: torch.Tensor,
    k_upper: torch.Tensor,
    v_lut: torch.Tensor,
    n_slots: int,
    key_bits: int,
    value_bits: int,
    k_out: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    v_out: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    start: int = 0,
    *,
    k_zero: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    clip_counter: torch.Tensor | None = None,
) -> tuple[KeyCodes, ValueCodes]:
    """:func:`quantize_keys_triton` and :func:`quantize_values_triton` of the same new tokens in **one launch**
    (a cache append; one kernel less per layer and step). Same arguments as the two (``k_out`` / ``v_out`` are their
    ``out``, ``start`` is shared), same results bit for bit: each program runs the body of one of the two kernels.
    ``k`` and ``v`` must have the same shape."""
    if k.shape != v.shape:
        raise ValueError(f"keys {tuple(k.shape)} and values {tuple(v.shape)} must have the same shape.")
    kres, klaunch = _prepare_keys(k, k_lut, k_lower, k_upper, n_slots, key_bits, k_out, start, k_zero=k_zero,
                                  k_scale=k_scale, clip_counter=clip_counter)
    vres, vlaunch = _prepare_values(v, v_lut, n_slots, value_bits, v_out, start)
    if klaunch is not None:
        (grid, kargs, kc), (_, vargs, vc) = klaunch, vlaunch
        quantize_kv_kernel[grid + (2,)](
            *kargs, *vargs, HEAD_DIM=kc["HEAD_DIM"], K_BITS=kc["BITS"], K_SLOTS=kc["N_SLOTS"], V_BITS=vc["BITS"],
            V_SLOTS=vc["N_SLOTS"], KP=vc["KP"], SCALE_MAX=vc["SCALE_MAX"], BLOCK_T=kc["BLOCK_T"],
            COUNT_CLIPPED=kc["COUNT_CLIPPED"], START_ON_DEVICE=kc["START_ON_DEVICE"], num_warps=4,
        )
    return kres, vres

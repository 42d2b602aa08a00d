"""The history-dequantize kernel (``kvquant_hf.kernels.dequantize``, prefill path) against the torch reference,
in the Triton interpreter (CPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import interpreted_kernel_modules, interpreted_module

from kvquant_hf import quant
from kvquant_hf.attention import PackedKV, history_blocks

_qz, _da = interpreted_kernel_modules()
_dq = interpreted_module("dequantize", "dequantize_kernel")


def _packed(b, h, cap, length, d, bits, k_slots, v_slots, seed=0, scale_dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, h, cap, d, generator=g) * torch.linspace(0.5, 3.0, d)
    v = torch.randn(b, h, cap, d, generator=g)
    klut, vlut = quant.normal_float_signposts(bits), quant.uniform_signposts(bits)
    lo, hi = quant.key_thresholds_from_sample(k, 0.05)
    pk = quant.quantize_keys(k, klut, lo, hi, k_slots, bits)
    pv = quant.quantize_values(v.to(scale_dtype) if scale_dtype != torch.float16 else v, vlut, v_slots, bits)
    zero, scale = quant.key_zero_scale(lo, hi)
    pos = (torch.arange(cap, dtype=torch.int32) * 37 + 5)[None].expand(b, cap).contiguous()  # large positions
    return PackedKV(pk.codes, pk.out_val, pk.out_idx, pv.codes, pv.scale, pv.zero, pv.out_val, pv.out_idx, klut, vlut,
                    zero, scale, pos, length, bits, bits, d)


@pytest.mark.parametrize("bits,d,k_slots,v_slots,start,end", [
    (4, 32, 1, 1, 0, 45), (3, 64, 2, 0, 7, 40), (2, 16, 0, 2, 33, 34), (3, 24, 1, 1, 0, 50), (4, 64, 0, 0, 10, 10),
])
def test_matches_reference(bits, d, k_slots, v_slots, start, end):
    b, h, cap, length = 2, 3, 56, 50
    packed = _packed(b, h, cap, length, d, bits, k_slots, v_slots, seed=bits + d)
    inv_freq = 1.0 / (500000 ** (torch.arange(0, d, 2).float() / d))
    # the reference: one block covering [start, end) of a view that starts at `start`
    ref_k, ref_v = packed.dequantize_block(start, end)
    from kvquant_hf.attention import rope_rotate
    ref_k = rope_rotate(ref_k, packed.positions[:, start:end], inv_freq, 0.9)
    k, v = _dq.dequantize_history_triton(packed, start, end, inv_freq, 0.9, torch.float32, block_t=16)
    assert k.shape == v.shape == (b, h, end - start, d)
    torch.testing.assert_close(v, ref_v, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k, ref_k, rtol=1e-4, atol=1e-4)  # cos/sin of angles up to ~2e3 rad


def test_model_dtype_output_and_history_blocks_agree():
    d = 32
    packed = _packed(1, 2, 40, 40, d, 4, 1, 1, seed=3)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    (_, _, ref_k, ref_v), = list(history_blocks(packed, 64, inv_freq, 1.0))
    k, v = _dq.dequantize_history_triton(packed, 0, 40, inv_freq, 1.0, torch.float16)
    assert k.dtype == v.dtype == torch.float16
    torch.testing.assert_close(k, ref_k.half(), rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(v, ref_v.half(), rtol=2e-3, atol=2e-3)


def test_bad_range_is_refused():
    packed = _packed(1, 1, 8, 8, 16, 4, 0, 0)
    with pytest.raises(ValueError, match="outside the history"):
        _dq.dequantize_history_triton(packed, 4, 9, torch.ones(8), 1.0, torch.float32)


def _math_op(q, k, v, scale, causal=False):
    from kvquant_hf.attention import attention_lse_math

    vis = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril() if causal else None
    return attention_lse_math(q, k, v, scale, vis)


@pytest.mark.parametrize("sink,mask_kind", [(1, "causal"), (0, "causal"), (2, "other")])
def test_prefill_with_kernel_dequant_and_causal_split(monkeypatch, sink, mask_kind):
    """The CUDA structure of the prefill path on CPU: history through the dequantize kernel, the chunk as one
    square causal call of the fused op (here float32 math standing in for FlashAttention) plus the sinks."""
    from kvquant_hf import attention as attn_mod

    calls = []
    monkeypatch.setattr(attn_mod, "_lse_op", lambda device, dtype, head_dim: (lambda *a, **k: (calls.append(k.get("causal", False)),
                                                                                    _math_op(*a, **k))[1]))
    b, h, g, d, length, lq = 2, 2, 3, 32, 70, 12
    packed = _packed(b, h, length, length, d, 3, 1, 1, seed=5)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(b, h * g, lq, d, generator=gen)
    ek, ev = torch.randn(b, h, sink + lq, d, generator=gen), torch.randn(b, h, sink + lq, d, generator=gen)
    causal = torch.ones(lq, lq, dtype=torch.bool).tril().expand(b, lq, lq)
    if mask_kind == "other":
        causal = causal.clone()
        causal[1, 5, 2] = False
    mask = torch.cat([torch.ones(b, lq, sink, dtype=torch.bool), causal], -1)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    kw = {"scaling": d**-0.5, "inv_freq": inv_freq, "attention_scaling": 1.0}
    ref = attn_mod.packed_attention_torch(q, packed, ek, ev, mask, **kw)
    out = attn_mod.packed_attention_prefill(q, packed, ek, ev, mask, block_size=32, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    # three history blocks, then the chunk as one causal call when the mask allows it
    assert calls == [False, False, False] + ([True] if mask_kind == "causal" else [])


@pytest.mark.parametrize("layout", ["folded", "per_head"])
def test_merge_kernel_matches_logsumexp_merge(layout):
    b, h, g, lq, d = 2, 2, 3, 5, 24
    gen = torch.Generator().manual_seed(0)
    parts = [(torch.randn(b, h, g * lq, d, generator=gen), torch.randn(b, h, g * lq, generator=gen) * 3)
             for _ in range(3)]
    parts[1][1][0, 1, :4] = float("-inf")  # rows that do not see one part
    for o, lse in parts:
        lse[1, 0, 2] = float("-inf")  # a row that sees nothing: stays zero
    acc = torch.zeros(b, h, g * lq, d)
    acc_lse = torch.full((b, h, g * lq), float("-inf"))
    for o, lse in parts:
        if layout == "per_head":  # [B, H*G, Lq, D], non-contiguous like FlashAttention's output, half precision
            o_in = o.reshape(b, h * g, lq, d).transpose(1, 2).contiguous().transpose(1, 2).half()
            _dq.merge_lse_(acc, acc_lse, o_in, lse.reshape(b, h * g, lq), lq)
        else:
            _dq.merge_lse_(acc, acc_lse, o, lse, lq)
    lse_all = torch.stack([lse for _, lse in parts])
    w = torch.softmax(lse_all, dim=0).nan_to_num(0.0)
    tol = 2e-3 if layout == "per_head" else 1e-5
    ref = sum(w[i].unsqueeze(-1) * (parts[i][0].half().float() if layout == "per_head" else parts[i][0])
              for i in range(3))
    torch.testing.assert_close(acc, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(acc_lse, torch.logsumexp(lse_all, 0))
    assert acc[1, 0, 2].abs().max() == 0

"""The dequantize-and-attend prefill path (``prefill_attention``): equal to the reference attention."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import make_tiny_llama

import kvquant_hf
from kvquant_hf import attention as attn_mod
from kvquant_hf import quant
from kvquant_hf.attention import PackedKV, fused_lse_available, packed_attention_prefill, packed_attention_torch
from kvquant_hf.errors import KVQuantConfigError


def _packed(b, h, length, d, bits, slots, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, h, length, d, generator=g) * torch.linspace(0.5, 3.0, d)
    v = torch.randn(b, h, length, d, generator=g)
    lut = quant.normal_float_signposts(bits)
    lo, hi = quant.key_thresholds_from_sample(k, 0.02)
    pk = quant.quantize_keys(k, lut, lo, hi, slots, bits)
    pv = quant.quantize_values(v, lut, slots, bits)
    zero, scale = quant.key_zero_scale(lo, hi)
    pos = torch.arange(3, 3 + length, dtype=torch.int32)[None].expand(b, length).contiguous()
    return PackedKV(pk.codes, pk.out_val, pk.out_idx, pv.codes, pv.scale, pv.zero, pv.out_val, pv.out_idx, lut, lut,
                    zero, scale, pos, length, bits, bits, d)


@pytest.mark.parametrize("bits,group,sink,block", [(4, 1, 0, 64), (3, 2, 1, 100), (2, 4, 2, 1000)])
def test_equals_reference(bits, group, sink, block):
    b, h, d, length, lq = 2, 2, 32, 230, 24
    packed = _packed(b, h, length, d, bits, slots=1, seed=bits)
    g = torch.Generator().manual_seed(7)
    q = torch.randn(b, h * group, lq, d, generator=g)
    ek = torch.randn(b, h, sink + lq, d, generator=g)
    ev = torch.randn(b, h, sink + lq, d, generator=g)
    causal = torch.ones(lq, lq, dtype=torch.bool).tril().expand(b, lq, lq)
    mask = torch.cat([torch.ones(b, lq, sink, dtype=torch.bool), causal], -1)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    kw = {"scaling": d**-0.5, "inv_freq": inv_freq, "attention_scaling": 1.0}
    ref = packed_attention_torch(q, packed, ek, ev, mask, **kw)
    out = packed_attention_prefill(q, packed, ek, ev, mask, block_size=block, fused=False, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # the exact block alone (empty history) and the history alone (no exact tokens) too
    torch.testing.assert_close(packed_attention_prefill(q, None, ek, ev, mask, fused=False, **kw),
                               packed_attention_torch(q, None, ek, ev, mask, **kw), rtol=1e-5, atol=1e-5)
    empty = ek[:, :, :0]
    torch.testing.assert_close(packed_attention_prefill(q, packed, empty, empty, None, fused=False, **kw),
                               packed_attention_torch(q, packed, empty, empty, None, **kw), rtol=1e-5, atol=1e-5)


def test_exact_rows_are_processed_in_pieces(monkeypatch):
    monkeypatch.setattr(attn_mod, "_EXACT_ROWS", 5)
    test_equals_reference(4, 2, 1, 64)


def test_no_fused_kernel_without_cuda():
    assert fused_lse_available(torch.device("cpu")) is False


def _chunked_logits(model, ids, cache_config, chunk):
    cache = kvquant_hf.KVQuantCache(cache_config, model_config=model.config)
    out = []
    with torch.no_grad():
        for s in range(0, ids.shape[1], chunk):
            e = min(ids.shape[1], s + chunk)
            out.append(model(ids[:, s:e], cache=cache, position_ids=torch.arange(s, e)[None]).logits)
    return torch.cat(out, 1), cache


def test_cache_dequant_mode_equals_kernel_mode(monkeypatch):
    """Chunked prefill through the cache: ``prefill_attention="dequant"`` gives the reference path's logits, and
    it is really taken for the chunks after the first (and not for a 1-token decode step)."""
    model = make_tiny_llama()
    kvquant_hf.patch_model(model)
    ids = torch.randint(0, 128, (1, 90), generator=torch.Generator().manual_seed(3))
    calls = []
    real = attn_mod.packed_attention_prefill
    monkeypatch.setattr("kvquant_hf.routing.packed_attention_prefill",
                        lambda *a, **k: (calls.append(a[0].shape[2]), real(*a, **k))[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # (no recent window: with one, the first chunks' history would be read exactly, not packed)
        ref, _ = _chunked_logits(model, ids, {"bits": 3, "prefill_attention": "kernel", "recent_window": 0}, 32)
        assert calls == []
        got, cache = _chunked_logits(model, ids, {"bits": 3, "prefill_attention": "dequant", "recent_window": 0},
                                     32)
        n_layers = model.config.num_hidden_layers
        assert calls == [32] * n_layers + [26] * n_layers  # the first chunk has no history yet
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        calls.clear()
        with torch.no_grad():
            model(ids[:, :1], cache=cache, position_ids=torch.tensor([[90]]))
        assert calls == []  # decode steps keep the kernel


def test_left_padding_keeps_the_kernel(monkeypatch):
    model = make_tiny_llama()
    kvquant_hf.patch_model(model)
    calls = []
    monkeypatch.setattr("kvquant_hf.routing.packed_attention_prefill", lambda *a, **k: calls.append(1))
    ids = torch.randint(1, 128, (2, 40), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :5] = 0
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, cache_implementation="kvquant",
                       cache_config={"bits": 4, "prefill_attention": "dequant", "prefill_chunk_size": 16})
    assert calls == []  # a padded history is not seen in full by every row


def test_config_validation():
    assert kvquant_hf.KVQuantConfig(prefill_attention="kernel").prefill_attention == "kernel"
    with pytest.raises(KVQuantConfigError, match="prefill_attention"):
        kvquant_hf.KVQuantConfig(prefill_attention="flash")


def test_fused_op_self_check_accepts_a_correct_op_and_rejects_wrong_ones():
    """The check every fused attention op must pass before the prefill path uses it (run here with float32 math
    standing in for the CUDA kernels): output and log-sum-exp, with and without the causal mask."""
    from kvquant_hf.attention import attention_lse_math, check_lse_op

    def good(q, k, v, scale, causal=False):
        vis = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril() if causal else None
        return attention_lse_math(q, k, v, scale, vis)

    def ignores_causal(q, k, v, scale, causal=False):
        return attention_lse_math(q, k, v, scale)

    def lse_off_by_one(q, k, v, scale, causal=False):
        out, lse = good(q, k, v, scale, causal)
        return out, lse + 1

    def raises(q, k, v, scale, causal=False):
        raise RuntimeError("no kernel for this head size")

    cpu = torch.device("cpu")
    assert check_lse_op(good, cpu, torch.float32, head_dim=96)
    assert not check_lse_op(ignores_causal, cpu, torch.float32)
    assert not check_lse_op(lse_off_by_one, cpu, torch.float32)
    assert not check_lse_op(raises, cpu, torch.float32)

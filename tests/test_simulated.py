"""Simulated quantize-dequantize caches (kvquant_hf.simulated): semantics, masks, exactness, accounting."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny_llama

from kvquant_hf import quant
from kvquant_hf.errors import KVQuantConfigError
from kvquant_hf.layer_api import AttendInputs, RopeContext, apply_rope
from kvquant_hf.models import patch_model
from kvquant_hf.simulated import (
    MethodSpec,
    NuqLayerParams,
    build_simulated_cache,
    method_avg_bits,
    parse_method,
)

HEAD_DIM = 16
KV_HEADS = 2


def _params(bits: int, n_layers: int = 2, width: float = 0.25, kv_heads: int = KV_HEADS) -> list[NuqLayerParams]:
    """Fixed (calibration-like) per-channel thresholds so that results do not depend on call boundaries."""
    lut = quant.normal_float_signposts(bits)
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n_layers):
        center = 0.05 * torch.randn(kv_heads, HEAD_DIM, generator=g)
        out.append(NuqLayerParams(lut.clone(), lut.clone(), center - width, center + width))
    return out


def _logits(model, ids, cache=None, **kwargs):
    with torch.no_grad():
        if cache is None:
            return model(ids, **kwargs).logits
        return model(ids, cache=cache, **kwargs).logits


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kv_heads", [2, 4])
def test_fp16_equals_unpatched_model(attn, kv_heads):
    model = make_tiny_llama(num_key_value_heads=kv_heads)
    model.config._attn_implementation = attn
    ids = torch.randint(0, 128, (2, 37), generator=torch.Generator().manual_seed(0))
    ref = _logits(model, ids)
    patch_model(model)
    out = _logits(model, ids, build_simulated_cache(model, "fp16"))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_nuq_lossless_setting_equals_fp16(tiny_llama):
    """A sink covering the whole window stores every token exactly: the nuq path must reduce to fp16."""
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(2))
    ref = _logits(tiny_llama, ids)
    patch_model(tiny_llama)
    cache = build_simulated_cache(tiny_llama, "nuq2", nuq_params=_params(2), sink_tokens=64, outlier_slots=1)
    torch.testing.assert_close(_logits(tiny_llama, ids, cache), ref, rtol=1e-5, atol=1e-5)


def test_nuq_fine_quantization_close_to_fp16(tiny_llama):
    ids = torch.randint(0, 128, (1, 48), generator=torch.Generator().manual_seed(3))
    ref = _logits(tiny_llama, ids)
    patch_model(tiny_llama)
    w0 = {"recent_window": 0}  # (48 tokens: the default window would keep them all exact)
    out4 = _logits(tiny_llama, ids, build_simulated_cache(tiny_llama, "nuq4", nuq_params=_params(4, width=0.3), **w0))
    out2 = _logits(tiny_llama, ids, build_simulated_cache(tiny_llama, "nuq2", nuq_params=_params(2, width=0.3), **w0))
    err4, err2 = (out4 - ref).abs().max(), (out2 - ref).abs().max()
    assert 0 < err4 < err2
    assert err4 < 0.05


@pytest.mark.parametrize("method", ["fp16", "nuq4", "nuq3", "nuq2", "int4", "int2"])
@pytest.mark.parametrize("sink", [0, 1, 3])
def test_one_forward_equals_token_by_token(tiny_llama, method, sink):
    """The diagonal-exact window forward equals decoding token by token (and prefill + decode)."""
    patch_model(tiny_llama)
    ids = torch.randint(0, 128, (2, 33), generator=torch.Generator().manual_seed(4))
    bits = int(method[-1]) if method[-1].isdigit() else 4

    def cache():
        return build_simulated_cache(tiny_llama, method, nuq_params=_params(bits), sink_tokens=sink, outlier_slots=1)

    full = _logits(tiny_llama, ids, cache())
    c = cache()
    steps = [_logits(tiny_llama, ids[:, t : t + 1], c) for t in range(ids.shape[1])]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)
    c = cache()
    parts = [_logits(tiny_llama, ids[:, :5], c), _logits(tiny_llama, ids[:, 5:20], c)]
    parts += [_logits(tiny_llama, ids[:, t : t + 1], c) for t in range(20, ids.shape[1])]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-4)


def _naive_attend(q, k_rot, v, k_hat, v_hat, scaling):
    """Loop reference: query i attends to quantized j < i and to its own exact (k_i, v_i)."""
    b, hq, lq, d = q.shape
    g = hq // k_rot.shape[1]
    out = torch.zeros(b, lq, hq, d)
    for h in range(hq):
        kh = h // g
        for i in range(lq):
            keys = torch.cat([k_hat[:, kh, :i], k_rot[:, kh, i : i + 1]], 1)  # [B, i+1, D]
            vals = torch.cat([v_hat[:, kh, :i], v[:, kh, i : i + 1]], 1)
            p = torch.softmax((keys @ q[:, h, i, :, None]).squeeze(-1) * scaling, -1)
            out[:, i, h] = (p[:, :, None] * vals).sum(1)
    return out


def test_attend_matches_naive_loop_gqa():
    """Layer-level check of the one-shot formula (scores with diag replaced, P @ V_hat + diag(P) (v - v_hat))."""
    torch.manual_seed(5)
    b, hq, h, lq, d = 2, 4, 2, 11, HEAD_DIM
    spec = parse_method("int3")
    cache = build_simulated_cache(
        type("Cfg", (), {"num_hidden_layers": 1, "head_dim": d, "hidden_size": hq * d, "num_attention_heads": hq}),
        spec,
    )
    layer = cache.layers[0]
    q, k, v = torch.randn(b, hq, lq, d), torch.randn(b, h, lq, d), torch.randn(b, h, lq, d)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    pos = torch.arange(lq)[None].expand(b, lq)
    rope = RopeContext(*RopeContext(None, None, inv_freq).cos_sin(pos), inv_freq=inv_freq)
    inputs = AttendInputs(q, k, v, pos, rope, None, d**-0.5)
    out = layer.attend(inputs)
    k_rot = apply_rope(k, rope.cos, rope.sin)
    k_hat, v_hat = quant.fake_quant_int_per_token(k_rot, 3), quant.fake_quant_int_per_token(v, 3)
    torch.testing.assert_close(out, _naive_attend(q, k_rot, v, k_hat, v_hat, d**-0.5), rtol=1e-5, atol=1e-5)
    # stored history is the quantized form
    torch.testing.assert_close(layer.keys, k_hat)
    torch.testing.assert_close(layer.values, v_hat)
    assert cache.get_seq_length() == lq
    assert cache.get_mask_sizes(1, 0) == (lq + 1, 0)


def test_query_chunking_does_not_change_results(tiny_llama):
    patch_model(tiny_llama)
    ids = torch.randint(0, 128, (1, 50), generator=torch.Generator().manual_seed(6))
    a = _logits(tiny_llama, ids, build_simulated_cache(tiny_llama, "nuq3", nuq_params=_params(3)))
    b = _logits(tiny_llama, ids, build_simulated_cache(tiny_llama, "nuq3", nuq_params=_params(3), query_chunk=7))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_masks_none_bool_float_agree(attn, tiny_llama):
    """None (sdpa skip), 4D bool and 4D float masks of the same causal pattern give the same logits."""
    tiny_llama.config._attn_implementation = attn
    patch_model(tiny_llama)
    ids = torch.randint(0, 128, (2, 21), generator=torch.Generator().manual_seed(7))
    ref = _logits(tiny_llama, ids, build_simulated_cache(tiny_llama, "nuq4", nuq_params=_params(4)))
    causal = torch.tril(torch.ones(21, 21, dtype=torch.bool))[None, None].expand(2, 1, 21, 21)
    for mask in (causal, torch.zeros(2, 1, 21, 21).masked_fill(~causal, torch.finfo(torch.float32).min)):
        cache = build_simulated_cache(tiny_llama, "nuq4", nuq_params=_params(4))
        torch.testing.assert_close(_logits(tiny_llama, ids, cache, attention_mask=mask), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_left_padding_matches_unpadded_rows(attn, tiny_llama):
    """Padding is masked and the sink holds each row's first real tokens (RoPE is relative, keys pre-RoPE)."""
    tiny_llama.config._attn_implementation = attn
    patch_model(tiny_llama)
    g = torch.Generator().manual_seed(8)
    a, bb = torch.randint(3, 128, (1, 20), generator=g), torch.randint(3, 128, (1, 14), generator=g)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 6, dtype=torch.long), bb], 1)], 0)
    mask2d = torch.ones(2, 20, dtype=torch.long)
    mask2d[1, :6] = 0
    kw = {"nuq_params": _params(4), "sink_tokens": 2}
    out = _logits(tiny_llama, ids, build_simulated_cache(tiny_llama, "nuq4", **kw), attention_mask=mask2d)
    ref_a = _logits(tiny_llama, a, build_simulated_cache(tiny_llama, "nuq4", **kw))
    ref_b = _logits(tiny_llama, bb, build_simulated_cache(tiny_llama, "nuq4", **kw))
    torch.testing.assert_close(out[0:1], ref_a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[1:2, 6:], ref_b, rtol=1e-4, atol=1e-4)


def test_sink_keeps_first_tokens_exact(tiny_llama):
    patch_model(tiny_llama)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(9))
    cache = build_simulated_cache(tiny_llama, "nuq2", nuq_params=_params(2), sink_tokens=3)
    _logits(tiny_llama, ids, cache)
    exact = build_simulated_cache(tiny_llama, "fp16")
    _logits(tiny_llama, ids, exact)
    layer, ref = cache.layers[1], exact.layers[1]
    torch.testing.assert_close(layer.keys[:, :, :3], ref.keys[:, :, :3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.values[:, :, :3], ref.values[:, :, :3], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(layer.values[:, :, 3:], ref.values[:, :, 3:])


def test_nuq_stores_what_quant_functions_produce(tiny_llama):
    """The stored history is exactly quant.quantize/dequantize of the pre-RoPE keys and of the values."""
    patch_model(tiny_llama)
    params = _params(3)
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(10))
    fp = build_simulated_cache(tiny_llama, "fp16")
    _logits(tiny_llama, ids, fp)  # layer 0 inputs do not depend on the cache
    cache = build_simulated_cache(tiny_llama, "nuq3", nuq_params=params, sink_tokens=0, outlier_slots=1)
    _logits(tiny_llama, ids, cache)
    pos = torch.arange(10)[None]
    inv_freq = tiny_llama.model.rotary_emb.inv_freq
    # recover pre-RoPE keys of layer 0 by rotating back the exact post-RoPE keys
    k_rot = fp.layers[0].keys
    k_pre = RopeContext(None, None, inv_freq).cos_sin(pos)
    cos, sin = k_pre
    k = apply_rope(k_rot, cos, -sin)
    p = params[0]
    packed = quant.quantize_keys(k, p.key_lut, p.key_lower, p.key_upper, 1, 3)
    from kvquant_hf.attention import rope_rotate

    k_hat = rope_rotate(quant.dequantize_keys(packed, p.key_lut, p.key_lower, p.key_upper, 3, HEAD_DIM), pos,
                        inv_freq, 1.0)
    torch.testing.assert_close(cache.layers[0].keys, k_hat, rtol=1e-4, atol=1e-4)
    v = fp.layers[0].values
    v_hat = quant.dequantize_values(quant.quantize_values(v, p.value_lut, 1, 3), p.value_lut, 3, HEAD_DIM)
    torch.testing.assert_close(cache.layers[0].values, v_hat, rtol=1e-5, atol=1e-5)


def test_kivi_oneshot_groups_per_call(tiny_llama):
    patch_model(tiny_llama)
    ids = torch.randint(0, 128, (1, 64), generator=torch.Generator().manual_seed(11))
    fp = build_simulated_cache(tiny_llama, "fp16")
    _logits(tiny_llama, ids, fp)
    cache = build_simulated_cache(tiny_llama, "kivi2-oneshot")
    _logits(tiny_llama, ids, cache)
    torch.testing.assert_close(cache.layers[0].keys, quant.fake_quant_kivi_keys(fp.layers[0].keys, 2))
    torch.testing.assert_close(cache.layers[0].values, quant.fake_quant_kivi_values(fp.layers[0].values, 2))


def test_uncalibrated_nuq_runs(tiny_llama):
    patch_model(tiny_llama)
    ids = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(12))
    ref = _logits(tiny_llama, ids)
    out = _logits(tiny_llama, ids, build_simulated_cache(tiny_llama, "nuq4"))
    assert torch.isfinite(out).all() and (out - ref).abs().max() < 0.1


def test_parse_method_and_errors():
    assert parse_method("nuq3", outlier_slots=2, sink_tokens=4).outlier_slots == 2
    assert parse_method("int4", outlier_slots=2, sink_tokens=4).sink_tokens == 0  # baselines: no sink/outliers
    assert parse_method("FP16").bits is None
    for bad in ("nuq", "nuq5", "fp8", "int", "q4"):
        with pytest.raises(KVQuantConfigError):
            parse_method(bad)
    with pytest.raises(KVQuantConfigError):
        MethodSpec("nuq", 4, key_rope="mid")


def test_patched_model_needed(tiny_llama):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_llama.config).eval()
    with pytest.raises(KVQuantConfigError, match="patch_model"):
        _logits(model, torch.zeros(1, 4, dtype=torch.long), build_simulated_cache(model, "int4"))


def test_avg_bits():
    nuq4 = parse_method("nuq4", outlier_slots=1, sink_tokens=0, recent_window=0)
    # codes 4 + 4, value scale/zero 32 bits, a slot (fp16 + uint8 channel) each side, int32 position per token
    want = (4 * 64 + 24 + 4 * 64 + 32 + 24 + 32) / 128
    assert method_avg_bits(nuq4, 64) == pytest.approx(want) == pytest.approx(quant.nuq_avg_bits(4, 64, 1) + 0.25)
    with_sink = parse_method("nuq4", outlier_slots=1, sink_tokens=1, recent_window=0)
    assert method_avg_bits(with_sink, 64, 2048) == pytest.approx((want * 2047 + (3 * 64 * 16 + 32) / 128) / 2048)
    assert method_avg_bits(parse_method("int4"), 64) == pytest.approx(4.5)
    assert method_avg_bits(parse_method("kivi2-oneshot"), 64) == pytest.approx((2 + 1 + 2 + 0.5) / 2)
    assert method_avg_bits(parse_method("kivi2"), 64) == pytest.approx((2 + 1 + 2 + 1) / 2)  # long-sequence limit
    assert method_avg_bits(parse_method("fp16"), 64) == 16.0
    assert math.isclose(method_avg_bits(parse_method("nuq2", outlier_slots=0, recent_window=0), 128),
                        (2 + 2 + 32 / 128) / 2 + 32 / 256)


def test_quantize_one_side_only_keeps_the_other_exact(tiny_llama):
    """The keys-only / values-only diagnostics quantize exactly one side, like the full method does."""
    patch_model(tiny_llama)
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(11))
    fp = build_simulated_cache(tiny_llama, "fp16")
    _logits(tiny_llama, ids, fp)
    both = build_simulated_cache(tiny_llama, MethodSpec("nuq", 2, outlier_slots=1), nuq_params=_params(2))
    _logits(tiny_llama, ids, both)
    for side in ("keys", "values"):
        spec = MethodSpec("nuq", 2, outlier_slots=1, quantize=side)
        assert not spec.storable
        cache = build_simulated_cache(tiny_llama, spec, nuq_params=_params(2))
        _logits(tiny_llama, ids, cache)
        got, ref, full = cache.layers[0], fp.layers[0], both.layers[0]  # layer 0 inputs do not depend on the cache
        exact_side, quant_side = ("values", "keys") if side == "keys" else ("keys", "values")
        torch.testing.assert_close(getattr(got, exact_side), getattr(ref, exact_side), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(getattr(got, quant_side), getattr(full, quant_side), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(getattr(got, quant_side), getattr(ref, quant_side))
    with pytest.raises(KVQuantConfigError, match="quantize"):
        MethodSpec("nuq", 2, quantize="neither")
    with pytest.raises(KVQuantConfigError, match="nuq diagnostic"):
        MethodSpec("int", 2, quantize="keys")

"""KVQuantCache: lossless equivalence with the unpatched model, packed storage, attention semantics, padding,
beams, crop/reset (CPU, tiny models)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from cache_helpers import (
    HEAD_DIM,
    calibrated_layer_signposts,
    chunked_logits,
    filled_cache,
    forward,
    make_lossless,
    make_signposts,
    rope_for,
    synthetic_inputs,
)
from conftest import make_tiny_llama, make_tiny_mistral

import kvquant_hf
from kvquant_hf import quant
from kvquant_hf.cache import KVQuantCache, KVQuantLayer
from kvquant_hf.config import KVQuantConfig
from kvquant_hf.errors import KVQuantError, UnsupportedModelError
from kvquant_hf.generation import cache_kwarg_name
from kvquant_hf.layer_api import apply_rope
from kvquant_hf.models import patch_model


@pytest.fixture
def fp32_value_scales(monkeypatch):
    """Store per-token value scale/zero in float32 for float32 models (default fp16), so the lossless setting is exact."""
    original = quant.value_scale_dtype
    monkeypatch.setattr(quant, "value_scale_dtype", lambda dt: torch.float32 if dt == torch.float32 else original(dt))


# --------------------------------------------------------------------------------------------
# lossless: the cache reproduces the unpatched model exactly
# --------------------------------------------------------------------------------------------
@pytest.mark.compat
@pytest.mark.parametrize(
    "make, chunks",
    [
        (lambda: make_tiny_llama(num_key_value_heads=4), (9, 4)),  # MHA
        (lambda: make_tiny_llama(num_key_value_heads=2), (9, 4)),  # GQA
        (lambda: make_tiny_mistral(sliding_window=6), (9, 4)),  # window < prompt < sequence
        (lambda: make_tiny_llama(num_key_value_heads=2), ()),  # token by token from the first token
    ],
    ids=["llama-mha", "llama-gqa", "mistral-window6", "llama-token-by-token"],
)
def test_lossless_prefill_and_decode_match_unpatched_model(make, chunks, fp32_value_scales):
    model = make()
    factory, reference = make_lossless(model)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(ids).logits
    cache = factory()
    got = chunked_logits(model, ids, cache, chunks)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    stats = cache.memory_stats()
    assert stats["n_clipped"] == 0
    assert stats["seq_length"] == 24 and stats["sink_tokens"] == 2 and stats["quantized_tokens"] == 22


def test_lossless_setting_is_not_vacuous(fp32_value_scales):
    """The same model with a realistic 4-bit setting differs from the reference: the test above tests quantization."""
    model = make_tiny_llama()
    _factory, reference = make_lossless(model)
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(ids).logits
    lossy = KVQuantCache({"bits": 2, "outlier_slots": 0, "sink_tokens": 1, "recent_window": 0}, model_config=model.config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kvquant_hf.UncalibratedCacheWarning)
        got = chunked_logits(model, ids, lossy, (10,))
    assert (got[:, 10:] - expected[:, 10:]).abs().max() > 1e-3


@pytest.mark.compat
@pytest.mark.parametrize("attn", ["sdpa", "eager"])  # bool masks and additive float masks
@pytest.mark.parametrize("make", [make_tiny_llama, lambda: make_tiny_mistral(sliding_window=5)], ids=["llama", "mistral"])
def test_left_padded_batch_equals_each_prompt_alone_lossless(make, attn, fp32_value_scales):
    model = make()
    model.set_attn_implementation(attn)
    factory, _ = make_lossless(model)
    _check_padded_batch_equals_alone(model, factory)


def test_left_padded_batch_equals_each_prompt_alone_calibrated_lossy():
    """With calibrated (fixed) key thresholds every token is quantized independently of the batch, and the sink of
    each row is its first *real* token: a padded row equals its prompt alone even at 3 bits."""
    model = make_tiny_llama()
    sp = make_signposts(model, quant.normal_float_signposts(3), -0.8, 0.8, bits=3)
    patch_model(model)

    def factory():
        return KVQuantCache({"bits": 3, "outlier_fraction": 0.05, "sink_tokens": 2}, signposts=sp, model_config=model.config)

    _check_padded_batch_equals_alone(model, factory)


def _check_padded_batch_equals_alone(model, factory):
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 128, (n,), generator=gen) for n in (11, 6, 3)]
    steps = torch.randint(1, 128, (4,), generator=gen)
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    kw = cache_kwarg_name(model)
    batch_cache = factory()
    with torch.no_grad():
        position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
        batch_logits = [model(ids, attention_mask=mask, position_ids=position_ids, **{kw: batch_cache}).logits[:, -1]]
        for t in steps:
            mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=torch.long)], dim=1)
            pos = mask.sum(-1, keepdim=True) - 1
            step = t.expand(len(prompts), 1)
            batch_logits.append(model(step, attention_mask=mask, position_ids=pos, **{kw: batch_cache}).logits[:, -1])
    assert batch_cache.layers[0].has_hist_pad
    for i, p in enumerate(prompts):
        alone_cache = factory()
        with torch.no_grad():
            alone = [model(p[None], **{kw: alone_cache}).logits[:, -1]]
            for t in steps:
                alone.append(model(t.view(1, 1), **{kw: alone_cache}).logits[:, -1])
        for got, want in zip(batch_logits, alone):
            torch.testing.assert_close(got[i : i + 1], want, atol=2e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# storage: exactly the oracle's codes, appended without re-quantization, grown in blocks
# --------------------------------------------------------------------------------------------
def test_storage_matches_quant_oracle_and_grows_in_blocks():
    h, n = 2, 40
    cfg = KVQuantConfig(bits=3, recent_window=0, outlier_slots=2, sink_tokens=1, block_size=16)
    layer = KVQuantLayer(cfg, 0, calibrated_layer_signposts(h, 3), calibrated_layer_signposts(h, 3))
    full = synthetic_inputs(2, 4, h, n, 0)
    capacities = []
    for t in range(n):
        step = synthetic_inputs(2, 4, h, 1, t)
        step.key, step.value = full.key[:, :, t : t + 1], full.value[:, :, t : t + 1]
        layer.attend(step)
        capacities.append(layer.capacity)
    assert layer.get_seq_length() == n and layer.n_sink == 1 and layer.length == n - 1
    # capacity: whole blocks, grown geometrically (few reallocations), never per token
    assert set(capacities) == {0, 16, 32, 48}  # sink first, then 16 -> ceil16(1.5 * 16) -> ceil16(1.5 * 32)
    assert layer.capacity >= n - 1
    lut = quant.normal_float_signposts(3)
    lo, hi = torch.full((h, HEAD_DIM), -1.5), torch.full((h, HEAD_DIM), 1.5)
    pk = quant.quantize_keys(full.key[:, :, 1:], lut, lo, hi, 2, 3)
    pv = quant.quantize_values(full.value[:, :, 1:], lut, 2, 3)
    m = n - 1
    assert torch.equal(layer.k_codes[:, :, :m], pk.codes)
    assert torch.equal(layer.k_out_idx[:, :, :m], pk.out_idx)
    assert torch.equal(layer.k_out_val[:, :, :m], pk.out_val)
    assert torch.equal(layer.v_codes[:, :, :m], pv.codes)
    assert torch.equal(layer.v_scale[:, :, :m], pv.scale) and torch.equal(layer.v_zero[:, :, :m], pv.zero)
    assert torch.equal(layer.v_out_idx[:, :, :m], pv.out_idx)
    assert torch.equal(layer.positions[:, :m], torch.arange(1, n, dtype=torch.int32).expand(2, m))
    assert torch.equal(layer.sink_k[:, :, :1], full.key[:, :, :1])  # sink: exact and pre-RoPE
    assert layer.n_clipped == pk.n_clipped


def test_attend_matches_reference_attention_over_dequantized_history():
    """attend() == softmax attention over [sink exact | dequantized history | new exact], RoPE from positions."""
    h, hq = 2, 4
    cfg = KVQuantConfig(bits=4, recent_window=0, outlier_slots=1, sink_tokens=2, block_size=16)
    layer = KVQuantLayer(cfg, 0, calibrated_layer_signposts(h), calibrated_layer_signposts(h))
    layer.attend(synthetic_inputs(1, hq, h, 12, 0, seed=1))
    step = synthetic_inputs(1, hq, h, 3, 12, seed=2)
    got = layer.attend(copy.copy(step))  # [B, L, Hq, D]
    # reference: dense attention on explicit tensors
    k_hist, v_hist = layer.dequantized_history()
    k_hist, v_hist = k_hist[:, :, :10], v_hist[:, :, :10]  # the 3 new tokens were appended after attending
    pos_all = torch.arange(0, 15)[None]
    rope = rope_for(pos_all, step.rope.inv_freq)
    k_all = torch.cat([layer.sink_k[:, :, :2].float(), k_hist, step.key], dim=2)
    v_all = torch.cat([layer.sink_v[:, :, :2].float(), v_hist, step.value], dim=2)
    k_all = apply_rope(k_all, rope.cos, rope.sin).repeat_interleave(hq // h, dim=1)
    v_all = v_all.repeat_interleave(hq // h, dim=1)
    scores = step.query @ k_all.transpose(-1, -2) * HEAD_DIM**-0.5
    causal = torch.ones(3, 15, dtype=torch.bool).tril(diagonal=12)
    want = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1) @ v_all
    torch.testing.assert_close(got, want.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_sliding_window_masks_sink_and_history():
    h = 2
    cfg = KVQuantConfig(bits=4, recent_window=0, outlier_slots=1, sink_tokens=1, block_size=16)
    layer = KVQuantLayer(cfg, 0, calibrated_layer_signposts(h), calibrated_layer_signposts(h))
    layer.attend(synthetic_inputs(1, 4, h, 10, 0, window=4))
    step = synthetic_inputs(1, 4, h, 1, 10, window=4)
    got = layer.attend(copy.copy(step))
    # only tokens 7, 8, 9 (history) and the new token are visible; the sink (position 0) is outside the window
    k_hist, v_hist = layer.dequantized_history()
    rope = rope_for(torch.arange(7, 11)[None], step.rope.inv_freq)
    k = apply_rope(torch.cat([k_hist[:, :, 6:9], step.key], 2), rope.cos, rope.sin).repeat_interleave(2, 1)
    v = torch.cat([v_hist[:, :, 6:9], step.value], 2).repeat_interleave(2, 1)
    want = torch.softmax(step.query @ k.transpose(-1, -2) * HEAD_DIM**-0.5, -1) @ v
    torch.testing.assert_close(got, want.transpose(1, 2), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# transformers cache API: beams, crop, reset, batch ops
# --------------------------------------------------------------------------------------------
def _layer_state(layer):
    return {name: getattr(layer, name).clone() for name in layer.batch_tensors()}


def test_reorder_cache_selects_rows_of_every_tensor():
    model = patch_model(make_tiny_llama())
    cache, _ = filled_cache(model)
    before = [_layer_state(layer) for layer in cache.layers]
    beam_idx = torch.tensor([2, 0, 0])
    cache.reorder_cache(beam_idx)
    for layer, state in zip(cache.layers, before):
        assert layer.batch_size == 3
        for name, tensor in state.items():
            assert torch.equal(getattr(layer, name), tensor[beam_idx]), name


def test_reordered_cache_continues_like_a_cache_of_the_reordered_prompts():
    model = patch_model(make_tiny_llama())
    cache, ids = filled_cache(model)
    beam_idx = torch.tensor([1, 1, 2])
    cache.reorder_cache(beam_idx)
    direct = KVQuantCache(cache.config, signposts=cache.key_signposts, model_config=model.config)
    nxt = torch.randint(1, 128, (3, 1), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        forward(model, ids[beam_idx], direct)
        a = forward(model, nxt, cache)
        b = forward(model, nxt, direct)
    torch.testing.assert_close(a, b)


def test_batch_repeat_interleave_and_select():
    model = patch_model(make_tiny_llama())
    cache, _ = filled_cache(model, batch=2)
    state = _layer_state(cache.layers[1])
    cache.batch_repeat_interleave(3)
    assert cache.layers[1].batch_size == 6
    assert torch.equal(cache.layers[1].k_codes, state["k_codes"].repeat_interleave(3, 0))
    cache.batch_select_indices(torch.tensor([0, 5]))
    assert torch.equal(cache.layers[1].k_codes, state["k_codes"])
    assert torch.equal(cache.layers[1].sink_k, state["sink_k"])


def test_crop_removes_tokens_from_the_end_and_decoding_resumes_identically():
    model = patch_model(make_tiny_llama())
    cache, _ = filled_cache(model, batch=2, n=10)
    extra = torch.randint(1, 128, (2, 4), generator=torch.Generator().manual_seed(7))
    first = chunked_logits(model, extra, cache, ())
    assert cache.get_seq_length() == 14
    cache.crop(-4)
    assert cache.get_seq_length() == 10 and all(layer.length == 9 for layer in cache.layers)
    again = chunked_logits(model, extra, cache, ())
    torch.testing.assert_close(again, first)
    cache.crop(0)  # transformers' "no-op / minimal size" call
    assert cache.get_seq_length() == 14
    cache.crop(12)  # legacy form: keep the first 12 tokens
    assert cache.get_seq_length() == 12
    cache.crop(1)  # into the sink boundary: only the sink token stays
    assert cache.get_seq_length() == 1 and cache.layers[0].length == 0 and cache.layers[0].n_sink == 1
    cache.crop(-5)
    assert cache.get_seq_length() == 0


def test_reset_keeps_allocation_and_reuse_gives_identical_results():
    model = patch_model(make_tiny_llama())
    cache = KVQuantCache({"bits": 4, "block_size": 16}, model_config=model.config)  # uncalibrated
    ids = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kvquant_hf.UncalibratedCacheWarning)
        first = chunked_logits(model, ids, cache, (8,))
        ptr, cap = cache.layers[0].k_codes.data_ptr(), cache.layers[0].capacity
        cache.reset()
        assert cache.get_seq_length() == 0 and cache.get_memory_footprint() == 0
        assert cache.layers[0].k_lower is None  # uncalibrated key ranges are re-estimated from the next prompt
        second = chunked_logits(model, ids, cache, (8,))
    assert cache.layers[0].k_codes.data_ptr() == ptr and cache.layers[0].capacity == cap
    torch.testing.assert_close(second, first)


def test_cache_api_basics():
    model = patch_model(make_tiny_llama())
    cache, _ = filled_cache(model, batch=2, n=9)
    assert cache.get_seq_length() == 9 and cache.get_seq_length(1) == 9
    assert cache.get_mask_sizes(3, 0) == (12, 0)
    assert cache.get_max_cache_shape() == -1 and cache.get_max_length() == -1
    assert cache.is_compileable is False
    assert len(cache) == model.config.num_hidden_layers
    with pytest.raises(UnsupportedModelError, match="patch_model"):
        cache.update(torch.zeros(2, 2, 1, 16), torch.zeros(2, 2, 1, 16), 0)
    with pytest.raises(UnsupportedModelError, match="patch_model"):
        cache.layers[0].update(torch.zeros(2, 2, 1, 16), torch.zeros(2, 2, 1, 16))
    with pytest.raises(KVQuantError, match="reset"):
        forward(model, torch.ones(3, 1, dtype=torch.long), cache)  # batch size changed mid-sequence


def test_unpatched_model_with_kvquant_cache_raises_a_clear_error():
    model = make_tiny_llama()
    cache = KVQuantCache(model_config=model.config)
    with pytest.raises(UnsupportedModelError, match="patch_model"):
        forward(model, torch.ones(1, 4, dtype=torch.long), cache)


def test_lazy_layers_without_model_config():
    model = patch_model(make_tiny_llama())
    cache = KVQuantCache(bits=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kvquant_hf.UncalibratedCacheWarning)
        forward(model, torch.ones(1, 6, dtype=torch.long), cache)
    assert len(cache.layers) == model.config.num_hidden_layers and cache.get_seq_length() == 6

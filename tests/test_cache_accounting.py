"""KVQuantCache accounting (bytes, bits, clipped outliers), uncalibrated mode, config errors and the sink's
rotated keys (CPU, tiny models)."""

from __future__ import annotations

import warnings

import pytest
import torch
from cache_helpers import (
    HEAD_DIM,
    calibrated_layer_signposts,
    chunked_logits,
    filled_cache,
    make_signposts,
    rope_for,
    synthetic_inputs,
)
from conftest import make_tiny_llama

import kvquant_hf
from kvquant_hf import quant, routing
from kvquant_hf.attention import packed_attention_torch
from kvquant_hf.cache import KVQuantCache, KVQuantLayer
from kvquant_hf.config import KVQuantConfig
from kvquant_hf.errors import KVQuantConfigError
from kvquant_hf.layer_api import AttendInputs, apply_rope
from kvquant_hf.layer_storage import HISTORY_TENSORS
from kvquant_hf.models import patch_model


# --------------------------------------------------------------------------------------------
# accounting
# --------------------------------------------------------------------------------------------
def test_memory_footprint_exact_bytes_and_avg_bits():
    # B=2, H=2, D=16, 4-bit keys/values, 1 slot, fp16 model, sink 1, block 16
    b, h, n = 2, 2, 11
    cfg = KVQuantConfig(bits=4, recent_window=0, outlier_slots=1, sink_tokens=1, block_size=16)
    layer = KVQuantLayer(cfg, 0, calibrated_layer_signposts(h), calibrated_layer_signposts(h))
    layer.attend(synthetic_inputs(b, 4, h, n, 0, dtype=torch.float16))
    cache = KVQuantCache(cfg, num_layers=1)
    cache.layers[0] = layer
    # per history token and row: H * (K codes 8 + K slot 2+1 + V codes 8 + V scale/zero 2*2 + V slot 2+1) + position 4
    per_hist = h * (8 + 3 + 8 + 4 + 3) + 4
    per_sink = 3 * h * HEAD_DIM * 2 + 4  # exact K (pre-RoPE and rotated) and V (fp16) + position
    assert layer.bytes_per_history_token() == per_hist == 56
    assert cache.get_memory_footprint() == b * (10 * per_hist + 1 * per_sink) == 2 * (560 + 196)
    assert cache.get_memory_footprint(include_spare=True) == b * (16 * per_hist + 1 * per_sink)
    stats = cache.memory_stats()
    assert stats["avg_bits_per_element"] == pytest.approx(quant.nuq_avg_bits(4, HEAD_DIM, 1))  # 5.625 at D=16
    assert stats["key_bits_per_element"] == pytest.approx(4 + 3 * 8 / 16)
    assert stats["value_bits_per_element"] == pytest.approx(4 + 4 * 8 / 16 + 3 * 8 / 16)
    assert stats["fp16_bytes"] == 2 * 2 * b * h * n * HEAD_DIM
    assert stats["avg_bits_per_element_all"] == pytest.approx(8 * stats["bytes"] / (2 * b * h * n * HEAD_DIM))
    assert stats["seq_length"] == n and stats["quantized_tokens"] == 10 and stats["batch_size"] == b
    assert 0 <= stats["key_outlier_slot_fill"] <= 1


def test_memory_footprint_counts_real_tensor_bytes():
    model = patch_model(make_tiny_llama())
    cache, _ = filled_cache(model, batch=2, n=13)
    total = 0
    for layer in cache.layers:
        for name in layer.batch_tensors():
            if name in ("sink_valid", "hist_start"):
                continue
            t = getattr(layer, name)
            if name in HISTORY_TENSORS:
                t = t[:, : layer.length] if name == "positions" else t[:, :, : layer.length]
            else:
                t = t[:, : layer.n_exact] if t.dim() == 2 else t[:, :, : layer.n_exact]  # sink and window
            total += t.numel() * t.element_size()
    assert cache.get_memory_footprint() == total


def test_n_clipped_counts_key_outliers_beyond_slots():
    h = 2
    cfg = KVQuantConfig(bits=4, outlier_slots=1, sink_tokens=0, block_size=16)
    layer = KVQuantLayer(cfg, 0, calibrated_layer_signposts(h, lower=-0.1, upper=0.1), calibrated_layer_signposts(h))
    inputs = synthetic_inputs(1, 4, h, 5, 0)
    expected = quant.quantize_keys(inputs.key, quant.normal_float_signposts(4), torch.full((h, 16), -0.1),
                                   torch.full((h, 16), 0.1), 1, 4).n_clipped
    layer.attend(inputs)
    assert layer.n_clipped == expected > 0


# --------------------------------------------------------------------------------------------
# uncalibrated mode and config errors
# --------------------------------------------------------------------------------------------
def test_uncalibrated_thresholds_come_from_the_prompt_without_sink_and_padding():
    h = 2
    cfg = KVQuantConfig(bits=4, outlier_fraction=0.0, sink_tokens=1, block_size=16)
    layer = KVQuantLayer(cfg)
    inputs = synthetic_inputs(2, 4, h, 20, 0)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1, :3] = False  # row 1: 3 padding tokens
    inputs.key[1, :, :3] = 100.0  # padding keys must not widen the ranges
    inputs.key[:, :, 0] = -100.0  # nor the sink of row 0 (row 1's sink is its token 3)
    inputs.attention_mask = (mask[:, None, :] & torch.ones(20, 20, dtype=torch.bool).tril())[:, None]
    with pytest.warns(kvquant_hf.UncalibratedCacheWarning, match="Calibrating"):
        layer.attend(inputs)
    keep = torch.ones(2, 20, dtype=torch.bool)
    keep[0, 0] = False
    keep[1, :4] = False
    sample = inputs.key.permute(0, 2, 1, 3)[keep].permute(1, 0, 2)
    torch.testing.assert_close(layer.k_lower, sample.amin(1))
    torch.testing.assert_close(layer.k_upper, sample.amax(1))
    assert torch.equal(layer.hist_start, torch.tensor([0, 3]))


@pytest.mark.parametrize("prompt", [8, 40], ids=["short-prompt", "long-prompt"])
def test_uncalibrated_cache_warns_exactly_once_per_cache(caplog, prompt):
    """One UncalibratedCacheWarning per cache over all its layers, prompts and resets, and no log lines (a short
    first prompt is said in that one warning)."""
    model = patch_model(make_tiny_llama())
    assert model.config.num_hidden_layers > 1
    per_cache = []
    with warnings.catch_warnings(record=True) as caught, caplog.at_level("DEBUG", logger="kvquant_hf"):
        warnings.simplefilter("always")
        for _ in range(2):
            seen = len(caught)
            cache = KVQuantCache(model_config=model.config)
            chunked_logits(model, torch.ones(1, prompt, dtype=torch.long), cache, (prompt,))
            cache.reset()
            chunked_logits(model, torch.ones(1, prompt, dtype=torch.long), cache, (prompt,))
            per_cache.append([w for w in caught[seen:] if issubclass(w.category, kvquant_hf.UncalibratedCacheWarning)])
    assert [len(hits) for hits in per_cache] == [1, 1]
    assert len(caught) == 2
    assert [r for r in caplog.records if r.levelno >= 30] == []
    message = str(per_cache[0][0].message)
    assert "Calibrating" in message
    assert ("from only 8 tokens" in message) == (prompt == 8)  # fewer than UNCALIBRATED_MIN_SAMPLE: said once


def test_config_errors_are_clear():
    with pytest.raises(KVQuantConfigError, match="allowed keys"):
        KVQuantCache({"bits": 4, "nbits": 3})
    with pytest.raises(KVQuantConfigError, match="bits=5"):
        KVQuantCache(bits=5)
    with pytest.raises(KVQuantConfigError, match="qnorm"):
        KVQuantCache(qnorm=True)
    layer = KVQuantLayer(KVQuantConfig(outlier_slots=16))
    with pytest.raises(KVQuantConfigError, match="fewer than head_dim"):
        layer.attend(synthetic_inputs(1, 4, 2, 2, 0))


def test_mismatched_signposts_are_rejected():
    model = make_tiny_llama()
    other = make_tiny_llama(num_hidden_layers=3)
    sp = make_signposts(other, quant.normal_float_signposts(4), -1, 1, bits=4)
    with pytest.raises(kvquant_hf.SignpostError, match="layers"):
        KVQuantCache(bits=4, signposts=sp, model_config=model.config)
    with pytest.raises(KVQuantConfigError, match="3 bits|bits=3"):
        KVQuantCache(bits=3, signposts=make_signposts(model, quant.normal_float_signposts(4), -1, 1, bits=4))


def test_packed_attention_reference_is_what_the_layer_calls(monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return packed_attention_torch(*args, **kwargs)

    monkeypatch.setattr(routing, "packed_attention_torch", spy)
    layer = KVQuantLayer(KVQuantConfig(sink_tokens=1), 0, calibrated_layer_signposts(2), calibrated_layer_signposts(2))
    layer.attend(synthetic_inputs(1, 4, 2, 6, 0))
    layer.attend(synthetic_inputs(1, 4, 2, 1, 6, window=3))
    assert len(calls) == 2 and calls[1]["window"] == 3 and calls[1]["q_positions"].tolist() == [[6]]


def _decode_inputs(prefill, step_seed, inv_freq):
    """One new token after ``prefill`` (an AttendInputs) rotated with ``inv_freq`` (a tensor object of our choice)."""
    b, _, n, _ = prefill.key.shape
    g = torch.Generator().manual_seed(step_seed)
    hq, h = prefill.query.shape[1], prefill.key.shape[1]
    positions = torch.full((b, 1), n)
    rope = rope_for(positions, inv_freq)
    q = apply_rope(torch.randn(b, hq, 1, HEAD_DIM, generator=g), rope.cos, rope.sin)
    k = torch.randn(b, h, 1, HEAD_DIM, generator=g) * 2
    v = torch.randn(b, h, 1, HEAD_DIM, generator=g)
    return AttendInputs(q, k, v, positions, rope, None, HEAD_DIM**-0.5, None)


def test_sink_keys_are_rotated_once_and_again_when_the_rope_changes(monkeypatch):
    cfg = KVQuantConfig(bits=4, recent_window=0, sink_tokens=2, block_size=16)
    layer = KVQuantLayer(cfg, 0, calibrated_layer_signposts(2), calibrated_layer_signposts(2))
    pre = synthetic_inputs(2, 4, 2, 7, 0)
    layer.attend(pre)
    inv_freq = pre.rope.inv_freq
    # rotated when the sink filled, exactly as the exact block rotated it before (model dtype, stored positions)
    cos, sin = pre.rope.cos_sin(layer.sink_positions[:, :2])
    assert torch.equal(layer.sink_k_rot[:, :, :2], apply_rope(layer.sink_k[:, :, :2], cos, sin))
    calls = []
    orig = layer.rotate_sink
    monkeypatch.setattr(layer, "rotate_sink", lambda rope, sl: (calls.append(sl), orig(rope, sl)))
    fresh = KVQuantLayer(cfg, 0, calibrated_layer_signposts(2), calibrated_layer_signposts(2))
    fresh.attend(pre)
    step = _decode_inputs(pre, 1, inv_freq)
    out = layer.attend(step)
    assert calls == []  # the same RoPE (inv_freq object): no rotation in the decode step
    fresh.sink_rope = None  # forces the rotation: same result
    torch.testing.assert_close(out, fresh.attend(step), rtol=0, atol=0)
    # a new inv_freq object (e.g. dynamic RoPE scaling): the sink is rotated again with it
    scaled = inv_freq * 0.5
    step2 = _decode_inputs(pre, 2, scaled)
    layer.attend(step2)
    assert calls == [slice(0, 2)]
    cos, sin = step2.rope.cos_sin(layer.sink_positions[:, :2])
    assert torch.equal(layer.sink_k_rot[:, :, :2], apply_rope(layer.sink_k[:, :, :2], cos, sin))
    # batch operations keep the rotated copy row-aligned with the sink
    layer.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(layer.sink_k_rot[:, :, :2], apply_rope(layer.sink_k[:, :, :2], cos[[1, 0]], sin[[1, 0]]))

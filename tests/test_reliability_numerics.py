"""Reliability, numerics: NaN/Inf never spreads through the cache (error and zero policies, rollback of the other
layers and of earlier prefill chunks, the CUDA-graph decoder's rule), outlier slots that run out, edge values
through quant.py and the cache, reuse after errors. CPU, tiny random models."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest
import torch
from cache_helpers import HEAD_DIM, calibrated_layer_signposts, forward, synthetic_inputs
from conftest import make_tiny_llama, make_tiny_mistral
from reliability_helpers import PROMPT, cache_kwargs, gen, setup_model, small_layer
from test_signposts import make_signposts as random_signposts

from kvquant_hf import quant
from kvquant_hf.cache import KVQuantCache, KVQuantLayer
from kvquant_hf.config import KVQuantConfig
from kvquant_hf.errors import CacheMismatchError, KVQuantConfigError, KVQuantError, KVQuantNumericalError, SignpostError
from kvquant_hf.layer_storage import HISTORY_TENSORS
from kvquant_hf.models import patch_model
from kvquant_hf.signposts import METADATA_FILE, layer_filename, save_signposts, sha256_file

pytestmark = pytest.mark.filterwarnings("ignore::kvquant_hf.UncalibratedCacheWarning")


# --------------------------------------------------------------------------------------------
# 2. NaN / Inf in new keys or values
# --------------------------------------------------------------------------------------------
def _storage(layer):
    """The valid part of a layer's storage (history [:length], sink [:n_sink]) and its lengths."""
    out = {"length": layer.length, "n_sink": layer.n_sink}
    for n in HISTORY_TENSORS:
        t = getattr(layer, n)
        out[n] = (t[:, : layer.length] if n == "positions" else t[:, :, : layer.length]).clone()
    for n in ("sink_k", "sink_v", "sink_positions", "sink_valid"):
        t = getattr(layer, n)
        out[n] = (t[:, : layer.n_sink] if t.dim() == 2 else t[:, :, : layer.n_sink]).clone()
    return out


def _same_storage(a, b):
    assert a.keys() == b.keys()
    for n in a:
        if isinstance(a[n], torch.Tensor):
            assert torch.equal(a[n], b[n]), n
        else:
            assert a[n] == b[n], n


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["key", "value"])
def test_nonfinite_error_names_layer_and_position_and_stores_nothing(bad, where):
    layer = small_layer()
    layer.attend(synthetic_inputs(2, 4, 2, 6, 0))
    before = _storage(layer)
    inputs = synthetic_inputs(2, 4, 2, 3, 6, seed=1)
    getattr(inputs, where)[1, 0, 2, 5] = bad
    with pytest.raises(KVQuantNumericalError, match=rf"layer 0: NaN or Inf in the new {where}s of batch row\(s\) "
                                                    r"\[1\] at position\(s\) \[8\].*nonfinite") as info:
        layer.attend(inputs)
    assert info.value.layer_idx == 0 and info.value.rows == [1] and info.value.positions == [8]
    assert isinstance(info.value, KVQuantError) and isinstance(info.value, FloatingPointError)
    _same_storage(_storage(layer), before)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_zero_contains_the_token(bad):
    """Policy "zero": the bad token is stored (and attended) as zeros; every other token, the per-token value
    scale/zero and the per-channel key state are exactly what a clean run with that token zeroed gives."""
    clean = small_layer(nonfinite="zero")
    dirty = small_layer(nonfinite="zero")
    inputs = synthetic_inputs(2, 4, 2, 7, 0)
    dirty_in = synthetic_inputs(2, 4, 2, 7, 0)
    dirty_in.key[0, 1, 4, 3] = bad
    dirty_in.value[1, 0, 2, :] = bad
    for t, row in ((4, 0), (2, 1)):
        inputs.key[row, :, t] = 0
        inputs.value[row, :, t] = 0
    out_clean = clean.attend(inputs)
    out_dirty = dirty.attend(dirty_in)
    assert torch.isfinite(out_dirty).all()
    torch.testing.assert_close(out_dirty, out_clean, rtol=0, atol=0)
    _same_storage(_storage(dirty), _storage(clean))
    for name in ("v_scale", "v_zero", "k_out_val"):
        assert torch.isfinite(getattr(dirty, name)[:, :, : dirty.length].float()).all()
    assert dirty.n_nonfinite == 2 and clean.n_nonfinite == 0
    # decoding continues finite
    step = synthetic_inputs(2, 4, 2, 1, 7, seed=3)
    assert torch.isfinite(dirty.attend(step)).all()
    dirty.reset()
    assert dirty.n_nonfinite == 0


def test_nonfinite_zero_keeps_uncalibrated_key_ranges_finite():
    layer = KVQuantLayer(KVQuantConfig(bits=4, sink_tokens=1, nonfinite="zero"))
    inputs = synthetic_inputs(1, 4, 2, 20, 0)
    inputs.key[0, :, 7] = float("nan")
    inputs.key[0, 0, 9, 2] = float("inf")
    layer.attend(inputs)
    for name in ("k_lower", "k_upper", "k_zero", "k_scale"):
        assert torch.isfinite(getattr(layer, name)).all(), name
    k, v = layer.dequantized_history()
    assert torch.isfinite(k).all() and torch.isfinite(v).all()


def _poison(model, layer_idx: int, call: int, position: int | None = None):
    """Make k_proj of `layer_idx` emit NaN on its `call`-th forward (0-based), at `position` (default last token)."""
    state = {"n": 0}

    def hook(_module, _inp, out):
        n = state["n"]
        state["n"] += 1
        if n == call:
            out = out.clone()
            out[:, -1 if position is None else position] = float("nan")
            return out
        return None

    return model.model.layers[layer_idx].self_attn.k_proj.register_forward_hook(hook)


def test_nonfinite_in_a_later_layer_rolls_back_the_earlier_layers():
    model = patch_model(make_tiny_llama())
    ref_model = patch_model(make_tiny_llama())
    cache = KVQuantCache({"bits": 4}, model_config=model.config)
    ref = KVQuantCache({"bits": 4}, model_config=model.config)
    ids = torch.randint(1, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    forward(model, ids[:, :8], cache)
    forward(ref_model, ids[:, :8], ref)
    handle = _poison(model, layer_idx=1, call=0)  # layer 0 stores the step, layer 1 sees NaN
    with pytest.raises(KVQuantNumericalError, match=r"layer 1: .* position\(s\) \[8\]"):
        forward(model, ids[:, 8:9], cache)
    handle.remove()
    assert [layer.get_seq_length() for layer in cache.layers] == [8, 8]
    _same_storage(_storage(cache.layers[0]), _storage(ref.layers[0]))
    # the sequence continues exactly as if the failed call never happened
    torch.testing.assert_close(forward(model, ids[:, 8:], cache), forward(ref_model, ids[:, 8:], ref), rtol=0, atol=0)


def test_nonfinite_in_the_prompt_rolls_back_to_an_empty_cache():
    model = patch_model(make_tiny_llama())
    cache = KVQuantCache({"bits": 4}, model_config=model.config)
    handle = _poison(model, layer_idx=1, call=0, position=3)
    with pytest.raises(KVQuantNumericalError, match=r"layer 1: .* position\(s\) \[3\]"):
        forward(model, PROMPT, cache)
    handle.remove()
    assert [layer.get_seq_length() for layer in cache.layers] == [0, 0]
    assert cache.layers[0].k_lower is None  # uncalibrated ranges are taken again from the next prompt
    fresh = KVQuantCache({"bits": 4}, model_config=model.config)
    torch.testing.assert_close(forward(model, PROMPT, cache), forward(model, PROMPT, fresh), rtol=0, atol=0)


def test_generate_after_a_numerical_error_equals_a_clean_run():
    model = setup_model(make_tiny_llama())
    expected = gen(model, 8, cache_implementation="kvquant")
    handle = _poison(model, layer_idx=0, call=3)  # the third decode step
    with pytest.raises(KVQuantNumericalError, match="layer 0"):
        gen(model, 8, cache_implementation="kvquant")
    handle.remove()
    assert torch.equal(gen(model, 8, cache_implementation="kvquant"), expected)
    # the same with a user cache object: it keeps the prompt and 2 decoded tokens, every layer alike
    cache = KVQuantCache({"bits": 4}, model_config=model.config)
    handle = _poison(model, layer_idx=1, call=3)
    with pytest.raises(KVQuantNumericalError, match="layer 1"):
        gen(model, 8, **cache_kwargs(model, cache))
    handle.remove()
    assert [layer.get_seq_length() for layer in cache.layers] == [PROMPT.shape[1] + 2] * 2
    cache.reset()
    assert torch.equal(gen(model, 8, **cache_kwargs(model, cache)), expected)


def test_generate_with_nonfinite_zero_keeps_going_and_counts():
    model = setup_model(make_tiny_llama())
    handle = _poison(model, layer_idx=0, call=0, position=4)  # one prompt token's key
    out = model.generate(PROMPT, max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                         output_scores=True, cache_implementation="kvquant", cache_config={"nonfinite": "zero"})
    handle.remove()
    cache = out.past_key_values if getattr(out, "cache", None) is None else out.cache
    assert out.sequences.shape[1] == PROMPT.shape[1] + 6
    assert all(torch.isfinite(s).all() for s in out.scores)
    assert cache.memory_stats()["n_nonfinite"] == 1
    for layer in cache.layers:
        assert torch.isfinite(layer.v_scale[:, :, : layer.length].float()).all()
        assert torch.isfinite(layer.k_scale).all()


# --------------------------------------------------------------------------------------------
# 2. outlier slots that run out; edge values through quant.py and through the cache
# --------------------------------------------------------------------------------------------
def test_outlier_slots_running_out_clip_and_count_without_writing_out_of_bounds():
    h = 2
    layer = KVQuantLayer(KVQuantConfig(bits=4, outlier_slots=2, sink_tokens=0, block_size=16), 0,
                         calibrated_layer_signposts(h, lower=-0.1, upper=0.1), calibrated_layer_signposts(h))
    inputs = synthetic_inputs(1, 4, h, 16, 0)  # capacity exactly 16: fills the first block
    layer.attend(inputs)
    assert layer.capacity == 16 and layer.k_out_idx.shape[-1] == 2
    n_out = int((inputs.key.abs() > 0.1).sum())
    assert layer.n_clipped == n_out - 2 * h * 16  # every token has > 2 outliers: 2 kept, the rest clipped
    k, _ = layer.dequantized_history()
    assert (k.abs() <= inputs.key.abs().amax() + 1e-6).all()
    kept = torch.gather(inputs.key, -1, layer.k_out_idx[:, :, :16].long())
    assert torch.equal(torch.gather(k, -1, layer.k_out_idx[:, :, :16].long()), kept)  # slots exact
    clipped = torch.ones_like(k, dtype=torch.bool).scatter(-1, layer.k_out_idx[:, :, :16].long(), False)
    assert (k[clipped].abs() <= 0.1 + 1e-6).all()  # the others at most the threshold
    cache = KVQuantCache(bits=4, num_layers=1)
    cache.layers[0] = layer
    assert cache.memory_stats()["n_clipped"] == layer.n_clipped


EDGE_VALUES = {
    "all_equal": lambda g: torch.full((2, 2, 5, 64), 3.25),
    "all_zero": lambda g: torch.zeros(2, 2, 5, 64),
    "neg_zero": lambda g: torch.full((2, 2, 5, 64), -0.0),
    "fp16_max": lambda g: (torch.randn(2, 2, 5, 64, generator=g) * 30000).clamp(-65504, 65504).index_fill(
        -1, torch.tensor([0, 1]), 65504.0).index_fill(-1, torch.tensor([2]), -65504.0),
    "tiny": lambda g: torch.randn(2, 2, 5, 64, generator=g) * 1e-6,
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("name", list(EDGE_VALUES))
def test_edge_values_round_trip_through_quant(name, dtype):
    g = torch.Generator().manual_seed(0)
    x = EDGE_VALUES[name](g).to(dtype)
    for bits in (2, 3, 4):
        lut = quant.normal_float_signposts(bits)
        half_gap = float((lut[1:] - lut[:-1]).max()) / 2
        pv = quant.quantize_values(x, lut, 1, bits)
        vd = quant.dequantize_values(pv, lut, bits, 64)
        assert torch.isfinite(pv.scale).all() and torch.isfinite(pv.zero).all()
        scale = pv.scale.float().clamp_min(quant.MIN_SCALE).unsqueeze(-1)
        bound = scale * half_gap * 1.01 + x.float().abs() * 2e-2 + 1e-6  # + rounding of zero to the scale dtype
        assert ((vd - x.float()).abs() <= bound).all(), (name, bits)
        # keys: thresholds from the same data
        lo, hi = quant.key_thresholds_from_sample(x, 0.0)
        pk = quant.quantize_keys(x, lut, lo, hi, 1, bits)
        kd = quant.dequantize_keys(pk, lut, lo, hi, bits, 64)
        _, kscale = quant.key_zero_scale(lo, hi)
        assert torch.isfinite(kd).all() and pk.n_clipped == 0
        assert ((kd - x.float()).abs() <= kscale[None, :, None, :] * half_gap * 1.01 + 1e-6).all(), (name, bits)


def test_huge_float32_values_saturate_instead_of_overflowing():
    lut = quant.normal_float_signposts(4)
    for mag in (1e6, 3e38):
        v = (torch.linspace(-1, 1, 64) * mag).reshape(1, 1, 1, 64)
        assert torch.isfinite(v).all()
        pv = quant.quantize_values(v, lut, 1, 4)
        assert pv.scale.dtype == torch.float16 and float(pv.scale) == 65504.0  # saturated, not inf
        vd = quant.dequantize_values(pv, lut, 4, 64)
        assert torch.isfinite(vd).all()
        lo, hi = torch.full((1, 64), -mag), torch.full((1, 64), mag)
        _, scale = quant.key_zero_scale(lo, hi)
        assert torch.isfinite(scale).all() and float(scale[0, 0]) == pytest.approx(mag)
        kd = quant.dequantize_keys(quant.quantize_keys(v, lut, lo, hi, 1, 4), lut, lo, hi, 4, 64)
        assert torch.isfinite(kd).all()


@pytest.mark.parametrize("name", list(EDGE_VALUES))
def test_edge_values_through_the_cache(name):
    """Keys and values of an edge kind go through the layer (uncalibrated: ranges from the same prompt) and come
    back within the signpost spacing; the attention output stays finite."""
    g = torch.Generator().manual_seed(1)
    x = EDGE_VALUES[name](g)[:1, :, :, :HEAD_DIM]
    dtype = torch.float16
    layer = KVQuantLayer(KVQuantConfig(bits=4, outlier_fraction=0.0, outlier_slots=1, sink_tokens=1))
    inputs = synthetic_inputs(1, 4, 2, 5, 0, dtype=dtype)
    inputs.key = x.to(dtype)
    inputs.value = x.flip(-1).to(dtype)
    inputs.query = inputs.query / 65504  # keep fp16 scores finite for the fp16_max case
    out = layer.attend(inputs)
    assert torch.isfinite(out).all()
    k, v = layer.dequantized_history()
    lut = quant.normal_float_signposts(4)
    half_gap = float((lut[1:] - lut[:-1]).max()) / 2
    kref, vref = inputs.key[:, :, 1:].float(), inputs.value[:, :, 1:].float()
    vscale = layer.v_scale[:, :, :4].float().clamp_min(quant.MIN_SCALE).unsqueeze(-1)
    assert ((v - vref).abs() <= vscale * half_gap * 1.01 + vref.abs() * 1e-3 + 1e-6).all()
    assert ((k - kref).abs() <= layer.k_scale[None, :, None, :] * half_gap * 1.01 + 1e-6).all()
    step = synthetic_inputs(1, 4, 2, 1, 5, dtype=dtype)
    step.query = step.query / 65504
    assert torch.isfinite(layer.attend(step)).all()


# --------------------------------------------------------------------------------------------
# 4. reuse: generate calls, reset, two models with different signposts, after exceptions
# --------------------------------------------------------------------------------------------
def test_one_cache_object_reused_across_generate_calls_with_reset():
    model = setup_model(make_tiny_llama())
    sp = random_signposts(model, bits=4)
    expected = gen(model, 8, cache_implementation="kvquant", cache_config={"signposts": sp})
    cache = KVQuantCache({"signposts": sp}, model_config=model.config)
    for _ in range(3):
        assert torch.equal(gen(model, 8, **cache_kwargs(model, cache)), expected)
        assert cache.get_seq_length() == PROMPT.shape[1] + 7  # the last token is not fed back
        ptr = cache.layers[0].k_codes.data_ptr()
        cache.reset()
        assert cache.get_seq_length() == 0 and cache.memory_stats()["n_clipped"] == 0
    assert cache.layers[0].k_codes.data_ptr() == ptr  # allocation kept
    # a batch of another size after reset re-initializes
    two = torch.cat([PROMPT, PROMPT.flip(-1)])
    out = model.generate(two, max_new_tokens=4, do_sample=False, **cache_kwargs(model, cache))
    assert torch.equal(out[:1, : PROMPT.shape[1] + 4], expected[:, : PROMPT.shape[1] + 4])


def test_two_models_with_different_signposts_in_one_process(tmp_path):
    llama = setup_model(make_tiny_llama(seed=1))
    mistral = setup_model(make_tiny_mistral(seed=2))
    sp_l = random_signposts(llama, bits=4, seed=3)
    sp_m = random_signposts(mistral, bits=3, seed=4)
    save_signposts(sp_l, tmp_path / "llama")
    save_signposts(sp_m, tmp_path / "mistral")
    cfg_l = {"signposts": str(tmp_path / "llama"), "bits": 4}
    cfg_m = {"signposts": str(tmp_path / "mistral"), "bits": 3}
    alone_l = gen(llama, 6, cache_implementation="kvquant", cache_config=cfg_l)
    alone_m = gen(mistral, 6, cache_implementation="kvquant", cache_config=cfg_m)
    cache_l = KVQuantCache(cfg_l, model_config=llama.config)
    cache_m = KVQuantCache(cfg_m, model_config=mistral.config)
    for _ in range(2):  # interleaved, alternating the cache objects and the string form
        assert torch.equal(gen(mistral, 6, **cache_kwargs(mistral, cache_m)), alone_m)
        assert torch.equal(gen(llama, 6, cache_implementation="kvquant", cache_config=cfg_l), alone_l)
        assert torch.equal(gen(llama, 6, **cache_kwargs(llama, cache_l)), alone_l)
        assert torch.equal(gen(mistral, 6, cache_implementation="kvquant", cache_config=cfg_m), alone_m)
        cache_l.reset()
        cache_m.reset()
    with pytest.raises(SignpostError, match="model_type"):  # crossing them is caught
        gen(llama, 2, **cache_kwargs(llama, cache_m))
    assert torch.equal(gen(llama, 6, cache_implementation="kvquant", cache_config=cfg_l), alone_l)


def test_generation_after_exceptions_of_every_kind_equals_the_reference():
    model = setup_model(make_tiny_llama())
    expected = gen(model, 6, cache_implementation="kvquant")
    cache = KVQuantCache({"bits": 4}, model_config=model.config)
    attempts = [
        lambda: gen(model, 6, cache_implementation="kvquant", cache_config={"bits": 7}),
        lambda: gen(model, 6, cache_implementation="kvquant", cache_config={"backend": "triton"}),
        lambda: gen(model, 6, cache_implementation="kvquant", cache_config={"signposts": "/nonexistent/folder"}),
        lambda: gen(model, 6, cache_implementation="kvquant", **cache_kwargs(model, cache)),
        lambda: forward(model, torch.ones(3, 1, dtype=torch.long), cache),  # batch changes mid-sequence
    ]
    for attempt in attempts[:3]:
        with pytest.raises(KVQuantError):
            attempt()
        assert torch.equal(gen(model, 6, cache_implementation="kvquant"), expected)
    with pytest.raises(KVQuantConfigError, match="only one"):
        attempts[3]()
    assert torch.equal(gen(model, 6, **cache_kwargs(model, cache)), expected)
    with pytest.raises(CacheMismatchError):
        attempts[4]()
    cache.reset()
    assert torch.equal(gen(model, 6, **cache_kwargs(model, cache)), expected)


# --------------------------------------------------------------------------------------------
# more bad input: valid-looking files with bad numbers, unsupported dtypes and head sizes
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("defect", ["nan_threshold", "inf_table", "unsorted_table", "upper_below_lower"])
def test_signpost_files_with_bad_numbers_and_matching_checksums_are_rejected(tmp_path, defect):
    from safetensors.torch import save_file

    model = setup_model(make_tiny_llama())
    sp = random_signposts(model, bits=4)
    folder = save_signposts(sp, tmp_path)
    tensors = sp.layers[1].tensors()
    if defect == "nan_threshold":
        tensors["key_upper"][0, 3] = float("nan")
        match = r"layer 1 'key_upper' contains NaN or inf"
    elif defect == "inf_table":
        tensors["value_signposts"][-1] = float("inf")
        match = r"layer 1 'value_signposts' contains NaN or inf"
    elif defect == "unsorted_table":
        tensors["key_signposts"] = tensors["key_signposts"].flip(0)
        match = r"layer 1 'key_signposts' is not sorted"
    else:
        tensors["key_lower"], tensors["key_upper"] = tensors["key_upper"], tensors["key_lower"]
        match = r"layer 1 has key_upper < key_lower"
    path = os.path.join(folder, layer_filename(1))
    save_file(tensors, path)
    meta_path = os.path.join(folder, METADATA_FILE)
    meta = json.loads(Path(meta_path).read_text())
    meta["files"][layer_filename(1)] = sha256_file(path)  # a consistent folder with bad numbers
    Path(meta_path).write_text(json.dumps(meta))
    with pytest.raises(SignpostError, match=match + r".*calibrate.py"):
        gen(model, 2, cache_implementation="kvquant", cache_config={"signposts": str(tmp_path), "bits": 4})


def test_unsupported_model_dtype_and_head_dim_are_clear_errors():
    model = setup_model(make_tiny_llama()).to(torch.float64)
    with pytest.raises(KVQuantConfigError, match=r"dtype torch.float64 are not supported.*float16, bfloat16 or float"):
        gen(model, 2, cache_implementation="kvquant")
    from transformers import LlamaConfig, LlamaForCausalLM

    odd = setup_model(LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=128,
                                               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                               head_dim=24)).eval())
    with pytest.raises(KVQuantConfigError, match=r"head_dim=24 is not supported; it must be a multiple of 16"):
        gen(odd, 2, cache_implementation="kvquant")
    assert gen(odd, 2).shape == (1, PROMPT.shape[1] + 2)  # the stock path still works on the patched model


# --------------------------------------------------------------------------------------------
# CUDA-graph decode: the host-side logic of the nonfinite rule (the graph itself needs a GPU)
# --------------------------------------------------------------------------------------------
def test_graph_mode_contains_on_the_device_without_a_host_sync():
    layer = small_layer()  # nonfinite="error", but a captured graph cannot raise: contain and count instead
    layer.attend(synthetic_inputs(1, 4, 2, 4, 0))
    layer.graph_mode = True
    k = torch.ones(1, 2, 1, HEAD_DIM)
    v = torch.ones(1, 2, 1, HEAD_DIM)
    k[0, 1, 0, 3] = float("nan")
    k2, v2 = layer.check_finite(k, v, torch.tensor([[4]]))
    assert torch.equal(k2, torch.zeros_like(k)) and torch.equal(v2, torch.zeros_like(v))
    assert layer.n_nonfinite == 1
    layer.graph_mode = False


def test_cuda_graph_decoder_rolls_back_and_raises_on_nonfinite(monkeypatch):
    from kvquant_hf.cuda_graph import CUDAGraphDecoder

    model = patch_model(make_tiny_llama())
    cache = KVQuantCache({"bits": 4}, model_config=model.config)
    forward(model, PROMPT, cache)
    for layer in cache.layers:  # what enter_graph_mode sets up, without CUDA
        layer.length_dev = torch.tensor([layer.length], dtype=torch.int32)

    class FakeGraph:  # a "replay" that appends one token per layer on the device, poisoned when asked
        poison = False

        def replay(self):
            for layer in cache.layers:
                layer.length_dev.add_(1)
                if self.poison and layer.layer_idx == 1:
                    layer.nonfinite_counter.add_(1)

    dec = CUDAGraphDecoder.__new__(CUDAGraphDecoder)
    dec.cache, dec.batch_size, dec.max_steps, dec.steps = cache, 1, 8, 0
    dec.static_ids = torch.zeros(1, 1, dtype=torch.long)
    dec.static_pos = torch.zeros(1, 1, dtype=torch.long)
    dec.static_logits = torch.zeros(1, 1, 128)
    dec.graph = FakeGraph()
    dec.check_nonfinite = True
    dec.nonfinite_seen = dec.nonfinite_counts()
    n0 = cache.get_seq_length()
    dec.step(torch.tensor([[1]]), torch.tensor([[n0]]))
    assert cache.get_seq_length() == n0 + 1
    dec.graph.poison = True
    with pytest.raises(KVQuantNumericalError, match=r"layer 1: .*CUDA-graph decode step at position\(s\) \[11\].*"
                                                    r"rolled back"):
        dec.step(torch.tensor([[2]]), torch.tensor([[n0 + 1]]))
    assert cache.get_seq_length() == n0 + 1 and dec.steps == 1
    assert [int(layer.length_dev) for layer in cache.layers] == [layer.length for layer in cache.layers]
    assert dec.nonfinite_counts() == [0, 0]
    dec.check_nonfinite = False  # nonfinite="zero": the contained token stays, counted
    dec.step(torch.tensor([[2]]), torch.tensor([[n0 + 1]]))
    assert cache.get_seq_length() == n0 + 2 and cache.memory_stats()["n_nonfinite"] == 1


def test_nonfinite_in_a_later_prefill_chunk_rolls_back_the_whole_prompt():
    model = setup_model(make_tiny_llama())
    cache = KVQuantCache({"bits": 4, "prefill_chunk_size": 4}, model_config=model.config)
    handle = _poison(model, layer_idx=1, call=2)  # the third 4-token chunk of the 10-token prompt
    with pytest.raises(KVQuantNumericalError, match=r"layer 1: .* position\(s\) \[9\]"):
        gen(model, 4, **cache_kwargs(model, cache))
    handle.remove()
    assert [layer.get_seq_length() for layer in cache.layers] == [0, 0]
    expected = gen(model, 4, cache_implementation="kvquant", cache_config={"prefill_chunk_size": 4})
    assert torch.equal(gen(model, 4, **cache_kwargs(model, cache)), expected)

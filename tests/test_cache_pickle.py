"""A filled KVQuantCache saves and loads (pickle, torch.save / torch.load) and generation continues from it
exactly as if it had never stopped: for example a long prompt's cache kept on disk."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from cache_helpers import for_greedy_generate, make_signposts
from conftest import make_tiny_llama

from kvquant_hf import quant
from kvquant_hf.cache import KVQuantCache
from kvquant_hf.generation import cache_kwarg_name
from kvquant_hf.layer_storage import HISTORY_TENSORS, ROW_TENSORS, SINK_TENSORS

pytestmark = pytest.mark.filterwarnings("ignore::kvquant_hf.UncalibratedCacheWarning")

PROMPT = torch.randint(1, 128, (1, 37), generator=torch.Generator().manual_seed(3))
NEW = 12
LAYER_TENSORS = HISTORY_TENSORS + SINK_TENSORS + ROW_TENSORS + ("k_lut", "v_lut", "k_lower", "k_upper", "k_zero",
                                                                "k_scale", "nonfinite_counter")


@pytest.fixture(scope="module")
def model():
    return for_greedy_generate(make_tiny_llama())


def _signposts(model):
    g = torch.Generator().manual_seed(11)
    h = model.config.num_key_value_heads
    lower = -1.0 - torch.rand(h, 16, generator=g)
    upper = 1.0 + torch.rand(h, 16, generator=g)
    return make_signposts(model, quant.normal_float_signposts(4), lower, upper, bits=4)


def _cache(model, calibrated: bool) -> KVQuantCache:
    cfg = {"bits": 4, "sink_tokens": 2, "block_size": 16, "prefill_chunk_size": 16, "outlier_slots": 1}
    return KVQuantCache(cfg, signposts=_signposts(model) if calibrated else None, model_config=model.config)


def _generate(model, ids, cache, new, **kw):
    return model.generate(ids, max_new_tokens=new, do_sample=False, **{cache_kwarg_name(model): cache}, **kw)


def _same_stats(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        (isinstance(a[k], float) and math.isnan(a[k]) and math.isnan(b[k])) or a[k] == b[k] for k in a)


def _assert_same_storage(a: KVQuantCache, b: KVQuantCache) -> None:
    assert len(a.layers) == len(b.layers)
    for la, lb in zip(a.layers, b.layers):
        assert (la.length, la.n_sink, la.capacity, la.device, la.backend) == (lb.length, lb.n_sink, lb.capacity,
                                                                             lb.device, lb.backend)
        for name in LAYER_TENSORS:
            ta, tb = getattr(la, name), getattr(lb, name)
            assert ta is not tb and torch.equal(ta, tb), name
        assert lb.owner() is b  # the loaded layers belong to the loaded cache


@pytest.mark.parametrize("calibrated", [True, False], ids=["calibrated", "uncalibrated"])
@pytest.mark.parametrize("stop_after", [1, 5])
def test_generation_continues_from_a_cache_saved_with_torch_save(model, tmp_path, calibrated, stop_after):
    """Prefill (in chunks) and decode ``stop_after - 1`` steps, save, load, continue: the same greedy tokens."""
    full = _generate(model, PROMPT, _cache(model, calibrated), NEW)
    cache = _cache(model, calibrated)
    first = _generate(model, PROMPT, cache, stop_after)
    held = cache.get_seq_length()
    assert held == PROMPT.shape[1] + stop_after - 1
    stats = cache.memory_stats()
    path = tmp_path / "prompt_cache.pt"
    torch.save(cache, path)
    del cache
    loaded = torch.load(path, weights_only=False)
    assert loaded.get_seq_length() == held and _same_stats(loaded.memory_stats(), stats)
    # transformers continues from a cache given the whole sequence so far: it feeds only the uncached tokens
    out = _generate(model, first, loaded, NEW - stop_after)
    assert torch.equal(out, full)
    assert loaded.get_seq_length() == full.shape[1] - 1


def test_pickle_round_trip_keeps_every_stored_tensor_and_the_statistics(model):
    cache = _cache(model, calibrated=True)
    _generate(model, PROMPT, cache, 3)
    loaded = pickle.loads(pickle.dumps(cache))
    assert _same_stats(loaded.memory_stats(), cache.memory_stats())
    assert loaded.config == cache.config and loaded.is_calibrated
    assert all(torch.equal(sa.key_lower, sb.key_lower) for sa, sb in zip(cache.key_signposts.layers,
                                                                           loaded.key_signposts.layers))
    _assert_same_storage(cache, loaded)
    # the original is untouched: its layers still belong to it
    assert all(layer.owner() is cache for layer in cache.layers)


def test_a_left_padded_batch_continues_after_loading(model, tmp_path):
    ids = torch.cat([PROMPT, PROMPT.flip(1)])
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    ids[1, :7] = 0
    full = _generate(model, ids, _cache(model, True), NEW, attention_mask=mask)
    cache = _cache(model, True)
    first = _generate(model, ids, cache, 2, attention_mask=mask)
    torch.save(cache, tmp_path / "batch.pt")
    loaded = torch.load(tmp_path / "batch.pt", weights_only=False)
    cont_mask = torch.cat([mask, torch.ones(2, first.shape[1] - ids.shape[1], dtype=mask.dtype)], dim=1)
    out = _generate(model, first, loaded, NEW - 2, attention_mask=cont_mask)
    assert torch.equal(out, full)


def test_an_empty_and_a_lazy_cache_pickle_too(model):
    empty = pickle.loads(pickle.dumps(_cache(model, calibrated=False)))
    assert empty.get_seq_length() == 0 and all(layer.owner() is empty for layer in empty.layers)
    lazy = KVQuantCache({"bits": 4})  # layers created on first use
    loaded = pickle.loads(pickle.dumps(lazy))
    loaded.layers[3]  # the factory is bound to the loaded cache
    assert len(loaded.layers) == 4 and all(layer.owner() is loaded for layer in loaded.layers)
    out = _generate(model, PROMPT, loaded, 2)
    assert out.shape[1] == PROMPT.shape[1] + 2


def test_graph_state_and_the_rope_object_are_not_pickled(model):
    cache = _cache(model, calibrated=True)
    _generate(model, PROMPT, cache, 2)
    layer = cache.layers[0]
    assert layer.sink_rope is not None
    layer.graph_mode, layer.length_dev = True, torch.tensor([layer.length], dtype=torch.int32)
    loaded = pickle.loads(pickle.dumps(cache)).layers[0]
    layer.graph_mode, layer.length_dev = False, None
    assert not loaded.graph_mode and loaded.length_dev is None and loaded.sink_rope is None
    assert loaded.length == layer.length


def test_a_layer_follows_its_tensors_to_the_device_they_load_on(model):
    """``torch.load(..., map_location=...)`` moves the tensors; the layer's device and backend follow them (a
    layer that recorded another device stands in for a cache saved on a GPU and loaded on CPU)."""
    cache = _cache(model, calibrated=True)
    _generate(model, PROMPT, cache, 2)
    for layer in cache.layers:
        layer.device, layer.backend = torch.device("cuda", 0), "triton"
    loaded = pickle.loads(pickle.dumps(cache))
    assert all(lay.device == torch.device("cpu") and lay.backend == "torch" and not lay.triton_quantize
               and lay.clip_counter is None for lay in loaded.layers)

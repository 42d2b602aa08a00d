"""Several threads calling ``generate`` on one model at once: each call gets its own KVQuantCache, with its own
settings, and no call changes state that the others read (the model's ``generation_config``, its forward)."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from cache_helpers import for_greedy_generate, returned_cache
from conftest import make_tiny_llama
from transformers.generation.streamers import BaseStreamer

import kvquant_hf

pytestmark = pytest.mark.filterwarnings("ignore::kvquant_hf.UncalibratedCacheWarning")

PROMPT = torch.tensor([[5, 17, 99, 3, 42, 8, 77, 31, 64, 12]])
LONG_PROMPT = torch.tensor([[(7 * i + 3) % 128 for i in range(37)]])
WAIT_S = 60


def _model():
    return for_greedy_generate(make_tiny_llama())


class Gate(BaseStreamer):
    """A streamer that, on the prompt (``generate`` has set up its cache and forward, the prefill not run yet),
    records what the model's generation_config says, announces ``inside`` and waits for ``release``."""

    def __init__(self, model):
        self.model, self.inside, self.release = model, threading.Event(), threading.Event()
        self.seen = None

    def put(self, value):
        if not self.inside.is_set():
            gc = self.model.generation_config
            self.seen = (gc.cache_implementation, gc.cache_config)
            self.inside.set()
            assert self.release.wait(WAIT_S)

    def end(self):
        pass


def _run(results, key, fn):
    try:
        results[key] = fn()
    except BaseException as exc:  # reported by the main thread
        results[key] = exc


def _check(results):
    for key, value in results.items():
        if isinstance(value, BaseException):
            raise AssertionError(f"thread {key} raised {value!r}") from value


@pytest.mark.parametrize("second_via", ["model_config", "kwargs"])
def test_second_thread_inside_first_call_gets_a_kvquant_cache(second_via):
    """Thread A uses model.generation_config.cache_implementation="kvquant" and is held inside its generate call;
    thread B then calls generate (the same way, or with the keyword): both return a KVQuantCache with their
    own settings, and the model's generation_config reads "kvquant" throughout."""
    model = _model()
    model.generation_config.cache_implementation = "kvquant"
    model.generation_config.cache_config = {"bits": 3}
    config_before = model.generation_config.to_dict()
    gate = Gate(model)
    results = {}
    common = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True)

    def first():
        return model.generate(PROMPT, streamer=gate, **common)

    def second():
        extra = {"cache_implementation": "kvquant", "cache_config": {"bits": 2}} if second_via == "kwargs" else {}
        seen = (model.generation_config.cache_implementation, model.generation_config.cache_config)
        return seen, model.generate(PROMPT, **common, **extra)

    a = threading.Thread(target=_run, args=(results, "a", first))
    a.start()
    assert gate.inside.wait(WAIT_S)
    try:
        _run(results, "b", second)
    finally:
        gate.release.set()
        a.join(WAIT_S)
    _check(results)
    seen_by_b, out_b = results["b"]
    out_a = results["a"]
    assert gate.seen == ("kvquant", {"bits": 3})
    assert seen_by_b == ("kvquant", {"bits": 3})
    cache_a, cache_b = returned_cache(out_a), returned_cache(out_b)
    assert isinstance(cache_a, kvquant_hf.KVQuantCache), type(cache_a)
    assert isinstance(cache_b, kvquant_hf.KVQuantCache), type(cache_b)
    assert cache_a is not cache_b
    assert cache_a.config.key_bits == 3
    assert cache_b.config.key_bits == (2 if second_via == "kwargs" else 3)
    assert model.generation_config.to_dict() == config_before
    assert "forward" not in model.__dict__
    # each thread's tokens equal the same call made alone
    alone = model.generate(PROMPT, **common)
    assert torch.equal(out_a.sequences, alone.sequences)
    if second_via == "model_config":
        assert torch.equal(out_b.sequences, alone.sequences)


def test_staggered_threads_all_get_kvquant_caches():
    """Free-running threads (a barrier, then a start 0-5 ms apart), repeated: every call returns a KVQuantCache
    and the model's generation_config stays "kvquant"."""
    model = _model()
    model.generation_config.cache_implementation = "kvquant"
    model.generation_config.cache_config = {"bits": 4}
    n_threads, trials = 3, 4
    for _ in range(trials):
        barrier = threading.Barrier(n_threads)
        results = {}

        def call(i, barrier=barrier):
            barrier.wait(WAIT_S)
            time.sleep(0.0025 * i)
            return model.generate(PROMPT, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)

        threads = [threading.Thread(target=_run, args=(results, i, lambda i=i: call(i))) for i in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT_S)
        _check(results)
        kinds = [type(returned_cache(results[i])).__name__ for i in range(n_threads)]
        assert kinds == ["KVQuantCache"] * n_threads
        assert model.generation_config.cache_implementation == "kvquant"
        assert model.generation_config.cache_config == {"bits": 4}
        assert "forward" not in model.__dict__


def test_chunked_prefill_of_a_thread_survives_another_call_ending():
    """Thread B's prompt is prefilled in chunks even when thread A's generate call ends between B's setup and
    B's prefill: B's result equals B's call made alone (chunked prefill differs from a one-call prefill here)."""
    model = _model()
    cfg = {"bits": 2, "prefill_chunk_size": 10, "recent_window": 0}
    common = dict(max_new_tokens=1, do_sample=False, output_logits=True, return_dict_in_generate=True,
                  cache_implementation="kvquant")
    with torch.no_grad():
        alone = model.generate(LONG_PROMPT, cache_config=cfg, **common)
        one_call = model.generate(LONG_PROMPT, cache_config={**cfg, "prefill_chunk_size": 0}, **common)
    assert not torch.allclose(alone.logits[0], one_call.logits[0], atol=1e-4)
    gate_a, gate_b = Gate(model), Gate(model)
    results = {}

    def run(gate):
        with torch.no_grad():
            return model.generate(LONG_PROMPT, cache_config=cfg, streamer=gate, **common)

    a = threading.Thread(target=_run, args=(results, "a", lambda: run(gate_a)))
    b = threading.Thread(target=_run, args=(results, "b", lambda: run(gate_b)))
    try:
        a.start()
        assert gate_a.inside.wait(WAIT_S)
        b.start()
        assert gate_b.inside.wait(WAIT_S)
        gate_a.release.set()  # A prefills, decodes and ends while B waits before its prefill
        a.join(WAIT_S)
    finally:
        gate_a.release.set()
        gate_b.release.set()
        a.join(WAIT_S)
        b.join(WAIT_S)
    _check(results)
    for key in ("a", "b"):
        torch.testing.assert_close(results[key].logits[0], alone.logits[0], atol=1e-6, rtol=1e-6)
    assert "forward" not in model.__dict__


def test_one_cache_in_two_concurrent_calls_is_refused():
    """A KVQuantCache object belongs to one generate call at a time: a second concurrent call with the same
    object gets a clear error instead of two calls writing into one cache."""
    model = _model()
    cache = kvquant_hf.KVQuantCache({"bits": 4}, model_config=model.config)
    name = kvquant_hf.generation.cache_kwarg_name(model)
    gate = Gate(model)
    results = {}
    a = threading.Thread(target=_run, args=(results, "a", lambda: model.generate(
        PROMPT, max_new_tokens=2, do_sample=False, streamer=gate, **{name: cache})))
    a.start()
    try:
        assert gate.inside.wait(WAIT_S)
        with pytest.raises(kvquant_hf.KVQuantConfigError, match="already in use"):
            model.generate(PROMPT, max_new_tokens=2, do_sample=False, **{name: cache})
    finally:
        gate.release.set()
        a.join(WAIT_S)
    _check(results)
    assert cache.get_seq_length() == PROMPT.shape[1] + 1


def test_patching_twice_keeps_the_stock_forward():
    """Two first calls racing past the "already patched" flag patch each attention layer once: the stock
    forward (used with transformers' own caches) stays reachable, and unpatching restores it."""
    from kvquant_hf.models import patch_model, unpatch_model

    model = _model()
    stock = model.generate(PROMPT, max_new_tokens=4, do_sample=False)
    patch_model(model)
    model._kvquant_patched = False  # the second thread read the flag before the first one set it
    patch_model(model)
    assert torch.equal(model.generate(PROMPT, max_new_tokens=4, do_sample=False), stock)
    unpatch_model(model)
    assert all("forward" not in layer.self_attn.__dict__ for layer in model.model.layers)
    assert torch.equal(model.generate(PROMPT, max_new_tokens=4, do_sample=False), stock)


def test_model_default_applies_to_a_passed_config_and_yields_to_a_passed_cache():
    """model.generation_config.cache_implementation="kvquant" is the default of every call: a call that passes
    its own GenerationConfig without a cache_implementation gets a KVQuantCache with the model's cache_config; a
    call that passes a KVQuantCache object uses that object. The model's config is unchanged."""
    from transformers import GenerationConfig

    model = _model()
    model.generation_config.cache_implementation = "kvquant"
    model.generation_config.cache_config = {"bits": 3}
    before = model.generation_config.to_dict()
    gc = GenerationConfig(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    out = model.generate(PROMPT, generation_config=gc)
    assert isinstance(returned_cache(out), kvquant_hf.KVQuantCache)
    assert returned_cache(out).config.key_bits == 3
    cache = kvquant_hf.KVQuantCache({"bits": 2}, model_config=model.config)
    name = kvquant_hf.generation.cache_kwarg_name(model)
    out = model.generate(PROMPT, max_new_tokens=4, do_sample=False, return_dict_in_generate=True, **{name: cache})
    assert returned_cache(out) is cache
    assert cache.get_seq_length() == PROMPT.shape[1] + 3
    assert model.generation_config.to_dict() == before
    assert gc.cache_implementation is None

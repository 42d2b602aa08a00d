"""`generate(cache_implementation="kvquant")` and passing a KVQuantCache object (CPU, tiny random models)."""

from __future__ import annotations

import warnings

import pytest
import torch
from cache_helpers import for_greedy_generate, make_lossless, make_signposts, returned_cache
from conftest import make_tiny_llama, make_tiny_mistral
from transformers import GenerationConfig
from transformers.generation.streamers import BaseStreamer, TextStreamer

import kvquant_hf
from kvquant_hf import quant
from kvquant_hf.cache import KVQuantLayer
from kvquant_hf.errors import KVQuantConfigError, SignpostError, UnsupportedModelError
from kvquant_hf.generation import cache_kwarg_name
from kvquant_hf.signposts import save_signposts

PROMPT = torch.tensor([[5, 17, 99, 3, 42, 8, 77, 31, 64, 12]])


pytestmark = pytest.mark.filterwarnings("ignore::kvquant_hf.UncalibratedCacheWarning")


@pytest.fixture
def fp32_value_scales(monkeypatch):
    original = quant.value_scale_dtype
    monkeypatch.setattr(quant, "value_scale_dtype", lambda dt: torch.float32 if dt == torch.float32 else original(dt))


class Collect(BaseStreamer):
    def __init__(self):
        self.chunks = []
        self.ended = False

    def put(self, value):
        self.chunks.append(value.flatten().tolist())

    def end(self):
        self.ended = True


class DigitsTokenizer:
    """Just enough of a tokenizer for TextStreamer."""

    def decode(self, ids, **kwargs):
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        return "".join(f"<{i}>" for i in ids)


# --------------------------------------------------------------------------------------------
# the string form
# --------------------------------------------------------------------------------------------
@pytest.mark.compat
@pytest.mark.parametrize("make", [make_tiny_llama, lambda: make_tiny_mistral(sliding_window=6)], ids=["llama", "mistral"])
def test_lossless_greedy_generate_matches_dynamic_cache(make, fp32_value_scales):
    model = for_greedy_generate(make())
    factory, reference = make_lossless(model)
    for_greedy_generate(reference)
    sp = factory().key_signposts
    want = reference.generate(PROMPT, max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True)
    got = model.generate(
        PROMPT, max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True,
        cache_implementation="kvquant",
        cache_config={"signposts": sp, "bits": 4, "outlier_slots": 15, "sink_tokens": 2},
    )
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), atol=2e-5, rtol=1e-4)
    cache = returned_cache(got)
    assert isinstance(cache, kvquant_hf.KVQuantCache)
    assert cache.get_seq_length() == PROMPT.shape[1] + 12 - 1


@pytest.mark.compat
def test_string_and_object_forms_agree_and_return_the_cache():
    model = for_greedy_generate(make_tiny_llama())
    cfg = {"bits": 3, "sink_tokens": 1, "outlier_fraction": 0.05}
    a = model.generate(PROMPT, max_new_tokens=6, do_sample=False, cache_implementation="kvquant", cache_config=cfg,
                       return_dict_in_generate=True)
    user_cache = kvquant_hf.KVQuantCache(cfg, model_config=model.config)
    b = model.generate(PROMPT, max_new_tokens=6, do_sample=False, **{cache_kwarg_name(model): user_cache})
    assert torch.equal(a.sequences, b)
    assert user_cache.get_seq_length() == PROMPT.shape[1] + 6 - 1
    assert returned_cache(a).config.bits == 3
    # past_key_values= works on every supported transformers version
    c_cache = kvquant_hf.KVQuantCache(cfg, model_config=model.config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        c = model.generate(PROMPT, max_new_tokens=6, do_sample=False, past_key_values=c_cache)
    assert torch.equal(c, b) and c_cache.get_seq_length() == user_cache.get_seq_length()


def test_sampling_and_num_return_sequences():
    model = for_greedy_generate(make_tiny_llama())
    kw = {"max_new_tokens": 6, "do_sample": True, "top_k": 20, "num_return_sequences": 3, "cache_implementation": "kvquant"}
    torch.manual_seed(0)
    a = model.generate(PROMPT, **kw)
    torch.manual_seed(0)
    b = model.generate(PROMPT, **kw)
    assert a.shape == (3, PROMPT.shape[1] + 6)
    assert torch.equal(a, b)


@pytest.mark.compat
def test_lossless_beam_search_matches_dynamic_cache(fp32_value_scales):
    model = for_greedy_generate(make_tiny_llama())
    factory, reference = make_lossless(model)
    for_greedy_generate(reference)
    sp = factory().key_signposts
    kw = {"max_new_tokens": 6, "num_beams": 3, "num_return_sequences": 2, "do_sample": False}
    want = reference.generate(PROMPT.repeat(2, 1), **kw)
    got = model.generate(PROMPT.repeat(2, 1), cache_implementation="kvquant",
                         cache_config={"signposts": sp, "outlier_slots": 15, "sink_tokens": 2}, **kw)
    assert got.shape == (4, PROMPT.shape[1] + 6)
    assert torch.equal(got, want)


def test_beam_search_lossy_runs_and_reorders(monkeypatch):
    model = for_greedy_generate(make_tiny_llama())
    calls = []
    original = kvquant_hf.KVQuantCache.reorder_cache

    def spy(self, beam_idx):
        calls.append(beam_idx.clone())
        return original(self, beam_idx)

    monkeypatch.setattr(kvquant_hf.KVQuantCache, "reorder_cache", spy)
    out = model.generate(PROMPT, max_new_tokens=5, num_beams=4, do_sample=False, cache_implementation="kvquant",
                         cache_config={"bits": 2})
    assert out.shape == (1, PROMPT.shape[1] + 5)
    assert calls and all(c.shape == (4,) for c in calls)


@pytest.mark.compat
def test_left_padded_batch_generate_equals_prompts_alone_lossless(fp32_value_scales):
    model = for_greedy_generate(make_tiny_llama())
    factory, _ = make_lossless(model)
    cfg = {"signposts": factory().key_signposts, "outlier_slots": 15, "sink_tokens": 2}
    short = PROMPT[:, 4:]
    ids = torch.cat([PROMPT, torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1)])
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                           cache_implementation="kvquant", cache_config=cfg)
    alone0 = model.generate(PROMPT, max_new_tokens=8, do_sample=False, cache_implementation="kvquant", cache_config=cfg)
    alone1 = model.generate(short, max_new_tokens=8, do_sample=False, cache_implementation="kvquant", cache_config=cfg)
    assert torch.equal(batch[0, -8:], alone0[0, -8:])
    assert torch.equal(batch[1, -8:], alone1[0, -8:])


def test_assisted_decoding_crops_the_cache_and_matches_dynamic_cache(monkeypatch, fp32_value_scales):
    model = for_greedy_generate(make_tiny_llama())
    factory, reference = make_lossless(model)
    for_greedy_generate(reference)
    assistant = for_greedy_generate(make_tiny_llama(seed=5))
    crops = []
    original = kvquant_hf.KVQuantCache.crop

    def spy(self, n):
        crops.append(n)
        return original(self, n)

    monkeypatch.setattr(kvquant_hf.KVQuantCache, "crop", spy)
    want = reference.generate(PROMPT, max_new_tokens=10, do_sample=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = model.generate(PROMPT, max_new_tokens=10, do_sample=False, assistant_model=assistant,
                             cache_implementation="kvquant",
                             cache_config={"signposts": factory().key_signposts, "outlier_slots": 15, "sink_tokens": 2})
    assert torch.equal(got, want)
    assert any(n < 0 for n in crops)  # rejected draft tokens were dropped from the quantized cache


def test_streamers():
    model = for_greedy_generate(make_tiny_llama())
    collect = Collect()
    out = model.generate(PROMPT, max_new_tokens=5, do_sample=False, streamer=collect, cache_implementation="kvquant")
    assert collect.ended
    assert [t for chunk in collect.chunks for t in chunk] == out[0].tolist()
    text = TextStreamer(DigitsTokenizer(), skip_prompt=True)
    printed = []
    text.on_finalized_text = lambda s, stream_end=False: printed.append(s)
    out = model.generate(PROMPT, max_new_tokens=5, do_sample=False, streamer=text, cache_implementation="kvquant")
    assert "".join(printed) == DigitsTokenizer().decode(out[0, PROMPT.shape[1] :])


def test_several_generate_calls_and_stock_caches_afterwards():
    model = for_greedy_generate(make_tiny_llama())
    stock_before = model.generate(PROMPT, max_new_tokens=5, do_sample=False)
    first = model.generate(PROMPT, max_new_tokens=5, do_sample=False, cache_implementation="kvquant",
                           cache_config={"bits": 4})
    second = model.generate(PROMPT, max_new_tokens=5, do_sample=False, cache_implementation="kvquant",
                            cache_config={"bits": 4})
    assert torch.equal(first, second)
    assert model._kvquant_patched
    # the patched model still works with transformers' own caches
    assert torch.equal(model.generate(PROMPT, max_new_tokens=5, do_sample=False), stock_before)
    assert torch.equal(
        model.generate(PROMPT, max_new_tokens=5, do_sample=False, cache_implementation="dynamic"), stock_before
    )


def test_generation_config_forms():
    model = for_greedy_generate(make_tiny_llama())
    expected = model.generate(PROMPT, max_new_tokens=4, do_sample=False, cache_implementation="kvquant",
                              cache_config={"bits": 3})
    gc = GenerationConfig(max_new_tokens=4, do_sample=False, cache_implementation="kvquant", cache_config={"bits": 3},
                          pad_token_id=0)
    assert torch.equal(model.generate(PROMPT, generation_config=gc), expected)
    assert gc.cache_implementation == "kvquant"  # the caller's config is not modified
    model.generation_config.cache_implementation = "kvquant"
    model.generation_config.cache_config = {"bits": 3}
    out = model.generate(PROMPT, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(out.sequences, expected)
    assert isinstance(returned_cache(out), kvquant_hf.KVQuantCache)
    assert model.generation_config.cache_implementation == "kvquant"


def test_signposts_folder_and_validation(tmp_path):
    model = for_greedy_generate(make_tiny_llama())
    sp = make_signposts(model, quant.normal_float_signposts(4), -1.0, 1.0, bits=4)
    save_signposts(sp, tmp_path)
    from_folder = model.generate(PROMPT, max_new_tokens=4, do_sample=False, cache_implementation="kvquant",
                                 cache_config={"signposts": str(tmp_path), "bits": 4})
    from_object = model.generate(PROMPT, max_new_tokens=4, do_sample=False, cache_implementation="kvquant",
                                 cache_config={"signposts": sp, "bits": 4})
    assert torch.equal(from_folder, from_object)
    with pytest.raises(SignpostError, match="bits"):
        model.generate(PROMPT, max_new_tokens=2, cache_implementation="kvquant",
                       cache_config={"signposts": str(tmp_path), "bits": 3})
    mistral = for_greedy_generate(make_tiny_mistral())
    with pytest.raises(SignpostError, match="model_type"):
        mistral.generate(PROMPT, max_new_tokens=2, cache_implementation="kvquant",
                         cache_config={"signposts": str(tmp_path), "bits": 4})


def test_generate_errors_are_clear():
    model = for_greedy_generate(make_tiny_llama())
    with pytest.raises(KVQuantConfigError, match="allowed keys"):
        model.generate(PROMPT, max_new_tokens=2, cache_implementation="kvquant", cache_config={"nbits": 4})
    with pytest.raises(KVQuantConfigError, match="backend"):
        model.generate(PROMPT, max_new_tokens=2, cache_implementation="kvquant", cache_config={"backend": "cuda"})
    with pytest.raises(kvquant_hf.BackendUnavailableError):
        model.generate(PROMPT, max_new_tokens=2, cache_implementation="kvquant", cache_config={"backend": "triton"})
    with pytest.raises(KVQuantConfigError, match="1 layers but the model has 2"):
        model.generate(PROMPT, max_new_tokens=2, **{cache_kwarg_name(model): kvquant_hf.KVQuantCache(num_layers=1)})
    cache = kvquant_hf.KVQuantCache(model_config=model.config)
    with pytest.raises(KVQuantConfigError, match="only one"):
        model.generate(PROMPT, max_new_tokens=2, cache_implementation="kvquant",
                       **{cache_kwarg_name(model): cache})


def test_unsupported_architecture_lists_supported_model_types():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    model = for_greedy_generate(Qwen2ForCausalLM(config).eval())
    with pytest.raises(UnsupportedModelError, match="llama.*mistral|mistral.*llama"):
        model.generate(PROMPT, max_new_tokens=2, cache_implementation="kvquant")
    with pytest.raises(UnsupportedModelError, match="llama"):
        model.generate(PROMPT, max_new_tokens=2, **{cache_kwarg_name(model): kvquant_hf.KVQuantCache()})


def test_import_registers_hook_without_importing_kernels():
    import subprocess
    import sys

    code = (
        "import sys, kvquant_hf\n"
        "from transformers.generation.utils import GenerationMixin\n"
        "assert getattr(GenerationMixin.generate, '_kvquant_hook', False)\n"
        "assert 'kvquant_hf.kernels' not in sys.modules and 'kvquant_hf.calibration' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))


def test_token_by_token_feeding_is_fast_and_never_reallocates_per_token():
    """The perplexity harness feeds windows token by token: a decode step through the packed cache costs a small
    multiple of a DynamicCache step on CPU (best of 3 runs of 32 steps each, robust to a loaded machine), and the
    storage is reallocated once per block, not per token."""
    import time

    from transformers import DynamicCache

    model = kvquant_hf.patch_model(make_tiny_llama())
    sp = make_signposts(model, quant.normal_float_signposts(4), -1.0, 1.0, bits=4)
    ids = torch.randint(0, 128, (1, 96), generator=torch.Generator().manual_seed(0))
    kw = cache_kwarg_name(model)

    def best_time(make_cache):
        best, cache = float("inf"), None
        for _ in range(3):
            cache = make_cache()
            with torch.no_grad():
                forward_ids = ids[:, :64]
                model(forward_ids, **{kw: cache})
                start = time.perf_counter()
                for t in range(64, 96):
                    model(ids[:, t : t + 1], **{kw: cache})
                best = min(best, time.perf_counter() - start)
        return best, cache

    stock, _ = best_time(lambda: DynamicCache(config=model.config))
    packed, cache = best_time(lambda: kvquant_hf.KVQuantCache(bits=4, signposts=sp, block_size=32,
                                                              model_config=model.config))
    assert cache.get_seq_length() == 96 and cache.layers[0].capacity == 96  # 64 (prompt) -> 96: blocks, not tokens
    assert packed < 12 * stock, f"packed decode {packed:.3f}s vs DynamicCache {stock:.3f}s for 32 steps"


# --------------------------------------------------------------------------------------------
# chunked prefill inside generate
# --------------------------------------------------------------------------------------------
LONG_PROMPT = torch.tensor([[(7 * i + 3) % 128 for i in range(37)]])


@pytest.mark.compat
def test_chunked_prefill_lossless_matches_dynamic_cache(fp32_value_scales):
    model = for_greedy_generate(make_tiny_llama())
    factory, reference = make_lossless(model)
    for_greedy_generate(reference)
    sp = factory().key_signposts
    want = reference.generate(LONG_PROMPT, max_new_tokens=6, do_sample=False, output_logits=True,
                              return_dict_in_generate=True)
    got = model.generate(LONG_PROMPT, max_new_tokens=6, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, cache_implementation="kvquant",
                         cache_config={"signposts": sp, "bits": 4, "outlier_slots": 15, "sink_tokens": 2,
                                       "prefill_chunk_size": 8})
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), atol=2e-5, rtol=1e-4)


def test_chunked_prefill_equals_manual_chunks_and_differs_from_one_call():
    """Each chunk attends to the *packed* earlier chunks: generate's chunking equals feeding the same chunks by
    hand, and (lossy setting, no recent window) differs from prefilling the whole prompt in one call."""
    model = for_greedy_generate(make_tiny_llama())
    cfg = {"bits": 2, "prefill_chunk_size": 10, "recent_window": 0}
    with torch.no_grad():
        got = model.generate(LONG_PROMPT, max_new_tokens=1, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, cache_implementation="kvquant", cache_config=cfg)
        one = model.generate(LONG_PROMPT, max_new_tokens=1, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, cache_implementation="kvquant",
                             cache_config={**cfg, "prefill_chunk_size": 0})
        cache = kvquant_hf.KVQuantCache({"bits": 2, "recent_window": 0}, model_config=model.config)
        n = LONG_PROMPT.shape[1]
        for s in range(0, n, 10):
            e = min(n, s + 10)
            logits = model(LONG_PROMPT[:, s:e], position_ids=torch.arange(s, e)[None],
                           **{cache_kwarg_name(model): cache}).logits
    torch.testing.assert_close(got.logits[0], logits[:, -1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got.logits[0], one.logits[0], atol=1e-4)
    assert returned_cache(got).get_seq_length() == n


def test_prefill_chunk_size_is_validated():
    with pytest.raises(KVQuantConfigError, match="prefill_chunk_size"):
        kvquant_hf.KVQuantConfig(prefill_chunk_size=-1)


def _manual_chunks(model, prompt, mask, cfg, chunk):
    """Reference: feed the chunks by hand with transformers' own (context-wide) masks."""
    cache = kvquant_hf.KVQuantCache(cfg, model_config=model.config)
    n = prompt.shape[1]
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        pos = (mask[:, :e].long().cumsum(-1) - 1).clamp(min=0)[:, s:e] if mask is not None else torch.arange(s, e)[None]
        logits = model(prompt[:, s:e], position_ids=pos, attention_mask=mask[:, :e] if mask is not None else None,
                       **{cache_kwarg_name(model): cache}).logits
    return logits[:, -1], cache


@pytest.mark.parametrize("make", [make_tiny_llama, make_tiny_mistral])
def test_chunked_prefill_masks_stay_chunk_sized(monkeypatch, make):
    """Later chunks get a [B, 1, c, c] mask (not c x context), with the same result as transformers' full masks,
    left padding (a pad longer than one chunk) and Mistral's sliding window included."""
    model = for_greedy_generate(make())
    prompt = torch.tensor([[(5 * i + 1) % 128 for i in range(31)], [(3 * i + 2) % 128 for i in range(31)]])
    mask = torch.ones_like(prompt)
    mask[1, :9] = 0  # left padding longer than the 7-token chunk
    prompt[1, :9] = 0
    cfg = {"bits": 3, "sink_tokens": 2, "prefill_chunk_size": 7}
    seen = []
    original = KVQuantLayer.attend

    def spy(self, inputs):
        if self.layer_idx == 0 and inputs.attention_mask is not None:
            seen.append(tuple(inputs.attention_mask.shape))
        return original(self, inputs)

    monkeypatch.setattr(KVQuantLayer, "attend", spy)
    with torch.no_grad():
        got = model.generate(prompt, attention_mask=mask, max_new_tokens=1, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, cache_implementation="kvquant", cache_config=cfg)
        n_gen = len(seen)
        want, ref_cache = _manual_chunks(model, prompt, mask, {k: v for k, v in cfg.items()
                                                               if k != "prefill_chunk_size"}, 7)
    chunk_masks = seen[1:5]
    assert chunk_masks == [(2, 1, 7, 7)] * 3 + [(2, 1, 3, 3)], seen[:n_gen]
    assert seen[n_gen] == (2, 1, 7, 7) or seen[n_gen][-1] == 7  # the reference's first chunk
    assert seen[n_gen + 1][-1] == 14  # transformers' own mask spans the context
    torch.testing.assert_close(got.logits[0], want, atol=1e-5, rtol=1e-5)
    got_cache = returned_cache(got)
    for a, b in zip(got_cache.layers, ref_cache.layers):
        assert torch.equal(a.k_codes[:, :, : b.length], b.k_codes[:, :, : b.length])
        assert torch.equal(a.hist_start, b.hist_start)

"""Left padding: a padded row's output equals the same prompt alone, whatever the prefill chunk size (padding that
fills whole chunks, padding longer than the sink, a sink the prompt cannot fill), on the torch path and on the
Triton path (interpreter); padding after a row's first real token is refused with a clear error. CPU, tiny
random Llama models."""

from __future__ import annotations

import pytest
import torch
from cache_helpers import for_greedy_generate, forward, make_lossless, make_signposts
from conftest import make_tiny_llama, make_tiny_mistral

from benchmarks.reliability_cases import padded_batch
from kvquant_hf import quant
from kvquant_hf.cache import KVQuantCache
from kvquant_hf.errors import KVQuantConfigError
from kvquant_hf.generation import cache_kwarg_name
from kvquant_hf.models import patch_model

pytestmark = pytest.mark.filterwarnings("ignore::kvquant_hf.UncalibratedCacheWarning")

NEW = 6


@pytest.fixture(scope="module")
def model():
    return for_greedy_generate(make_tiny_llama())


@pytest.fixture(scope="module")
def signposts(model):
    return make_signposts(model, quant.normal_float_signposts(4), -2.0, 2.0, bits=4)


def greedy(model, ids, mask, cfg, n=NEW):
    out = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, output_scores=True,
                         return_dict_in_generate=True, cache_implementation="kvquant", cache_config=cfg)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.scores, 1)


def assert_rows_match_alone(model, cfg, lengths, total=None, atol=1e-4):
    ids, mask, prompts = padded_batch(lengths, total)
    tokens, scores = greedy(model, ids, mask, cfg)
    for i, p in enumerate(prompts):
        alone_tokens, alone_scores = greedy(model, p[None], None, cfg)
        assert tokens[i].tolist() == alone_tokens[0].tolist(), f"row {i} ({len(p)} tokens)"
        torch.testing.assert_close(scores[i], alone_scores[0], atol=atol, rtol=atol)


# ----------------------------------------------------------------------------------------------
# padded rows equal the prompt alone
# ----------------------------------------------------------------------------------------------
#: prompt lengths per chunk size, padded to 40: the 5-token row's 35 padding tokens span two chunks of 16, four of 8
#: and seven of 5; the other rows' padding is whole chunks, so their real tokens are split where they are alone
#: (the tokens of one call attend to each other exactly, to earlier calls through the quantized history)
LENGTHS = {16: [40, 5, 24], 8: [40, 5, 16, 32], 5: [40, 5, 25], 0: [40, 5, 17]}


@pytest.mark.parametrize("chunk", [16, 8, 5, 0], ids=["chunk16", "chunk8", "chunk5", "unchunked"])
@pytest.mark.parametrize("sink", [1, 4])
@pytest.mark.parametrize("window", [0, 6], ids=["no-window", "window6"])
def test_padding_longer_than_the_prefill_chunk_matches_the_prompt_alone(model, signposts, chunk, sink, window):
    cfg = {"signposts": signposts, "bits": 4, "prefill_chunk_size": chunk, "sink_tokens": sink, "backend": "torch",
           "recent_window": window}
    assert_rows_match_alone(model, cfg, LENGTHS[chunk])


def test_a_sink_the_short_prompt_cannot_fill_takes_its_first_generated_tokens(model, signposts):
    """8 sink slots, a 3-token prompt behind 37 padding tokens: as alone, the first 5 generated tokens fill the sink
    (kept exact) instead of going to the quantized history."""
    cfg = {"signposts": signposts, "bits": 4, "prefill_chunk_size": 16, "sink_tokens": 8}
    assert_rows_match_alone(model, cfg, [40, 3])


def test_every_row_padded_longer_than_a_chunk(model, signposts):
    """Padding to a fixed length: every row starts with whole chunks of padding."""
    cfg = {"signposts": signposts, "bits": 4, "prefill_chunk_size": 8, "sink_tokens": 2}
    assert_rows_match_alone(model, cfg, [16, 6], total=32)


def test_uncalibrated_padding_longer_than_the_chunk(model):
    """Without signposts the key ranges come from the batch's first prompt tokens, so logits differ slightly from
    the prompt alone; the greedy tokens agree and the logits stay within a few percent (not tens of percent)."""
    ids, mask, prompts = padded_batch([40, 5])
    for chunk in (16, 0):
        cfg = {"bits": 4, "prefill_chunk_size": chunk}
        tokens, scores = greedy(model, ids, mask, cfg)
        alone_tokens, alone_scores = greedy(model, prompts[1][None], None, cfg)
        assert tokens[1].tolist() == alone_tokens[0].tolist()
        assert float((scores[1] - alone_scores[0]).norm() / alone_scores[0].norm()) < 0.02


def test_sink_holds_the_first_real_tokens_and_padding_is_masked_history(model, signposts):
    ids, mask, _ = padded_batch([40, 5])
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    cache = KVQuantCache({"bits": 4, "sink_tokens": 2, "block_size": 16}, signposts=signposts,
                         model_config=model.config)
    patch_model(model)
    with torch.no_grad():
        for s in range(0, 40, 16):  # chunks of 16 as separate calls, each with the mask up to its end
            forward(model, ids[:, s:s + 16], cache, attention_mask=mask[:, :s + 16], position_ids=pos[:, s:s + 16])
    for layer in cache.layers:
        assert layer.sink_valid[:, :2].all()
        assert layer.sink_positions[1, :2].tolist() == [0, 1]  # the short row's first real tokens
        assert layer.hist_start.tolist() == [0, 35]  # its 35 padding tokens lead its history (38 tokens)
        assert layer.length == 38


@pytest.fixture
def fp32_value_scales(monkeypatch):
    """Per-token value scale/zero in float32 for float32 models, so the lossless setting is exact."""
    original = quant.value_scale_dtype
    monkeypatch.setattr(quant, "value_scale_dtype", lambda dt: torch.float32 if dt == torch.float32 else original(dt))


@pytest.mark.parametrize("make", [make_tiny_llama, lambda: make_tiny_mistral(sliding_window=6)],
                         ids=["llama", "mistral-window6"])
def test_lossless_padded_batch_equals_the_fp_cache_for_every_chunk_size(fp32_value_scales, make):
    """With quantization made exact, every row of a padded batch (user cache, chunked or not) gives the logits of
    transformers' own cache: padding is masked in every chunk, in the sink and in the history."""
    model = make()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    factory, reference = make_lossless(model)
    ids, mask, _ = padded_batch([40, 5, 17, 1])
    kw = {"attention_mask": mask, "max_new_tokens": NEW, "do_sample": False, "output_scores": True,
          "return_dict_in_generate": True}
    expected = reference.generate(ids, **kw)
    for chunk in (16, 7, 0):
        out = model.generate(ids, **kw, **{cache_kwarg_name(model): factory(prefill_chunk_size=chunk)})
        assert torch.equal(out.sequences, expected.sequences), chunk
        torch.testing.assert_close(torch.stack(out.scores), torch.stack(expected.scores), atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# padding after real tokens is refused
# ----------------------------------------------------------------------------------------------
def test_padding_inside_a_row_is_refused_by_generate(model, signposts):
    ids, mask, _ = padded_batch([12, 12])
    mask[1, 6] = 0
    for chunk in (4, 0):
        with pytest.raises(KVQuantConfigError, match=r"padding after real tokens in batch row\(s\) \[1\].*left"):
            greedy(model, ids, mask, {"signposts": signposts, "bits": 4, "prefill_chunk_size": chunk})


def test_padding_inside_a_row_is_refused_by_a_user_cache_and_nothing_is_stored(model, signposts):
    ids, mask, _ = padded_batch([12, 3])
    patch_model(model)
    cache = KVQuantCache({"bits": 4, "sink_tokens": 1, "block_size": 16}, signposts=signposts,
                         model_config=model.config)
    bad = mask.clone()
    bad[0, 5] = 0
    with torch.no_grad():
        with pytest.raises(KVQuantConfigError, match=r"batch row\(s\) \[0\]"):
            forward(model, ids, cache, attention_mask=bad)
        assert cache.get_seq_length() == 0
        forward(model, ids[:, :8], cache, attention_mask=mask[:, :8])  # row 1: only padding so far
        # row 1 may still be left-padded (all its tokens so far were padding); row 0 has real tokens: refused
        later = torch.ones(2, 12, dtype=torch.long)
        later[:, 8] = 0
        with pytest.raises(KVQuantConfigError, match=r"batch row\(s\) \[0\]"):
            forward(model, ids[:, 8:], cache, attention_mask=later)
        assert cache.get_seq_length() == 8
        forward(model, ids[:, 8:], cache, attention_mask=mask)  # the cache is still usable


# ----------------------------------------------------------------------------------------------
# the Triton path (interpreter on CPU)
# ----------------------------------------------------------------------------------------------
def test_triton_path_padding_longer_than_the_chunk(monkeypatch, model, signposts):
    from conftest import force_triton_backend

    force_triton_backend(monkeypatch)
    ids, mask, prompts = padded_batch([24, 3])
    cfg = {"bits": 4, "prefill_chunk_size": 8, "sink_tokens": 2, "backend": "triton"}
    runs = []
    for batch, batch_mask in ((ids, mask), (prompts[1][None], None)):
        cache = KVQuantCache(cfg, signposts=signposts, model_config=model.config)
        out = model.generate(batch, attention_mask=batch_mask, max_new_tokens=3, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, **{cache_kwarg_name(model): cache})
        assert cache.layers[0].backend == "triton"
        runs.append((out.sequences[:, batch.shape[1]:], torch.stack(out.scores, 1)))
    (tokens, scores), (alone_tokens, alone_scores) = runs
    assert tokens[1].tolist() == alone_tokens[0].tolist()
    torch.testing.assert_close(scores[1], alone_scores[0], atol=1e-4, rtol=1e-4)

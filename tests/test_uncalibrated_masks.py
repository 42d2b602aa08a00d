"""Uncalibrated key ranges (no signposts) when some or all rows of the first prompt are only padding: generate runs
as with transformers' own cache, and the ranges come from real tokens only."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama

import kvquant_hf

pytestmark = [pytest.mark.filterwarnings("ignore::kvquant_hf.UncalibratedCacheWarning"),
              pytest.mark.filterwarnings("ignore:.*right-padding.*")]

ROW = [5, 17, 99, 3, 42, 8, 77, 31, 64, 12]
CONFIGS = [{}, {"sink_tokens": 0}, {"sink_tokens": 4}, {"prefill_chunk_size": 4}, {"bits": 2, "sink_tokens": 2}]


def _model():
    model = make_tiny_llama()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def _generate(model, ids, mask, **kw):
    return model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, **kw)


def _cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out["past_key_values"]


MASKS = {
    "one_row_all_zero": (torch.tensor([ROW]), torch.zeros(1, 10, dtype=torch.long)),
    "every_row_all_zero": (torch.tensor([ROW, ROW[::-1]]), torch.zeros(2, 10, dtype=torch.long)),
    "second_row_all_zero": (torch.tensor([ROW, ROW[::-1]]), torch.tensor([[1] * 10, [0] * 10])),
    "first_row_all_zero_third_padded": (torch.tensor([ROW, ROW[::-1], ROW]),
                                        torch.tensor([[0] * 10, [1] * 10, [0] * 4 + [1] * 6])),
}


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("case", list(MASKS))
def test_all_padding_rows_generate_like_the_fp_cache(case, cfg):
    """Where the fp cache generates, the KVQuant cache generates too: same shapes, finite logits wherever the fp
    cache's are finite, finite key ranges in every layer (taken again from the first real tokens)."""
    model = _model()
    ids, mask = MASKS[case]
    fp = _generate(model, ids, mask)
    got = _generate(model, ids, mask, cache_implementation="kvquant", cache_config=cfg)
    assert got.sequences.shape == fp.sequences.shape
    fp_logits, logits = torch.stack(fp.logits), torch.stack(got.logits)
    assert bool(torch.isfinite(logits[torch.isfinite(fp_logits)]).all())
    for layer in _cache(got).layers:
        assert not layer.key_ranges_provisional  # the generated tokens are real: the ranges come from them
        assert bool(torch.isfinite(layer.k_lower).all() and torch.isfinite(layer.k_upper).all())


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_real_row_is_unaffected_by_an_all_padding_row(cfg):
    """A batch of a real prompt and an all-padding row: the real row's tokens and logits equal the prompt alone
    (the all-padding row adds nothing to the key ranges)."""
    model = _model()
    alone = _generate(model, torch.tensor([ROW]), torch.ones(1, 10, dtype=torch.long),
                      cache_implementation="kvquant", cache_config=cfg)
    ids, mask = MASKS["second_row_all_zero"]
    got = _generate(model, ids, mask, cache_implementation="kvquant", cache_config=cfg)
    assert torch.equal(got.sequences[:1], alone.sequences)
    torch.testing.assert_close(torch.stack(got.logits)[:, :1], torch.stack(alone.logits), atol=1e-4, rtol=1e-4)
    for a, b in zip(_cache(got).layers, _cache(alone).layers):
        torch.testing.assert_close(a.k_lower, b.k_lower, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.k_upper, b.k_upper, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sink_tokens", [0, 1])
def test_first_chunk_all_padding_in_every_row_ranges_from_real_tokens(sink_tokens):
    """Left padding longer than the first prefill chunk in every row: the first chunk holds no real token. The
    ranges must come from the real tokens, so the padding's token ids change nothing."""
    model = _model()
    ids = torch.tensor([[0] * 6 + ROW[:6], [0] * 7 + ROW[5:10]])
    mask = (torch.arange(12)[None, :] >= torch.tensor([[6], [7]])).long()
    cfg = {"prefill_chunk_size": 4, "sink_tokens": sink_tokens}
    got = _generate(model, ids, mask, cache_implementation="kvquant", cache_config=cfg)
    other_pad = torch.where(mask.bool(), ids, torch.full_like(ids, 33))
    again = _generate(model, other_pad, mask, cache_implementation="kvquant", cache_config=cfg)
    assert torch.equal(got.sequences[:, 12:], again.sequences[:, 12:])
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(again.logits), atol=1e-5, rtol=1e-5)
    for a, b in zip(_cache(got).layers, _cache(again).layers):
        assert not a.key_ranges_provisional
        torch.testing.assert_close(a.k_lower, b.k_lower, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(a.k_upper, b.k_upper, atol=1e-6, rtol=1e-6)


def test_provisional_ranges_are_dropped_by_reset():
    """A cache reset after an all-padding prompt takes its ranges from the next prompt again."""
    model = kvquant_hf.patch_model(_model())
    cache = kvquant_hf.KVQuantCache({"bits": 4}, model_config=model.config)
    name = kvquant_hf.generation.cache_kwarg_name(model)
    with torch.no_grad():
        model(torch.tensor([ROW]), attention_mask=torch.zeros(1, 10, dtype=torch.long), **{name: cache})
    assert all(layer.key_ranges_provisional for layer in cache.layers)
    cache.reset()
    assert all(not layer.key_ranges_provisional and layer.k_lower is None for layer in cache.layers)

"""Helpers shared by the reliability tests: a greedy generate on a fixed prompt and a small calibrated layer."""

from __future__ import annotations

import torch
from cache_helpers import calibrated_layer_signposts

from kvquant_hf.cache import KVQuantLayer
from kvquant_hf.config import KVQuantConfig
from kvquant_hf.generation import cache_kwarg_name

PROMPT = torch.tensor([[5, 17, 99, 3, 42, 8, 77, 31, 64, 12]])


def setup_model(model):
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def gen(model, n=6, **kw):
    return model.generate(PROMPT, max_new_tokens=n, do_sample=False, **kw)


def cache_kwargs(model, cache):
    return {cache_kwarg_name(model): cache}


def small_layer(**cfg):
    h = 2
    config = KVQuantConfig(**{"bits": 4, "outlier_slots": 1, "sink_tokens": 1, "block_size": 16, **cfg})
    return KVQuantLayer(config, 0, calibrated_layer_signposts(h), calibrated_layer_signposts(h))

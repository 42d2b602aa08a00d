"""Careless and hostile inputs to the memory planner and to ``generate``'s capacity check: each is a typed error
naming the argument (or a CapacityError before anything is allocated, on CPU too), never a raw traceback."""

from __future__ import annotations

import pytest
import torch
from cache_helpers import for_greedy_generate
from conftest import make_tiny_llama

import kvquant_hf
from kvquant_hf import planner
from kvquant_hf.cache import KVQuantCache, KVQuantLayer
from kvquant_hf.errors import KVQuantConfigError
from kvquant_hf.generation import cache_kwarg_name
from kvquant_hf.planner_checks import MAX_POSITIONS, free_host_memory

pytestmark = pytest.mark.filterwarnings("ignore::kvquant_hf.UncalibratedCacheWarning")

GiB = 2**30
PROMPT = torch.tensor([[5, 17, 99, 3, 42, 8, 77, 31, 64, 12]])


@pytest.fixture(scope="module")
def model():
    return for_greedy_generate(make_tiny_llama())


# (case, plan_capacity keyword arguments (model, config) -> dict, words the message must contain)
PLAN_CASES = [
    ("model is a string", lambda m, c: {"model": "meta-llama/Llama-3.1-8B"}, ["model must be", "str"]),
    ("model is a config", lambda m, c: {"model": c}, ["model_config="]),
    ("model is a tensor", lambda m, c: {"model": torch.zeros(3)}, ["model must be", "Tensor"]),
    ("model_config is a dict", lambda m, c: {"model": None, "model_config": {"hidden_size": 64}},
     ["model_config", "num_hidden_layers"]),
    ("model_config is a string", lambda m, c: {"model": None, "model_config": "llama"}, ["model_config", "str"]),
    ("no model and no config", lambda m, c: {"model": None}, ["model or a model_config"]),
    ("cache_config is a list", lambda m, c: {"cache_config": [4]}, ["cache_config", "dict"]),
    ("cache_config unknown string", lambda m, c: {"cache_config": "fp8"}, ["cache_config='fp8'", "'fp16'"]),
    ("cache_config unknown key", lambda m, c: {"cache_config": {"bitz": 4}}, ["bitz"]),
    ("free_memory is a string", lambda m, c: {"free_memory": "80GB"}, ["free_memory", "str"]),
    ("free_memory is negative", lambda m, c: {"free_memory": -1}, ["free_memory", ">= 0"]),
    ("free_memory is NaN", lambda m, c: {"free_memory": float("nan")}, ["free_memory"]),
    ("free_memory is a bool", lambda m, c: {"free_memory": True}, ["free_memory", "bool"]),
    ("free_memory value None", lambda m, c: {"free_memory": {"cpu": None}}, ["free_memory['cpu']", "NoneType"]),
    ("free_memory value str", lambda m, c: {"free_memory": {"cpu": "1G"}}, ["free_memory['cpu']", "str"]),
    ("free_memory device bad", lambda m, c: {"free_memory": {"gpu0": GiB}}, ["free_memory key", "'gpu0'"]),
    ("free_memory device negative", lambda m, c: {"free_memory": {-1: GiB}}, ["free_memory key", ">= 0"]),
    ("dtype not a dtype", lambda m, c: {"dtype": "float17"}, ["dtype='float17'"]),
    ("dtype an int dtype", lambda m, c: {"dtype": torch.int8}, ["dtype=torch.int8"]),
    ("dtype a number", lambda m, c: {"dtype": 16}, ["dtype=16"]),
    ("batch_size str", lambda m, c: {"batch_size": "2"}, ["batch_size='2'", "int"]),
    ("batch_size float", lambda m, c: {"batch_size": 2.0}, ["batch_size=2.0", "int"]),
    ("batch_size bool", lambda m, c: {"batch_size": True}, ["batch_size=True", "int"]),
    ("batch_size None", lambda m, c: {"batch_size": None}, ["batch_size=None", "int"]),
    ("batch_size zero", lambda m, c: {"batch_size": 0}, ["batch_size=0", ">= 1"]),
    ("prompt_tokens float", lambda m, c: {"prompt_tokens": 10.5}, ["prompt_tokens=10.5"]),
    ("prompt_tokens empty", lambda m, c: {"prompt_tokens": 0}, ["prompt_tokens=0", "at least one token"]),
    ("prompt_tokens beyond int32", lambda m, c: {"prompt_tokens": MAX_POSITIONS + 1}, ["prompt_tokens", "<="]),
    ("prefill_chunk_size str", lambda m, c: {"prefill_chunk_size": "4096"}, ["prefill_chunk_size='4096'"]),
    ("prefill_chunk_size negative", lambda m, c: {"prefill_chunk_size": -1}, ["prefill_chunk_size=-1"]),
    ("reserved str", lambda m, c: {"reserved": "yes"}, ["reserved='yes'", "True or False"]),
    ("weights_resident int", lambda m, c: {"weights_resident": 1}, ["weights_resident=1", "True or False"]),
    ("headroom_bytes str", lambda m, c: {"headroom_bytes": "512M"}, ["headroom_bytes='512M'"]),
    ("headroom_bytes negative", lambda m, c: {"headroom_bytes": -5}, ["headroom_bytes=-5"]),
    ("max_tokens_limit float", lambda m, c: {"max_tokens_limit": 1e9}, ["max_tokens_limit"]),
    ("device_map unknown device", lambda m, c: {"model": None, "model_config": c, "device_map": ["cpu", "disk"]},
     ["device_map[1]", "'disk'"]),
    ("device_map of a wrong type", lambda m, c: {"model": None, "model_config": c, "device_map": "auto"},
     ["device_map=str"]),
    ("device_map dict bad device", lambda m, c: {"model": None, "model_config": c, "device_map": {"": "gpu"}},
     ["device_map['']", "'gpu'"]),
]


@pytest.mark.parametrize("case,kwargs,words", PLAN_CASES, ids=[c[0] for c in PLAN_CASES])
def test_plan_capacity_refuses_bad_arguments_by_name(model, case, kwargs, words):
    args = {"model": model, "cache_config": {"bits": 4}, "free_memory": {"cpu": 2 * GiB}}
    args.update(kwargs(model, model.config))
    with pytest.raises(KVQuantConfigError) as info:
        kvquant_hf.plan_capacity(**args)
    for word in words:
        assert word in str(info.value), (case, str(info.value))


@pytest.mark.parametrize("kwargs", [{"free_memory": 1.5 * GiB}, {"dtype": "bfloat16"}, {"dtype": "torch.float16"},
                                    {"free_memory": {0: GiB, "cpu": 2 * GiB}}, {"batch_size": torch.tensor(2).item()}])
def test_plan_capacity_accepts_natural_spellings(model, kwargs):
    args = {"model": model, "cache_config": {"bits": 4}, "free_memory": {"cpu": 2 * GiB}, "prompt_tokens": 16}
    args.update(kwargs)
    assert kvquant_hf.plan_capacity(**args).max_tokens > 1000


def test_plan_never_promises_more_than_int32_positions(model):
    plan = kvquant_hf.plan_capacity(model, {"bits": 2}, free_memory={"cpu": 2**60}, prompt_tokens=16)
    assert plan.max_tokens == MAX_POSITIONS
    fp16 = kvquant_hf.plan_capacity(model, "fp16", free_memory={"cpu": 2**60}, prompt_tokens=16)
    assert fp16.max_tokens > MAX_POSITIONS  # DynamicCache has no int32 positions


def test_a_huge_block_size_leaves_no_room_in_the_plan(model):
    plan = kvquant_hf.plan_capacity(model, {"block_size": 2**40}, free_memory={"cpu": 16 * GiB}, prompt_tokens=16)
    assert plan.max_tokens <= 1  # only the sink fits: one history token reserves 2**40 slots


def _generate(model, ids=PROMPT, **kw):
    return model.generate(ids, do_sample=False, cache_implementation="kvquant", **kw)


@pytest.fixture
def no_allocation(monkeypatch):
    """Records every layer allocation: a refused request allocates nothing."""
    calls = []
    original = KVQuantLayer.lazy_initialization
    monkeypatch.setattr(KVQuantLayer, "lazy_initialization",
                        lambda self, k, v: (calls.append(self.layer_idx), original(self, k, v))[1])
    return calls


# (case, generate keyword arguments, error type, words the message must contain)
GENERATE_CASES = [
    ("max_new_tokens str", {"max_new_tokens": "5"}, KVQuantConfigError, ["max_new_tokens='5'", "positive int"]),
    ("max_new_tokens float", {"max_new_tokens": 5.5}, KVQuantConfigError, ["max_new_tokens=5.5"]),
    ("max_new_tokens bool", {"max_new_tokens": True}, KVQuantConfigError, ["max_new_tokens=True"]),
    ("max_new_tokens zero", {"max_new_tokens": 0}, KVQuantConfigError, ["max_new_tokens=0"]),
    ("max_new_tokens negative", {"max_new_tokens": -3}, KVQuantConfigError, ["max_new_tokens=-3"]),
    ("beyond int32 positions", {"max_new_tokens": 2**31}, KVQuantConfigError, ["int32", "2,147,483,658"]),
    ("block_size larger than memory", {"max_new_tokens": 4, "cache_config": {"block_size": 2**40}},
     planner.CapacityError, ["block_size=1,099,511,627,776", "on cpu"]),
    ("max_new_tokens larger than memory", {"max_new_tokens": 2**31 - 100}, planner.CapacityError,
     ["2,147,483,558 tokens", "on cpu", "lower max_new_tokens"]),
    ("empty prompt", {"ids": PROMPT[:, :0], "max_new_tokens": 4}, KVQuantConfigError, ["prompt is empty"]),
    ("empty batch-2 prompt", {"ids": torch.zeros(2, 0, dtype=torch.long), "max_new_tokens": 4}, KVQuantConfigError,
     ["prompt is empty"]),
    ("empty prompt, no max_new_tokens", {"ids": PROMPT[:, :0]}, KVQuantConfigError, ["prompt is empty"]),
    ("num_beams str", {"max_new_tokens": 4, "num_beams": "2"}, KVQuantConfigError, ["num_beams='2'", "positive"]),
    ("num_return_sequences zero", {"max_new_tokens": 4, "num_return_sequences": 0}, KVQuantConfigError,
     ["num_return_sequences=0"]),
]


@pytest.mark.parametrize("case,kwargs,error,words", GENERATE_CASES, ids=[c[0] for c in GENERATE_CASES])
def test_generate_refuses_before_allocating(model, no_allocation, case, kwargs, error, words):
    with pytest.raises(error) as info:
        _generate(model, **kwargs)
    for word in words:
        assert word in str(info.value), (case, str(info.value))
    assert no_allocation == []


@pytest.mark.parametrize("case,kwargs,error,words", GENERATE_CASES, ids=[c[0] for c in GENERATE_CASES])
def test_generate_with_a_user_cache_refuses_the_same(model, no_allocation, case, kwargs, error, words):
    kwargs = dict(kwargs)
    cache = KVQuantCache(kwargs.pop("cache_config", {}), model_config=model.config)
    with pytest.raises(error):
        model.generate(kwargs.pop("ids", PROMPT), do_sample=False, **{cache_kwarg_name(model): cache}, **kwargs)
    assert no_allocation == []


def test_an_empty_prompt_fails_with_the_fp_cache_too(model):
    """The class of outcome matches transformers' own cache: an error (there a raw one from inside the model)."""
    with pytest.raises(Exception):  # noqa: B017 (transformers' error type is not part of its API)
        model.generate(PROMPT[:, :0], max_new_tokens=4, do_sample=False)


def test_cpu_requests_are_checked_against_host_memory(model, monkeypatch, no_allocation):
    monkeypatch.setattr(planner, "free_host_memory", lambda: 700 * 2**20)  # 512 MiB headroom + ~188 MiB
    plan = kvquant_hf.plan_capacity(model, {"bits": 4}, free_memory={"cpu": 700 * 2**20},
                                    prompt_tokens=PROMPT.shape[1])
    assert PROMPT.shape[1] < plan.max_tokens < 10**8
    with pytest.raises(planner.CapacityError, match="on cpu"):
        _generate(model, max_new_tokens=plan.max_tokens - PROMPT.shape[1] + 1, cache_config={"bits": 4})
    assert no_allocation == []
    out = _generate(model, max_new_tokens=3, cache_config={"bits": 4})
    assert out.shape[1] == PROMPT.shape[1] + 3
    # capacity_check=False turns it off (the request is then the caller's responsibility)
    monkeypatch.setattr(planner, "free_host_memory", lambda: 0)
    out = _generate(model, max_new_tokens=3, cache_config={"bits": 4, "capacity_check": False})
    assert out.shape[1] == PROMPT.shape[1] + 3


def test_host_memory_is_known_here():
    free = free_host_memory()
    assert free is not None and 0 < free < 2**50


@pytest.mark.parametrize("tokens", [MAX_POSITIONS + 1, -1, "16", 16.0, None, True])
def test_reserve_refuses_what_int32_positions_cannot_hold(model, tokens):
    cache = KVQuantCache({"bits": 4}, model_config=model.config)
    with pytest.raises(KVQuantConfigError, match="reserve"):
        cache.reserve(tokens)
    assert all(layer.reserve_tokens == 0 for layer in cache.layers)


def test_max_new_tokens_in_a_passed_generation_config_is_checked_too(model, no_allocation):
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=2**31 - 100, do_sample=False, pad_token_id=0, eos_token_id=None)
    with pytest.raises(planner.CapacityError, match="on cpu"):
        model.generate(PROMPT, generation_config=config, cache_implementation="kvquant")
    assert no_allocation == []
    config = GenerationConfig(max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert model.generate(PROMPT, generation_config=config, cache_implementation="kvquant").shape[1] == 13

"""Memory planner (`kvquant_hf.plan_capacity`): exact byte accounting, growth policy, multi-device arithmetic and
the `generate` refusal, all on CPU with explicit memory figures."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama

import kvquant_hf
from kvquant_hf import planner
from kvquant_hf.benchmarking import fast_filled_cache
from kvquant_hf.cache import KVQuantCache, KVQuantLayer
from kvquant_hf.layer_storage import (
    HISTORY_TENSORS,
    ROW_TENSORS,
    SINK_TENSORS,
    grown_capacities,
    layer_tensor_bytes,
    reserved_capacity,
)
from kvquant_hf.config import KVQuantConfig
from kvquant_hf.errors import KVQuantConfigError, KVQuantError
from kvquant_hf.generation import cache_kwarg_name

GiB = 2**30
PROMPT = torch.tensor([[5, 17, 99, 3, 42, 8, 77, 31, 64, 12]])


pytestmark = pytest.mark.filterwarnings("ignore::kvquant_hf.UncalibratedCacheWarning")


def _llama3_8b_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False)


def _free_for(model, extra: int, prompt: int, batch: int = 1, cfg: dict | None = None) -> int:
    """Free memory that leaves ``extra`` bytes for the cache after headroom and activations (CPU)."""
    conf = KVQuantConfig.from_dict(cfg or {})
    chunk = min(prompt, conf.prefill_chunk_size) if conf.prefill_chunk_size else prompt
    act = planner.activation_bytes(planner.ModelShape.from_config(model.config), torch.float32, batch, chunk,
                                   "kvquant", "cpu", sink_tokens=conf.sink_tokens)
    return planner.DEFAULT_HEADROOM + act + extra


def _layer_nbytes(layer: KVQuantLayer) -> int:
    names = list(HISTORY_TENSORS + SINK_TENSORS + ROW_TENSORS)
    names += ["k_lut", "v_lut", "k_lower", "k_upper", "k_zero", "k_scale", "clip_counter"]
    total = 0
    for name in names:
        t = getattr(layer, name, None)
        if t is not None:
            total += t.numel() * t.element_size()
    return total


@pytest.mark.parametrize("bits,slots,sink,dtype", [(4, None, 1, torch.float32), (2, 3, 4, torch.bfloat16),
                                                   (3, 0, 0, torch.float16)])
def test_layer_tensor_bytes_equal_the_allocation(bits, slots, sink, dtype):
    cfg = KVQuantConfig(bits=bits, recent_window=0, outlier_slots=slots, sink_tokens=sink, block_size=32)
    b, h, d, total = 2, 2, 32, 77
    layer = KVQuantLayer(cfg, 0)
    layer.reserve(total)
    k = torch.randn(b, h, 40, d).to(dtype)
    layer.lazy_initialization(k, k)
    layer.store(k, k, torch.arange(40).expand(b, 40), None)  # thresholds from the prompt: all tensors exist
    cap = reserved_capacity(cfg, total)
    assert layer.capacity == cap == -(-(total - sink) // 32) * 32
    sizes = layer_tensor_bytes(cfg, b, h, d, dtype, cap)
    # CPU: no Triton clip counter (the last, 4-byte entry)
    assert _layer_nbytes(layer) == sum(sizes) - 4
    # the history part is exactly what memory_footprint(include_spare=True) counts per token
    assert sum(sizes[:9]) == b * cap * layer.bytes_per_history_token()
    assert layer.memory_footprint(include_spare=True) == b * (cap * layer.bytes_per_history_token()
                                                             + sink * layer.bytes_per_sink_token())


def test_grown_capacities_follow_the_layer_growth():
    cfg = KVQuantConfig(bits=4, recent_window=0, sink_tokens=1, block_size=16)
    layer = KVQuantLayer(cfg, 0)
    h, d = 2, 16
    seen = []
    k = torch.randn(1, h, 1, d)
    layer.lazy_initialization(k, k)
    layer.set_key_thresholds(-torch.ones(h, d), torch.ones(h, d))
    appends = [24] * 5 + [1] * 90
    pos = 0
    for n in appends:
        x = torch.randn(1, h, n, d)
        layer.append_history(x, x, torch.arange(pos, pos + n).expand(1, n))
        pos += n
        if not seen or seen[-1] != layer.capacity:
            seen.append(layer.capacity)
    # the planner's simulation, with prefill appends of 24 then decode appends of 1
    predicted = grown_capacities(cfg, 5 * 24, 24)
    assert seen[: len(predicted)] == predicted
    assert predicted == [32, 48, 80, 128]
    assert grown_capacities(cfg, 0, 8) == []


def test_plan_capacity_matches_a_real_fill():
    model = make_tiny_llama()
    cfg = {"bits": 4, "block_size": 16, "recent_window": 0}  # (the ring's fixed cost: tests/test_recent_window.py)
    es = 4
    free = _free_for(model, 200_000, 10, batch=2)
    plan = kvquant_hf.plan_capacity(model, cfg, free_memory={"cpu": free}, batch_size=2, prompt_tokens=10)
    dev = plan.devices[0]
    assert dev.device == "cpu" and dev.layers == [0, 1] and dev.weights_resident
    assert dev.weights_bytes == sum(p.numel() * es for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())
    n = plan.max_tokens
    assert n > 100
    budget = dev.budget_bytes
    assert plan.cache_bytes(n)["cpu"] <= budget < plan.cache_bytes(n + 1)["cpu"]
    # a cache really filled to that many tokens with generate's reservation allocates what the plan says
    cache = fast_filled_cache(model, batch=2, tokens=n, cache_config=cfg, reserve=n)
    real = sum(_layer_nbytes(layer) for layer in cache.layers)
    assert real + 4 * len(cache.layers) == plan.cache_bytes(n)["cpu"]  # + the CUDA-only clip counters
    stats = cache.memory_stats()
    assert stats["seq_length"] == n
    # bytes_allocated (spare included) is the history+sink part of the plan
    assert stats["bytes_allocated"] <= plan.cache_bytes(n)["cpu"] < stats["bytes_allocated"] + 4096


def test_plan_capacity_without_reservation_counts_growth():
    model = make_tiny_llama()
    kw = {"free_memory": {"cpu": _free_for(model, 300_000, 64)}, "batch_size": 1, "prompt_tokens": 64}
    reserved = kvquant_hf.plan_capacity(model, {"block_size": 16}, **kw)
    grown = kvquant_hf.plan_capacity(model, {"block_size": 16}, reserved=False, **kw)
    assert 0 < grown.max_tokens < reserved.max_tokens


def test_llama3_8b_h200_targets():
    """The issue's targets on one H200 (about 139.8 GiB usable), model weights loaded from a config."""
    cfg = _llama3_8b_config()
    free = {"cuda:0": int(139.8 * GiB)}
    kw = {"model_config": cfg, "free_memory": free, "dtype": torch.bfloat16}
    nuq4 = kvquant_hf.plan_capacity(None, {"bits": 4, "outlier_fraction": 0.01}, **kw)
    nuq2 = kvquant_hf.plan_capacity(None, {"bits": 2, "outlier_fraction": 0.01}, **kw)
    fp16 = kvquant_hf.plan_capacity(None, "fp16", **kw)
    dev = nuq4.devices[0]
    # bf16 Llama-3-8B: 8,030,261,248 parameters
    assert dev.weights_bytes == 2 * 8_030_261_248 and not dev.weights_resident
    # per token: 32 layers x (8 heads x (64 + 64 codes + 2x2 scale/zero + 2x2x3 slots) + 4 position)
    assert dev.bytes_per_token == 32 * (8 * (64 + 64 + 4 + 12) + 4) == 36992
    # chunked prefill keeps masks chunk-sized: nothing but the cache grows with the context
    expected = dev.budget_bytes / dev.bytes_per_token
    assert abs(nuq4.max_tokens - expected) / expected < 0.005  # allocator rounding (2 MiB) per tensor, blocks
    decode = kvquant_hf.plan_capacity(None, {"bits": 4}, prompt_tokens=1, **kw)  # filled cache, then decode
    assert decode.devices[0].activation_bytes < dev.activation_bytes
    # (+ the granularity of 2 MiB allocator rounding of each tensor)
    assert 0 < decode.max_tokens - nuq4.max_tokens < dev.activation_bytes / dev.bytes_per_token + 8192
    assert nuq4.max_tokens >= 3_000_000
    assert nuq2.max_tokens >= 5_000_000
    assert 850_000 < fp16.max_tokens < 1_050_000
    assert fp16.devices[0].bytes_per_token == 32 * 2 * 8 * 128 * 2
    assert nuq4.cache_bytes(nuq4.max_tokens)["cuda:0"] <= dev.budget_bytes


def test_multi_device_arithmetic():
    cfg = _llama3_8b_config()
    dec = {"prompt_tokens": 1}  # decode scenario: no chunk mask
    one = kvquant_hf.plan_capacity(None, {"bits": 2}, model_config=cfg, free_memory={"cuda:0": 100 * GiB}, **dec)
    layers = ["cuda:0"] * 16 + ["cuda:1"] * 16
    two = kvquant_hf.plan_capacity(None, {"bits": 2}, model_config=cfg, device_map=layers,
                                   free_memory={"cuda:0": 100 * GiB, "cuda:1": 100 * GiB}, **dec)
    d0, d1 = two.devices
    assert (d0.device, d1.device) == ("cuda:0", "cuda:1")
    assert d0.layers == list(range(16)) and d1.layers == list(range(16, 32))
    assert d0.bytes_per_token == d1.bytes_per_token == one.devices[0].bytes_per_token / 2
    # embedding on the first device, LM head and final norm on the last (untied: same sizes)
    assert d1.weights_bytes - d0.weights_bytes == 4096 * 2
    assert two.max_tokens == min(d0.max_tokens, d1.max_tokens)
    assert two.max_tokens > 2 * one.max_tokens  # twice the memory, the same weights
    # an uneven split: the fuller device limits the context
    uneven = kvquant_hf.plan_capacity(None, {"bits": 2}, model_config=cfg,
                                      device_map=["cuda:0"] * 24 + ["cuda:1"] * 8,
                                      free_memory={"cuda:0": 100 * GiB, "cuda:1": 100 * GiB}, **dec)
    assert uneven.limiting_device == "cuda:0"
    assert uneven.max_tokens == uneven.per_device_tokens["cuda:0"] < uneven.per_device_tokens["cuda:1"]
    # accelerate-style map gives the same plan as the list
    amap = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 1, "lm_head": 1}
    amap.update({f"model.layers.{i}": 0 if i < 16 else 1 for i in range(32)})
    same = kvquant_hf.plan_capacity(None, {"bits": 2}, model_config=cfg, device_map=amap,
                                    free_memory={"cuda:0": 100 * GiB, "cuda:1": 100 * GiB}, **dec)
    assert same.per_device_tokens == two.per_device_tokens
    # the generate scenario (4096-token prefill chunk) only adds activations per device
    chunked = kvquant_hf.plan_capacity(None, {"bits": 2}, model_config=cfg, device_map=layers,
                                       free_memory={"cuda:0": 100 * GiB, "cuda:1": 100 * GiB})
    assert 0 < two.max_tokens - chunked.max_tokens < 2 * chunked.devices[0].activation_bytes / d0.bytes_per_token


def test_plan_reads_layer_devices_from_the_model():
    """Layers on two devices (CPU and meta stand in for two GPUs): each device counts its own layers and weights."""
    model = make_tiny_llama(num_hidden_layers=3)
    model.model.layers[2].to("meta")
    plan = kvquant_hf.plan_capacity(model, {"block_size": 16}, prompt_tokens=8,
                                    free_memory={"cpu": _free_for(model, 10**6, 8), "meta": _free_for(model, 10**5, 8)})
    by_dev = {d.device: d for d in plan.devices}
    assert by_dev["cpu"].layers == [0, 1] and by_dev["meta"].layers == [2]
    layer_bytes = sum(p.numel() * 4 for p in model.model.layers[2].parameters())
    assert by_dev["meta"].weights_bytes == layer_bytes
    assert plan.max_tokens == min(by_dev["cpu"].max_tokens, by_dev["meta"].max_tokens)
    assert plan.limiting_device == "meta"


def test_cache_layers_allocate_on_their_keys_device():
    cache = KVQuantCache({"bits": 2, "block_size": 16}, num_layers=2)
    cache.reserve(40)
    k0 = torch.randn(1, 2, 3, 16)
    k1 = torch.randn(1, 2, 3, 16, device="meta")
    cache.layers[0].lazy_initialization(k0, k0)
    cache.layers[1].lazy_initialization(k1, k1)
    for layer, dev in zip(cache.layers, ("cpu", "meta")):
        assert layer.device.type == dev
        for name in HISTORY_TENSORS + SINK_TENSORS:
            assert getattr(layer, name).device.type == dev, name
        assert layer.capacity == 48


def test_plan_needs_memory_figures_on_cpu():
    with pytest.raises(KVQuantConfigError, match="free_memory"):
        kvquant_hf.plan_capacity(make_tiny_llama(), {})


def _setup(model):
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def test_generate_refuses_a_request_that_cannot_fit(monkeypatch):
    model = _setup(make_tiny_llama())
    cfg = {"bits": 4, "block_size": 16, "recent_window": 0}
    free = _free_for(model, 120_000, PROMPT.shape[1])
    plan = kvquant_hf.plan_capacity(model, cfg, free_memory={"cpu": free}, prompt_tokens=PROMPT.shape[1])
    fits = plan.max_tokens
    assert fits > PROMPT.shape[1]
    monkeypatch.setattr(planner, "free_device_memory", lambda device: free)
    allocations = []
    original = KVQuantLayer.lazy_initialization
    monkeypatch.setattr(KVQuantLayer, "lazy_initialization",
                        lambda self, k, v: (allocations.append(self.layer_idx), original(self, k, v))[1])
    too_many = fits - PROMPT.shape[1] + 1
    with pytest.raises(planner.CapacityError) as info:
        model.generate(PROMPT, max_new_tokens=too_many, do_sample=False, cache_implementation="kvquant",
                       cache_config=cfg)
    msg = str(info.value)
    assert isinstance(info.value, KVQuantError)
    assert f"{fits + 1:,} tokens" in msg and f"only {fits:,} tokens fit" in msg and "Fix:" in msg
    assert allocations == []  # refused before the cache allocated anything
    # exactly at capacity it runs (a few tokens: the tiny model is cheap but not free)
    small_free = free - plan.devices[0].bytes_per_token * (fits - PROMPT.shape[1] - 4)
    small = kvquant_hf.plan_capacity(model, cfg, free_memory={"cpu": small_free}, prompt_tokens=PROMPT.shape[1])
    monkeypatch.setattr(planner, "free_device_memory", lambda device: small_free)
    new = small.max_tokens - PROMPT.shape[1]
    assert 1 <= new <= 40
    out = model.generate(PROMPT, max_new_tokens=new, do_sample=False, cache_implementation="kvquant",
                         cache_config=cfg)
    assert out.shape[1] == small.max_tokens
    with pytest.raises(planner.CapacityError):
        model.generate(PROMPT, max_new_tokens=new + 1, do_sample=False, cache_implementation="kvquant",
                       cache_config=cfg)
    # batch and returned sequences count
    with pytest.raises(planner.CapacityError, match="batch 2"):
        model.generate(PROMPT.repeat(2, 1), max_new_tokens=new, do_sample=False,
                       cache_implementation="kvquant", cache_config=cfg)
    with pytest.raises(planner.CapacityError, match="batch 3"):
        model.generate(PROMPT, max_new_tokens=new, do_sample=True, num_return_sequences=3,
                       cache_implementation="kvquant", cache_config=cfg)
    # a user-built cache is checked too; capacity_check=False turns the check off
    with pytest.raises(planner.CapacityError):
        model.generate(PROMPT, max_new_tokens=new + 1, do_sample=False,
                       **{cache_kwarg_name(model): KVQuantCache(cfg, model_config=model.config)})
    out = model.generate(PROMPT, max_new_tokens=new + 1, do_sample=False, cache_implementation="kvquant",
                         cache_config={**cfg, "capacity_check": False})
    assert out.shape[1] == small.max_tokens + 1


def test_generate_without_memory_figures_does_not_check():
    model = _setup(make_tiny_llama())
    out = model.generate(PROMPT, max_new_tokens=3, do_sample=False, cache_implementation="kvquant",
                         cache_config={"bits": 4})
    assert out.shape[1] == PROMPT.shape[1] + 3

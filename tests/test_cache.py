"""KVQuantCache: packed storage, attention semantics, padding, beams, crop/reset, accounting (CPU, tiny models)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import make_tiny_llama, make_tiny_mistral

import kvquant_hf
from kvquant_hf import cache as cache_mod
from kvquant_hf import quant
from kvquant_hf.attention import packed_attention_torch
from kvquant_hf.cache import KVQuantCache, KVQuantLayer, resolve_backend
from kvquant_hf.config import KVQuantConfig
from kvquant_hf.errors import BackendUnavailableError, KVQuantConfigError, KVQuantError, UnsupportedModelError
from kvquant_hf.generation import _cache_kwarg_name
from kvquant_hf.layer_api import AttendInputs, RopeContext, apply_rope
from kvquant_hf.models import patch_model
from kvquant_hf.signposts import LayerSignposts, Signposts

HEAD_DIM = 16


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def make_signposts(model, lut: torch.Tensor, lower: float | torch.Tensor, upper: float | torch.Tensor, bits: int):
    """In-memory Signposts for `model` with the same table and thresholds in every layer."""
    cfg = model.config
    h = cfg.num_key_value_heads
    lo = torch.full((h, HEAD_DIM), float(lower)) if not isinstance(lower, torch.Tensor) else lower
    hi = torch.full((h, HEAD_DIM), float(upper)) if not isinstance(upper, torch.Tensor) else upper
    layers = [
        LayerSignposts(lut.clone(), lut.clone(), lo.clone(), hi.clone(), torch.zeros(4), torch.zeros(4))
        for _ in range(cfg.num_hidden_layers)
    ]
    meta = {
        "bits": bits,
        "model": {
            "model_type": cfg.model_type,
            "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": h,
            "head_dim": HEAD_DIM,
            "hidden_size": cfg.hidden_size,
        },
    }
    return Signposts(layers=layers, metadata=meta)


def make_lossless(model):
    """Make quantization exact for `model` (modified in place) and return `(cache_factory, reference_model)`.

    The lossless setting: head_dim 16 with 15 outlier slots; channel 0 of every key head is forced to exactly 0
    (zeroed k_proj rows, in the reference too) and sits inside the calibrated range [0, 0], every other key
    channel is an outlier stored exactly; each value token keeps 15 exact slots and the remaining channel is
    its own zero point, decoded through the table entry 0 (the table contains 0 exactly). Float32 models also
    need float32 value scale/zero (`fp32_value_scales` fixture).
    """
    h = model.config.num_key_value_heads
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight.view(h, HEAD_DIM, -1)[:, 0] = 0
    reference = copy.deepcopy(model)
    lut = torch.linspace(-1.0, 0.875, 16)  # step 0.125: contains 0 exactly
    sp = make_signposts(model, lut, 0.0, 0.0, bits=4)
    patch_model(model)

    def factory(**overrides):
        cfg = {"bits": 4, "outlier_slots": HEAD_DIM - 1, "sink_tokens": 2, "block_size": 16, **overrides}
        return KVQuantCache(cfg, signposts=sp, model_config=model.config)

    return factory, reference


@pytest.fixture
def fp32_value_scales(monkeypatch):
    """Store per-token value scale/zero in float32 for float32 models (default fp16), so the lossless setting is exact."""
    original = quant.value_scale_dtype
    monkeypatch.setattr(quant, "value_scale_dtype", lambda dt: torch.float32 if dt == torch.float32 else original(dt))


def forward(model, ids, cache, **kwargs):
    return model(ids, **{_cache_kwarg_name(model): cache}, **kwargs).logits


def chunked_logits(model, ids, cache, chunks):
    """Logits of `ids` fed in chunks of the given sizes (the rest one token at a time)."""
    outs, pos = [], 0
    sizes = list(chunks) + [1] * (ids.shape[1] - sum(chunks))
    with torch.no_grad():
        for n in sizes:
            outs.append(forward(model, ids[:, pos : pos + n], cache))
            pos += n
    return torch.cat(outs, dim=1)


def rope_for(positions: torch.Tensor, inv_freq: torch.Tensor, dtype=torch.float32) -> RopeContext:
    ctx = RopeContext(cos=None, sin=None, inv_freq=inv_freq)
    ctx.cos, ctx.sin = ctx.cos_sin(positions, dtype)
    return ctx


def synthetic_inputs(b, hq, h, n, pos0, dtype=torch.float32, seed=0, mask=None, window=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, n, HEAD_DIM, generator=g).to(dtype)
    k = (torch.randn(b, h, n, HEAD_DIM, generator=g) * 2).to(dtype)
    v = torch.randn(b, h, n, HEAD_DIM, generator=g).to(dtype)
    positions = torch.arange(pos0, pos0 + n).expand(b, n)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM))
    rope = rope_for(positions, inv_freq, dtype)
    q = apply_rope(q, rope.cos, rope.sin)
    return AttendInputs(q, k, v, positions, rope, mask, HEAD_DIM**-0.5, window)


def calibrated_layer_signposts(h, bits=4, lower=-1.5, upper=1.5):
    lut = quant.normal_float_signposts(bits)
    return LayerSignposts(lut, lut, torch.full((h, HEAD_DIM), lower), torch.full((h, HEAD_DIM), upper),
                          torch.zeros(4), torch.zeros(4))


# --------------------------------------------------------------------------------------------
# lossless: the cache reproduces the unpatched model exactly
# --------------------------------------------------------------------------------------------
@pytest.mark.compat
@pytest.mark.parametrize(
    "make, chunks",
    [
        (lambda: make_tiny_llama(num_key_value_heads=4), (9, 4)),  # MHA
        (lambda: make_tiny_llama(num_key_value_heads=2), (9, 4)),  # GQA
        (lambda: make_tiny_mistral(sliding_window=6), (9, 4)),  # window < prompt < sequence
        (lambda: make_tiny_llama(num_key_value_heads=2), ()),  # token by token from the first token
    ],
    ids=["llama-mha", "llama-gqa", "mistral-window6", "llama-token-by-token"],
)
def test_lossless_prefill_and_decode_match_unpatched_model(make, chunks, fp32_value_scales):
    model = make()
    factory, reference = make_lossless(model)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(ids).logits
    cache = factory()
    got = chunked_logits(model, ids, cache, chunks)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    stats = cache.memory_stats()
    assert stats["n_clipped"] == 0
    assert stats["seq_length"] == 24 and stats["sink_tokens"] == 2 and stats["quantized_tokens"] == 22


def test_lossless_setting_is_not_vacuous(fp32_value_scales):
    """The same model with a realistic 4-bit setting differs from the reference: the test above tests quantization."""
    model = make_tiny_llama()
    _factory, reference = make_lossless(model)
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(ids).logits
    lossy = KVQuantCache({"bits": 2, "outlier_slots": 0, "sink_tokens": 1}, model_config=model.config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kvquant_hf.UncalibratedCacheWarning)
        got = chunked_logits(model, ids, lossy, (10,))
    assert (got[:, 10:] - expected[:, 10:]).abs().max() > 1e-3


@pytest.mark.compat
@pytest.mark.parametrize("attn", ["sdpa", "eager"])  # bool masks and additive float masks
@pytest.mark.parametrize("make", [make_tiny_llama, lambda: make_tiny_mistral(sliding_window=5)], ids=["llama", "mistral"])
def test_left_padded_batch_equals_each_prompt_alone_lossless(make, attn, fp32_value_scales):
    model = make()
    model.set_attn_implementation(attn)
    factory, _ = make_lossless(model)
    _check_padded_batch_equals_alone(model, factory)


def test_left_padded_batch_equals_each_prompt_alone_calibrated_lossy():
    """With calibrated (fixed) key thresholds every token is quantized independently of the batch, and the sink of
    each row is its first *real* token: a padded row equals its prompt alone even at 3 bits."""
    model = make_tiny_llama()
    sp = make_signposts(model, quant.normal_float_signposts(3), -0.8, 0.8, bits=3)
    patch_model(model)

    def factory():
        return KVQuantCache({"bits": 3, "outlier_fraction": 0.05, "sink_tokens": 2}, signposts=sp, model_config=model.config)

    _check_padded_batch_equals_alone(model, factory)


def _check_padded_batch_equals_alone(model, factory):
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 128, (n,), generator=gen) for n in (11, 6, 3)]
    steps = torch.randint(1, 128, (4,), generator=gen)
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    kw = _cache_kwarg_name(model)
    batch_cache = factory()
    with torch.no_grad():
        position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
        batch_logits = [model(ids, attention_mask=mask, position_ids=position_ids, **{kw: batch_cache}).logits[:, -1]]
        for t in steps:
            mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=torch.long)], dim=1)
            pos = mask.sum(-1, keepdim=True) - 1
            step = t.expand(len(prompts), 1)
            batch_logits.append(model(step, attention_mask=mask, position_ids=pos, **{kw: batch_cache}).logits[:, -1])
    assert batch_cache.layers[0].has_hist_pad
    for i, p in enumerate(prompts):
        alone_cache = factory()
        with torch.no_grad():
            alone = [model(p[None], **{kw: alone_cache}).logits[:, -1]]
            for t in steps:
                alone.append(model(t.view(1, 1), **{kw: alone_cache}).logits[:, -1])
        for got, want in zip(batch_logits, alone):
            torch.testing.assert_close(got[i : i + 1], want, atol=2e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# storage: exactly the oracle's codes, appended without re-quantization, grown in blocks
# --------------------------------------------------------------------------------------------
def test_storage_matches_quant_oracle_and_grows_in_blocks():
    h, n = 2, 40
    cfg = KVQuantConfig(bits=3, outlier_slots=2, sink_tokens=1, block_size=16)
    layer = KVQuantLayer(cfg, 0, calibrated_layer_signposts(h, 3), calibrated_layer_signposts(h, 3))
    full = synthetic_inputs(2, 4, h, n, 0)
    capacities = []
    for t in range(n):
        step = synthetic_inputs(2, 4, h, 1, t)
        step.key, step.value = full.key[:, :, t : t + 1], full.value[:, :, t : t + 1]
        layer.attend(step)
        capacities.append(layer.capacity)
    assert layer.get_seq_length() == n and layer.n_sink == 1 and layer.length == n - 1
    # capacity: whole blocks, grown geometrically (few reallocations), never per token
    assert set(capacities) == {0, 16, 32, 48}  # sink first, then 16 -> ceil16(1.5 * 16) -> ceil16(1.5 * 32)
    assert layer.capacity >= n - 1
    lut = quant.normal_float_signposts(3)
    lo, hi = torch.full((h, HEAD_DIM), -1.5), torch.full((h, HEAD_DIM), 1.5)
    pk = quant.quantize_keys(full.key[:, :, 1:], lut, lo, hi, 2, 3)
    pv = quant.quantize_values(full.value[:, :, 1:], lut, 2, 3)
    m = n - 1
    assert torch.equal(layer.k_codes[:, :, :m], pk.codes)
    assert torch.equal(layer.k_out_idx[:, :, :m], pk.out_idx)
    assert torch.equal(layer.k_out_val[:, :, :m], pk.out_val)
    assert torch.equal(layer.v_codes[:, :, :m], pv.codes)
    assert torch.equal(layer.v_scale[:, :, :m], pv.scale) and torch.equal(layer.v_zero[:, :, :m], pv.zero)
    assert torch.equal(layer.v_out_idx[:, :, :m], pv.out_idx)
    assert torch.equal(layer.positions[:, :m], torch.arange(1, n, dtype=torch.int32).expand(2, m))
    assert torch.equal(layer.sink_k[:, :, :1], full.key[:, :, :1])  # sink: exact and pre-RoPE
    assert layer.n_clipped == pk.n_clipped


def test_attend_matches_reference_attention_over_dequantized_history():
    """attend() == softmax attention over [sink exact | dequantized history | new exact], RoPE from positions."""
    h, hq = 2, 4
    cfg = KVQuantConfig(bits=4, outlier_slots=1, sink_tokens=2, block_size=16)
    layer = KVQuantLayer(cfg, 0, calibrated_layer_signposts(h), calibrated_layer_signposts(h))
    layer.attend(synthetic_inputs(1, hq, h, 12, 0, seed=1))
    step = synthetic_inputs(1, hq, h, 3, 12, seed=2)
    got = layer.attend(copy.copy(step))  # [B, L, Hq, D]
    # reference: dense attention on explicit tensors
    k_hist, v_hist = layer.dequantized_history()
    k_hist, v_hist = k_hist[:, :, :10], v_hist[:, :, :10]  # the 3 new tokens were appended after attending
    pos_all = torch.arange(0, 15)[None]
    rope = rope_for(pos_all, step.rope.inv_freq)
    k_all = torch.cat([layer.sink_k[:, :, :2].float(), k_hist, step.key], dim=2)
    v_all = torch.cat([layer.sink_v[:, :, :2].float(), v_hist, step.value], dim=2)
    k_all = apply_rope(k_all, rope.cos, rope.sin).repeat_interleave(hq // h, dim=1)
    v_all = v_all.repeat_interleave(hq // h, dim=1)
    scores = step.query @ k_all.transpose(-1, -2) * HEAD_DIM**-0.5
    causal = torch.ones(3, 15, dtype=torch.bool).tril(diagonal=12)
    want = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1) @ v_all
    torch.testing.assert_close(got, want.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_sliding_window_masks_sink_and_history():
    h = 2
    cfg = KVQuantConfig(bits=4, outlier_slots=1, sink_tokens=1, block_size=16)
    layer = KVQuantLayer(cfg, 0, calibrated_layer_signposts(h), calibrated_layer_signposts(h))
    layer.attend(synthetic_inputs(1, 4, h, 10, 0, window=4))
    step = synthetic_inputs(1, 4, h, 1, 10, window=4)
    got = layer.attend(copy.copy(step))
    # only tokens 7, 8, 9 (history) and the new token are visible; the sink (position 0) is outside the window
    k_hist, v_hist = layer.dequantized_history()
    rope = rope_for(torch.arange(7, 11)[None], step.rope.inv_freq)
    k = apply_rope(torch.cat([k_hist[:, :, 6:9], step.key], 2), rope.cos, rope.sin).repeat_interleave(2, 1)
    v = torch.cat([v_hist[:, :, 6:9], step.value], 2).repeat_interleave(2, 1)
    want = torch.softmax(step.query @ k.transpose(-1, -2) * HEAD_DIM**-0.5, -1) @ v
    torch.testing.assert_close(got, want.transpose(1, 2), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# transformers cache API: beams, crop, reset, batch ops
# --------------------------------------------------------------------------------------------
def _filled_cache(model, batch=3, n=14, **overrides):
    sp = make_signposts(model, quant.normal_float_signposts(4), -1.0, 1.0, bits=4)
    cache = KVQuantCache({"bits": 4, "sink_tokens": 1, "block_size": 16, **overrides}, signposts=sp,
                         model_config=model.config)
    ids = torch.randint(1, 128, (batch, n), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        forward(model, ids, cache)
    return cache, ids


def _layer_state(layer):
    return {name: getattr(layer, name).clone() for name in layer._batch_tensors()}


def test_reorder_cache_selects_rows_of_every_tensor():
    model = patch_model(make_tiny_llama())
    cache, _ = _filled_cache(model)
    before = [_layer_state(layer) for layer in cache.layers]
    beam_idx = torch.tensor([2, 0, 0])
    cache.reorder_cache(beam_idx)
    for layer, state in zip(cache.layers, before):
        assert layer.batch_size == 3
        for name, tensor in state.items():
            assert torch.equal(getattr(layer, name), tensor[beam_idx]), name


def test_reordered_cache_continues_like_a_cache_of_the_reordered_prompts():
    model = patch_model(make_tiny_llama())
    cache, ids = _filled_cache(model)
    beam_idx = torch.tensor([1, 1, 2])
    cache.reorder_cache(beam_idx)
    direct = KVQuantCache(cache.config, signposts=cache.key_signposts, model_config=model.config)
    nxt = torch.randint(1, 128, (3, 1), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        forward(model, ids[beam_idx], direct)
        a = forward(model, nxt, cache)
        b = forward(model, nxt, direct)
    torch.testing.assert_close(a, b)


def test_batch_repeat_interleave_and_select():
    model = patch_model(make_tiny_llama())
    cache, _ = _filled_cache(model, batch=2)
    state = _layer_state(cache.layers[1])
    cache.batch_repeat_interleave(3)
    assert cache.layers[1].batch_size == 6
    assert torch.equal(cache.layers[1].k_codes, state["k_codes"].repeat_interleave(3, 0))
    cache.batch_select_indices(torch.tensor([0, 5]))
    assert torch.equal(cache.layers[1].k_codes, state["k_codes"])
    assert torch.equal(cache.layers[1].sink_k, state["sink_k"])


def test_crop_removes_tokens_from_the_end_and_decoding_resumes_identically():
    model = patch_model(make_tiny_llama())
    cache, _ = _filled_cache(model, batch=2, n=10)
    extra = torch.randint(1, 128, (2, 4), generator=torch.Generator().manual_seed(7))
    first = chunked_logits(model, extra, cache, ())
    assert cache.get_seq_length() == 14
    cache.crop(-4)
    assert cache.get_seq_length() == 10 and all(layer.length == 9 for layer in cache.layers)
    again = chunked_logits(model, extra, cache, ())
    torch.testing.assert_close(again, first)
    cache.crop(0)  # transformers' "no-op / minimal size" call
    assert cache.get_seq_length() == 14
    cache.crop(12)  # legacy form: keep the first 12 tokens
    assert cache.get_seq_length() == 12
    cache.crop(1)  # into the sink boundary: only the sink token stays
    assert cache.get_seq_length() == 1 and cache.layers[0].length == 0 and cache.layers[0].n_sink == 1
    cache.crop(-5)
    assert cache.get_seq_length() == 0


def test_reset_keeps_allocation_and_reuse_gives_identical_results():
    model = patch_model(make_tiny_llama())
    cache = KVQuantCache({"bits": 4, "block_size": 16}, model_config=model.config)  # uncalibrated
    ids = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kvquant_hf.UncalibratedCacheWarning)
        first = chunked_logits(model, ids, cache, (8,))
        ptr, cap = cache.layers[0].k_codes.data_ptr(), cache.layers[0].capacity
        cache.reset()
        assert cache.get_seq_length() == 0 and cache.get_memory_footprint() == 0
        assert cache.layers[0].k_lower is None  # uncalibrated key ranges are re-estimated from the next prompt
        second = chunked_logits(model, ids, cache, (8,))
    assert cache.layers[0].k_codes.data_ptr() == ptr and cache.layers[0].capacity == cap
    torch.testing.assert_close(second, first)


def test_cache_api_basics():
    model = patch_model(make_tiny_llama())
    cache, _ = _filled_cache(model, batch=2, n=9)
    assert cache.get_seq_length() == 9 and cache.get_seq_length(1) == 9
    assert cache.get_mask_sizes(3, 0) == (12, 0)
    assert cache.get_max_cache_shape() == -1 and cache.get_max_length() == -1
    assert cache.is_compileable is False
    assert len(cache) == model.config.num_hidden_layers
    with pytest.raises(UnsupportedModelError, match="patch_model"):
        cache.update(torch.zeros(2, 2, 1, 16), torch.zeros(2, 2, 1, 16), 0)
    with pytest.raises(UnsupportedModelError, match="patch_model"):
        cache.layers[0].update(torch.zeros(2, 2, 1, 16), torch.zeros(2, 2, 1, 16))
    with pytest.raises(KVQuantError, match="reset"):
        forward(model, torch.ones(3, 1, dtype=torch.long), cache)  # batch size changed mid-sequence


def test_unpatched_model_with_kvquant_cache_raises_a_clear_error():
    model = make_tiny_llama()
    cache = KVQuantCache(model_config=model.config)
    with pytest.raises(UnsupportedModelError, match="patch_model"):
        forward(model, torch.ones(1, 4, dtype=torch.long), cache)


def test_lazy_layers_without_model_config():
    model = patch_model(make_tiny_llama())
    cache = KVQuantCache(bits=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kvquant_hf.UncalibratedCacheWarning)
        forward(model, torch.ones(1, 6, dtype=torch.long), cache)
    assert len(cache.layers) == model.config.num_hidden_layers and cache.get_seq_length() == 6


# --------------------------------------------------------------------------------------------
# dtypes and devices
# --------------------------------------------------------------------------------------------
def _cpu_supports(dtype) -> bool:
    try:
        x = torch.randn(2, 8, dtype=dtype)
        torch.nn.functional.scaled_dot_product_attention(x[None, None], x[None, None], x[None, None])
        (x @ x.T).sum().item()
        return True
    except RuntimeError:
        return False


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_model_dtypes(dtype):
    if not _cpu_supports(dtype):
        pytest.skip(f"this CPU build lacks {dtype} matmul/sdpa")
    model = make_tiny_llama()
    factory, reference = make_lossless(model)  # scales in the model dtype: exact for bf16/fp16
    model.to(dtype)
    reference.to(dtype)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = reference(ids).logits.float()
    cache = factory()
    got = chunked_logits(model, ids, cache, (8,)).float()
    layer = cache.layers[0]
    assert layer.sink_k.dtype == dtype and layer.k_out_val.dtype == dtype
    assert layer.v_scale.dtype == (torch.bfloat16 if dtype == torch.bfloat16 else torch.float16)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    # our attention accumulates in float32, transformers' in the model dtype: compare at that dtype's precision
    tol = {torch.float32: 2e-3, torch.bfloat16: 6e-2, torch.float16: 1e-2}[dtype]
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)


def test_backend_selection():
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("torch", torch.device("cpu")) == "torch"
    with pytest.raises(BackendUnavailableError, match="backend='torch'"):
        resolve_backend("triton", torch.device("cpu"))
    layer = KVQuantLayer(KVQuantConfig(backend="triton"))
    with pytest.raises(BackendUnavailableError):
        layer.attend(synthetic_inputs(1, 4, 2, 3, 0))


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def make_hd64(model_type: str = "llama", sliding_window: int | None = None):
    """A small random model with head_dim 64 (the Triton path needs a power of two >= 32): 1 layer, 4/2 heads."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    common = {
        "vocab_size": 128, "hidden_size": 256, "intermediate_size": 256, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "max_position_embeddings": 1024,
        "tie_word_embeddings": False,
    }
    torch.manual_seed(0)
    if model_type == "mistral":
        return MistralForCausalLM(MistralConfig(sliding_window=sliding_window, **common)).eval()
    return LlamaForCausalLM(LlamaConfig(**common)).eval()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_lossless_matches_unpatched_model(dtype):
    model = make_tiny_llama()
    factory, reference = make_lossless(model)  # scales in the model dtype: exact for fp16/bf16
    model.to("cuda", dtype)
    reference.to("cuda", dtype)
    ids = torch.randint(0, 128, (2, 40), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        expected = reference(ids).logits.float()
    cache = factory(backend="auto")
    got = chunked_logits(model, ids, cache, (20, 7)).float()
    layer = cache.layers[0]
    assert layer.k_codes.device.type == "cuda" and layer.backend == "torch"  # head_dim 16: torch path
    tol = 2e-2 if dtype == torch.float16 else 8e-2
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)


@pytest.mark.gpu
@needs_cuda
def test_cuda_triton_backend_refuses_head_dim_16():
    model = patch_model(make_tiny_llama()).cuda()
    cache = KVQuantCache(backend="triton", model_config=model.config)
    with pytest.raises(BackendUnavailableError, match="head_dim"):
        forward(model, torch.ones(1, 4, dtype=torch.long, device="cuda"), cache)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("kind", ["llama", "mistral-window12"])
def test_cuda_triton_and_torch_backends_agree(kind, dtype):
    model = make_hd64("mistral", 12) if kind.startswith("mistral") else make_hd64()
    model = patch_model(model).to("cuda", dtype)
    h = model.config.num_key_value_heads
    lut = quant.normal_float_signposts(3)
    sp = make_signposts(model, lut, -0.6, 0.6, bits=3)
    for layer_sp in sp.layers:  # make_signposts assumes head_dim 16
        layer_sp.key_lower, layer_sp.key_upper = torch.full((h, 64), -0.6), torch.full((h, 64), 0.6)
    sp.metadata["model"]["head_dim"] = 64
    ids = torch.randint(0, 128, (3, 70), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding in row 1
    caches, logits = {}, {}
    kw = _cache_kwarg_name(model)
    for backend in ("torch", "triton"):
        cache = KVQuantCache({"bits": 3, "outlier_slots": 2, "sink_tokens": 2, "block_size": 32, "backend": backend},
                             signposts=sp, model_config=model.config)
        outs = []
        with torch.no_grad():
            pos = (mask.cumsum(-1) - 1).clamp_min(0)
            outs.append(model(ids[:, :50], attention_mask=mask[:, :50], position_ids=pos[:, :50], **{kw: cache}).logits)
            outs.append(model(ids[:, 50:54], attention_mask=mask[:, :54], position_ids=pos[:, 50:54], **{kw: cache}).logits)
            for t in range(54, 70):
                outs.append(model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], position_ids=pos[:, t : t + 1],
                                  **{kw: cache}).logits)
        caches[backend], logits[backend] = cache, torch.cat(outs, 1).float()
    # one layer: it sees identical inputs, so its storage must be bit-identical
    a, b = caches["torch"].layers[0], caches["triton"].layers[0]
    assert b.backend == "triton" and b.triton_quantize
    n = a.length
    for name in ("k_codes", "k_out_idx", "k_out_val", "v_codes", "v_scale", "v_zero", "v_out_idx", "v_out_val"):
        assert torch.equal(getattr(a, name)[:, :, :n], getattr(b, name)[:, :, :n]), name
    assert a.n_clipped == b.n_clipped
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(logits["triton"], logits["torch"], atol=tol, rtol=tol)


@pytest.mark.gpu
@needs_cuda
def test_cuda_generate_auto_backend():
    model = make_hd64().to("cuda", torch.float16)
    model.generation_config.pad_token_id = 0
    prompt = torch.randint(1, 128, (2, 30), device="cuda")
    out = model.generate(prompt, max_new_tokens=16, do_sample=False, num_beams=2, cache_implementation="kvquant",
                         cache_config={"bits": 4}, return_dict_in_generate=True)
    cache = getattr(out, "cache", None) or out["past_key_values"]
    assert out.sequences.shape == (2, 46)
    assert cache.layers[0].backend == "triton"
    assert cache.memory_stats()["seq_length"] == 45


# --------------------------------------------------------------------------------------------
# accounting
# --------------------------------------------------------------------------------------------
def test_memory_footprint_exact_bytes_and_avg_bits():
    # B=2, H=2, D=16, 4-bit keys/values, 1 slot, fp16 model, sink 1, block 16
    b, h, n = 2, 2, 11
    cfg = KVQuantConfig(bits=4, outlier_slots=1, sink_tokens=1, block_size=16)
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
    cache, _ = _filled_cache(model, batch=2, n=13)
    total = 0
    for layer in cache.layers:
        for name in layer._batch_tensors():
            if name in ("sink_valid", "hist_start"):
                continue
            t = getattr(layer, name)
            if name in cache_mod._HISTORY_TENSORS:
                t = t[:, : layer.length] if name == "positions" else t[:, :, : layer.length]
            else:
                t = t[:, : layer.n_sink] if t.dim() == 2 else t[:, :, : layer.n_sink]
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
def test_uncalibrated_thresholds_come_from_the_prompt_without_sink_and_padding(monkeypatch):
    monkeypatch.setattr(cache_mod, "_UNCALIBRATED_WARNED", False)
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


def test_uncalibrated_warning_is_emitted_once(monkeypatch):
    monkeypatch.setattr(cache_mod, "_UNCALIBRATED_WARNED", False)
    model = patch_model(make_tiny_llama())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            cache = KVQuantCache(model_config=model.config)
            chunked_logits(model, torch.ones(1, 8, dtype=torch.long), cache, (6,))
    hits = [w for w in caught if issubclass(w.category, kvquant_hf.UncalibratedCacheWarning)]
    assert len(hits) == 1


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

    monkeypatch.setattr(cache_mod, "packed_attention_torch", spy)
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
    cfg = KVQuantConfig(bits=4, sink_tokens=2, block_size=16)
    layer = KVQuantLayer(cfg, 0, calibrated_layer_signposts(2), calibrated_layer_signposts(2))
    pre = synthetic_inputs(2, 4, 2, 7, 0)
    layer.attend(pre)
    inv_freq = pre.rope.inv_freq
    # rotated when the sink filled, exactly as the exact block rotated it before (model dtype, stored positions)
    cos, sin = pre.rope.cos_sin(layer.sink_positions[:, :2])
    assert torch.equal(layer.sink_k_rot[:, :, :2], apply_rope(layer.sink_k[:, :, :2], cos, sin))
    calls = []
    orig = layer._rotate_sink
    monkeypatch.setattr(layer, "_rotate_sink", lambda rope, sl: (calls.append(sl), orig(rope, sl)))
    fresh = KVQuantLayer(cfg, 0, calibrated_layer_signposts(2), calibrated_layer_signposts(2))
    fresh.attend(pre)
    step = _decode_inputs(pre, 1, inv_freq)
    out = layer.attend(step)
    assert calls == []  # the same RoPE (inv_freq object): no rotation in the decode step
    fresh._sink_rope = None  # forces the rotation: same result
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

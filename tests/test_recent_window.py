"""The exact recent window (``recent_window=R``): a query sees the R tokens before it exactly (plus itself and the
sink) and older tokens through the packed history, in prefill chunks, token-by-token decoding (the ring wraps),
left-padded batches, beam reordering and ``crop``; the accounting and the planner count the ring. CPU, torch path;
the Triton path runs in the interpreter."""

from __future__ import annotations

import copy

import pytest
import torch
from cache_helpers import (
    HEAD_DIM,
    calibrated_layer_signposts,
    filled_cache,
    for_greedy_generate,
    forward,
    make_signposts,
    rope_for,
    synthetic_inputs,
)
from conftest import make_tiny_llama

from kvquant_hf import quant
from kvquant_hf.cache import KVQuantCache
from kvquant_hf.config import KVQuantConfig
from kvquant_hf.errors import KVQuantConfigError
from kvquant_hf.layer import KVQuantLayer
from kvquant_hf.layer_api import apply_rope
from kvquant_hf.layer_storage import layer_tensor_bytes
from kvquant_hf.models import patch_model

H, HQ, SINK = 2, 4, 2


def make_layer(window: int, backend: str = "torch", slots: int = 1) -> KVQuantLayer:
    cfg = KVQuantConfig(bits=4, outlier_slots=slots, sink_tokens=SINK, block_size=16, recent_window=window,
                        backend=backend)
    # narrow key thresholds: many clipped keys, so a quantized token differs clearly from its exact form
    return KVQuantLayer(cfg, 0, calibrated_layer_signposts(H, lower=-1.0, upper=1.0), calibrated_layer_signposts(H))


def reference(layer: KVQuantLayer, keys: torch.Tensor, values: torch.Tensor, step, exact_from: int) -> torch.Tensor:
    """Dense attention of ``step``'s queries over every token so far: the sink and history tokens with index
    ``>= exact_from`` exact (``keys``/``values``: every token's exact pre-RoPE K/V, in order), older history tokens
    dequantized from the layer's packed history, the new tokens exact and causal."""
    n_new = step.key.shape[2]
    k_hist, v_hist = layer.dequantized_history()
    past = keys.shape[2] - n_new
    n_hist = past - SINK
    idx = torch.arange(n_hist)
    use_exact = (idx >= exact_from)[None, None, :, None]
    k = torch.where(use_exact, keys[:, :, SINK:past], k_hist[:, :, :n_hist])
    v = torch.where(use_exact, values[:, :, SINK:past], v_hist[:, :, :n_hist])
    k_all = torch.cat([keys[:, :, :SINK], k, keys[:, :, past:]], dim=2)
    v_all = torch.cat([values[:, :, :SINK], v, values[:, :, past:]], dim=2)
    rope = rope_for(torch.arange(keys.shape[2])[None], step.rope.inv_freq)
    k_all = apply_rope(k_all, rope.cos, rope.sin).repeat_interleave(HQ // H, dim=1)
    v_all = v_all.repeat_interleave(HQ // H, dim=1)
    scores = step.query @ k_all.transpose(-1, -2) * HEAD_DIM**-0.5
    causal = torch.ones(n_new, keys.shape[2], dtype=torch.bool).tril(diagonal=past)
    out = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1) @ v_all
    return out.transpose(1, 2)


def run_steps(layer: KVQuantLayer, sizes, window: int, seed: int = 0):
    """Feed calls of the given sizes; each call's output against :func:`reference` with the window rule."""
    keys, values, pos = None, None, 0
    for i, n in enumerate(sizes):
        step = synthetic_inputs(1, HQ, H, n, pos, seed=seed + i)
        keys = step.key if keys is None else torch.cat([keys, step.key], 2)
        values = step.value if values is None else torch.cat([values, step.value], 2)
        got = layer.attend(copy.copy(step))
        if pos > SINK:
            n_hist = pos - SINK
            want = reference(layer, keys, values, step, exact_from=n_hist - window)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        pos += n
    return keys, values


@pytest.mark.parametrize("window", [1, 3, 8])
def test_decode_sees_the_window_exact_and_older_tokens_packed(window):
    """Prefill, then single tokens past the ring's size (it wraps) and a chunk: every call against the reference."""
    run_steps(make_layer(window), [12, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 4, 1, 1], window)


def test_the_window_changes_the_output_and_zero_is_no_window():
    """The setting is not vacuous (a window of 3 differs from none), and window 0 is the packed-only cache."""
    outs = {}
    for w in (0, 3):
        layer = make_layer(w)
        layer.attend(synthetic_inputs(1, HQ, H, 12, 0, seed=0))
        outs[w] = layer.attend(synthetic_inputs(1, HQ, H, 1, 12, seed=1))
    assert not torch.allclose(outs[0], outs[3], atol=1e-3)
    run_steps(make_layer(0), [12, 1, 1, 3], 0)


def test_a_window_longer_than_the_sequence_makes_the_model_exact():
    """Every token exact: the patched model with the cache equals the stock model, in chunks and in decode steps."""
    model = make_tiny_llama()
    reference_model = copy.deepcopy(model)
    patch_model(model)
    sp = make_signposts(model, quant.normal_float_signposts(2), -0.5, 0.5, bits=2)  # very lossy when used
    ids = torch.randint(1, 128, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = reference_model(ids).logits
        for window, close in ((64, True), (0, False)):
            cache = KVQuantCache({"bits": 2, "sink_tokens": 1, "block_size": 16, "recent_window": window,
                                  "backend": "torch"}, signposts=sp, model_config=model.config)
            got = torch.cat([forward(model, ids[:, :8], cache)] +
                            [forward(model, ids[:, i:i + 1], cache) for i in range(8, 20)], dim=1)
            assert torch.allclose(got, want, atol=1e-4, rtol=1e-4) == close


def test_crop_refills_the_window_with_the_packed_form_of_tokens_that_had_left_it():
    window = 3
    layer = make_layer(window)
    keys, values = run_steps(layer, [12, 1, 1, 1, 1], window)  # history 14 tokens, ring holds 11..13
    layer.crop(-4)  # history 10: the window is 7..9, of which only none are still exact in the ring
    assert layer.length == 10 and layer.n_window == window
    keys, values = keys[:, :, :12], values[:, :, :12]
    step = synthetic_inputs(1, HQ, H, 1, 12, seed=50)
    got = layer.attend(copy.copy(step))
    keys, values = torch.cat([keys, step.key], 2), torch.cat([values, step.value], 2)
    # tokens 7..9 came back dequantized: everything in the history is in packed form
    torch.testing.assert_close(got, reference(layer, keys, values, step, exact_from=10), atol=1e-5, rtol=1e-5)
    # a crop that keeps part of the ring: tokens still there stay exact
    layer2 = make_layer(window)
    keys, values = run_steps(layer2, [12, 1, 1, 1, 1], window)  # ring holds history 11..13
    layer2.crop(-1)  # history 13: window 10..12; 11 and 12 are still in the ring, 10 comes back dequantized
    step = synthetic_inputs(1, HQ, H, 1, 15, seed=51)
    got = layer2.attend(copy.copy(step))
    keys, values = torch.cat([keys[:, :, :15], step.key], 2), torch.cat([values[:, :, :15], step.value], 2)
    torch.testing.assert_close(got, reference(layer2, keys, values, step, exact_from=11), atol=1e-5, rtol=1e-5)


def test_crop_into_the_sink_and_reset_empty_the_window():
    layer = make_layer(4)
    run_steps(layer, [9, 1, 1], 4)
    layer.crop(1)
    assert layer.length == 0 and layer.n_window == 0 and not bool(layer.sink_valid[:, 1:].any())
    layer.reset()
    run_steps(layer, [7, 1, 2, 1], 4, seed=20)


def test_reordered_cache_with_a_window_continues_like_the_reordered_prompts():
    model = patch_model(make_tiny_llama())
    cache, ids = filled_cache(model, recent_window=4, backend="torch")
    beam_idx = torch.tensor([1, 1, 2])
    cache.reorder_cache(beam_idx)
    direct = KVQuantCache(cache.config, signposts=cache.key_signposts, model_config=model.config)
    nxt = torch.randint(1, 128, (3, 1), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        forward(model, ids[beam_idx], direct)
        torch.testing.assert_close(forward(model, nxt, cache), forward(model, nxt, direct))


def test_beam_search_and_padded_generate_run_with_a_window():
    model = for_greedy_generate(patch_model(make_tiny_llama()))
    sp = make_signposts(model, quant.normal_float_signposts(4), -2.0, 2.0, bits=4)
    ids = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    cfg = {"signposts": sp, "bits": 4, "recent_window": 4, "backend": "torch", "prefill_chunk_size": 4}
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False,
                         cache_implementation="kvquant", cache_config=cfg)
    assert out.shape == (2, 15)


def test_accounting_and_planner_count_the_ring():
    model = patch_model(make_tiny_llama())
    cache, _ = filled_cache(model, batch=2, n=13, recent_window=5)
    layer = cache.layers[0]
    assert layer.n_window == 5 and layer.n_exact == 6
    sink_bytes = layer.bytes_per_sink_token()
    assert cache.get_memory_footprint() == 2 * 2 * (12 * layer.bytes_per_history_token() + 6 * sink_bytes)
    assert cache.memory_stats()["window_tokens"] == 5
    cfg = layer.config
    sizes = layer_tensor_bytes(cfg, 2, layer.num_heads, HEAD_DIM, layer.dtype, layer.capacity)
    allocated = [getattr(layer, n).numel() * getattr(layer, n).element_size() for n in layer.batch_tensors()]
    assert sum(allocated) == sum(sizes[: len(allocated)])


def test_recent_window_is_validated():
    for bad in (-1, 1.5, "128", 10**6):
        with pytest.raises(KVQuantConfigError, match="recent_window"):
            KVQuantConfig(recent_window=bad)


def test_triton_path_with_a_window_matches_the_reference(monkeypatch):
    """The Triton path (interpreter on CPU): exact block over [sink | window | new], packed kernel up to the window."""
    from conftest import force_triton_backend

    force_triton_backend(monkeypatch)
    layer = make_layer(3, backend="triton")
    run_steps(layer, [12, 1, 1, 1, 1, 2, 1], 3)
    assert layer.backend == "triton"


@pytest.mark.parametrize("graph", [False, True], ids=["index", "length_dev"])
def test_window_append_kernel_equals_the_torch_ring_write(graph):
    """``kvquant_hf.kernels.window_append_`` (interpreter on CPU) writes what the torch path writes, at the slot of
    the history index (given, or read from the device length), and the next step's attended length."""
    pytest.importorskip("triton")
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton interpreter on CPU (TRITON_INTERPRET=1)")
    from conftest import interpreted_module

    window_append_ = interpreted_module("window_write", "_window_append_kernel").window_append_
    b, h, ns, r, d = 3, 2, 2, 5, HEAD_DIM
    g = torch.Generator().manual_seed(0)
    key, value, key_rot = (torch.randn(b, h, 1, d, generator=g, dtype=torch.float32).to(torch.float16)
                           for _ in range(3))
    positions = torch.tensor([[40], [41], [42]])
    tensors = [torch.randn(b, h, ns + r, d, generator=g).to(torch.float16) for _ in range(3)]
    spos = torch.zeros(b, ns + r, dtype=torch.int32)
    svalid = torch.zeros(b, ns + r, dtype=torch.bool)
    want = [t.clone() for t in tensors]
    j = 13
    slot = ns + j % r
    for w, x in zip(want, (key, value, key_rot)):
        w[:, :, slot] = x[:, :, 0]
    length_dev = torch.tensor([j], dtype=torch.int32)
    attend = torch.zeros(1, dtype=torch.int32)
    window_append_(key, value, key_rot, positions, *tensors, spos, svalid, ns, r,
                   index=None if graph else j, length_dev=length_dev if graph else None,
                   attend_len=attend if graph else None)
    for got, w in zip(tensors, want):
        assert torch.equal(got, w)
    assert spos[:, slot].tolist() == [40, 41, 42] and int((spos != 0).sum()) == 3
    assert svalid[:, slot].all() and int(svalid.sum()) == 3
    if graph:
        assert int(attend) == j + 1 - r
    with pytest.raises(ValueError, match="exactly one"):
        window_append_(key, value, key_rot, positions, *tensors, spos, svalid, ns, r)

"""The exact-block kernel (``kvquant_hf.kernels.exact_block``) under the Triton interpreter against the torch ops it
replaces: ``apply_rope`` in the model dtype (bit-identical), ``cat`` of sink and new rows, the non-finite guard and
the graph-mode position write."""

from __future__ import annotations

# (TRITON_INTERPRET=1 is set by conftest.py on machines without a GPU; on a GPU machine these modules skip)
import pytest
import torch
from conftest import interpreted_kernel_modules, interpreted_module

from kvquant_hf.layer_api import RopeContext, apply_rope, rotate_half

interpreted_kernel_modules()  # skips this module unless the interpreter is on


def _prep():
    return interpreted_module("exact_block", "_decode_prep_kernel").decode_prep


def _inputs(b, hq, h, n, s, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # the attention forward's layout: [B, L, H, D] projections transposed to [B, H, L, D]
    q = (3 * torch.randn(b, n, hq, d, generator=g)).to(dtype).transpose(1, 2)
    k = (3 * torch.randn(b, n, h, d, generator=g)).to(dtype).transpose(1, 2)
    v = torch.randn(b, n, h, d, generator=g).to(dtype).transpose(1, 2)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    pos = torch.arange(100, 100 + n).expand(b, n) + torch.arange(b)[:, None] * 7
    cos, sin = RopeContext(None, None, inv_freq, 1.0).cos_sin(pos, dtype)
    sink_k = torch.randn(b, h, s, d, generator=g).to(dtype)
    sink_v = torch.randn(b, h, s, d, generator=g).to(dtype)
    return q, k, v, cos, sin, sink_k, sink_v, pos


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("b,hq,h,n,s,d", [(1, 4, 2, 1, 1, 16), (2, 6, 3, 3, 2, 32), (2, 8, 1, 1, 0, 64)])
def test_rope_and_exact_block_bit_identical_to_the_torch_ops(dtype, b, hq, h, n, s, d):
    decode_prep = _prep()
    q, k, v, cos, sin, sink_k, sink_v, _ = _inputs(b, hq, h, n, s, d, dtype)
    qr, ek, ev = decode_prep(q, k, v, cos, sin, sink_k, sink_v)
    assert qr.is_contiguous() and ek.shape == (b, h, s + n, d) and ev.shape == (b, h, s + n, d)
    assert torch.equal(ev, torch.cat([sink_v, v], dim=2))
    assert torch.equal(ek[:, :, :s], sink_k)
    for got, x in ((qr, q), (ek[:, :, s:], k)):
        want = apply_rope(x, cos, sin)
        if dtype == torch.bfloat16:
            # the interpreter casts float32 to bfloat16 by truncation (the GPU rounds to nearest; there the kernel
            # is bit-identical: tests/gpu/test_gpu_exact_block.py): up to one bf16 ulp per rounded step
            bound = 3 * 2**-7 * (x.float().abs() + rotate_half(x.float()).abs())
            assert ((got.float() - want.float()).abs() <= bound).all()
            assert not torch.allclose(got.float(), x.float(), atol=0.1)  # rotated (position 100+: far from identity)
        else:
            assert torch.equal(got, want)


def test_cos_sin_of_batch_one_broadcast_and_query_left_alone():
    decode_prep = _prep()
    q, k, v, cos, sin, sink_k, sink_v, _ = _inputs(2, 4, 2, 2, 1, 16, torch.float16)
    cos1, sin1 = cos[:1], sin[:1]
    qr, ek, _ = decode_prep(q, k, v, cos1, sin1, sink_k, sink_v, rotate_query=False)
    assert qr is q
    assert torch.equal(ek[:, :, 1:], apply_rope(k, cos1.expand(2, -1, -1), sin1.expand(2, -1, -1)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_guard_zeroes_bad_tokens_in_place_and_counts_them(dtype):
    decode_prep = _prep()
    b, hq, h, n, s, d = 2, 4, 3, 4, 1, 16
    q, k, v, cos, sin, sink_k, sink_v, _ = _inputs(b, hq, h, n, s, d, dtype, seed=3)
    k[0, 2, 1, 7] = float("nan")   # row 0, token 1: a NaN in one head's key
    v[1, 0, 3, 0] = float("inf")   # row 1, token 3: an Inf in one head's value
    k[1, 1, 2, 9] = float("-inf")  # row 1, token 2 (upper half of the channels) ...
    v[1, 1, 2, 5] = float("nan")   # ... and a NaN in its value too: still one bad token
    bad = ~(torch.isfinite(k).all(-1).all(1) & torch.isfinite(v).all(-1).all(1))
    keep = ~bad[:, None, :, None]
    want_k, want_v = torch.where(keep, k, 0.0), torch.where(keep, v, 0.0)
    counter = torch.full((1,), 2, dtype=torch.int64)
    qr, ek, ev = decode_prep(q, k, v, cos, sin, sink_k, sink_v, counter=counter)
    assert counter.item() == 2 + 3
    assert torch.equal(k, want_k) and torch.equal(v, want_v)  # in place: the store sees the zeroed tokens
    assert torch.equal(ek, torch.cat([sink_k, apply_rope(want_k, cos, sin)], dim=2))
    assert torch.equal(ev, torch.cat([sink_v, want_v], dim=2))
    assert torch.isfinite(qr).all()
    decode_prep(q, k, v, cos, sin, sink_k, sink_v, counter=counter)  # all finite now: nothing counted
    assert counter.item() == 5


def test_positions_written_at_the_device_length():
    decode_prep = _prep()
    q, k, v, cos, sin, sink_k, sink_v, pos = _inputs(2, 4, 2, 2, 1, 16, torch.float16)
    out = torch.full((2, 10), -1, dtype=torch.int32)
    decode_prep(q, k, v, cos, sin, sink_k, sink_v, positions=pos, positions_out=out,
                length_dev=torch.tensor([5], dtype=torch.int32))
    want = torch.full((2, 10), -1, dtype=torch.int32)
    want[:, 5:7] = pos.to(torch.int32)
    assert torch.equal(out, want)


def test_bad_arguments_are_named():
    decode_prep = _prep()
    q, k, v, cos, sin, sink_k, sink_v, pos = _inputs(1, 4, 2, 1, 1, 16, torch.float16)
    with pytest.raises(ValueError, match="dtypes differ"):
        decode_prep(q.float(), k, v, cos, sin)
    with pytest.raises(ValueError, match="cos/sin"):
        decode_prep(q, k, v, cos[..., :8], sin[..., :8])
    with pytest.raises(ValueError, match="all or none"):
        decode_prep(q, k, v, cos, sin, positions=pos)
    with pytest.raises(ValueError, match="int64"):
        decode_prep(q, k, v, cos, sin, counter=torch.zeros(1, dtype=torch.int32))
    with pytest.raises(ValueError, match="sink keys"):
        decode_prep(q, k, v, cos, sin, sink_k[:, :1], sink_v)


# ----------------------------------------------------------------------------------------------
# the cache's Triton path on CPU (interpreter): resolve_backend would pick torch off CUDA, so force it
# ----------------------------------------------------------------------------------------------
def _triton_on_cpu(monkeypatch):
    import importlib

    import kvquant_hf.kernels
    from kvquant_hf import layer as layer_mod

    _prep()  # exact_block reloaded for the interpreter if needed
    importlib.reload(kvquant_hf.kernels)
    monkeypatch.setattr(layer_mod, "resolve_backend",
                        lambda backend, device, head_dim=None: "torch" if backend == "torch" else "triton")


def test_layer_triton_path_matches_torch_path_with_padding_and_partial_sinks(monkeypatch):
    """Prefill with left padding (row 1 has fewer real tokens than sink slots, so part of its sink is padding until
    decode steps fill it), then decode steps without a mask: the fused exact block must mask the padded sink exactly
    as the torch path."""
    from conftest import make_tiny_llama

    from kvquant_hf import KVQuantCache, patch_model
    from kvquant_hf.generation import cache_kwarg_name

    _triton_on_cpu(monkeypatch)
    model = patch_model(make_tiny_llama())
    kw = cache_kwarg_name(model)
    ids = torch.randint(0, 128, (2, 26), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :19] = 0  # row 1: only 1 real prompt token for 3 sink slots
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    logits = {}
    for backend in ("torch", "triton"):
        cache = KVQuantCache({"bits": 4, "sink_tokens": 3, "block_size": 16, "backend": backend},
                             model_config=model.config)
        outs = []
        with torch.no_grad():
            outs.append(model(ids[:, :20], attention_mask=mask[:, :20], position_ids=pos[:, :20], **{kw: cache}).logits)
            for t in range(20, 26):
                outs.append(model(ids[:, t : t + 1], position_ids=pos[:, t : t + 1], **{kw: cache}).logits)
        layer = cache.layers[0]
        assert layer.backend == backend
        if backend == "triton":
            # row 1's sink held padding for two steps (the exact block kept its mask), then took the first two
            # generated tokens, as for its prompt alone
            assert layer.sinks_valid() and layer.sink_positions[1, :3].tolist() == [0, 1, 2]
        logits[backend] = torch.cat(outs, 1)
    torch.testing.assert_close(logits["triton"], logits["torch"], atol=2e-4, rtol=2e-4)


def test_layer_triton_path_rotates_the_query_like_the_model(monkeypatch):
    from kvquant_hf import KVQuantConfig
    from kvquant_hf.cache import KVQuantLayer
    from kvquant_hf.layer_api import AttendInputs

    _triton_on_cpu(monkeypatch)
    q, k, v, cos, sin, _, _, pos = _inputs(2, 4, 2, 5, 0, 16, torch.float16, seed=7)
    rope = RopeContext(cos, sin, 1.0 / (10000 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)))
    outs = []
    for rotated in (True, False):
        layer = KVQuantLayer(KVQuantConfig(bits=4, sink_tokens=1, backend="triton"))
        query = apply_rope(q, cos, sin) if rotated else q
        out = layer.attend(AttendInputs(query, k.clone(), v.clone(), pos, rope, None, 0.25, query_rotated=rotated))
        assert layer.backend == "triton" and layer.sinks_all_valid is None  # no mask needed the sink check
        outs.append(out)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("padded", [False, True], ids=["batch1", "batch2-left-padded"])
def test_graph_mode_with_a_shared_device_length_matches_eager(monkeypatch, padded):
    """What CUDAGraphDecoder runs (without capturing: no GPU here): every layer in graph mode reading one shared
    device-side length that is advanced once per step after the last layer, and no mask for the new token. The
    logits and the stored tokens equal the eager Triton path's, also for a left-padded batch whose padding reaches
    into the sink (so it must come from the prefill's record, not from the step's mask)."""
    from conftest import make_tiny_llama

    from kvquant_hf import KVQuantCache, patch_model
    from kvquant_hf.cache import KVQuantLayer
    from kvquant_hf.errors import KVQuantError
    from kvquant_hf.generation import cache_kwarg_name

    _triton_on_cpu(monkeypatch)
    masks_read = []
    original = KVQuantLayer.new_block_mask
    monkeypatch.setattr(KVQuantLayer, "new_block_mask",
                        lambda self, *a: masks_read.append(self.graph_mode) or original(self, *a))
    model = patch_model(make_tiny_llama())
    kw = cache_kwarg_name(model)
    b = 2 if padded else 1
    ids = torch.randint(0, 128, (b, 23), generator=torch.Generator().manual_seed(9))
    prompt_mask = torch.ones(b, 20, dtype=torch.long)
    if padded:
        prompt_mask[1, :6] = 0
    pos = (prompt_mask.cumsum(-1) - 1).clamp_min(0)
    runs = {}
    for mode in ("eager", "graph"):
        cache = KVQuantCache({"bits": 4, "sink_tokens": 3, "block_size": 16, "backend": "triton"},
                             model_config=model.config)
        with torch.no_grad():
            model(ids[:, :20], attention_mask=prompt_mask, position_ids=pos, **{kw: cache})
            shared = None
            if mode == "graph":
                shared = torch.zeros(1, dtype=torch.int32)
                for layer in cache.layers:
                    layer.enter_graph_mode(8, num_splits=2, length_dev=shared)
                assert int(shared) == cache.layers[0].length == 17  # set to the layers' length (20 - 3 sinks)
            outs = []
            for t in range(20, 23):
                # a 4D mask, as transformers builds while a CUDA graph is captured: graph mode builds no mask from it
                mask = torch.zeros(b, 1, 1, t + 1)
                step_pos = pos[:, -1:] + (t - 19)
                outs.append(model(ids[:, t:t + 1], position_ids=step_pos, attention_mask=mask, **{kw: cache}).logits)
                if shared is not None:
                    assert int(shared) == t - 3  # no layer advanced it
                    shared.add_(1)
                    for layer in cache.layers:
                        layer.length += 1  # the host mirror, as CUDAGraphDecoder.step keeps it
        runs[mode] = (torch.cat(outs, 1), cache)
    torch.testing.assert_close(runs["graph"][0], runs["eager"][0], atol=2e-4, rtol=2e-4)
    assert masks_read and True not in masks_read  # eager steps read the mask, graph-mode steps never
    g, e = runs["graph"][1].layers[1], runs["eager"][1].layers[1]
    n = e.length
    assert g.length == n == 20 and int(g.length_dev) == n
    assert torch.equal(g.k_codes[:, :, :n], e.k_codes[:, :, :n]) and torch.equal(g.v_codes[:, :, :n], e.v_codes[:, :, :n])
    assert torch.equal(g.positions[:, :n], e.positions[:, :n])
    layer = runs["graph"][1].layers[0]
    with pytest.raises(KVQuantError, match="shared length_dev"):
        layer.enter_graph_mode(4, num_splits=2, length_dev=torch.zeros(1, dtype=torch.int64))

"""Exact recent window (nuq) and decode-equivalent KIVI in the simulated caches: per-(i, j) exact/quantized choice
against independent token-by-token references, call splits, accounting and errors."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama

from kvquant_hf import quant
from kvquant_hf.errors import KVQuantConfigError
from kvquant_hf.layer_api import AttendInputs, RopeContext, apply_rope
from kvquant_hf.layer_storage import window_token_bytes
from kvquant_hf.models import patch_model
from kvquant_hf.simulated import MethodSpec, NuqLayerParams, build_simulated_cache, method_avg_bits, parse_method
from kvquant_hf.simulated_attention import ExactRule

D, HQ, H = 16, 4, 2


def _cfg():
    return type("Cfg", (), {"num_hidden_layers": 1, "head_dim": D, "hidden_size": HQ * D, "num_attention_heads": HQ})


def _params(bits, n_layers=1, kv_heads=H):
    lut = quant.normal_float_signposts(bits)
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n_layers):
        c = 0.05 * torch.randn(kv_heads, D, generator=g)
        out.append(NuqLayerParams(lut.clone(), lut.clone(), c - 1.5, c + 1.5))
    return out


def _qkv(lq, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, HQ, lq, D, generator=g), torch.randn(b, H, lq, D, generator=g), torch.randn(b, H, lq, D,
                                                                                                       generator=g)


def _run(layer, q, k, v, splits, first_pos=0):
    """Feed the layer the calls ``splits`` (lengths); return the concatenated outputs ``[B, L, Hq, D]``."""
    b = q.shape[0]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    outs, t = [], 0
    for n in splits:
        pos = torch.arange(first_pos + t, first_pos + t + n)[None].expand(b, n)
        rope = RopeContext(*RopeContext(None, None, inv_freq).cos_sin(pos), inv_freq=inv_freq)
        outs.append(layer.attend(AttendInputs(q[:, :, t : t + n], k[:, :, t : t + n], v[:, :, t : t + n], pos, rope,
                                              None, D**-0.5)))
        t += n
    return torch.cat(outs, 1)


def _k_rot(k):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    pos = torch.arange(k.shape[2])[None].expand(k.shape[0], -1)
    cos, sin = RopeContext(None, None, inv_freq).cos_sin(pos)
    return apply_rope(k, cos, sin)


def _naive(q, k_rot, v, k_hat, v_hat, key_exact, value_exact):
    """Per-query loop: query i builds its key/value set from exact or dequantized per the two predicates."""
    b, hq, lq, d = q.shape
    g = hq // k_rot.shape[1]
    out = torch.zeros(b, lq, hq, d)
    for i in range(lq):
        ks = torch.stack([k_rot[:, :, j] if key_exact(i, j) else k_hat[:, :, j] for j in range(i + 1)], 2)
        vs = torch.stack([v[:, :, j] if value_exact(i, j) else v_hat[:, :, j] for j in range(i + 1)], 2)
        for h in range(hq):
            p = torch.softmax((ks[:, h // g] @ q[:, h, i, :, None]).squeeze(-1) * d**-0.5, -1)
            out[:, i, h] = (p[:, :, None] * vs[:, h // g]).sum(1)
    return out


# --------------------------------------------------------------------------------------------
# nuq with an exact recent window
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("r", [1, 5])
@pytest.mark.parametrize("splits", [[23], [4, 9, 1, 1, 8], [1] * 23])
def test_nuq_window_equals_per_query_reference(r, splits):
    q, k, v = _qkv(23)
    cache = build_simulated_cache(_cfg(), "nuq3", nuq_params=_params(3), sink_tokens=2, outlier_slots=1,
                                  recent_window=r, query_chunk=6)
    layer = cache.layers[0]
    out = _run(layer, q, k, v, splits)
    # the stored dequantized history (sink exact) is the per-token nuq quantization: independent of the window
    ref_cache = build_simulated_cache(_cfg(), "nuq3", nuq_params=_params(3), sink_tokens=2, outlier_slots=1)
    _run(ref_cache.layers[0], q, k, v, [23])
    k_hat, v_hat = ref_cache.layers[0].keys, ref_cache.layers[0].values
    torch.testing.assert_close(layer.keys, k_hat)
    exact = lambda i, j: i - j <= r  # noqa: E731
    ref = _naive(q, _k_rot(k), v, k_hat, v_hat, exact, exact)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert layer.keys_exact.shape[2] == r  # only the last R exact tokens are kept


def test_nuq_window_zero_generic_path_matches_diagonal_path():
    """R = 0 keeps today's diagonal path; the two-set attention with band(0) gives the same result (1e-6)."""
    q, k, v = _qkv(40, seed=3)
    for splits in ([40], [7, 1, 20, 12]):
        legacy = build_simulated_cache(_cfg(), "nuq4", nuq_params=_params(4), sink_tokens=1, outlier_slots=1,
                                       recent_window=0)
        assert legacy.layers[0].key_rule is None
        generic = build_simulated_cache(_cfg(), "nuq4", nuq_params=_params(4), sink_tokens=1, outlier_slots=1,
                                        recent_window=0)
        generic.layers[0].key_rule = generic.layers[0].value_rule = ExactRule("band", 0)
        torch.testing.assert_close(_run(generic.layers[0], q, k, v, splits), _run(legacy.layers[0], q, k, v, splits),
                                   rtol=1e-6, atol=1e-6)


def test_nuq_window_covering_everything_equals_fp16(tiny_llama):
    patch_model(tiny_llama)
    ids = torch.randint(0, 128, (2, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = tiny_llama(ids, cache=build_simulated_cache(tiny_llama, "fp16")).logits
        quant_only = tiny_llama(ids, cache=build_simulated_cache(tiny_llama, "nuq2", sink_tokens=0,
                                                                 recent_window=0)).logits
        out = tiny_llama(ids, cache=build_simulated_cache(tiny_llama, "nuq2", sink_tokens=0, recent_window=29)).logits
        part = tiny_llama(ids, cache=build_simulated_cache(tiny_llama, "nuq2", sink_tokens=0, recent_window=8)).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # the first R + 1 tokens see only exact K/V; later ones do not
    torch.testing.assert_close(part[:, :9], ref[:, :9], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(part[:, 9:], ref[:, 9:], atol=1e-3)
    assert (part - ref).abs().mean() < (quant_only - ref).abs().mean()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_nuq_window_left_padding_matches_unpadded_rows(attn):
    model = make_tiny_llama()
    model.config._attn_implementation = attn
    patch_model(model)
    g = torch.Generator().manual_seed(8)
    a, bb = torch.randint(3, 128, (1, 20), generator=g), torch.randint(3, 128, (1, 14), generator=g)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 6, dtype=torch.long), bb], 1)], 0)
    mask2d = torch.ones(2, 20, dtype=torch.long)
    mask2d[1, :6] = 0
    kw = {"sink_tokens": 2, "recent_window": 4, "nuq_params": _params(4, n_layers=2)}
    with torch.no_grad():
        out = model(ids, attention_mask=mask2d, cache=build_simulated_cache(model, "nuq4", **kw)).logits
        ref_a = model(a, cache=build_simulated_cache(model, "nuq4", **kw)).logits
        ref_b = model(bb, cache=build_simulated_cache(model, "nuq4", **kw)).logits
        # prefill then decode through the padded batch too
        c = build_simulated_cache(model, "nuq4", **kw)
        steps = [model(ids[:, :9], attention_mask=mask2d[:, :9], cache=c).logits]
        for t in range(9, 20):
            steps.append(model(ids[:, t : t + 1], attention_mask=mask2d[:, : t + 1], cache=c).logits)
    torch.testing.assert_close(out[0:1], ref_a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[1:2, 6:], ref_b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.cat(steps, 1)[:, 6:], out[:, 6:], rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# KIVI
# --------------------------------------------------------------------------------------------
def test_kivi_group_quantizer_by_hand():
    x = torch.tensor([[[[0.0, 1.0], [0.3, -1.0], [1.0, 0.5], [0.6, 3.0]]]])  # [1, 1, 4 tokens, 2 channels]
    out = quant.kivi_fake_quant_keys(x, 2, 4)  # one group of 4 tokens per channel, 3 levels
    mn, mx = x.amin(2, keepdim=True), x.amax(2, keepdim=True)
    scale = ((mx - mn) / 3).half().float()
    want = ((x - mn) / scale).clamp(0, 3).round() * scale + mn
    torch.testing.assert_close(out, want)
    assert out[0, 0, :, 0].tolist() == pytest.approx([0.0, 1 / 3, 1.0, 2 / 3], abs=1e-3)
    v = torch.randn(1, 1, 3, 8)
    vq = quant.kivi_fake_quant_values(v, 4, 4)  # two channel groups of 4 per token
    torch.testing.assert_close(vq[..., :4], quant.kivi_fake_quant_groups(v[..., :4], 4, 4, dim=-1))
    assert not torch.allclose(vq, quant.fake_quant_int_per_token(v, 4))
    with pytest.raises(KVQuantConfigError, match="multiple"):
        quant.kivi_fake_quant_keys(torch.randn(1, 1, 5, 2), 2, 4)


def _kivi_reference(q, k_rot, v, bits, g, r):
    """KIVI's decode loop: append, attend over quantized + full, then flush keys at R / drop the oldest value."""
    b, hq, lq, d = q.shape
    hg = hq // k_rot.shape[1]
    k_quant, k_full, v_quant, v_full = [], [], [], []
    out = torch.zeros(b, lq, hq, d)
    for i in range(lq):
        k_full.append(k_rot[:, :, i])
        v_full.append(v[:, :, i])
        ks = torch.stack(k_quant + k_full, 2)
        vs = torch.stack(v_quant + v_full, 2)
        for h in range(hq):
            p = torch.softmax((ks[:, h // hg] @ q[:, h, i, :, None]).squeeze(-1) * d**-0.5, -1)
            out[:, i, h] = (p[:, :, None] * vs[:, h // hg]).sum(1)
        if len(k_full) == r:
            block = quant.kivi_fake_quant_keys(torch.stack(k_full, 2), bits, g)
            k_quant += list(block.unbind(2))
            k_full = []
        if len(v_full) > r:
            v_quant.append(quant.kivi_fake_quant_values(v_full.pop(0)[:, :, None], bits, g)[:, :, 0])
    return out


@pytest.mark.parametrize("splits", [[37], [3, 6, 1, 10, 17], [1] * 37, [16, 21]])
def test_kivi_equals_token_by_token_reference(splits):
    q, k, v = _qkv(37, seed=5)
    spec = MethodSpec("kivi", 2, kivi_group=4, recent_window=8)
    cache = build_simulated_cache(_cfg(), spec, query_chunk=5)
    out = _run(cache.layers[0], q, k, v, splits)
    ref = _kivi_reference(q, _k_rot(k), v, 2, 4, 8)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    layer = cache.layers[0]
    # complete groups are stored quantized with their group's range, the open group's keys exact
    n_full = (37 // 4) * 4
    torch.testing.assert_close(layer.keys[:, :, :n_full], quant.kivi_fake_quant_keys(_k_rot(k)[:, :, :n_full], 2, 4))
    torch.testing.assert_close(layer.keys[:, :, n_full:], _k_rot(k)[:, :, n_full:])


def test_kivi_differs_from_oneshot_and_the_residual_matters(tiny_llama):
    patch_model(tiny_llama)
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        ref = tiny_llama(ids, cache=build_simulated_cache(tiny_llama, "fp16")).logits
        kivi = tiny_llama(ids, cache=build_simulated_cache(tiny_llama, "kivi2")).logits
        oneshot = tiny_llama(ids, cache=build_simulated_cache(tiny_llama, "kivi2-oneshot")).logits
    # the first 128 tokens see keys and values exact (all in the residual)
    torch.testing.assert_close(kivi[:, :128], ref[:, :128], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(kivi[:, 129:], ref[:, 129:], atol=1e-4)
    assert not torch.allclose(oneshot[:, :128], ref[:, :128], atol=1e-4)


# --------------------------------------------------------------------------------------------
# accounting
# --------------------------------------------------------------------------------------------
def _kivi_stored_tensors(t, d, bits, g, r):
    """The tensors KIVI holds after ``t`` tokens (one head): packed codes, fp16 scales/zeros, fp16 residuals."""
    n_res_k = t % r
    n_q = t - n_res_k
    v_res = min(t, r)
    v_q = t - v_res
    gv = min(g, d)
    return [
        torch.empty(n_q * d * bits // 8, dtype=torch.uint8),  # key codes
        torch.empty(2, n_q // g, d, dtype=torch.float16),  # key scale, zero per channel and group of tokens
        torch.empty(n_res_k, d, dtype=torch.float16),  # key residual
        torch.empty(v_q * d * bits // 8, dtype=torch.uint8),  # value codes
        torch.empty(2, v_q, d // gv, dtype=torch.float16),  # value scale, zero per token and group of channels
        torch.empty(v_res, d, dtype=torch.float16),  # value residual
    ]


@pytest.mark.parametrize("name", ["kivi4", "kivi2", "kivi4-g128", "kivi2-g64"])
@pytest.mark.parametrize("t", [100, 128, 300, 2048])
def test_kivi_avg_bits_counts_the_stored_tensors(name, t):
    spec = parse_method(name)
    nbytes = sum(x.nbytes for x in _kivi_stored_tensors(t, 64, spec.bits, spec.kivi_group, 128))
    assert method_avg_bits(spec, 64, t) == pytest.approx(8 * nbytes / (2 * 64 * t))


@pytest.mark.parametrize("r", [0, 16])
def test_nuq_avg_bits_counts_the_stored_tensors(r):
    spec = parse_method("nuq4", outlier_slots=1, sink_tokens=2, recent_window=r)
    t, h, d = 40, 3, 64
    k, v = torch.randn(1, h, t - 2, d, dtype=torch.float16), torch.randn(1, h, t - 2, d, dtype=torch.float16)
    lut = quant.normal_float_signposts(4)
    pk = quant.quantize_keys(k, lut, -torch.ones(h, d), torch.ones(h, d), 1, 4)
    pv = quant.quantize_values(v, lut, 1, 4)
    tensors = [pk.codes, pk.out_val, pk.out_idx, pv.codes, pv.scale, pv.zero, pv.out_val, pv.out_idx,
               torch.empty(t - 2, dtype=torch.int32)]  # packed history + positions
    tensors += [torch.empty(3, h, 2, d, dtype=torch.float16), torch.empty(2, dtype=torch.int32)]  # sink K, K_rot, V
    # the exact window's layout belongs to the real cache: its per-token cost comes from its accounting
    nbytes = sum(x.nbytes for x in tensors) + r * window_token_bytes(h, d, torch.float16)
    assert method_avg_bits(spec, d, t, num_kv_heads=h) == pytest.approx(8 * nbytes / (t * h * 2 * d))
    assert method_avg_bits(spec, d, 2048) > method_avg_bits(spec, d, 32768) > method_avg_bits(spec, d)


def test_window_names_and_errors():
    assert parse_method("nuq4", recent_window=128).recent_window == 128
    assert parse_method("nuq4").recent_window == 128  # the cache's default window
    assert parse_method("int4", recent_window=128).recent_window == 0  # baselines ignore the nuq window
    k = parse_method("kivi4", recent_window=16)
    assert (k.kivi_group, k.recent_window, k.kivi_oneshot) == (32, 128, False)
    assert parse_method("kivi2-g128").kivi_group == 128 and parse_method("kivi2-g64").kivi_group == 64
    one = parse_method("kivi2-oneshot")
    assert one.kivi_oneshot and one.recent_window == 0
    for bad in ("kivi4-g16", "nuq4-g64", "int4-oneshot", "kivi-g32", "kivi4-", "kivi4-oneshot-g64"):
        with pytest.raises(KVQuantConfigError, match="unknown method"):
            parse_method(bad)
    with pytest.raises(KVQuantConfigError, match="recent_window"):
        parse_method("nuq4", recent_window=-1)
    with pytest.raises(KVQuantConfigError, match="multiple"):
        MethodSpec("kivi", 4, kivi_group=32, recent_window=48)
    with pytest.raises(KVQuantConfigError, match="nuq and KIVI only"):
        MethodSpec("int", 4, recent_window=8)
    with pytest.raises(KVQuantConfigError, match="no residual"):
        MethodSpec("kivi", 4, kivi_oneshot=True, recent_window=8)


@pytest.mark.parametrize("method", ["nuq4", "kivi"])
def test_first_call_fast_path_equals_general_path(method):
    """The perplexity-window path (far part + band merged by log-sum-exp) equals the chunked general path."""
    q, k, v = _qkv(300, b=1, seed=9)
    outs = []
    for use_sdpa in (True, False):
        if method == "kivi":
            cache = build_simulated_cache(_cfg(), MethodSpec("kivi", 4, kivi_group=8, recent_window=32), query_chunk=64)
        else:
            cache = build_simulated_cache(_cfg(), "nuq4", nuq_params=_params(4), sink_tokens=1, outlier_slots=1,
                                          recent_window=20, query_chunk=64)
        cache.layers[0].use_sdpa = use_sdpa
        outs.append(_run(cache.layers[0], q, k, v, [300]))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)

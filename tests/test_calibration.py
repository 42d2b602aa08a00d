"""Calibration: Fisher capture, normalization rules, weighted k-means, end to end on tiny and real models."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_llama

import calibrate as calibrate_cli
from kvquant_hf import quant
from kvquant_hf.calibration import (
    DEFAULT_KMEANS_MAX_POINTS,
    DEFAULT_MAX_TOKENS_PER_LAYER,
    calibrate,
    capture_calibration_sample,
    key_thresholds,
    kmeans_subsample,
    load_calibration_text,
    normalize_keys,
    normalize_values,
    qnorm_stats,
    sample_windows,
    weighted_kmeans_1d,
)
from kvquant_hf.calibration_capture import Reservoir
from kvquant_hf.config import default_outlier_slots
from kvquant_hf.errors import KVQuantConfigError
from kvquant_hf.signposts import load_signposts, save_signposts, validate_signposts

FAST = {"kmeans_n_init": 1, "progress": False}
CALIBRATION_TEXT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "wikitext-2", "valid.tokens.txt")


def token_stream(n: int = 4000, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def kv_outputs(model, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(k_proj, v_proj) outputs `[S, H*D]` of every layer for one window, by plain forward hooks."""
    outs: dict = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.self_attn.k_proj.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__((i, 0), o)))
        handles.append(layer.self_attn.v_proj.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__((i, 1), o)))
    with torch.no_grad():
        model(input_ids=ids[None], use_cache=False)
    for h in handles:
        h.remove()
    return [(outs[(i, 0)][0], outs[(i, 1)][0]) for i in range(len(model.model.layers))]


def reference_fisher(model, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Squared gradients of the mean token NLL w.r.t. k_proj/v_proj outputs, via zero perturbations."""
    deltas: dict = {}

    def add_delta(key):
        def hook(_m, _a, out):
            d = torch.zeros_like(out, requires_grad=True)
            deltas[key] = d
            return out + d

        return hook

    handles = []
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.self_attn.k_proj.register_forward_hook(add_delta((i, 0))))
        handles.append(layer.self_attn.v_proj.register_forward_hook(add_delta((i, 1))))
    logits = model(input_ids=ids[None], use_cache=False).logits[0, :-1]
    loss = torch.nn.functional.cross_entropy(logits.float(), ids[1:])
    keys = sorted(deltas)
    grads = torch.autograd.grad(loss, [deltas[k] for k in keys])
    for h in handles:
        h.remove()
    g = dict(zip(keys, grads, strict=True))
    return [(g[(i, 0)][0] ** 2, g[(i, 1)][0] ** 2) for i in range(len(model.model.layers))]


# --------------------------------------------------------------------------------------------
# normalization rules agree with the quant.py oracle
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_slots", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_normalize_values_matches_quantize_values(n_slots, dtype):
    g = torch.Generator().manual_seed(n_slots)
    v = (torch.randn(2, 3, 40, 64, generator=g) * torch.rand(1, 3, 40, 1, generator=g) * 3).to(dtype)
    v[0, 0, 0, 5] = 50.0  # a real outlier
    v[1, 2, 3] = 0.25  # all-equal vector (scale floor)
    lut = quant.normal_float_signposts(3)
    x_norm, inlier, scale = normalize_values(v, n_slots, dtype)
    packed = quant.quantize_values(v, lut, n_slots, 3)
    codes = quant.unpack_codes(packed.codes, 3, 64)
    assert torch.equal(quant.encode_nearest(x_norm, lut), codes)
    torch.testing.assert_close(scale[..., 0], packed.scale.to(torch.float32).clamp_min(quant.MIN_SCALE))
    assert (~inlier).sum(-1).eq(n_slots).all()
    if n_slots:
        slot_mask = torch.zeros_like(inlier).scatter(-1, packed.out_idx.long(), True)
        assert torch.equal(~inlier, slot_mask)
        assert not inlier[0, 0, 0, 5]
    assert x_norm[inlier].abs().max() <= 1.0 + 1e-2  # in range up to the scale rounding


def test_normalize_keys_matches_quantize_keys():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(500, 2, 16, generator=g) * torch.linspace(0.1, 5, 16)
    lower, upper = key_thresholds(k, 0.02)
    x_norm, inlier, scale = normalize_keys(k, lower, upper)
    lut = quant.normal_float_signposts(4)
    packed = quant.quantize_keys(k.permute(1, 0, 2)[None], lut, lower, upper, n_slots=16, bits=4)
    codes = quant.unpack_codes(packed.codes, 4, 16)[0].permute(1, 0, 2)
    assert torch.equal(quant.encode_nearest(x_norm, lut)[inlier], codes[inlier])
    assert x_norm[inlier].abs().max() <= 1.0 + 1e-6
    assert x_norm[~inlier].abs().min() >= 1.0 - 1e-6
    torch.testing.assert_close(scale, (upper - lower) / 2)


def test_key_thresholds_bracket_one_minus_f_of_the_data():
    g = torch.Generator().manual_seed(1)
    k = torch.distributions.StudentT(3.0).sample((4000, 2, 16)) * torch.rand(1, 2, 16, generator=g)
    for f in (0.0, 0.01, 0.1):
        lower, upper = key_thresholds(k, f)
        inside = ((k >= lower) & (k <= upper)).float().mean(0)  # per channel
        assert torch.allclose(inside, torch.full_like(inside, 1 - f), atol=2 / 4000 + 1e-6), (f, inside)
        if f == 0:
            assert torch.equal(lower, k.amin(0)) and torch.equal(upper, k.amax(0))


def test_qnorm_stats_use_nearest_signpost():
    x = torch.linspace(-1, 1, 1001)
    lut = torch.tensor([-0.8, -0.1, 0.3, 0.9])
    xq = lut[quant.encode_nearest(x, lut)]
    stats = qnorm_stats(x, lut)
    expected = torch.tensor([x.mean(), x.std(unbiased=False), xq.mean(), xq.std(unbiased=False)])
    torch.testing.assert_close(stats, expected)


# --------------------------------------------------------------------------------------------
# weighted k-means
# --------------------------------------------------------------------------------------------
def test_weighted_kmeans_moves_centroids_toward_heavy_points():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, 5000)
    w = np.where(x > 0.5, 100.0, 1.0)
    plain = weighted_kmeans_1d(x, None, 4, seed=0, n_init=1)
    weighted = weighted_kmeans_1d(x, w, 4, seed=0, n_init=1)
    torch.testing.assert_close(plain, torch.tensor([-0.75, -0.25, 0.25, 0.75]), atol=0.03, rtol=0)
    assert (plain > 0.5).sum() == 1 and (weighted > 0.5).sum() >= 2
    assert torch.all(weighted[1:] > weighted[:-1])


def test_kmeans_subsample_keeps_weighted_distribution():
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.uniform(-1, 1, 300_000), dtype=torch.float32)
    w = torch.where(x > 0, 9.0, 1.0)
    pts, pw = kmeans_subsample(x, w, max_points=20_000, seed=0)
    assert pts.size <= 20_000 and pw.sum() == 20_000
    frac_pos = pw[pts > 0].sum() / pw.sum()
    assert abs(frac_pos - 0.9) < 0.02  # weighted mass above 0 is 90%
    pts, pw = kmeans_subsample(x, None, max_points=20_000, seed=0)
    assert pts.size == 20_000 and np.all(pw == 1) and abs((pts > 0).mean() - 0.5) < 0.02
    pts, pw = kmeans_subsample(x[:100], w[:100], max_points=20_000)
    assert pts.size == 100 and np.isclose(pw.mean(), 1.0)


def test_kmeans_with_few_distinct_points_still_returns_full_table():
    c = weighted_kmeans_1d(np.array([0.1, 0.1, 0.3]), None, 8)
    assert c.shape == (8,) and torch.all(c[1:] > c[:-1]) and {0.1, 0.3} <= {round(float(v), 6) for v in c}


# --------------------------------------------------------------------------------------------
# capture
# --------------------------------------------------------------------------------------------
def test_reservoir_is_bounded_and_uniform():
    hits = np.zeros(400)
    for seed in range(300):
        res = Reservoir(capacity=100, seed=seed)
        slots = np.full(100, -1)
        for start in range(0, 400, 50):
            src, dst = res.assign(50)
            assert len(set(dst.tolist())) == len(dst)
            slots[dst.numpy()] = start + src.numpy()
        assert res.filled == 100 and res.seen == 400 and (slots >= 0).all()
        hits[slots] += 1
    p = hits / 300  # every token should be kept with probability 100 / 400
    assert abs(p[:200].mean() - 0.25) < 0.02 and abs(p[200:].mean() - 0.25) < 0.02


def test_capture_sink_exclusion_and_fisher_match_autograd(tiny_llama):
    ids = token_stream(64)
    sample = capture_calibration_sample(tiny_llama, ids[None], sink_tokens=2, fisher_weighting="fisher",
                                        progress=False)
    assert sample.num_tokens == 62 and sample.tokens_seen == 62
    kv = kv_outputs(tiny_llama, ids)
    fisher = reference_fisher(tiny_llama, ids)
    for layer in range(2):
        torch.testing.assert_close(sample.keys[layer], kv[layer][0][2:])  # sink rows left out, order kept
        torch.testing.assert_close(sample.values[layer], kv[layer][1][2:])
        torch.testing.assert_close(sample.key_fisher[layer], fisher[layer][0][2:], rtol=1e-4, atol=1e-14)
        torch.testing.assert_close(sample.value_fisher[layer], fisher[layer][1][2:], rtol=1e-4, atol=1e-14)
        assert sample.key_fisher[layer].max() > 0 and sample.value_fisher[layer].max() > 0
    assert all(p.requires_grad for p in tiny_llama.parameters())  # restored after the capture


def test_capture_restores_model_state(tiny_llama):
    tiny_llama.train()
    flags = [p.requires_grad for p in tiny_llama.parameters()]
    with torch.no_grad():  # calibrate must still get gradients
        sample = capture_calibration_sample(tiny_llama, token_stream(64)[None], progress=False)
    assert sample.key_fisher[0].max() > 0
    assert tiny_llama.training and [p.requires_grad for p in tiny_llama.parameters()] == flags
    assert not any(m._forward_hooks for m in tiny_llama.modules())


def test_capture_memory_is_bounded(tiny_llama):
    windows, _ = sample_windows(token_stream(), nsamples=6, seqlen=64, seed=0)
    sample = capture_calibration_sample(tiny_llama, windows, max_tokens_per_layer=50, progress=False)
    assert sample.tokens_seen == 6 * 63
    assert all(t.shape == (50, 32) for t in sample.keys + sample.values + sample.key_fisher + sample.value_fisher)
    assert sample.keys[0].dtype == torch.float32 and sample.keys[0].device.type == "cpu"


def test_capture_without_fisher_needs_no_gradients(tiny_llama):
    sample = capture_calibration_sample(tiny_llama, token_stream(64)[None], fisher_weighting="none", progress=False)
    assert all(torch.equal(f, torch.ones_like(f)) for f in sample.key_fisher + sample.value_fisher)


def test_capture_bfloat16_model_gets_finite_fisher():
    model = make_tiny_llama().to(torch.bfloat16)
    ids = token_stream(64)
    sample = capture_calibration_sample(model, ids[None], progress=False)
    assert sample.model_dtype == torch.bfloat16
    ref = reference_fisher(make_tiny_llama(), ids)  # float32 twin: same weights up to bf16 rounding
    for layer in range(2):
        f = sample.key_fisher[layer]
        assert torch.isfinite(f).all() and (f > 0).float().mean() > 0.9
        ratio = f.sum() / ref[layer][0][1:].sum()
        assert 0.5 < ratio < 2.0, ratio  # the loss scaling is undone: same magnitude as fp32


# --------------------------------------------------------------------------------------------
# end to end
# --------------------------------------------------------------------------------------------
def test_calibrate_tiny_llama_end_to_end(tmp_path, tiny_llama):
    t0 = time.perf_counter()
    result = calibrate(tiny_llama, None, token_stream(), bits=(4, 3, 2), nsamples=4, seqlen=64, **FAST)
    assert time.perf_counter() - t0 < 30
    assert sorted(result) == [2, 3, 4]
    for b, sp in result.items():
        assert sp.bits == b and sp.num_layers == 2 and sp.num_kv_heads == 2 and sp.head_dim == 16
        meta = sp.metadata
        assert meta["outlier_slots_default"] == default_outlier_slots(0.01, 16) == 1
        cal = meta["calibration"]
        assert cal["nsamples"] == 4 and cal["seqlen"] == 64 and cal["tokens_per_layer"] == 4 * 63
        assert len(cal["window_starts"]) == 4 and "tokens_sha256" in cal and cal["duration_s"] > 0
        for layer in sp.layers:
            for lut in (layer.key_signposts, layer.value_signposts):
                assert lut.shape == (2**b,) and torch.all(lut[1:] > lut[:-1]) and lut.abs().max() <= 1.01
            assert torch.all(layer.key_upper > layer.key_lower)
            assert layer.key_qnorm[1] > 0 and layer.key_qnorm[3] > 0
        folder = save_signposts(sp, tmp_path)
        loaded = load_signposts(tmp_path, bits=b)
        validate_signposts(loaded, tiny_llama, bits=b)
        assert loaded.path == folder
        torch.testing.assert_close(loaded.layers[1].value_signposts, sp.layers[1].value_signposts)
    # all bit widths share one capture: identical thresholds
    assert torch.equal(result[2].layers[0].key_lower, result[4].layers[0].key_lower)


def test_calibrate_mha_and_determinism(tiny_llama_mha):
    kwargs = dict(bits=3, nsamples=3, seqlen=48, seed=5, **FAST)
    a = calibrate(tiny_llama_mha, None, token_stream(), **kwargs)[3]
    b = calibrate(tiny_llama_mha, None, token_stream(), **kwargs)[3]
    assert a.num_kv_heads == 4
    for la, lb in zip(a.layers, b.layers, strict=True):
        assert torch.equal(la.key_signposts, lb.key_signposts) and torch.equal(la.value_signposts, lb.value_signposts)
    c = calibrate(tiny_llama_mha, None, token_stream(), **{**kwargs, "seed": 6})[3]
    assert a.metadata["calibration"]["window_starts"] != c.metadata["calibration"]["window_starts"]


def test_fisher_weighting_moves_tiny_model_centroids(tiny_llama):
    kwargs = dict(bits=3, nsamples=4, seqlen=64, key_table="kmeans", **FAST)  # (the k-means key tables)
    fisher = calibrate(tiny_llama, None, token_stream(), fisher_weighting="fisher", **kwargs)[3]
    plain = calibrate(tiny_llama, None, token_stream(), fisher_weighting="none", **kwargs)[3]
    fx2 = calibrate(tiny_llama, None, token_stream(), fisher_weighting="fisher_x2", **kwargs)[3]
    assert fisher.fisher_weighting == "fisher" and plain.fisher_weighting == "none"
    for layer in range(2):
        lf, lp, lx = fisher.layers[layer], plain.layers[layer], fx2.layers[layer]
        assert torch.equal(lf.key_lower, lp.key_lower)  # thresholds do not depend on the weighting
        assert (lf.key_signposts - lp.key_signposts).abs().max() > 0.02
        assert (lf.value_signposts - lp.value_signposts).abs().max() > 0.02
        assert (lf.value_signposts - lx.value_signposts).abs().max() > 1e-3  # per-token scales differ


def test_pre_cut_windows_and_text_input(tiny_llama):
    windows = token_stream(3 * 32).reshape(3, 32)
    sp = calibrate(tiny_llama, None, windows, bits=2, sink_tokens=0, **FAST)[2]
    cal = sp.metadata["calibration"]
    assert (cal["nsamples"], cal["seqlen"], cal["tokens_per_layer"], cal["window_starts"]) == (3, 32, 96, None)

    class CharTokenizer:
        def __call__(self, text, **kwargs):
            return {"input_ids": [ord(c) % 128 for c in text]}

    text = "calibration text " * 100
    sp = calibrate(tiny_llama, CharTokenizer(), text, bits=4, nsamples=2, seqlen=64, **FAST)[4]
    assert sp.metadata["calibration"]["text_sha256"] == hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bits": 5}, "bits=5 is not supported"),
        ({"fisher_weighting": "hessian"}, "fisher_weighting='hessian' is not supported"),
        ({"outlier_fraction": 0.5}, "outlier_fraction=0.5 must be in"),
        ({"seqlen": 10_000}, "only 4000 tokens, fewer than seqlen=10000"),
        ({"sink_tokens": 64}, "sink_tokens=64 must be in"),
    ],
)
def test_invalid_arguments(tiny_llama, kwargs, match):
    args = {"nsamples": 2, "seqlen": 64, **FAST, **kwargs}
    with pytest.raises(KVQuantConfigError, match=match):
        calibrate(tiny_llama, None, token_stream(), **args)


# --------------------------------------------------------------------------------------------
# calibration text and CLI
# --------------------------------------------------------------------------------------------
def test_load_calibration_text(tmp_path, monkeypatch):
    path = tmp_path / "t.txt"
    path.write_bytes(b"line one\r\nline two\n")
    text, info = load_calibration_text(text_file=str(path))
    assert info == {"text_file": str(path)}
    assert hashlib.sha256(text.encode()).hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(KVQuantConfigError, match="exactly one"):
        load_calibration_text()
    with pytest.raises(KVQuantConfigError, match="cannot read"):
        load_calibration_text(text_file=str(tmp_path / "missing.txt"))

    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(KVQuantConfigError, match="--text-file ../shared/data/wikitext-2/valid.tokens.txt"):
        load_calibration_text(dataset="wikitext2")


def test_cli_writes_folders_and_summary(tmp_path, monkeypatch, capsys, tiny_llama):
    from kvquant_hf.models import loading

    class CharTokenizer:
        def __call__(self, text, **kwargs):
            return {"input_ids": [ord(c) % 128 for c in text]}

    seen = {}

    def fake_load(model, gguf_file=None, dtype=None, device=None, device_map=None, **kwargs):
        seen.update(model=model, dtype=dtype, device=device, device_map=device_map)
        return tiny_llama, CharTokenizer()

    monkeypatch.setattr(loading, "load_model_and_tokenizer", fake_load)
    text_file = tmp_path / "cal.txt"
    text_file.write_text("some calibration text. " * 200)
    out = tmp_path / "sp"
    rc = calibrate_cli.main([
        "--model", "tiny", "--text-file", str(text_file), "--bits", "4", "2", "--outlier-fraction", "0",
        "--nsamples", "2", "--seqlen", "64", "--output-dir", str(out), "--device", "cpu", "--fisher", "fisher_x2",
        "--quiet",
    ])
    assert rc == 0 and seen == {"model": "tiny", "dtype": "float32", "device": "cpu", "device_map": None}
    assert sorted(os.listdir(out)) == ["nuq2", "nuq4"]
    sp = load_signposts(out, bits=2)
    assert sp.outlier_fraction == 0 and sp.outlier_slots_default == 0 and sp.fisher_weighting == "fisher_x2"
    assert sp.metadata["calibration"]["text_file"] == str(text_file)
    printed = capsys.readouterr().out
    assert "calibrated 2 layers" in printed and f"nuq4: {out}/nuq4" in printed and "layer 0 key signposts" in printed

    rc = calibrate_cli.main(["--model", "tiny", "--text-file", str(tmp_path / "missing.txt"), "--output-dir",
                             str(out), "--quiet"])
    assert rc == 2 and "cannot read the calibration text" in capsys.readouterr().err


@pytest.mark.slow
def test_calibrate_smollm2_small(smollm2, tmp_path):
    if not os.path.exists(CALIBRATION_TEXT):
        pytest.skip(f"calibration text {CALIBRATION_TEXT} not found")
    model, tokenizer = smollm2
    text = Path(CALIBRATION_TEXT).read_text(encoding="utf-8")[:200_000]
    t0 = time.perf_counter()
    result = calibrate(model, tokenizer, text, bits=(4, 2), nsamples=2, seqlen=256, kmeans_max_points=10_000,
                       **FAST)
    assert time.perf_counter() - t0 < 300  # about 20 s on an idle 2-core CPU
    for b, sp in result.items():
        validate_signposts(sp, model, bits=b)
        assert (sp.num_layers, sp.num_kv_heads, sp.head_dim) == (30, 3, 64)
        save_signposts(sp, tmp_path)
        loaded = load_signposts(tmp_path, bits=b)
        assert torch.all(loaded.layers[0].key_signposts[1:] > loaded.layers[0].key_signposts[:-1])
    assert not any(m._forward_hooks for m in model.modules())


def test_cli_help_shows_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as exc:
        calibrate_cli.build_parser().parse_args(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    entries = {"-" + e.split()[0]: " ".join(e.split()) for e in out.split("\n  -")[1:]}  # "--bits {2,3,4} ... (default: ...)"
    for option, default in [("--bits", "[4, 3, 2]"), ("--nsamples", "16"), ("--seqlen", "2048"),
                            ("--outlier-fraction", "0.01"), ("--sink-tokens", "1"), ("--seed", "0"),
                            ("--fisher", "fisher"), ("--key-table", "auto"), ("--value-table", "kmeans"),
                            ("--max-tokens-per-layer", str(DEFAULT_MAX_TOKENS_PER_LAYER)),
                            ("--kmeans-max-points", str(DEFAULT_KMEANS_MAX_POINTS))]:
        assert entries[option].endswith(f"(default: {default})"), entries[option]
    assert "(default: None)" not in out

"""Perplexity harness (kvquant_hf.evaluation.perplexity): protocol, JSON, resume, real-vs-simulated cache."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from conftest import make_tiny_llama

from kvquant_hf import quant
from kvquant_hf.errors import KVQuantConfigError
from kvquant_hf.evaluation import evaluate_perplexity, make_windows
from kvquant_hf.evaluation import perplexity as ppl_mod
from kvquant_hf.models import patch_model, unpatch_model
from kvquant_hf.simulated import NuqLayerParams

REQUIRED_KEYS = {"ppl", "avg_bits", "nll", "tokens", "windows"}
VALID_TEXT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "wikitext-2", "valid.tokens.txt")


def _ids(n: int = 400, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed))


def _handmade_signposts(model, bits_list=(4, 2), width: float = 0.25):
    """Calibration-like Signposts for a tiny model (NormalFloat tables, fixed key thresholds)."""
    from kvquant_hf.models.loading import model_identity
    from kvquant_hf.signposts import LayerSignposts, Signposts

    g = torch.Generator().manual_seed(1)
    cfg = model.config
    out = {}
    for bits in bits_list:
        lut = quant.normal_float_signposts(bits)
        layers = []
        for _ in range(cfg.num_hidden_layers):
            center = 0.05 * torch.randn(cfg.num_key_value_heads, cfg.head_dim, generator=g)
            stats = torch.tensor([0.0, 1.0, 0.0, 1.0])
            layers.append(LayerSignposts(lut.clone(), lut.clone(), center - width, center + width, stats, stats))
        meta = {"format_version": 1, "kind": "kvquant-signposts", "bits": bits, "model": model_identity(model),
                "calibration": {"duration_s": 1.5}}
        out[bits] = Signposts(layers, meta)
    return out


def test_harness_json_keys_and_protocol(tiny_llama):
    res = evaluate_perplexity(tiny_llama, _ids(), ["fp16", "nuq4", "nuq2", "int4", "int2", "kivi4", "kivi2"],
                              seqlen=64, windows=5)
    assert list(res) == ["fp16", "nuq4", "nuq2", "int4", "int2", "kivi4", "kivi2"]
    for name, r in res.items():
        assert REQUIRED_KEYS <= set(r), name
        assert r["windows"] == 5 and r["tokens"] == 5 * 63  # 400 tokens -> 6 windows, first 5 used
        assert r["nll"] == pytest.approx(r["nll_sum"] / r["tokens"])
        assert r["ppl"] == pytest.approx(math.exp(r["nll"]))
        assert len(r["window_nll"]) == 5
    json.dumps(res)  # serializable
    assert res["fp16"]["avg_bits"] == 16.0
    assert res["int4"]["avg_bits"] == pytest.approx(4 + 32 / 16)
    assert res["nuq4"]["uncalibrated"] is True
    # quantization hurts, more at fewer bits
    assert res["int2"]["ppl"] > res["int4"]["ppl"]


def test_fp16_matches_hf_loss(tiny_llama):
    ids = _ids(300, seed=1)
    wins = make_windows(ids, 100)
    with torch.no_grad():
        losses = [tiny_llama(w[None], labels=w[None]).loss for w in wins]
    expected = math.exp(float(torch.stack(losses).mean()))
    res = evaluate_perplexity(tiny_llama, ids, ["fp16"], seqlen=100)
    assert res["fp16"]["ppl"] == pytest.approx(expected, rel=1e-5)
    assert res["fp16"]["windows"] == 3


def test_make_windows():
    ids = torch.arange(10)
    assert make_windows(ids, 3).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert make_windows(ids, 3, windows=2).shape == (2, 3)
    assert make_windows(ids, 3, windows=99).shape == (3, 3)
    with pytest.raises(KVQuantConfigError):
        make_windows(ids, 11)
    with pytest.raises(KVQuantConfigError):
        make_windows(ids, 1)


def test_resume_skips_done_windows(tiny_llama, monkeypatch):
    ids = _ids(400, seed=2)
    first = evaluate_perplexity(tiny_llama, ids, ["fp16", "int3"], seqlen=64, windows=2)
    calls = []
    real = ppl_mod.MethodRunner.score
    monkeypatch.setattr(ppl_mod.MethodRunner, "score", lambda self, w: calls.append(1) or real(self, w))
    resumed = evaluate_perplexity(tiny_llama, ids, ["fp16", "int3"], seqlen=64, windows=4, state=first)
    assert len(calls) == 4  # 2 new windows x 2 methods
    fresh = evaluate_perplexity(tiny_llama, ids, ["fp16", "int3"], seqlen=64, windows=4)
    for name in fresh:
        assert resumed[name]["ppl"] == pytest.approx(fresh[name]["ppl"], rel=1e-6)


def test_signposts_and_explicit_params(tiny_llama):
    sps = _handmade_signposts(tiny_llama)
    res = evaluate_perplexity(tiny_llama, _ids(), ["nuq4", "nuq2"], seqlen=64, windows=2, signposts=sps)
    assert res["nuq4"]["calibration_s"] == 1.5 and "uncalibrated" not in res["nuq4"]
    lut = quant.normal_float_signposts(4)
    params = [NuqLayerParams(lut, lut, layer.key_lower, layer.key_upper) for layer in sps[4].layers]
    res2 = evaluate_perplexity(tiny_llama, _ids(), ["nuq4"], seqlen=64, windows=2, nuq_params={"nuq4": params})
    assert res2["nuq4"]["ppl"] == pytest.approx(res["nuq4"]["ppl"], rel=1e-6)
    with pytest.raises(KVQuantConfigError, match="nuq3"):
        evaluate_perplexity(tiny_llama, _ids(), ["nuq3"], seqlen=64, windows=1, signposts=sps)


def test_bad_arguments(tiny_llama):
    with pytest.raises(KVQuantConfigError, match="cache"):
        evaluate_perplexity(tiny_llama, _ids(), ["fp16"], seqlen=64, cache="paged")
    with pytest.raises(KVQuantConfigError, match="simulated"):
        evaluate_perplexity(tiny_llama, _ids(), ["int4"], seqlen=64, cache="real")
    with pytest.raises(KVQuantConfigError, match="distinct"):
        evaluate_perplexity(tiny_llama, _ids(), ["fp16", "fp16"], seqlen=64)
    with pytest.raises(KVQuantConfigError, match="text"):
        evaluate_perplexity(tiny_llama, object(), ["fp16"], seqlen=64)


@pytest.mark.parametrize("prefill", [0, 10])
@pytest.mark.parametrize("sink", [0, 1])
def test_simulated_equals_real_cache(tiny_llama, prefill, sink):
    """The simulated one-forward-per-window harness reproduces token-by-token decoding with KVQuantCache."""
    pytest.importorskip("kvquant_hf.cache")
    sps = _handmade_signposts(tiny_llama)
    kw = {"seqlen": 48, "windows": 3, "signposts": sps, "sink_tokens": sink, "prefill": prefill}
    sim = evaluate_perplexity(tiny_llama, _ids(seed=3), ["nuq4", "nuq2"], **kw)
    real = evaluate_perplexity(tiny_llama, _ids(seed=3), ["nuq4", "nuq2"], cache="real", **kw)
    for name in sim:
        torch.testing.assert_close(torch.tensor(sim[name]["window_nll"]), torch.tensor(real[name]["window_nll"]),
                                   rtol=1e-4, atol=1e-3)


def test_chunked_prefill_real_cache_equals_simulated_chunks(tiny_llama):
    """--chunk N on the real cache = the simulated cache fed the same chunks, exact within each chunk."""
    pytest.importorskip("kvquant_hf.cache")
    from kvquant_hf.simulated import build_simulated_cache

    sps = _handmade_signposts(tiny_llama)
    ids = _ids(seed=4)[:48]
    w0 = {"recent_window": 0}  # (48 tokens: a window of the default 128 would keep every token exact)
    real = evaluate_perplexity(tiny_llama, ids, ["nuq2"], seqlen=48, windows=1, signposts=sps, cache="real", chunk=16,
                               **w0)
    patch_model(tiny_llama)
    sim = build_simulated_cache(tiny_llama, "nuq2", signposts=sps[2] if isinstance(sps, dict) else sps, **w0)
    sim.set_within_call("exact")
    logits = []
    with torch.no_grad():
        for s0, e in ((0, 16), (16, 32), (32, 47)):
            pos = torch.arange(s0, e)[None]
            logits.append(tiny_llama(input_ids=ids[None, s0:e], position_ids=pos, cache=sim).logits[0])
    nll = float(torch.nn.functional.cross_entropy(torch.cat(logits).float(), ids[1:48], reduction="sum"))
    assert real["nuq2"]["window_nll"][0] == pytest.approx(nll, rel=1e-4, abs=1e-3)
    harness = evaluate_perplexity(tiny_llama, ids, ["nuq2"], seqlen=48, windows=1, signposts=sps, chunk=16, **w0)
    assert harness["nuq2"]["window_nll"][0] == pytest.approx(nll, rel=1e-4, abs=1e-3)  # simulated, chunked
    token_by_token = evaluate_perplexity(tiny_llama, ids, ["nuq2"], seqlen=48, windows=1, signposts=sps, cache="real",
                                         **w0)
    assert token_by_token["nuq2"]["window_nll"][0] != pytest.approx(nll, rel=1e-6)  # chunking changes the result
    with pytest.raises(KVQuantConfigError, match="chunk"):
        evaluate_perplexity(tiny_llama, ids, ["nuq2"], seqlen=48, windows=1, signposts=sps, cache="real", chunk=0)


class _CharTokenizer:
    """Minimal tokenizer for the CLI test: one token per byte, vocab 128."""

    def __call__(self, text, return_tensors=None):
        ids = torch.tensor([[ord(c) % 128 for c in text]])
        return type("Enc", (), {"input_ids": ids})()


def test_cli_writes_json(tmp_path, monkeypatch):
    from kvquant_hf.models import loading

    model = make_tiny_llama()
    monkeypatch.setattr(loading, "load_model_and_tokenizer", lambda *a, **k: (model, _CharTokenizer()))
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    out = tmp_path / "out.json"
    argv = ["--model", "tiny", "--text-file", str(text), "--seqlen", "128", "--windows", "3", "--methods", "fp16",
            "nuq3", "int3", "kivi2", "--uncalibrated", "--json", str(out), "--device", "cpu", "--quiet"]
    ppl_mod.main(argv)
    data = json.loads(out.read_text())
    assert set(data) == {"meta", "results"}
    assert data["meta"]["seqlen"] == 128 and "command" in data["meta"] and "date" in data["meta"]
    assert data["meta"]["uncalibrated"] is True
    assert set(data["results"]) == {"fp16", "nuq3", "int3", "kivi2"}
    for r in data["results"].values():
        assert REQUIRED_KEYS <= set(r) and r["windows"] == 3
    ppl_mod.main(argv)  # resumes from the JSON: nothing left to do, same numbers
    again = json.loads(out.read_text())
    assert again["results"]["nuq3"]["ppl"] == data["results"]["nuq3"]["ppl"]


# --------------------------------------------------------------------------------------------
# real model (slow)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def smollm2_quick_signposts(smollm2):
    """nuq4 signposts with 1% outliers calibrated by the test itself (4 windows x 512 tokens of the validation text)."""
    from kvquant_hf.calibration import calibrate

    if not os.path.isfile(VALID_TEXT):
        pytest.skip(f"calibration text {VALID_TEXT} is missing")
    model, tok = smollm2
    with open(VALID_TEXT, encoding="utf-8") as f:
        text = f.read()
    return calibrate(model, tok, text, bits=(4,), outlier_fraction=0.01, nsamples=4, seqlen=512, progress=False)


@pytest.mark.slow
def test_smollm2_nuq4_close_to_fp16_and_beats_int4(smollm2, smollm2_quick_signposts):
    test_text = os.path.join(os.path.dirname(VALID_TEXT), "test.raw.txt")
    if not os.path.isfile(test_text):
        pytest.skip(f"{test_text} is missing")
    model, tok = smollm2
    was_patched = getattr(model, "_kvquant_patched", False)
    with open(test_text, encoding="utf-8") as f:
        ids = ppl_mod.tokenize_text(tok, f.read()[:20000])
    try:
        res = evaluate_perplexity(model, ids, ["fp16", "nuq4", "int4"], seqlen=512, windows=2,
                                  signposts=smollm2_quick_signposts, outlier_fraction=0.01, sink_tokens=1)
    finally:
        if not was_patched:
            unpatch_model(model)
    fp16, nuq4, int4 = res["fp16"]["ppl"], res["nuq4"]["ppl"], res["int4"]["ppl"]
    assert res["nuq4"]["windows"] == 2
    assert nuq4 < fp16 * 1.04, (fp16, nuq4)
    assert nuq4 < int4, (nuq4, int4)


def test_patch_is_transparent_for_other_caches(tiny_llama):
    """evaluate_perplexity patches the model; the patch must not change plain forwards."""
    ids = _ids(64, seed=4)[None]
    with torch.no_grad():
        ref = tiny_llama(ids).logits
        patch_model(tiny_llama)
        torch.testing.assert_close(tiny_llama(ids).logits, ref)


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
def test_cli_help_lists_the_methods_and_defaults(capsys):
    with pytest.raises(SystemExit) as exc:
        ppl_mod.parse_args(["--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "fp16, nuq2/nuq3/nuq4, int2/int3/int4/int8, kivi2/kivi3/kivi4/kivi8" in out
    assert "tokens per window (default: 2048)" in out and "--uncalibrated" in out


@pytest.mark.parametrize("methods, match", [
    (["fp16", "nuq4", "nuq2"], "nuq4, nuq2 need calibrated signposts: pass --signposts"),
    (["nuq5"], "--methods: nuq needs bits"),
    (["fp17"], "--methods: unknown method 'fp17'"),
])
def test_cli_refuses_unknown_methods_and_uncalibrated_nuq(capsys, methods, match):
    with pytest.raises(SystemExit) as exc:
        ppl_mod.parse_args(["--model", "m", "--text-file", "t", "--methods", *methods])
    assert exc.value.code == 2
    assert match in capsys.readouterr().err


def test_cli_runs_nuq_with_signposts_or_when_asked_uncalibrated():
    base = ["--model", "m", "--text-file", "t", "--methods", "fp16", "nuq4", "int4"]
    assert ppl_mod.parse_args([*base, "--signposts", "S"]).signposts == "S"
    assert ppl_mod.parse_args([*base, "--uncalibrated"]).uncalibrated
    assert ppl_mod.parse_args(["--model", "m", "--text-file", "t", "--methods", "fp16", "kivi2"]).methods == ["fp16", "kivi2"]

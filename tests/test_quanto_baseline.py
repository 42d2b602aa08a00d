"""transformers' QuantizedCache (quanto) as a perplexity baseline: decode equivalence, batching, stored bits, CLI."""

from __future__ import annotations

import importlib.util
import inspect
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_llama

from kvquant_hf.errors import BackendUnavailableError, KVQuantConfigError
from kvquant_hf.evaluation import evaluate_perplexity
from kvquant_hf.evaluation import perplexity as ppl_mod
from kvquant_hf.evaluation import quantized_cache_baseline as qcb
from kvquant_hf.models import patch_model
from kvquant_hf.simulated import MethodSpec, method_avg_bits, parse_method

pytest.importorskip("optimum.quanto")
from transformers import LlamaConfig  # noqa: E402
from transformers.cache_utils import DynamicCache, QuantizedCache  # noqa: E402


def _ids(n: int = 1000, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed))


def _model():
    """Tiny MHA Llama (4 kv heads x head_dim 16: a token's K/V of one layer fills one quanto group of 64)."""
    return make_tiny_llama(num_key_value_heads=4)


def _decode_nll(model, window: torch.Tensor, nbits: int) -> float:
    """Reference: token-by-token decoding of one window through a fresh QuantizedCache, one model call per token."""
    cache = QuantizedCache("quanto", model.config, nbits=nbits)
    total = 0.0
    with torch.no_grad():
        for t in range(window.numel() - 1):
            logits = model(input_ids=window[None, t: t + 1], cache=cache, use_cache=True).logits[0, -1]
            total += float(F.cross_entropy(logits[None].float(), window[t + 1: t + 2]))
    return total


def test_decode_equivalence_with_stock_model():
    """The harness (on the kvquant-patched model) = a plain decode loop on an unpatched copy of the model."""
    seqlen = 300  # the residual (128 tokens) empties into the quantized states twice per window
    ids = _ids()
    model = _model()
    res = evaluate_perplexity(model, ids, ["fp16", "quanto4", "quanto2"], seqlen=seqlen, windows=2, window_batch=1)
    assert "forward" in model.model.layers[0].self_attn.__dict__  # the harness ran on the patched attention
    reference = _model()  # same seed, never patched
    wins = ppl_mod.make_windows(ids, seqlen, 2)
    for name, bits in (("quanto4", 4), ("quanto2", 2)):
        expected = [_decode_nll(reference, w, bits) for w in wins]
        torch.testing.assert_close(torch.tensor(res[name]["window_nll"], dtype=torch.float64),
                                   torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-4)
        assert res[name]["tokens"] == 2 * (seqlen - 1)
        assert res[name]["ppl"] == pytest.approx(math.exp(sum(expected) / (2 * (seqlen - 1))), rel=1e-5)
    # quantizing the history changes the result, more at 2 bits
    err4 = abs(res["quanto4"]["nll"] - res["fp16"]["nll"])
    err2 = abs(res["quanto2"]["nll"] - res["fp16"]["nll"])
    assert 0 < err4 < err2


def test_patched_model_runs_the_stock_attention_for_quantized_cache():
    """A call's own tokens see their exact K/V in QuantizedCache, so a whole-sequence call equals DynamicCache."""
    model = _model()
    ids = _ids(64, seed=5)[None]
    with torch.no_grad():
        ref = model(input_ids=ids, cache=DynamicCache(config=model.config), use_cache=True).logits
        patch_model(model)
        out = model(input_ids=ids, cache=QuantizedCache("quanto", model.config, nbits=2), use_cache=True).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # and through the harness: every token of a window given in the first call -> exactly the fp16 NLL
    res = evaluate_perplexity(model, _ids(seed=6), ["fp16", "quanto2"], seqlen=64, windows=2, prefill=64)
    torch.testing.assert_close(torch.tensor(res["quanto2"]["window_nll"]), torch.tensor(res["fp16"]["window_nll"]),
                               rtol=1e-5, atol=1e-4)


def test_batched_windows_equal_one_at_a_time(monkeypatch):
    """Rows of a batch do not interact (a row's NLL is bit-identical whatever the other rows hold); against one
    window per batch they agree to float rounding: CPU GEMMs round differently per batch size (~1e-7 in the
    logits, also with DynamicCache), and a quantization code that flips on such a difference moves the window's
    NLL sum by a few 1e-5 of itself."""
    model = _model()
    ids = _ids(seed=7)
    wins = ppl_mod.make_windows(ids, 150, 5)
    spec = qcb.QuantizedCacheSpec("quanto", 4)
    a = qcb.score_windows_decode(model, wins[[0, 1, 2]], qcb.new_quantized_cache(model.config, spec))
    b = qcb.score_windows_decode(model, wins[[0, 3, 4]], qcb.new_quantized_cache(model.config, spec))
    assert a[0] == b[0] and a[1] != b[1]
    one = evaluate_perplexity(model, ids, ["quanto4"], seqlen=150, windows=5, window_batch=1)
    shapes = []
    real = qcb.QuantizedCacheRunner.score_many
    monkeypatch.setattr(qcb.QuantizedCacheRunner, "score_many",
                        lambda self, w: shapes.append(tuple(w.shape)) or real(self, w))
    batched = evaluate_perplexity(model, ids, ["quanto4"], seqlen=150, windows=5, window_batch=3)
    assert shapes == [(3, 150), (2, 150)]  # 5 windows in two batches, same windows in the same order
    assert batched["quanto4"]["window_nll"][:3] == [nll for nll, _ in a]
    torch.testing.assert_close(torch.tensor(batched["quanto4"]["window_nll"]),
                               torch.tensor(one["quanto4"]["window_nll"]), rtol=1e-4, atol=1e-4)
    assert batched["quanto4"]["windows"] == 5 and batched["quanto4"]["window_batch"] == 3
    with pytest.raises(KVQuantConfigError, match="window_batch"):
        evaluate_perplexity(model, ids, ["quanto4"], seqlen=150, windows=1, window_batch=0)


def _hand_bits(heads: int, head_dim: int, quantized: int, residual: int, nbits: int) -> float:
    """Bits per K/V element by hand: groups of 64 elements, codes packed 8 // nbits per byte along the group
    rows (rows rounded up), fp16 scale and shift per group, fp16 residual."""
    groups = heads * quantized * head_dim // 64
    packed = math.ceil(groups / (8 // nbits)) * 64
    per_side = packed + groups * 2 * 2 + heads * residual * head_dim * 2
    return 8 * per_side / (heads * (quantized + residual) * head_dim)


@pytest.mark.parametrize("nbits", [4, 2])
def test_stored_bits_of_a_decoded_cache_match_a_hand_count(nbits):
    model = _model()
    window = _ids(200, seed=8)
    cache = QuantizedCache("quanto", model.config, nbits=nbits)
    with torch.no_grad():
        for t in range(200):
            model(input_ids=window[None, t: t + 1], cache=cache, use_cache=True)
    # 1-token first call, then one token per call: the residual empties at 128 -> 1 + 128 quantized, 71 residual
    assert qcb.decode_token_split(200, 128) == (129, 71)
    expected = _hand_bits(4, 16, 129, 71, nbits)
    measured = qcb.cache_storage(cache, model.config)
    assert measured["tokens"] == 200 and measured["kv_elements"] == 2 * 2 * 4 * 200 * 16
    assert measured["avg_bits"] == pytest.approx(expected, rel=1e-12)
    # the state rebuilt in two calls stores the same bytes
    assert qcb.quantized_cache_avg_bits(model.config, qcb.QuantizedCacheSpec("quanto", nbits), 200)["avg_bits"] == \
        pytest.approx(expected, rel=1e-12)
    # counting the run's float32 scales and residual instead of float16 gives more bits
    assert qcb.cache_storage(cache, model.config, float_bits=None)["avg_bits"] > expected + 1


def test_avg_bits_at_2k_and_32k_for_smollm2_shapes():
    """SmolLM2-135M K/V shapes (3 kv heads x 64): measured bits at 2048 and 32768 tokens against the hand count."""
    config = LlamaConfig(vocab_size=128, hidden_size=576, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64)
    spec = qcb.QuantizedCacheSpec("quanto", 4)
    for n, split in ((2048, (1921, 127)), (32768, (32641, 127))):
        assert qcb.decode_token_split(n, 128) == split
        assert qcb.avg_bits_at(config, spec, n) == pytest.approx(_hand_bits(3, 64, *split, 4), rel=1e-12)
    assert 4.5 < qcb.avg_bits_at(config, spec, 32768) < 4.6 < 5 < qcb.avg_bits_at(config, spec, 2048) < 5.5


def test_harness_reports_bits_at_2k_and_32k_for_every_method():
    model = _model()
    res = evaluate_perplexity(model, _ids(seed=9), ["fp16", "int4", "kivi2", "quanto2"], seqlen=200, windows=1)
    heads = {"num_kv_heads": 4} if "num_kv_heads" in inspect.signature(method_avg_bits).parameters else {}
    for name in ("fp16", "int4", "kivi2"):
        spec = parse_method(name)
        assert res[name]["avg_bits"] == method_avg_bits(spec, 16, 200, **heads)
        assert res[name]["avg_bits_2k"] == method_avg_bits(spec, 16, 2048, **heads)
        assert res[name]["avg_bits_32k"] == method_avg_bits(spec, 16, 32768, **heads)
    q = res["quanto2"]
    assert q["avg_bits"] == pytest.approx(_hand_bits(4, 16, 129, 71, 2))
    assert q["avg_bits_2k"] == pytest.approx(_hand_bits(4, 16, 1921, 127, 2))
    assert q["avg_bits_32k"] == pytest.approx(_hand_bits(4, 16, 32641, 127, 2))
    # the cache of the run itself, after its last call (199 tokens: the last token is never fed)
    assert q["storage_measured"]["tokens"] == 199
    assert q["storage_measured"]["avg_bits"] == pytest.approx(_hand_bits(4, 16, 129, 70, 2))
    assert q["seconds_per_window"] > 0 and q["cache"] == "QuantizedCache"


def test_recent_window_is_passed_only_when_given():
    model = _model()
    base = evaluate_perplexity(model, _ids(seed=10), ["nuq4", "int4"], seqlen=64, windows=1)
    if "recent_window" in MethodSpec.__dataclass_fields__:
        res = evaluate_perplexity(model, _ids(seed=10), ["nuq4", "int4"], seqlen=64, windows=1, recent_window=16)
        assert res["nuq4"]["spec"]["recent_window"] == 16
        assert res["nuq4"]["spec"] != base["nuq4"]["spec"]
    else:
        with pytest.raises(KVQuantConfigError, match="recent_window"):
            evaluate_perplexity(model, _ids(seed=10), ["nuq4"], seqlen=64, windows=1, recent_window=16)


def test_method_names_and_errors():
    assert qcb.parse_quantized_cache_method("Quanto4") == qcb.QuantizedCacheSpec("quanto", 4, name="quanto4")
    assert qcb.is_quantized_cache_method("quanto2") and not qcb.is_quantized_cache_method("kivi2")
    with pytest.raises(KVQuantConfigError, match="quanto2, quanto4"):
        ppl_mod.parse_any_method("quanto8")
    with pytest.raises(KVQuantConfigError, match="quanto2/quanto4"):
        ppl_mod.parse_any_method("quant4")
    if importlib.util.find_spec("hqq") is None:
        with pytest.raises(BackendUnavailableError, match="pip install hqq"):
            ppl_mod.parse_any_method("hqq4")
    else:
        assert ppl_mod.parse_any_method("hqq4").backend == "hqq"


def test_cli_help_and_parsing(capsys):
    with pytest.raises(SystemExit) as exc:
        ppl_mod.parse_args(["--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert qcb.QUANTIZED_CACHE_NAMES in out and "--recent-window" in out and "--window-batch" in out
    base = ["--model", "m", "--text-file", "t", "--methods", "fp16", "quanto4", "quanto2"]
    args = ppl_mod.parse_args(base)
    assert args.methods == ["fp16", "quanto4", "quanto2"] and args.recent_window is None
    assert args.window_batch == qcb.DEFAULT_WINDOW_BATCH
    args = ppl_mod.parse_args([*base, "--recent-window", "32", "--window-batch", "4"])
    assert args.recent_window == 32 and args.window_batch == 4
    for bad, match in ((["quanto8"], "--methods: quanto8"), (["foo4"], "quanto2/quanto4")):
        with pytest.raises(SystemExit) as exc:
            ppl_mod.parse_args(["--model", "m", "--text-file", "t", "--methods", *bad])
        assert exc.value.code == 2 and match in capsys.readouterr().err


class _CharTokenizer:
    def __call__(self, text, return_tensors=None):
        return type("Enc", (), {"input_ids": torch.tensor([[ord(c) % 128 for c in text]])})()


def test_cli_json_with_quanto(tmp_path, monkeypatch):
    from kvquant_hf.models import loading

    model = _model()
    monkeypatch.setattr(loading, "load_model_and_tokenizer", lambda *a, **k: (model, _CharTokenizer()))
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    out = tmp_path / "out.json"
    ppl_mod.main(["--model", "tiny", "--text-file", str(text), "--seqlen", "140", "--windows", "3", "--methods",
                  "fp16", "quanto4", "--window-batch", "2", "--json", str(out), "--device", "cpu", "--quiet"])
    data = json.loads(out.read_text())
    assert data["meta"]["window_batch"] == 2 and data["meta"]["recent_window"] is None
    for name in ("fp16", "quanto4"):
        r = data["results"][name]
        assert {"ppl", "avg_bits", "avg_bits_2k", "avg_bits_32k"} <= set(r) and r["windows"] == 3
    assert data["results"]["quanto4"]["avg_bits_32k"] < data["results"]["quanto4"]["avg_bits_2k"] < 16

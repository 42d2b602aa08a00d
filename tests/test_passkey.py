"""Passkey retrieval harness (kvquant_hf.evaluation.passkey): prompt construction, scoring, the CLI and its JSON
contract, on a tiny random Llama with a byte tokenizer (accuracy itself is meaningless here)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_llama

from kvquant_hf import generation, simulated
from kvquant_hf.errors import KVQuantConfigError
from kvquant_hf.evaluation import passkey


class ByteTokenizer:
    """ASCII characters as token ids (< 128, the tiny model's vocabulary)."""

    bos_token_id = None
    pad_token_id = 0
    eos_token_id = None

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(int(i)) for i in ids)


pytestmark = pytest.mark.filterwarnings("ignore::kvquant_hf.UncalibratedCacheWarning")


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_build_prompt_length_and_depth(depth):
    tok = ByteTokenizer()
    ids = passkey.build_prompt(tok, 2000, depth, "12345", new_tokens=8)
    per = len(passkey.FILLER)
    assert 2000 - 8 - per < len(ids) <= 2000 - 8
    text = tok.decode(ids)
    assert text.startswith(passkey.INSTRUCTION) and text.endswith(passkey.QUESTION)
    needle = passkey.NEEDLE.format(key="12345")
    assert text.count(needle) == 1
    before = text[len(passkey.INSTRUCTION): text.index(needle)]
    after = text[text.index(needle) + len(needle): -len(passkey.QUESTION)]
    assert before == passkey.FILLER * (len(before) // per) and after == passkey.FILLER * (len(after) // per)
    n = (len(before) + len(after)) // per
    assert len(before) // per == round(depth * n)


def test_build_prompt_too_short():
    with pytest.raises(KVQuantConfigError, match="too short"):
        passkey.build_prompt(ByteTokenizer(), 100, 0.5, "12345")


def test_extract_passkey():
    assert passkey.extract_passkey(" 48213. Remember") == "48213"
    assert passkey.extract_passkey("the key: 4821 3") is None
    assert passkey.extract_passkey("123456") is None
    assert passkey.extract_passkey("x 1 23456 99999") == "23456"


def test_scoring_counts_correct_answers(monkeypatch):
    """A 'model' that reads the needle scores 1.0, one that answers a fixed wrong key scores 0."""
    tok = ByteTokenizer()
    model = make_tiny_llama()

    def oracle(model, ids, method, new_tokens, signposts, chunk, pad_id, cache_config=None):
        text = tok.decode(ids[0].tolist())
        key = text.split("The pass key is ")[1][:5]
        return tok.encode(" " + key + ".")

    monkeypatch.setattr(passkey, "generate", oracle)
    res = passkey.run_passkey(model, tok, [600], [0, 1], 3, ["fp16", "nuq4"])
    assert res["fp16"]["accuracy"] == res["nuq4"]["accuracy"] == 1.0 and res["fp16"]["total"] == 6
    monkeypatch.setattr(passkey, "generate", lambda *a: tok.encode(" 00000"))
    res = passkey.run_passkey(model, tok, [600], [0.5], 2, ["nuq2"])
    assert res["nuq2"]["accuracy"] == 0.0 and res["nuq2"]["cells"][0]["outputs"][0]["answer"] == " 00000"


def test_cli_json_contract_real_caches(monkeypatch, tmp_path):
    model = make_tiny_llama()
    model.generation_config.eos_token_id = None
    tok = ByteTokenizer()
    monkeypatch.setattr(passkey, "load_model_and_tokenizer", lambda *a, **k: (model, tok))
    chunks, kivi_calls, caches = [], [], []
    orig_chunked = generation.ForwardRouter.chunked_prefill
    monkeypatch.setattr(generation.ForwardRouter, "chunked_prefill",
                        lambda self, ids, kw: (chunks.append(ids.shape[1]), caches.append(self.cache),
                                               orig_chunked(self, ids, kw))[2])
    orig_kivi = simulated.KiviLayer.simulate
    monkeypatch.setattr(simulated.KiviLayer, "simulate",
                        lambda self, *a: (kivi_calls.append(a[0].shape[2]), orig_kivi(self, *a))[1])
    out_path = tmp_path / "passkey.json"
    out = passkey.main(["--model", "tiny", "--lengths", "400", "600", "--depths", "0", "1", "--trials", "2",
                        "--methods", "fp16", "nuq4", "kivi2", "--chunk", "128", "--json", str(out_path),
                        "--device", "cpu"])
    data = json.loads(out_path.read_text())
    assert set(data) == {"config", "complete", "methods", "environment"} and data["complete"] is True
    assert set(data["methods"]) == {"fp16", "nuq4", "kivi2"}
    for res in data["methods"].values():
        assert res["total"] == 2 * 2 * 2
        assert res["accuracy"] == res["correct"] / res["total"]
        assert [(c["length"], c["depth"]) for c in res["cells"]] == [(400, 0.0), (400, 1.0), (600, 0.0), (600, 1.0)]
        for c in res["cells"]:
            assert c["trials"] == 2 and len(c["outputs"]) == 2 and c["prompt_tokens"] <= c["length"] - 8
            assert c["accuracy"] == c["correct"] / 2
    # same pass keys for every method
    keys = {m: [o["passkey"] for c in res["cells"] for o in c["outputs"]] for m, res in data["methods"].items()}
    assert keys["fp16"] == keys["nuq4"] == keys["kivi2"]
    # nuq ran the real cache with chunked prefill (8 prompts longer than the chunk), kivi the simulated cache
    assert len(chunks) == 8 and all(n > 128 for n in chunks)
    assert all(type(c).__name__ == "KVQuantCache" and c.config.prefill_chunk_size == 128 for c in caches)
    assert kivi_calls and max(kivi_calls) > 300 and 1 in kivi_calls  # the prompt, then one token per step
    assert out["config"]["methods"] == ["fp16", "nuq4", "kivi2"]


def test_checkpoint_after_every_cell():
    seen = []
    passkey.run_passkey(make_tiny_llama(), ByteTokenizer(), [400], [0, 1], 1, ["fp16"],
                        on_cell=lambda res: seen.append(len(res["fp16"]["cells"])))
    assert seen == [1, 2]


def test_unknown_method():
    with pytest.raises(KVQuantConfigError, match="not supported"):
        passkey.run_passkey(make_tiny_llama(), ByteTokenizer(), [600], [0], 1, ["nuq5"])


def test_nuq_answers_follow_the_model_when_lossless(monkeypatch):
    """nuq4 through the real cache (chunked prefill) mostly picks fp16's greedy tokens on the same prompt."""
    model = make_tiny_llama()
    model.generation_config.eos_token_id = None
    tok = ByteTokenizer()
    ids = torch.tensor([passkey.build_prompt(tok, 400, 0.5, "55555")])
    ref = passkey.generate(model, ids, "fp16", 6, None, 64, 0)
    got = passkey.generate(model, ids, "nuq4", 6, None, 64, 0)
    assert len(ref) == len(got) == 6
    assert sum(a == b for a, b in zip(ref, got)) >= 4


def test_cli_cache_config_reaches_the_cache(monkeypatch, tmp_path):
    model = make_tiny_llama()
    model.generation_config.eos_token_id = None
    monkeypatch.setattr(passkey, "load_model_and_tokenizer", lambda *a, **k: (model, ByteTokenizer()))
    caches = []
    orig_chunked = generation.ForwardRouter.chunked_prefill
    monkeypatch.setattr(generation.ForwardRouter, "chunked_prefill",
                        lambda self, ids, kw: (caches.append(self.cache), orig_chunked(self, ids, kw))[1])
    out = passkey.main(["--model", "tiny", "--lengths", "400", "--depths", "0.5", "--trials", "1", "--methods", "nuq4",
                        "--chunk", "128", "--cache-config", '{"sink_tokens": 3}', "--device", "cpu"])
    assert caches and all(c.config.sink_tokens == 3 and c.config.prefill_chunk_size == 128 for c in caches)
    assert out["config"]["cache_config"] == '{"sink_tokens": 3}'
    with pytest.raises(SystemExit, match="not valid JSON"):
        passkey.main(["--model", "tiny", "--methods", "nuq4", "--cache-config", "{qnorm}"])
    with pytest.raises(SystemExit, match="must be a JSON object"):
        passkey.main(["--model", "tiny", "--methods", "nuq4", "--cache-config", "[1]"])

"""CPU smoke runs of the GPU capacity and prefill benchmarks (``benchmarks.capacity``, ``benchmarks.prefill``) on a tiny
random model: the planner's prediction is what the benchmark then allocates, the result files are written (and
copied to $OUT), GPU-only parts are marked skipped."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import capacity, common, prefill
from benchmarks.common import random_model, random_model_device_map


@pytest.fixture
def results(monkeypatch, tmp_path):
    repo, out = tmp_path / "results", tmp_path / "out"
    monkeypatch.setattr(common, "RESULTS_DIR", str(repo))
    monkeypatch.setenv("OUT", str(out))
    return repo, out


def test_capacity_benchmark_smoke(results):
    repo, out = results
    rows = capacity.main(["--smoke"])
    for d in (repo, out):
        data = json.loads((d / "capacity.json").read_text())
        assert data["meta"]["shape"] == "tiny" and len(data["rows"]) == len(rows)
        assert data["device"].startswith("cpu") and data["command"] and data["commit"] and data["date"]
        md = (d / "capacity.md").read_text()
        assert "## Several GPUs" in md and "## Planner predictions" in md and "## Run" in md
    history = (repo / "history.csv").read_text().splitlines()
    assert len(history) == 1 + len(rows) and all(line.startswith("capacity,") for line in history[1:])
    cap = {r["method"]: r for r in rows if r["section"] == "capacity"}
    assert set(cap) == {"fp16", "nuq4", "nuq2"}
    for m, r in cap.items():
        assert "error" not in r, r
        assert r["measured_tokens"].startswith("skipped") and r["gpu_memory"].startswith("skipped")
        # the benchmark holds exactly the predicted context, and the cache it allocated is the predicted size
        assert r["context"] == r["held_tokens"] == r["predicted_tokens"] > 1000
        assert len(r["decode_ms_all"]) == 2
        if m != "fp16":
            clip_counters = 4 * 2 / 2**30  # CUDA-only 4-byte counter per layer, in the plan
            assert r["cache_gib"] <= r["predicted_cache_gib"] < r["cache_gib"] + 8192 / 2**30 + clip_counters
    # the quantized caches hold many more tokens in the same memory
    assert cap["nuq2"]["predicted_tokens"] > cap["nuq4"]["predicted_tokens"] > 2 * cap["fp16"]["predicted_tokens"]
    # several devices (here one CPU "device"): meta-built model materialized per device, half the prediction filled
    (multi,) = [r for r in rows if r["section"] == "multi_gpu"]
    assert "error" not in multi, multi
    assert multi["predicted_per_device"] == {"cpu": multi["predicted_tokens"]}
    assert multi["context"] == multi["held_tokens"] == int(multi["predicted_tokens"] * 0.5)
    # the planner table: Llama-3-8B on 1 and 2 GPUs, Llama-2-7B on 1, 2 and 8, four methods each
    plan = [r for r in rows if r["section"] == "plan"]
    assert len(plan) == (2 + 3) * 4
    one = {r["method"]: r["predicted_tokens"] for r in plan if r["model"].startswith("Llama-3") and r["gpus"] == 1}
    assert one["nuq2-1%"] > one["nuq4-1%"] > one["fp16"]


def test_prefill_benchmark_smoke(results):
    repo, _out = results
    rows = prefill.main(["--smoke"])
    assert [r["method"] for r in rows] == ["nuq4 chunked (64), prefill_attention=auto", "fp16"]
    assert all(r["tokens_per_s"] > 0 and r["prompt"] == 160 for r in rows)
    data = json.loads((repo / "prefill.json").read_text())
    assert data["name"] == "prefill" and data["rows"] == json.loads(json.dumps(rows))


def test_allocation_only_equals_filled_memory():
    model = random_model("tiny", dtype=torch.float32, device="cpu")
    a = capacity.allocate_cache(model, "nuq3", 3000, 2990, fill=False)
    b = capacity.allocate_cache(model, "nuq3", 3000, 2990, fill=True)
    assert a.get_seq_length() == b.get_seq_length() == 2990
    assert a.get_memory_footprint(include_spare=True) == b.get_memory_footprint(include_spare=True)
    assert capacity.decode_steps(model, a, 2990, 1, "cpu")[0] > 0
    assert a.get_seq_length() == 2991


def test_random_model_device_map_is_a_working_model():
    """Weights materialized per device and the rebuilt rotary embedding give a model that runs and generates."""
    model, dmap = random_model_device_map("tiny", ["cpu"], dtype=torch.float32)
    assert dmap["model.layers.0"] == "cpu" and dmap["lm_head"] == "cpu"
    assert not any(p.is_meta for p in model.parameters())
    ref = type(model.model.rotary_emb)(config=model.config)
    assert torch.equal(model.model.rotary_emb.inv_freq, ref.inv_freq)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    model.generation_config.pad_token_id = 0
    out = model.generate(ids, max_new_tokens=3, do_sample=False, cache_implementation="kvquant",
                         cache_config={"bits": 2})
    assert out.shape == (1, 11)

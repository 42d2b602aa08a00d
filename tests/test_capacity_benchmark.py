"""CPU smoke test of the GPU capacity benchmarks (benchmarks/capacity.py, benchmarks/multi_gpu_capacity.py) on a
tiny random model: the planner's prediction is what the benchmark then allocates, results are written in the
benchmarks/common.py format (and copied to $OUT), GPU-only parts are marked skipped."""

from __future__ import annotations

import json
import os
import sys

import pytest

from kvquant_hf import cache as cache_mod

_BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
if _BENCH not in sys.path:
    sys.path.insert(0, _BENCH)


@pytest.fixture(autouse=True)
def _quiet_uncalibrated(monkeypatch):
    monkeypatch.setattr(cache_mod, "_UNCALIBRATED_WARNED", True)


@pytest.fixture
def results(monkeypatch, tmp_path):
    import common

    repo = tmp_path / "results"
    out = tmp_path / "out"
    monkeypatch.setattr(common, "results_dir", lambda: (os.makedirs(os.environ.get("OUT") or repo, exist_ok=True),
                                                        str(os.environ.get("OUT") or repo))[1])
    monkeypatch.setenv("OUT", str(out))
    return repo, out


def test_capacity_benchmark_smoke(results):
    import capacity

    repo, out = results
    rows = capacity.main(["--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--free-mib", "8",
                          "--headroom-mib", "0", "--decode-steps", "2", "--methods", "fp16", "nuq4", "nuq2",
                          "--prefill-lengths", "160", "--prefill-chunk", "64", "--prefill-methods", "nuq4", "fp16"])
    for d in (repo, out):
        data = json.loads((d / "capacity.json").read_text())
        assert data["environment"]["shape"] == "tiny" and len(data["rows"]) == len(rows)
        assert "## Prefill throughput" in (d / "capacity.md").read_text()
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
    pre = [r for r in rows if r["section"] == "prefill"]
    assert [r["method"] for r in pre] == ["nuq4 chunked (64), prefill_attention=auto", "fp16"]
    assert all(r["tokens_per_s"] > 0 for r in pre)


def test_allocation_only_equals_filled_memory():
    import capacity
    from common import random_model

    model = random_model("tiny", dtype=__import__("torch").float32, device="cpu")
    a = capacity.allocate_cache(model, "nuq3", 3000, 2990, fill=False)
    b = capacity.allocate_cache(model, "nuq3", 3000, 2990, fill=True)
    assert a.get_seq_length() == b.get_seq_length() == 2990
    assert a.get_memory_footprint(include_spare=True) == b.get_memory_footprint(include_spare=True)
    assert capacity.decode_steps(model, a, 2990, 1, "cpu")[0] > 0
    assert a.get_seq_length() == 2991


def test_multi_gpu_capacity_smoke(results):
    """The multi-GPU script end to end on CPU (one device): meta-built model materialized per device, planner,
    fast fill at the predicted size, decode steps."""
    import multi_gpu_capacity

    _repo, out = results
    rows = multi_gpu_capacity.main(["--shape", "tiny", "--devices", "cpu", "--dtype", "float32", "--free-mib", "8",
                                    "--headroom-mib", "0", "--decode-steps", "2", "--scale", "0.5"])
    (row,) = rows
    assert "error" not in row, row
    assert row["predicted_per_device"] == {"cpu": row["predicted_tokens"]}
    assert row["context"] == row["held_tokens"] == int(row["predicted_tokens"] * 0.5)
    assert json.loads((out / "multi_gpu_capacity.json").read_text())["environment"]["devices"] == ["cpu"]


def test_random_model_device_map_is_a_working_model():
    """Weights materialized per device and the rebuilt rotary embedding give a model that runs and generates."""
    import torch
    from common import random_model_device_map

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

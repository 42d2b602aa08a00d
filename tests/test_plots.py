"""benchmarks.plots redraws the result figures (benchmarks/figures/) from the latest result files."""

from __future__ import annotations

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_plots_from_latest_results(tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks import common, plots

    written = plots.main(["--out-dir", str(tmp_path)])
    assert sorted(os.path.basename(p) for p in written) == sorted(n for n, _ in plots.PLOTTERS.values())
    for p in written:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # the numbers behind them are the ones in the result files
    acc = {r["method"]: r["delta_pct"] for r in plots.accuracy_rows()}
    want = {r["method"]: r["delta_pct"] for r in common.read_result("accuracy")["rows"]
            if r.get("text", "wikitext2") == "wikitext2" and r.get("seqlen", 2048) == 2048}
    assert acc["nuq4-1%"] == want["nuq4-1%"] and {"int4", "kivi2", "nuq3-1%"} <= set(acc)
    us = plots.decode_attention_us()
    rows = [r for r in common.read_result("decode_attention")["rows"] if r.get("section") == "attention"]
    r0 = next(r for r in rows if r["batch"] == 1 and r["method"] == "nuq4-1%")
    assert us["nuq4-1%"][r0["context"]] == r0["us"]
    cap = plots.capacity_tokens()
    cap_rows = common.read_result("capacity")["rows"]
    for r in cap_rows:
        if r["section"] == "capacity" and isinstance(r.get("measured_tokens"), int):
            assert cap[(1, r["method"])] == (r["measured_tokens"], True)
    plan = {(r["gpus"], r["method"].replace("-1%", "")): r["predicted_tokens"] for r in cap_rows
            if r["section"] == "plan" and r["model"].startswith("Llama-3-8B")}
    assert set(cap) == set(plan)  # every method on 1 and 2 GPUs is drawn, measured or planned
    for key, (tokens, measured) in cap.items():
        assert measured or tokens == plan[key]


def test_committed_plots_exist():
    for name in ("accuracy.png", "decode_attention.png", "capacity.png"):
        assert os.path.getsize(os.path.join(ROOT, "benchmarks", "figures", name)) > 10_000

"""benchmarks/plots.py redraws the README's plots from the committed result files."""

from __future__ import annotations

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _plots_module():
    spec = importlib.util.spec_from_file_location("kvquant_plots", os.path.join(ROOT, "benchmarks", "plots.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_plots_from_committed_results(tmp_path):
    pytest.importorskip("matplotlib")
    plots = _plots_module()
    written = plots.main(["--out-dir", str(tmp_path)])
    assert sorted(os.path.basename(p) for p in written) == sorted(n for n, _ in plots.PLOTTERS.values())
    for p in written:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # the numbers behind them are the committed ones
    acc = {r["method"]: r["delta_pct"] for r in plots.accuracy_rows()}
    assert acc["nuq4-1%"] == pytest.approx(2.47, abs=0.01)
    kernel = plots.kernel_times_128k()
    assert kernel["new"]["nuq4-1%"] == pytest.approx(436.9, abs=0.1)
    assert kernel["cuda"]["nuq4-1%"] == pytest.approx(163.4, abs=0.1)  # decode_attention_cuda_final5.md
    cap = plots.capacity_tokens()
    assert cap[(1, "nuq2")] == (6422529, True) and cap[(2, "nuq2")] == (13647873, True)
    assert cap[(2, "nuq4")][1] is False  # 2-GPU nuq4 was only planned


def test_committed_plots_exist():
    for name in ("accuracy_smollm2.png", "decode_kernel_128k.png", "capacity_h200.png"):
        assert os.path.getsize(os.path.join(ROOT, "benchmarks", "results", "plots", name)) > 10_000

"""benchmarks.passkey: per-method passkey JSON merged into one table against fp16."""

from __future__ import annotations

import json
import os

import pytest

from benchmarks import common, passkey


def _write(folder, name, method, cells, complete=True):
    doc = {"config": {"model": "smollm2", "signposts": "S", "lengths": [2048]}, "complete": complete,
           "methods": {method: {"accuracy": 0.0, "cells": [{"length": n, "depth": d, "trials": 10, "correct": c}
                                                           for (n, d), c in cells.items()]}}}
    with open(os.path.join(folder, f"{name}.json"), "w") as fh:
        json.dump(doc, fh)


def test_within_tolerance_per_cell_and_totals(tmp_path, monkeypatch):
    _write(tmp_path, "fp16", "fp16", {(2048, 0.0): 10, (2048, 0.5): 7})
    _write(tmp_path, "nuq3", "nuq3", {(2048, 0.0): 9, (2048, 0.5): 10})
    _write(tmp_path, "nuq3-pinned", "nuq3", {(2048, 0.0): 10}, complete=False)
    rows, summary = passkey.build(passkey.load(str(tmp_path)))
    assert [r["depth"] for r in rows] == ["0.00", "0.50"]
    assert rows[0]["nuq3 within 1"] == "yes" and rows[1]["nuq3 within 1"] == "NO (+3)"
    assert rows[1]["nuq3-pinned"] == "not run"
    assert summary["nuq3"] == {"correct": 19, "trials": 20, "cells_within": 1, "cells": 2}
    assert summary["nuq3-pinned"]["cells"] == 1
    out = tmp_path / "results"
    monkeypatch.setattr(common, "RESULTS_DIR", str(out))
    monkeypatch.delenv("OUT", raising=False)
    passkey.main(["--merge-only", str(tmp_path), "--order", "fp16", "nuq3-pinned", "nuq3"])
    md = (out / "passkey.md").read_text()
    assert "| length | depth | fp16 | nuq3-pinned | nuq3 |" in md and "incomplete" in md
    data = json.loads((out / "passkey.json").read_text())
    totals = {r["run"]: r for r in data["rows"] if r["kind"] == "total"}
    assert totals["nuq3"]["cells_within"] == 1 and totals["fp16"]["correct"] == 17
    with pytest.raises(SystemExit, match="not in"):
        passkey.main(["--merge-only", str(tmp_path), "--order", "fp16", "nuq9"])


def test_needs_fp16(tmp_path):
    _write(tmp_path, "nuq4", "nuq4", {(2048, 0.0): 10})
    with pytest.raises(SystemExit, match="fp16"):
        passkey.build(passkey.load(str(tmp_path)))


def test_runs_one_process_per_method(tmp_path, monkeypatch):
    """The run mode starts ``kvquant_hf.evaluation.passkey`` once per method with the grid and writes its JSON."""
    started = []

    class FakeProcess:
        def __init__(self, cmd, **_kwargs):
            started.append(cmd)
            method = cmd[cmd.index("--methods") + 1]
            _write(os.path.dirname(cmd[cmd.index("--json") + 1]), method, method, {(2048, 0.0): 10})

        def wait(self, timeout=None):
            return 0

    monkeypatch.setattr(passkey.subprocess, "Popen", FakeProcess)
    monkeypatch.setattr(common, "git_commit", lambda: "abc123")  # (it starts git through Popen)
    monkeypatch.setattr(common, "RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.delenv("OUT", raising=False)
    rows = passkey.main(["--methods", "fp16", "nuq4", "--lengths", "2048", "--depths", "0", "--trials", "10",
                         "--signposts", "S", "--device", "cpu"])
    assert [c[c.index("--methods") + 1] for c in started] == ["fp16", "nuq4"]
    assert all(c[1:3] == ["-m", "kvquant_hf.evaluation.passkey"] and "--signposts" in c for c in started)
    assert rows == [{"length": 2048, "depth": "0.00", "fp16": "10/10", "nuq4": "10/10", "nuq4 within 1": "yes"}]

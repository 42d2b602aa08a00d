"""benchmarks/passkey_table.py: per-method passkey JSON merged into one table against fp16."""

from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import passkey_table


def _write(folder, name, method, cells, complete=True):
    doc = {"config": {"signposts": "S", "lengths": [2048]}, "complete": complete,
           "methods": {method: {"accuracy": 0.0, "cells": [{"length": n, "depth": d, "trials": 10, "correct": c}
                                                           for (n, d), c in cells.items()]}}}
    with open(os.path.join(folder, f"{name}.json"), "w") as fh:
        json.dump(doc, fh)


def test_within_tolerance_per_cell_and_totals(tmp_path, monkeypatch):
    _write(tmp_path, "fp16", "fp16", {(2048, 0.0): 10, (2048, 0.5): 7})
    _write(tmp_path, "nuq3", "nuq3", {(2048, 0.0): 9, (2048, 0.5): 10})
    _write(tmp_path, "nuq3-tuned", "nuq3", {(2048, 0.0): 10}, complete=False)
    rows, summary = passkey_table.build(passkey_table.load(str(tmp_path)))
    assert [r["depth"] for r in rows] == ["0.00", "0.50"]
    assert rows[0]["nuq3 within 1"] == "yes" and rows[1]["nuq3 within 1"] == "NO (+3)"
    assert rows[1]["nuq3-tuned"] == "not run"
    assert summary["nuq3"] == {"correct": 19, "trials": 20, "cells_within": 1, "cells": 2}
    assert summary["nuq3-tuned"]["cells"] == 1
    out = tmp_path / "results"
    out.mkdir()
    monkeypatch.setattr(passkey_table, "results_dir", lambda: str(out))
    passkey_table.main([str(tmp_path), "--name", "pk", "--order", "fp16", "nuq3-tuned", "nuq3"])
    md = (out / "pk.md").read_text()
    assert "| length | depth | fp16 | nuq3-tuned | nuq3 |" in md and "INCOMPLETE" in md
    with pytest.raises(SystemExit, match="not in"):
        passkey_table.main([str(tmp_path), "--order", "fp16", "nuq9"])


def test_needs_fp16(tmp_path):
    _write(tmp_path, "nuq4", "nuq4", {(2048, 0.0): 10})
    with pytest.raises(SystemExit, match="fp16"):
        passkey_table.build(passkey_table.load(str(tmp_path)))

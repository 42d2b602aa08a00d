"""The benchmarks package: the shared result writer, every benchmark's ``--smoke`` run on CPU (the whole path of a
GPU benchmark on tiny shapes), the GPU runner script, and the results folder (one .md/.json pair per benchmark)."""

from __future__ import annotations

import ast
import csv
import json
import os
import subprocess

import pytest

from benchmarks import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
NAMES = ("accuracy", "side_by_side", "decode_attention", "e2e_decode", "capacity", "prefill", "passkey",
         "reliability", "soak")
RUN_FIELDS = ("command", "device", "commit", "date")


@pytest.fixture
def results(monkeypatch, tmp_path):
    monkeypatch.setattr(common, "RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.delenv("OUT", raising=False)
    return tmp_path / "results"


def _history(folder) -> list[dict]:
    with open(folder / "history.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_write_result_pair_history_and_out_copy(results, monkeypatch, tmp_path):
    out = tmp_path / "out"
    monkeypatch.setenv("OUT", str(out))
    monkeypatch.setenv("BENCHMARK_COMMIT", "abc123")
    monkeypatch.setattr(common, "_ROOT", str(tmp_path))  # no git metadata here: the variable names the commit
    rows = [{"method": "a", "ms": 1.5}, {"method": "b", "ms": float("nan")}]
    md = common.write_result("demo", rows, "# Demo\n\n" + common.md_table(rows, ["method", "ms"]), meta={"x": 1})
    data = json.loads((results / "demo.json").read_text())
    assert data["name"] == "demo" and data["meta"] == {"x": 1} and data["commit"] == "abc123"
    assert data["rows"] == [{"method": "a", "ms": 1.5}, {"method": "b", "ms": None}]
    assert all(data[k] for k in RUN_FIELDS)
    text = open(md).read()
    assert text.startswith("# Demo") and "| a | 1.500 |" in text and "## Run" in text and "- commit: abc123" in text
    common.write_result("demo", rows[:1], "# Demo again", history=False)  # the pair is rewritten, history kept
    common.write_result("other", rows[:1], "# Other")
    hist = _history(results)
    assert [h["name"] for h in hist] == ["demo", "demo", "other"]
    assert json.loads(hist[0]["row"]) == {"method": "a", "ms": 1.5} and hist[0]["commit"] == "abc123"
    assert json.loads((results / "demo.json").read_text())["rows"] == [{"method": "a", "ms": 1.5}]
    for f in ("demo.json", "demo.md", "other.json", "other.md", "history.csv"):
        assert (out / f).read_bytes() == (results / f).read_bytes()


def test_git_commit_of_the_checkout():
    commit = common.git_commit()
    assert commit != "unknown" and len(commit.split("-")[0]) >= 7


def _smoke(module, results, *extra):
    import importlib

    rows = importlib.import_module(f"benchmarks.{module}").main(["--smoke", *extra])
    data = json.loads((results / f"{module}.json").read_text())
    assert data["name"] == module and data["device"].startswith("cpu") and all(data[k] for k in RUN_FIELDS)
    assert (results / f"{module}.md").read_text().startswith("# ")
    assert [h["name"] for h in _history(results)] == [module] * len(data["rows"])
    return rows, data


def test_decode_attention_smoke(results):
    rows, _ = _smoke("decode_attention", results)
    att = {r["method"]: r for r in rows if r["section"] == "attention"}
    assert set(att) == {"fp16 SDPA", "nuq4-1%", "nuq3-1%", "nuq2-1%"}
    assert att["fp16 SDPA"]["speedup"] == 1.0 and all(r["us"] > 0 for r in att.values())
    # packed bytes per token shrink with the bits
    assert att["nuq2-1%"]["mbytes"] < att["nuq3-1%"]["mbytes"] < att["nuq4-1%"]["mbytes"] < att["fp16 SDPA"]["mbytes"]
    assert {(r["bits"], r["new_tokens"]) for r in rows if r["section"] == "append"} == {
        (b, n) for b in (4, 3, 2) for n in (1, 7)}


def test_e2e_decode_smoke(results):
    rows, _ = _smoke("e2e_decode", results)
    assert [r["method"] for r in rows] == ["kvquant_nuq4", "kvquant_nuq4_w16", "kvquant_nuq2", "dynamic"]
    for r in rows:
        assert "error" not in r, r
        assert r["ms_per_step"] > 0
    # the window's ring (16 exact tokens) costs more than the packed-only cache; nuq2 less than nuq4
    assert rows[1]["cache_gib"] > rows[0]["cache_gib"] > rows[2]["cache_gib"] > 0


def test_throughput_smoke(results):
    rows, data = _smoke("throughput", results)
    assert [(r["method"], r["context"], r["batch"]) for r in rows] == [("kvquant_nuq4", 64, 2), ("dynamic", 64, 2)]
    for r in rows:
        assert "error" not in r, r
        assert r["prefill_s"] > 0 and r["decode_tok_s"] > 0
        assert r["decode_tok_s"] == pytest.approx(2 * (data["meta"]["new_tokens"] - 1) / r["decode_s"])
    assert rows[1]["decode_ratio"] == 1.0 and rows[0]["decode_ratio"] == pytest.approx(
        rows[0]["decode_tok_s"] / rows[1]["decode_tok_s"])
    # the largest batch: the planner's plan holds context + new tokens at it and not at one more sequence
    import torch

    import kvquant_hf
    from benchmarks import throughput

    model = common.random_model("tiny", dtype=torch.float32, device="cpu", num_layers=2)
    free = 2 << 30
    batch = {m: throughput.planned_batch(model, m, 1024, 8, free_memory=free)
             for m in ("kvquant_nuq4", "kvquant_nuq2", "dynamic")}
    assert batch["kvquant_nuq2"] >= batch["kvquant_nuq4"] > 0 and batch["dynamic"] > 0, batch
    for method, b in batch.items():
        cfg = throughput.cache_config(method) if method.startswith("kvquant") else "fp16"
        tokens = [kvquant_hf.plan_capacity(model, cfg, batch_size=n, prompt_tokens=1024, free_memory=free).max_tokens
                  for n in (b, b + 1)]
        assert tokens[0] >= 1024 + 8 > tokens[1] or b == throughput.MAX_BATCH, (method, b, tokens)


def test_accuracy_smoke(results, tmp_path):
    """Two texts (a WikiText-like file and the docstring text built on the fly) at two window lengths: one row per
    (text, seqlen, method), one table per window length with a PPL / vs fp16 column pair per text."""
    wiki = tmp_path / "wiki.txt"
    wiki.write_text(" = Valkyria Chronicles III = \n\n Senjou no Valkyria 3 : Unrecorded Chronicles is a tactical role "
                    "@-@ playing video game developed by Sega and Media.Vision for the PlayStation Portable . \n" * 2)
    work = tmp_path / "work"
    rows, data = _smoke("accuracy", results, "--text-file", str(wiki), "--work-dir", str(work))
    from benchmarks import accuracy

    runs = {(r["text"], r["seqlen"]) for r in rows}
    assert runs == {(t, s) for t in ("wikitext2", "docstrings") for s in accuracy.SMOKE_SEQLENS}
    assert [(r["seqlen"], r["text"]) for r in rows if r["method"] == "fp16"] == [
        (s, t) for s in accuracy.SMOKE_SEQLENS for t in ("wikitext2", "docstrings")]
    for run in runs:
        by = {r["method"]: r for r in rows if (r["text"], r["seqlen"]) == run}
        assert {"fp16", "int4", "kivi2", "nuq4-1%", "nuq2-1%"} <= set(by)
        assert by["fp16"]["delta_pct"] is None and by["fp16"]["avg_bits"] == 16
        # (at 32K tokens: in windows of 32-64 tokens every token also sits in the 128-token exact window)
        assert by["nuq2-1%"]["avg_bits_32k"] < by["nuq4-1%"]["avg_bits_32k"] < 16
        assert by["int4"]["delta_pct"] == pytest.approx(100 * (by["int4"]["ppl"] / by["fp16"]["ppl"] - 1))
        assert "target_met" in by["nuq4-1%"] and by["fp16"]["windows"] == accuracy.SMOKE_WINDOWS
        assert set(data["meta"]["window_nll"][f"{run[0]}-{run[1]}"]) == set(by)
    fp16 = {(r["text"], r["seqlen"]): r["ppl"] for r in rows if r["method"] == "fp16"}
    assert len(set(fp16.values())) == 4  # each text and window length scores its own ids
    doc = data["meta"]["texts"]["docstrings"]
    assert doc["python"] and 0 < doc["chars"] <= accuracy.SMOKE_CHARS and data["meta"]["texts"]["wikitext2"]
    md = (results / "accuracy.md").read_text()
    for s in accuracy.SMOKE_SEQLENS:
        assert f"## Windows of {s} tokens" in md
    assert md.count("| wikitext2 PPL | wikitext2 vs fp16 | docstrings PPL | docstrings vs fp16 |") == 2
    # the checkpoints alone give the same rows and text records again
    assert accuracy.main(["--render-only", "--work-dir", str(work)]) == rows
    assert json.loads((results / "accuracy.json").read_text())["meta"]["texts"] == data["meta"]["texts"]
    for flag, missing in (("--text-file", "wiki"), ("--docstrings-file", "docstrings")):
        with pytest.raises(SystemExit, match="does not exist"):
            accuracy.main(["--smoke", "--text-file", str(wiki), flag, str(tmp_path / f"no-{missing}.txt")])


def test_side_by_side_smoke(results):
    pytest.importorskip("optimum.quanto")
    rows, _ = _smoke("side_by_side", results)
    by = {r["cache"]: r for r in rows}
    assert {"fp16 (DynamicCache)", "KVQuant nuq4-1%", "QuantizedCache quanto int4"} <= set(by)
    # 32 tokens: all of them also sit in the exact recent window (1.5x fp16 per token), so KVQuant holds more
    assert by["fp16 (DynamicCache)"]["bytes"] < by["KVQuant nuq4-1%"]["bytes"] < 2 * by["fp16 (DynamicCache)"]["bytes"]
    assert all(by[k]["decode_ms_per_token"] > 0 for k in ("fp16 (DynamicCache)", "KVQuant nuq4-1%"))


def test_soak_smoke(results):
    result, data = _smoke("soak", results)
    s = result["summary"]
    assert s["steps_done"] == 20 and s["n_nonfinite"] == 0
    assert s["live_tensors_minus_cache_MiB_range"][0] == s["live_tensors_minus_cache_MiB_range"][1]  # no leak
    assert data["meta"]["cuda_graph"] is False


def test_reliability_smoke(results):
    """The first cases of every group run, each handled, and the report has one section per group."""
    from benchmarks import reliability

    assert reliability.main(["--smoke"]) == 0
    data = json.loads((results / "reliability.json").read_text())
    rows = data["rows"]
    groups = [reliability.FIRST_GROUP] + [title for title, _ in reliability.GROUPS]
    assert [r["group"] for r in rows] == [groups[0]] * 4 + [g for g in groups[1:] for _ in range(2)]
    assert all(r["handled"] == "yes" and r["state_intact"] == "yes" and r["observed"] for r in rows)
    assert data["meta"] == {"all_handled": True, "pickle_executed": False, "cases": 16, "handled": 16}
    md = (results / "reliability.md").read_text()
    assert all(f"## {g} (" in md for g in groups)


def test_run_gpu_script_rejects_unknown_names():
    out = subprocess.run(["bash", os.path.join(BENCH, "run_gpu.sh"), "nonsense"], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 2 and "unknown benchmark: nonsense" in out.stderr


def test_package_imports_public_names_only():
    """No sys.path edits, no private names of kvquant_hf (``from kvquant_hf... import _x`` or ``module._x``)."""
    for fname in sorted(os.listdir(BENCH)):
        if not fname.endswith(".py"):
            continue
        src = open(os.path.join(BENCH, fname)).read()
        assert "sys.path" not in src, fname
        tree = ast.parse(src)
        kv_modules = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kvquant_hf"):
                assert not [a.name for a in node.names if a.name.startswith("_")], (fname, node.module)
                kv_modules |= {a.asname or a.name for a in node.names}
            if isinstance(node, ast.Import):
                kv_modules |= {a.asname or a.name for a in node.names if a.name.startswith("kvquant_hf")}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                base = node.value
                while isinstance(base, ast.Attribute):
                    base = base.value
                assert not (isinstance(base, ast.Name) and base.id in kv_modules), (fname, node.attr)


def test_results_folder_holds_one_pair_per_benchmark():
    folder = os.path.join(BENCH, "results")
    files = {f for f in os.listdir(folder) if os.path.isfile(os.path.join(folder, f))}
    assert files == {f"{n}.{ext}" for n in NAMES for ext in ("md", "json")} | {"history.csv"}
    recorded = {h["name"] for h in _history(__import__("pathlib").Path(folder))}
    for name in NAMES:
        with open(os.path.join(folder, f"{name}.json")) as fh:
            data = json.load(fh)
        assert data["name"] == name and data["rows"] and all(data[k] for k in RUN_FIELDS), name
        assert "## Run" in open(os.path.join(folder, f"{name}.md")).read()
        assert name in recorded

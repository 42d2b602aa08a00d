"""The wheel: one top-level package, ``kvquant_hf``, with the kernels as ``kvquant_hf.kernels`` (the repository folder
``triton_kernels/`` maps onto it; the top-level name ``triton_kernels`` belongs to the Triton project) and the CUDA
source as package data. Built from a copy of the sources in a temporary folder (nothing is written to the checkout)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory) -> list[str]:
    pytest.importorskip("setuptools")
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("kvquant_hf", "triton_kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-q", "-w", str(out), str(src)], check=False, capture_output=True, text=True, cwd=src)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "warn" not in (proc.stdout + proc.stderr).lower(), proc.stdout + proc.stderr
    (wheel,) = out.glob("kvquant_hf-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        return zf.namelist()


def test_the_wheel_installs_one_top_level_package(wheel_names):
    top = {n.split("/")[0] for n in wheel_names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"kvquant_hf"}
    assert not any("triton_kernels" in n for n in wheel_names)


def test_the_wheel_carries_the_kernels_and_the_cuda_source(wheel_names):
    names = set(wheel_names)
    for module in ("__init__", "common", "decode_attention", "cuda_decode", "quantize", "dequantize"):
        assert f"kvquant_hf/kernels/{module}.py" in names, module
    assert "kvquant_hf/kernels/cuda/packed_decode.cu" in names
    in_checkout = {f"kvquant_hf/kernels/{p.name}" for p in (ROOT / "triton_kernels").glob("*.py")}
    assert {n for n in names if n.startswith("kvquant_hf/kernels/") and n.endswith(".py")} == in_checkout
    for sub in ("models", "evaluation"):
        assert f"kvquant_hf/{sub}/__init__.py" in names


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (anywhere in the file, lazy imports included), with the checkout's
    ``triton_kernels/`` folder named ``kvquant_hf.kernels`` as installed."""
    import ast

    files = {}
    for path in (ROOT / "kvquant_hf").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in (ROOT / "triton_kernels").glob("*.py"):
        files["kvquant_hf.kernels" + ("" if path.stem == "__init__" else f".{path.stem}")] = path
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in files and t != name}
    return graph


def circles(graph: dict[str, set[str]], start: set[str]) -> list[list[str]]:
    """Import circles among the modules reachable from ``start`` (depth-first search for back edges)."""
    found, state, path = [], {}, []

    def visit(m):
        state[m] = "open"
        path.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                found.append(path[path.index(t):] + [t])
            elif t not in state:
                visit(t)
        path.pop()
        state[m] = "done"

    for m in sorted(start):
        if m not in state:
            visit(m)
    return found


def test_the_kernels_import_without_circles():
    graph = import_graph()
    kernels = {m for m in graph if m.startswith("kvquant_hf.kernels.")}
    assert {"kvquant_hf.kernels.common", "kvquant_hf.kernels.decode_attention",
            "kvquant_hf.kernels.cuda_decode"} <= kernels
    assert circles(graph, kernels) == []
    assert "kvquant_hf.kernels.common" in graph["kvquant_hf.kernels.cuda_decode"]
    assert not any(m.startswith("kvquant_hf.kernels") for m in graph["kvquant_hf.kernels.common"])
    # the circle this test exists for is found when present
    assert circles({**graph, "kvquant_hf.kernels.common": graph["kvquant_hf.kernels.common"] | {
        "kvquant_hf.kernels.decode_attention"}}, kernels)


def test_the_whole_package_imports_without_circles():
    graph = import_graph()
    assert circles(graph, set(graph)) == []


def source_files() -> list[Path]:
    """The project's Python sources: package, kernels, benchmarks, tests and the calibration script."""
    files = [ROOT / "calibrate.py"]
    for folder in ("kvquant_hf", "triton_kernels", "benchmarks", "tests"):
        files += sorted((ROOT / folder).rglob("*.py"))
    return files


def test_modules_stay_small_enough_to_read_in_one_sitting():
    too_long = {str(p.relative_to(ROOT)): n for p in source_files() if (n := len(p.read_text().splitlines())) > 600}
    assert too_long == {}


def test_no_module_imports_a_private_name_of_another():
    """``from x import _name`` across modules: a name another module needs is public (dunder names are fine)."""
    import ast

    ours = {"kvquant_hf", "benchmarks", "triton_kernels"} | {p.stem for p in (ROOT / "tests").rglob("*.py")}
    found = []
    for path in source_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or node.module.split(".")[0] in ours):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        found.append(f"{path.relative_to(ROOT)}: from {node.module} import {alias.name}")
    assert found == []

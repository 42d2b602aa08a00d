"""The example notebooks (``examples/*.ipynb``) run top to bottom on CPU without an error and draw their plots.

Each notebook is executed with nbclient in a kernel of the interpreter running the tests (cwd = ``examples/``,
``OMP_NUM_THREADS=1`` unless set).
To re-execute them and save the outputs into the committed files::

    python tests/test_notebooks.py            # all
    python tests/test_notebooks.py 03_accuracy
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
DATA = os.environ.get("DATA", os.path.join(os.path.dirname(ROOT), "shared", "data", "wikitext-2"))

#: notebook -> the fewest image outputs it must have
NOTEBOOKS = {
    "01_quickstart": 1,
    "02_calibrate": 2,
    "03_accuracy": 1,
    "04_long_context": 3,
}


def execute_notebook(name: str, timeout: int = 900):
    """Execute ``examples/NAME.ipynb`` in a kernel of ``sys.executable``; returns ``(notebook, seconds)``."""
    import nbformat
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    nb = nbformat.read(os.path.join(EXAMPLES, name + ".ipynb"), as_version=4)
    with tempfile.TemporaryDirectory() as kernels:
        # a kernel spec of this very interpreter, so the notebook sees the same packages as the tests
        write_kernel_spec(os.path.join(kernels, "kvquant_here"))
        ksm = KernelSpecManager(kernel_dirs=[kernels])
        km = KernelManager(kernel_name="kvquant_here", kernel_spec_manager=ksm)
        client = NotebookClient(nb, km=km, timeout=timeout, kernel_name="kvquant_here",
                                resources={"metadata": {"path": EXAMPLES}})
        t0 = time.perf_counter()
        # One torch/OpenMP thread in the kernel: on a small shared machine (2 cores, other jobs running) two
        # spinning OpenMP threads made the same notebook 4x slower (149 s vs 37 s for 03_accuracy).
        saved = os.environ.get("OMP_NUM_THREADS")
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        try:
            client.execute()
        finally:
            if saved is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            if km.has_kernel:  # nbclient leaves a kernel it was handed running
                km.shutdown_kernel(now=True)
        seconds = time.perf_counter() - t0
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb, seconds


def _outputs(nb, kind: str) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == kind]


def _images(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
               for o in c.get("outputs", []))


def _missing_dependencies() -> list[str]:
    import importlib.util

    missing = [m for m in ("nbclient", "nbformat", "ipykernel", "matplotlib", "gguf")
               if importlib.util.find_spec(m) is None]
    if not os.path.isdir(DATA):
        missing.append(f"WikiText-2 at {DATA}")
    return missing


@pytest.mark.slow
@pytest.mark.parametrize("name", list(NOTEBOOKS))
def test_notebook_runs(name):
    missing = _missing_dependencies()
    if missing:
        pytest.skip("missing: " + ", ".join(missing))
    from kvquant_hf.errors import KVQuantError
    from kvquant_hf.models.loading import resolve_model

    try:
        resolve_model("smollm2", None)
    except KVQuantError as exc:
        pytest.skip(f"embedded SmolLM2 unavailable: {exc}")
    nb, seconds = execute_notebook(name)
    errors = _outputs(nb, "error")
    assert not errors, f"{name}: a cell raised {errors[0].get('ename')}: {errors[0].get('evalue')}"
    assert all(c.get("execution_count") for c in nb.cells if c.cell_type == "code"), f"{name}: a cell did not run"
    assert _images(nb) >= NOTEBOOKS[name], f"{name}: {_images(nb)} plots, expected {NOTEBOOKS[name]}"
    print(f"{name}: {seconds:.0f} s")


def test_committed_notebooks_have_outputs():
    """The committed notebooks carry their executed outputs (plots included) and no error output."""
    import importlib.util

    if importlib.util.find_spec("nbformat") is None:
        pytest.skip("nbformat not installed")
    import nbformat

    for name, n_images in NOTEBOOKS.items():
        nb = nbformat.read(os.path.join(EXAMPLES, name + ".ipynb"), as_version=4)
        assert not _outputs(nb, "error"), name
        assert _images(nb) >= n_images, name
        assert all(c.get("execution_count") for c in nb.cells if c.cell_type == "code"), name


if __name__ == "__main__":
    import nbformat

    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    for name in sys.argv[1:] or list(NOTEBOOKS):
        nb, seconds = execute_notebook(name)
        nbformat.write(nb, os.path.join(EXAMPLES, name + ".ipynb"))
        print(f"{name}: executed in {seconds:.0f} s, {_images(nb)} plots, saved")

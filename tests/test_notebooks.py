"""Every notebook runs top to bottom in a fresh kernel; committed notebooks carry no outputs.

The kernel is a subprocess: it does not run conftest.py, so the notebooks set what they need
(HF_HUB_OFFLINE, XLA_FLAGS in 03) themselves. To check that, those variables are removed from
the kernel's environment; JAX_PLATFORMS is kept so the suite stays on CPU on a GPU machine.
Execution times go into each test's ``notebook_seconds`` property, which conftest.py prints in
the terminal summary (also from pytest-xdist workers).
"""

import ast
import os
import re
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 300
KERNEL_NAME = "python3"  # ipykernel's own spec; jupyter_client runs it with this interpreter
STRIPPED_ENV = ("XLA_FLAGS", "HF_HUB_OFFLINE", "PYTHONPATH")
# what notebooks may import from the project: the public API (and the converter)
ALLOWED_PROJECT_MODULES = {"dllm_jax", "dllm_jax.viz", "dllm_jax.sampling", "convert.hf_to_orbax"}

def _read(path):
    return nbformat.read(path, as_version=4)


def _code(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def test_there_are_notebooks():
    assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_algorithms_compared.ipynb",
                                           "03_scaling_out.ipynb", "04_conversion.ipynb", "05_rl_in_process.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
    """Outputs and execution counts are stripped, so diffs show only code and prose."""
    nb = _read(path)
    for i, cell in enumerate(_code(nb)):
        assert cell.outputs == [], f"{path.name}: code cell {i} has outputs; clear them before committing"
        assert cell.execution_count is None, f"{path.name}: code cell {i} has an execution count"
    nbformat.validate(nb)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_opens_with_gpu_instructions_and_uses_public_api(path):
    nb = _read(path)
    first = nb.cells[0]
    assert first.cell_type == "markdown"
    assert "GPU" in first.source and "dllm_jax.load(" in first.source
    for cell in _code(nb):
        for node in ast.walk(ast.parse(cell.source)):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            for name in names:
                if name.split(".")[0] in ("dllm_jax", "convert", "serve"):
                    assert name in ALLOWED_PROJECT_MODULES, f"{path.name} imports {name}, not public API"
        assert not re.search(r"\b(m|model|m_\w+)\._\w", cell.source), f"{path.name} touches a private attribute"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, record_property):
    nb = _read(path)
    env = {k: v for k, v in os.environ.items() if k not in STRIPPED_ENV}
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name=KERNEL_NAME,
                                     resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    client.execute(env=env)  # raises CellExecutionError (with the cell and traceback) on any error
    record_property("notebook_seconds", time.perf_counter() - start)
    errors = [o for c in _code(nb) for o in c.outputs if o.output_type == "error"]
    assert not errors
    images = sum("image/png" in o.get("data", {}) for c in _code(nb) for o in c.outputs)
    if path.name != "03_scaling_out.ipynb":
        assert images > 0, f"{path.name} drew no figure"

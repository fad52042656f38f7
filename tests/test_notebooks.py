"""The notebooks in notebooks/: every one runs top to bottom from a fresh kernel (small settings), and the
saved copies in the repository carry their outputs and the required settings/run-time cells.

Execution (marked ``real_model``: SmolLM2 and, where present, ../shared) goes through
``notebooks/execute.py`` with nbclient and a kernel started from this interpreter. Notebook 01 needs the
EasyEdit host (the current source, ../shared/hosts/EasyEdit, on the kernel's path); notebooks 02-04 need only
the core package, and their kernels run without the host (importing it costs 10 s and 1.2 GB). With
../shared present the small settings use WikiText statistics from 200 texts, otherwise text sampled from the
model; a separate test runs the set-up cells of notebooks 02 and 04 as if ../shared were absent and checks that
they say so.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
from conftest import HOST_MISSING, SMOLLM2_CORPUS

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
SHARED = ROOT.parent / "shared" / "data"
NOTEBOOK_NAMES = sorted(p.name for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
NEEDS_EASYEDIT = {"01_quickstart.ipynb"}
HAS_EASYEDIT = importlib.util.find_spec("easyeditor") is not None

# Small settings: two edits in one batch, a short target search, few statistics texts (every code path of each
# notebook runs; the numbers mean nothing).
SMALL = {
    "ALPHAEDIT_NB_EDITS": "2",
    "ALPHAEDIT_NB_BATCH": "2",
    "ALPHAEDIT_NB_STEPS": "5",
    "ALPHAEDIT_NB_GEN_TOKENS": "5",
    "ALPHAEDIT_NB_REPR_EDITS": "4",
    "ALPHAEDIT_NB_REPR_PROMPTS": "6",
    "ALPHAEDIT_NB_GLUE_N": "2",
    "HF_HUB_OFFLINE": "1",
}
# Statistics from 100 short texts (computed once and shared by the notebooks of a run); two corpus fractions in
# 03; in 02 one method of each kind (MEMIT, PRUNE and RECT code paths, with and without P).
SMALL.update({"ALPHAEDIT_NB_CORPUS": "wikitext" if SMOLLM2_CORPUS[0] != "self" else "self",
              "ALPHAEDIT_NB_SAMPLES": "100", "ALPHAEDIT_NB_MAX_TOKENS": "48", "ALPHAEDIT_NB_FRACTIONS": "0.5,1.0",
              "ALPHAEDIT_NB_METHODS_02": "MEMIT,PRUNE+P,RECT+P,AlphaEdit"})


def _load_executor():
    for module in ("nbformat", "nbclient", "ipykernel"):
        pytest.importorskip(module, reason=f"{module} is not installed: pip install -e '.[notebooks]' (or '.[test]')")
    spec = importlib.util.spec_from_file_location("alphaedit_notebooks_execute", NOTEBOOKS / "execute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _require_model():
    models = pytest.importorskip("alphaedit_plugin.models")
    try:
        models.smollm2_gguf_path()
    except models.ModelNotAvailableError as error:
        pytest.skip(f"SmolLM2 is not available: {error}")


def _stream_text(nb) -> str:
    return "\n".join(output.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                     for output in cell.get("outputs", []) if output.get("output_type") == "stream")


def test_there_are_four_notebooks():
    assert NOTEBOOK_NAMES == ["01_quickstart.ipynb", "02_sequential_comparison.ipynb", "03_why_it_works.ipynb",
                              "04_general_capability.ipynb"]


@pytest.mark.parametrize("name", NOTEBOOK_NAMES)
def test_saved_notebook_structure(name):
    """One settings cell near the top reads ALPHAEDIT_NB_* variables; the run time is stated; outputs are saved."""
    nb = json.loads((NOTEBOOKS / name).read_text(encoding="utf-8"))
    cells = nb["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    sources = ["".join(c["source"]) for c in code]
    settings = [i for i, s in enumerate(sources) if "os.environ.get(\"ALPHAEDIT_NB_" in s]
    assert settings == [0], f"{name}: the ALPHAEDIT_NB_* settings must be in the first code cell only, found {settings}"
    assert cells.index(code[0]) <= 3, f"{name}: the settings cell is not near the top"
    markdown = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    assert "Run time" in markdown and "2-core CPU" in markdown, f"{name}: no markdown cell states the run time"
    assert "TIME_" not in markdown and "OBSERVATIONS" not in markdown, f"{name}: a placeholder was left in"
    counts = [c.get("execution_count") for c in code]
    assert all(isinstance(n, int) for n in counts) and counts == sorted(counts), \
        f"{name}: the saved notebook must be executed top to bottom (execution counts {counts})"
    outputs = [o for c in code for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"], f"{name}: the saved run has an error"
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{name}: the saved run has no plot"


@pytest.fixture(autouse=True)
def _one_thread_per_kernel_beside_other_workers(monkeypatch):
    """Under pytest-xdist each worker runs beside another: a kernel with one thread per core would oversubscribe
    the cores (generation ran 7x slower that way on two cores)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        monkeypatch.setenv("MKL_NUM_THREADS", "1")


def _kernel_without_host(monkeypatch):
    """The core notebooks' kernels: the package on the path, the EasyEdit source not."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("ALPHAEDIT_TESTS_WITHOUT_HOST", "1")


@pytest.mark.real_model
@pytest.mark.parametrize("name", NOTEBOOK_NAMES)
def test_notebook_runs(name, smollm2_stats_dir, monkeypatch, tmp_path):
    if name in NEEDS_EASYEDIT and not HAS_EASYEDIT:
        pytest.skip(f"{name} needs the EasyEdit host: {HOST_MISSING}")
    if name not in NEEDS_EASYEDIT:
        _kernel_without_host(monkeypatch)
    executor = _load_executor()
    _require_model()
    for key, value in SMALL.items():
        monkeypatch.setenv(key, value)
    if name.startswith("02"):
        monkeypatch.setenv("ALPHAEDIT_NB_METHODS", SMALL["ALPHAEDIT_NB_METHODS_02"])
    monkeypatch.setenv("ALPHAEDIT_NB_STATS_DIR", str(smollm2_stats_dir))
    nb = executor.execute_notebook(NOTEBOOKS / name, timeout=900, save_to=tmp_path / name)  # raises on any error
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), f"{name}: a cell did not run"
    outputs = [o for c in code for o in c.get("outputs", [])]
    if name.startswith("04") and not (SHARED / "glue").is_dir():
        # Without ../shared there is no GLUE data to plot: the notebook must say so where the plot would be.
        said = [o["data"].get("text/markdown", "") for o in outputs if "data" in o]
        assert any("No GLUE data" in text and "nothing to plot" in text for text in said), \
            f"{name}: no plot and no message that the GLUE data are missing"
        return
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{name}: no plot"


@pytest.mark.real_model
@pytest.mark.parametrize("name", ["02_sequential_comparison.ipynb", "04_general_capability.ipynb"])
def test_notebook_says_when_shared_is_absent(name, monkeypatch, tmp_path):
    _kernel_without_host(monkeypatch)
    executor = _load_executor()
    _require_model()
    for key, value in SMALL.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("ALPHAEDIT_NB_SHARED", str(tmp_path / "no-shared-here"))
    monkeypatch.setenv("ALPHAEDIT_NB_STATS_DIR", str(tmp_path / "stats"))
    monkeypatch.setenv("ALPHAEDIT_NB_CORPUS", "wikitext")  # must fall back to 'self', saying so
    monkeypatch.setenv("ALPHAEDIT_NB_SAMPLES", "16")
    monkeypatch.setenv("ALPHAEDIT_NB_MAX_TOKENS", "24")
    monkeypatch.setenv("ALPHAEDIT_NB_EDITS", "2")
    monkeypatch.setenv("ALPHAEDIT_NB_BATCH", "2")
    monkeypatch.setenv("ALPHAEDIT_NB_METHODS", "AlphaEdit,MEMIT")
    # The data are chosen, and their absence reported, in the set-up cell: run the notebook up to it.
    source = json.loads((NOTEBOOKS / name).read_text(encoding="utf-8"))["cells"]
    setup = next(i for i, c in enumerate(source) if c["cell_type"] == "code" and "is absent" in "".join(c["source"]))
    nb = executor.execute_notebook(NOTEBOOKS / name, timeout=900, cells=setup + 1)
    text = _stream_text(nb)
    assert "wiki.test.raw is absent" in text and "'self'" in text, "no message that WikiText is missing"
    assert "counterfact-edit.json is absent" in text and "NOT CounterFact" in text, "no message that CounterFact is missing"
    if name.startswith("04"):
        assert "GLUE subsets are not in" in text

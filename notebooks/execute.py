"""Execute the notebooks with this interpreter as their kernel, and optionally save their outputs.

    .venv/bin/python notebooks/execute.py --inplace notebooks/02_sequential_comparison.ipynb
    PYTHONPATH=../shared/hosts/EasyEdit .venv/bin/python notebooks/execute.py --inplace notebooks/01_quickstart.ipynb

Each notebook runs in a fresh kernel started from ``sys.executable`` (a kernelspec written to
a temporary folder, so no Jupyter installation or registered kernel is needed), with the
notebooks folder as its working directory and this process's environment, so the
``ALPHAEDIT_NB_*`` size settings read by each notebook's settings cell are passed through.
A cell that raises stops the run with ``nbclient.exceptions.CellExecutionError``.
``tests/test_notebooks.py`` uses :func:`execute_notebook` with small settings; ``make notebooks``
runs this script with the full settings and ``--inplace``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent
KERNEL_NAME = "alphaedit-notebooks"
# What a saved notebook names as its kernel: the standard one, so that it opens anywhere.
SAVED_KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
logger = logging.getLogger("alphaedit_plugin.notebooks")


def execute_notebook(path, timeout: int = 3600, save_to=None, python: str = sys.executable, cells=None):
    """Run the cells of the notebook at ``path`` in a new kernel of ``python``; returns the executed notebook.

    ``timeout`` is per cell, in seconds. ``save_to``: where to write the notebook with its outputs
    (nothing is written if None). ``cells``: run only the first ``cells`` cells (default: all).
    """
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    if cells is not None:
        nb.cells = nb.cells[:cells]
    with tempfile.TemporaryDirectory(prefix="alphaedit-kernel-") as folder:
        spec_dir = Path(folder) / KERNEL_NAME
        spec_dir.mkdir()
        (spec_dir / "kernel.json").write_text(json.dumps({
            "argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": f"Python ({python})", "language": "python"}))
        manager = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=KernelSpecManager(kernel_dirs=[folder]),
                                connection_file=str(Path(folder) / "connection.json"))  # not in Jupyter's runtime dir
        client = NotebookClient(nb, km=manager, kernel_name=KERNEL_NAME, timeout=timeout, startup_timeout=120,
                                resources={"metadata": {"path": str(path.parent)}})
        started = time.perf_counter()

        def progress(cell, cell_index, **_):
            if cell.cell_type == "code":
                logger.info("%s: cell %d done (%.0f s since start)", path.name, cell_index, time.perf_counter() - started)

        client.on_cell_executed = progress
        client.execute()
    nb.metadata["kernelspec"] = dict(SAVED_KERNELSPEC)
    if save_to is not None:
        nbformat.write(nb, str(save_to))
    return nb


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", help="notebooks to run (default: every notebooks/*.ipynb)")
    parser.add_argument("--inplace", action="store_true", help="save each notebook with its outputs")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per cell (default 3600)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    paths = [Path(p) for p in args.notebooks] or sorted(NOTEBOOKS.glob("[0-9]*.ipynb"))
    for path in paths:
        started = time.perf_counter()
        logger.info("executing %s with %s", path, sys.executable)
        execute_notebook(path, timeout=args.timeout, save_to=path if args.inplace else None)
        logger.info("%s: done in %.0f s%s", path, time.perf_counter() - started, " (saved)" if args.inplace else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())

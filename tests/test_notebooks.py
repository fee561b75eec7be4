"""Every notebook in notebooks/ executes top to bottom without an error (nbclient, a fresh kernel each)."""

import pathlib
import time

import nbformat
import pytest
from nbclient import NotebookClient

from cli_checks import cpu_settings

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def test_the_three_notebooks_are_there():
    assert [p.name for p in NOTEBOOKS] == ["01_routing.ipynb", "02_train_tiny_switch.ipynb",
                                           "03_expert_analysis.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, monkeypatch):
    # One CPU device in the kernel, as on a laptop (this test process has 8, from conftest).
    for name, value in cpu_settings().items():
        monkeypatch.setenv(name, value)
    notebook = nbformat.read(path, as_version=4)
    assert not any(cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), \
        f"{path.name} is committed with outputs: clear them"
    start = time.time()
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO)}}).execute()
    seconds = time.time() - start
    errors = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs
              if o.output_type == "error"]
    assert not errors
    # The budget is 2 minutes on an idle 2-core CPU; this bound only catches a notebook that grew by a lot
    # (CI machines are shared and slower).
    assert seconds < 360, f"{path.name} took {seconds:.0f} s"

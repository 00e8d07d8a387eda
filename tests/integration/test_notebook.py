"""notebooks/quickstart.ipynb, executed top to bottom in a real Jupyter kernel."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[2]


def test_the_quickstart_notebook_runs_without_errors(tmp_path):
    notebook = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    ).execute()
    outputs = "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))
    assert "succeeded" in outputs and "compiling solver" in outputs
    assert "build dist/app.txt 28 bytes" in outputs and "compiled: parser solver cli" in outputs
    assert "ray_cicd_step_outcomes" in outputs and "stopped the HTTP API" in outputs
    nbformat.write(notebook, tmp_path / "quickstart.executed.ipynb")

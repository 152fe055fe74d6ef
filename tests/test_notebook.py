"""notebooks/compare_runs.ipynb: executes headless against a real ablation store; kept without outputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from ablation_store import EXPERIMENT, shared_store
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "compare_runs.ipynb"


@pytest.fixture
def this_python_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A "python3" kernelspec that runs ipykernel with this interpreter (JUPYTER_PATH comes first)."""
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return "python3"


def test_committed_notebook_has_no_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code)
    # It uses experiments.compare and experiments.plots instead of computing tables or figures itself.
    source = "\n".join(cell.source for cell in code)
    assert "compare.format_table(" in source
    assert all(f"plots.{name}(" in source for name in ("plot_curves", "plot_tasks"))


def test_notebook_runs_against_an_ablation_store(tmp_path_factory, monkeypatch, this_python_kernel):
    monkeypatch.setenv("GLM_TRACKING_URI", shared_store(tmp_path_factory))
    monkeypatch.setenv("GLM_EXPERIMENT", EXPERIMENT)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name=this_python_kernel,
                   resources={"metadata": {"path": str(ROOT)}}).execute()  # raises on a cell error

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    data = [output.get("data", {}) for output in outputs]
    markdown = [item["text/markdown"] for item in data if "text/markdown" in item]
    assert len(markdown) == 1
    table = markdown[0]
    assert "| glm | 71.0±1.4 | 62.0±2.8 | 82.0±2.8/77.0±2.8 | 70.5±2.1 | 4.60±0.14 | 26.00±1.41 |" in table
    assert "| no_shuffle - glm | -10.0±1.4 |" in table and "| glm = GLM_Large | 76.0 |" in table
    images = [item for item in data if "image/png" in item]
    assert len(images) == 3  # learning curves, per-objective losses, per-task bars
    text = "".join(output.get("text", "") for output in outputs if output.output_type == "stream")
    assert "sweep 'mini'" in text and "classifier: 1 seed(s)" in text

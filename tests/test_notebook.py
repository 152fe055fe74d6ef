"""notebooks/compare_runs.ipynb: executes headless against real stores of the three kinds of
experiment (an ablation sweep, SuperGLUE runs, pretraining runs); kept without outputs."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from ablation_store import EXPERIMENT, shared_store
from nbclient import NotebookClient
from run_store import build_run_store
from timeouts import HANG_S

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "compare_runs.ipynb"


def readme_notebook_command() -> str:
    """The one command of the README that executes the notebook."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = re.findall(r"^(jupyter .*compare_runs\.ipynb)$", readme, flags=re.MULTILINE)
    assert len(commands) == 1, commands
    return commands[0]


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


def execute(uri: str, experiment: str | None, kernel: str,
            monkeypatch: pytest.MonkeyPatch) -> tuple[list, str]:
    """Run every cell; return the outputs' data items and the printed text."""
    monkeypatch.setenv("GLM_TRACKING_URI", uri)
    if experiment is None:
        monkeypatch.delenv("GLM_EXPERIMENT", raising=False)
    else:
        monkeypatch.setenv("GLM_EXPERIMENT", experiment)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=HANG_S, kernel_name=kernel,
                   resources={"metadata": {"path": str(ROOT)}}).execute()  # raises on a cell error
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    text = "".join(output.get("text", "") for output in outputs if output.output_type == "stream")
    return [output.get("data", {}) for output in outputs], text


def markdown_and_images(data: list) -> tuple[list[str], list]:
    return [item["text/markdown"] for item in data if "text/markdown" in item], \
        [item for item in data if "image/png" in item]


def test_notebook_runs_against_an_ablation_store(tmp_path_factory, monkeypatch, this_python_kernel):
    data, text = execute(shared_store(tmp_path_factory), EXPERIMENT, this_python_kernel, monkeypatch)
    markdown, images = markdown_and_images(data)
    assert len(markdown) == 1
    table = markdown[0]
    assert "| glm | 71.0±1.4 | 62.0±2.8 | 82.0±2.8/77.0±2.8 | 70.5±2.1 | 4.60±0.14 | 26.00±1.41 |" in table
    assert "| no_shuffle - glm | -10.0±0.0* |" in table and "| glm = GLM_Large | 76.0 |" in table
    assert len(images) == 3  # learning curves, per-objective losses, per-task bars
    assert "(sweep)" in text and "sweep 'mini'" in text and "classifier: 1 seed(s)" in text


def test_notebook_runs_against_superglue_and_pretraining_stores(tmp_path, monkeypatch, this_python_kernel):
    uri = build_run_store(tmp_path)
    data, text = execute(uri, "superglue", this_python_kernel, monkeypatch)
    (table,), images = markdown_and_images(data)
    assert "experiment: superglue (superglue)" in text and "glm: 2 seed(s)" in text
    assert "| glm | - | - | - | 71.0±1.4 | - | - | 77.0±2.8/82.0±2.8 | - | 75.2±2.1 |" in table
    assert "*paper (Table 1)*" in table and len(images) == 1  # per-task bars only
    # Without GLM_EXPERIMENT: the experiment of the store's most recent run (SuperGLUE's were last).
    data, text = execute(uri, None, this_python_kernel, monkeypatch)
    assert "experiment: superglue (superglue)" in text
    data, text = execute(uri, "quickstart", this_python_kernel, monkeypatch)
    (table,), images = markdown_and_images(data)
    assert "experiment: quickstart (runs)" in text and "r1: 2 seed(s)" in text
    assert "| r1 | 3.00±0.14 | 20.19±2.85 |" in table and "| r2 | 2.50 | 12.18 |" in table
    assert len(images) == 1 and "'quickstart' has no SuperGLUE scores" in text  # learning curves only


@pytest.mark.slow
def test_the_readme_command_runs_the_notebook_from_the_repository_root(tmp_path, this_python_kernel):
    # A checkout with the default store outputs/mlflow.db: the notebook is started in notebooks/, and
    # still reads the repository's store and code.
    checkout = tmp_path / "checkout"
    (checkout / "notebooks").mkdir(parents=True)
    (checkout / "notebooks" / NOTEBOOK.name).write_bytes(NOTEBOOK.read_bytes())
    for package in ("experiments", "glm_lightning", "datamodules"):
        (checkout / package).symlink_to(ROOT / package)
    build_run_store(checkout / "outputs")
    env = {key: value for key, value in os.environ.items()
           if key not in ("GLM_TRACKING_URI", "MLFLOW_TRACKING_URI", "GLM_EXPERIMENT", "PYTHONPATH")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this venv's jupyter
    result = subprocess.run(shlex.split(readme_notebook_command()), cwd=checkout, env=env,
                            capture_output=True, text=True, timeout=HANG_S)
    assert result.returncode == 0, result.stderr[-3000:]
    html = (checkout / "outputs" / "compare_runs.html").read_text(encoding="utf-8")
    assert f"store: sqlite:///{checkout.resolve() / 'outputs' / 'mlflow.db'}" in html
    assert "experiment: superglue (superglue)" in html and "Avg (2 of 8 tasks)" in html
    assert html.count('src="data:image/png;base64') == 1  # the per-task bars

"""experiments.compare: Table-1 layout of SuperGLUE parent runs read back from an MLflow store."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from experiments.compare import load_rows, main

# Dev results as the superglue job logs them (GLM_SPEC §9.1 rows, as fractions).
GLM = {"ReCoRD/f1": 0.817, "ReCoRD/em": 0.811, "COPA/accuracy": 0.76, "WSC/accuracy": 0.817,
       "RTE/accuracy": 0.74, "BoolQ/accuracy": 0.821, "WiC/accuracy": 0.685, "CB/f1": 0.961,
       "CB/accuracy": 0.946, "MultiRC/f1a": 0.771, "MultiRC/em": 0.363, "table1/avg": 0.770}
BERT = {"ReCoRD/f1": 0.763, "ReCoRD/em": 0.756, "COPA/accuracy": 0.69, "WSC/accuracy": 0.644,
        "RTE/accuracy": 0.736, "BoolQ/accuracy": 0.801, "WiC/accuracy": 0.71, "CB/f1": 0.948,
        "CB/accuracy": 0.929, "MultiRC/f1a": 0.719, "MultiRC/em": 0.241, "table1/avg": 0.720}
# A second seed of "glm": every metric 0.2 points higher, the average 0.4 points higher.
GLM_SEED2 = {key: value + (0.004 if key == "table1/avg" else 0.002) for key, value in GLM.items()}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment("superglue")
    client.create_experiment("pretrain")

    def log(name: str, metrics: dict[str, float], tags: dict[str, str] | None = None) -> str:
        run = client.create_run(exp_id, run_name=name, tags=tags or {})
        for key, value in metrics.items():
            client.log_metric(run.info.run_id, key, value)
        client.set_terminated(run.info.run_id)
        return run.info.run_id

    log("bert", BERT)
    parent = log("glm", GLM)
    log("glm", GLM_SEED2)
    log("glm/CB", {"CB/f1": 0.5, "CB/accuracy": 0.5}, {"mlflow.parentRunId": parent, "task": "CB"})
    log("unfinished", {"CB/f1": 0.9})  # a parent without table1/avg is not a SuperGLUE result
    return uri


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def markdown_cells(text: str) -> dict[str, list[str]]:
    """{first cell: other cells} for the body rows of a markdown table."""
    lines = [line for line in text.splitlines() if line.startswith("|")][2:]
    table = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    return {cells[0]: cells[1:] for cells in table}


def test_load_rows_groups_parent_runs_by_name(store):
    rows = load_rows("superglue", store)
    assert list(rows) == ["bert", "glm"]
    assert len(rows["glm"]) == 2 and rows["bert"][0]["CB/f1"] == pytest.approx(0.948)


def test_markdown_table_matches_logged_numbers(store, capsys):
    code, out, err = run_main(capsys, "--experiment", "superglue", "--tracking-uri", store)
    assert code == 0 and err == ""
    header = out.splitlines()[0]
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "run", "ReCoRD", "COPA", "WSC", "RTE", "BoolQ", "WiC", "CB", "MultiRC", "Avg"]
    cells = markdown_cells(out)
    assert cells["bert"] == ["76.3/75.6", "69.0", "64.4", "73.6", "80.1", "71.0", "94.8/92.9", "71.9/24.1",
                             "72.0"]
    # Two seeds: mean ± sample std (values 0.2 apart -> std 0.14; the averages 0.4 apart -> 0.28).
    assert cells["glm"] == ["81.8±0.1/81.2±0.1", "76.1±0.1", "81.8±0.1", "74.1±0.1", "82.2±0.1",
                            "68.6±0.1", "96.2±0.1/94.7±0.1", "77.2±0.1/36.4±0.1", "77.2±0.3"]


def test_baseline_deltas(store, capsys):
    code, out, _ = run_main(capsys, "--experiment", "superglue", "--tracking-uri", store,
                            "--baseline", "bert")
    assert code == 0
    cells = markdown_cells(out)
    assert "bert - bert" not in cells
    assert cells["glm - bert"] == ["+5.5/+5.6", "+7.1", "+17.4", "+0.5", "+2.1", "-2.4", "+1.4/+1.8",
                                   "+5.3/+12.3", "+5.2"]


def test_runs_filter_and_order(store, capsys):
    code, out, _ = run_main(capsys, "--experiment", "superglue", "--tracking-uri", store,
                            "--runs", "glm", "bert")
    assert code == 0 and list(markdown_cells(out)) == ["glm", "bert"]


def test_csv_output_file(store, capsys, tmp_path):
    path = tmp_path / "table.csv"
    code, out, _ = run_main(capsys, "--experiment", "superglue", "--tracking-uri", store, "--format", "csv",
                            "--baseline", "bert", "--output", str(path))
    assert code == 0 and out == ""
    table = list(csv.reader(io.StringIO(path.read_text())))
    assert table[0] == ["run", "ReCoRD", "COPA", "WSC", "RTE", "BoolQ", "WiC", "CB", "MultiRC", "Avg"]
    rows = {row[0]: row[1:] for row in table[1:]}
    assert rows["bert"][6] == "94.8/92.9" and rows["bert"][-1] == "72.0"
    assert rows["glm"][6] == "96.2±0.1/94.7±0.1" and rows["glm - bert"][-1] == "+5.2"


def test_latex_output(store, capsys):
    code, out, _ = run_main(capsys, "--experiment", "superglue", "--tracking-uri", store, "--format", "latex",
                            "--baseline", "bert")
    assert code == 0
    assert out.startswith("\\begin{tabular}{lccccccccc}") and out.rstrip().endswith("\\end{tabular}")
    lines = {line.split(" & ")[0]: line for line in out.splitlines() if " & " in line}
    assert lines["bert"] == ("bert & 76.3/75.6 & 69.0 & 64.4 & 73.6 & 80.1 & 71.0 & 94.8/92.9 & 71.9/24.1 "
                             "& 72.0 \\\\")
    assert "96.2$\\pm$0.1/94.7$\\pm$0.1" in lines["glm"] and lines["glm"].endswith("77.2$\\pm$0.3 \\\\")
    assert lines["glm - bert"].endswith("+5.2 \\\\")


@pytest.mark.parametrize(("argv", "message"), [
    (["--experiment", "nope"],
     "unknown experiment 'nope'; existing experiments: Default, pretrain, superglue"),
    (["--experiment", "pretrain"], "no SuperGLUE parent runs"),
    (["--experiment", "superglue", "--runs", "t5"], "no SuperGLUE parent run named 't5'"),
    (["--experiment", "superglue", "--baseline", "t5"], "unknown baseline 't5'"),
])
def test_errors_are_one_line(store, capsys, argv, message):
    code, out, err = run_main(capsys, *argv, "--tracking-uri", store)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_missing_store_and_command_line(tmp_path):
    uri = f"sqlite:///{tmp_path / 'absent.db'}"
    result = subprocess.run([sys.executable, "-m", "experiments.compare", "--experiment", "superglue",
                             "--tracking-uri", uri], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 2 and result.stderr == f"error: no MLflow store at {uri}\n"
    assert not (tmp_path / "absent.db").exists()

"""experiments.compare: Table-1 / Table-6 layouts of runs read back from real MLflow stores.

SuperGLUE parent runs (an ``exp=superglue`` experiment) and ablation sweeps (``exp=ablations``, the
store of tests/ablation_store.py), published rows, plots and the sweep report."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
from ablation_store import EXPERIMENT, HISTORIES, LATEST, shared_store, sweep_run_id
from mlflow.tracking import MlflowClient
from run_store import build_run_store

from experiments import paper_results
from experiments.compare import (
    CompareError,
    default_run_metrics,
    delta_cell,
    experiment_kind,
    fetch_runs,
    load_rows,
    load_runs,
    load_sweep,
    main,
    stat_cell,
    write_report,
)
from experiments.plots import curve_data, curve_groups, mean_curve, objective_keys, plot_curves, plot_tasks
from experiments.tables import Column, avg_header, task_columns

# Dev results as the superglue job logs them (the paper's Table 1 rows, as fractions).
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

    log("bert", {**BERT, "pretrain/val_loss": 2.5})
    parent = log("glm", {**GLM, "pretrain/val_loss": 2.25})
    log("glm", {**GLM_SEED2, "pretrain/val_loss": 2.35})
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

    path.write_text("kept")  # an existing output is replaced only with --overwrite
    code, _, err = run_main(capsys, "--experiment", "superglue", "--tracking-uri", store,
                            "--output", str(path))
    assert code == 2 and err == f"error: {path} already exists; give --overwrite to replace it\n"
    assert path.read_text() == "kept"
    assert run_main(capsys, "--experiment", "superglue", "--tracking-uri", store, "--output", str(path),
                    "--overwrite")[0] == 0
    assert path.read_text().startswith("| run")


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
    (["--experiment", "pretrain"], "no finished runs in experiment 'pretrain'"),
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


def test_extra_metric_columns_are_shown_as_logged(store, capsys):
    code, out, _ = run_main(capsys, "--experiment", "superglue", "--tracking-uri", store,
                            "--metric", "pretrain/val_loss", "--baseline", "bert")
    assert code == 0
    assert out.splitlines()[0].endswith("| Avg | pretrain/val_loss |")
    cells = markdown_cells(out)
    assert cells["bert"][-2:] == ["72.0", "2.50"]
    assert cells["glm"][-2:] == ["77.2±0.3", "2.30±0.07"]
    assert cells["glm - bert"][-2:] == ["+5.2", "-0.20"]


def test_paper_rows_of_table1(store, capsys):
    code, out, _ = run_main(capsys, "--experiment", "superglue", "--tracking-uri", store, "--paper")
    assert code == 0
    lines = out.splitlines()
    assert lines[4].startswith("| *paper (Table 1)* |")
    cells = markdown_cells(out)
    assert list(cells) == ["bert", "glm", "*paper (Table 1)*", "BERT_Base", "GLM_Base", "BERT_Large",
                           "GLM_Large", "GLM_Doc", "GLM_Sent"]
    assert cells["GLM_Large"] == ["81.7/81.1", "76.0", "81.7", "74.0", "82.1", "68.5", "96.1/94.6",
                                  "77.1/36.3", "77.0"]
    assert cells["BERT_Base"][-1] == "66.1" and cells["GLM_Base"][-1] == "70.7"


# ---------------------------------------------------------------------------------------------
# Ablation sweeps

HEADER = ["variant", "COPA", "RTE", "CB", "Avg (3 of 8 tasks)", "pretrain/val_loss", "perplexity/ppl"]
# The latest "mini" sweep: seeds as mean ± sample std (x100 for SuperGLUE, as logged otherwise).
GLM_ROW = ["71.0±1.4", "62.0±2.8", "82.0±2.8/77.0±2.8", "70.5±2.1", "4.60±0.14", "26.00±1.41"]
NO_SHUFFLE_ROW = ["61.0±1.4", "52.0±2.8", "72.0±2.8/71.0±1.4", "61.0±1.4", "6.70±1.70", "32.00±2.83"]
CLASSIFIER_ROW = ["55.0", "58.0", "65.0/70.0", "60.0", "4.50", "25.00"]
# Deltas paired by seed: the mean of the per-seed differences ± t(0.975, 1) * sd / sqrt(2) with
# t = 12.706 (scipy.stats.t.ppf(0.975, 1)), * when the interval excludes 0. COPA: 60 - 70 and
# 62 - 72, both -10 (sd 0); CB accuracy: 70 - 75 = -5 and 72 - 79 = -7, sd 1.41 -> ±12.7; Avg:
# 60 - 69 = -9 and 62 - 72 = -10, sd 0.71 -> ±6.4 (interval -15.9 to -3.1); pretrain/val_loss:
# 1.0 and 3.2 -> +2.10±13.98. The classifier has seed 1 only: one difference, no interval.
NO_SHUFFLE_DELTA = ["-10.0±0.0*", "-10.0±0.0*", "-10.0±0.0*/-6.0±12.7", "-9.5±6.4*", "+2.10±13.98",
                    "+6.00±12.71"]
CLASSIFIER_DELTA = ["-15.0", "-2.0", "-15.0/-5.0", "-9.0", "+0.00", "+0.00"]
DELTA_TITLE = "*delta vs glm, paired by seed, ± 95 % t interval, \\* = excludes 0*"
PAPER_ROWS = {
    "glm = GLM_Large": ["76.0", "74.0", "96.1/94.6", "77.0", "-", "-"],
    "no_shuffle = - shuffle spans": ["61.0", "54.5", "90.5/92.9", "68.5", "-", "-"],
    "classifier = - cloze finetune (classifier head)": ["62.0", "66.8", "89.2/91.1", "70.0", "-", "-"],
}


@pytest.fixture(scope="module")
def ablations(tmp_path_factory) -> str:
    return shared_store(tmp_path_factory)


def header_cells(text: str) -> list[str]:
    return [cell.strip() for cell in text.splitlines()[0].strip("|").split("|")]


def test_load_sweep_takes_the_latest_sweep_and_its_finished_variant_runs(ablations):
    sweep = load_sweep(EXPERIMENT, ablations)
    assert sweep.name == "mini" and sweep.run_id == sweep_run_id(ablations)
    assert sweep.baseline == "glm" and sweep.tags["scale"] == "mini"
    # Table order from the sweep's `variants` tag; the FAILED glm seed 3 is not a seed.
    assert list(sweep.rows) == ["glm", "no_shuffle", "classifier"]
    assert [len(seeds) for seeds in sweep.rows.values()] == [2, 2, 1]
    assert sorted(seed["RTE/accuracy"] for seed in sweep.rows["glm"]) == pytest.approx([0.60, 0.64])
    # The classifier was finetuned from glm seed 1's pretraining run.
    assert sweep.pretrain_runs["classifier"] == [sweep.pretrain_runs["glm"][0]]
    assert len(set(sweep.pretrain_runs["glm"] + sweep.pretrain_runs["no_shuffle"])) == 4


def test_sweep_table_with_deltas_against_the_sweep_baseline(ablations, capsys):
    code, out, err = run_main(capsys, "--experiment", EXPERIMENT, "--tracking-uri", ablations)
    assert code == 0 and err == ""
    # Only the finetuned tasks, in Table-1 order, then Avg and the default extra metrics.
    assert header_cells(out) == HEADER
    assert markdown_cells(out) == {"glm": GLM_ROW, "no_shuffle": NO_SHUFFLE_ROW, "classifier": CLASSIFIER_ROW,
                                   DELTA_TITLE: [""] * 6, "no_shuffle - glm": NO_SHUFFLE_DELTA,
                                   "classifier - glm": CLASSIFIER_DELTA}
    assert list(markdown_cells(out))[:3] == ["glm", "no_shuffle", "classifier"]


def test_sweep_metric_runs_and_baseline_options(ablations, capsys):
    code, out, _ = run_main(capsys, "--experiment", EXPERIMENT, "--tracking-uri", ablations,
                            "--metric", "perplexity/adjusted_ppl", "--runs", "classifier", "glm",
                            "--baseline", "classifier")
    assert code == 0
    assert header_cells(out) == ["variant", "COPA", "RTE", "CB", "Avg (3 of 8 tasks)",
                                 "perplexity/adjusted_ppl"]
    cells = markdown_cells(out)
    assert list(cells) == ["classifier", "glm", DELTA_TITLE.replace("glm", "classifier"), "glm - classifier"]
    assert cells["glm"] == [*GLM_ROW[:4], "41.50±2.12"]
    # paired on seed 1, the only seed of the classifier: 70 - 55, 60 - 58, ...
    assert cells["glm - classifier"] == ["+15.0", "+2.0", "+15.0/+5.0", "+9.0", "+0.00"]


def test_sweep_paper_rows(ablations, capsys):
    code, out, _ = run_main(capsys, "--experiment", EXPERIMENT, "--tracking-uri", ablations, "--paper")
    assert code == 0
    cells = markdown_cells(out)
    names = list(cells)
    assert names[names.index("*paper (Tables 1 and 6)*") + 1:] == list(PAPER_ROWS)
    assert {name: cells[name] for name in PAPER_ROWS} == PAPER_ROWS
    assert cells["glm"] == GLM_ROW


def test_named_sweep(ablations, capsys):
    code, out, _ = run_main(capsys, "--experiment", EXPERIMENT, "--tracking-uri", ablations,
                            "--sweep", "other", "--paper")
    assert code == 0
    # Only RTE was finetuned and pretrain/val_loss was not logged: those columns are left out.
    assert header_cells(out) == ["variant", "RTE", "Avg (1 of 8 tasks)", "perplexity/ppl"]
    assert markdown_cells(out) == {
        "glm": ["55.0", "55.0", "31.00"], "masked_lm": ["45.0", "45.0", "90.00"],
        DELTA_TITLE: ["", "", ""], "masked_lm - glm": ["-10.0", "-10.0", "+59.00"],
        "*paper (Tables 1 and 6)*": ["", "", ""], "glm = GLM_Large": ["74.0", "77.0", "-"],
        "masked_lm = BERT_Large (reproduced)": ["72.2", "71.2", "-"]}


def test_sweep_csv_and_latex(ablations, capsys):
    code, out, _ = run_main(capsys, "--experiment", EXPERIMENT, "--tracking-uri", ablations,
                            "--format", "csv", "--paper")
    assert code == 0
    table = list(csv.reader(io.StringIO(out)))
    assert table[0] == HEADER
    assert table[1:] == [["glm", *GLM_ROW], ["no_shuffle", *NO_SHUFFLE_ROW], ["classifier", *CLASSIFIER_ROW],
                         ["no_shuffle - glm", *NO_SHUFFLE_DELTA], ["classifier - glm", *CLASSIFIER_DELTA],
                         *(["paper: " + name, *cells] for name, cells in PAPER_ROWS.items())]

    code, out, _ = run_main(capsys, "--experiment", EXPERIMENT, "--tracking-uri", ablations,
                            "--format", "latex", "--paper")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "\\begin{tabular}{lcccccc}" and lines[-1] == "\\end{tabular}"
    assert lines[2] == ("variant & COPA & RTE & CB & Avg (3 of 8 tasks) & pretrain/val\\_loss & "
                        "perplexity/ppl \\\\")
    assert lines[5] == ("no\\_shuffle & 61.0$\\pm$1.4 & 52.0$\\pm$2.8 & 72.0$\\pm$2.8/71.0$\\pm$1.4 & "
                        "61.0$\\pm$1.4 & 6.70$\\pm$1.70 & 32.00$\\pm$2.83 \\\\")
    assert lines.count("\\midrule") == 3
    assert "paper: no\\_shuffle = - shuffle spans & 61.0 & 54.5 & 90.5/92.9 & 68.5 & - & - \\\\" in lines


@pytest.mark.parametrize(("argv", "message"), [
    (["--sweep", "nope"], "unknown sweep 'nope' in 'ablations'; sweeps: broken, mini, other"),
    (["--sweep", "broken"], "no finished variant runs in sweep 'broken'"),
    (["--metric", "nope"], "unknown metric 'nope'; available: CB/accuracy, CB/f1, COPA/accuracy, "
                           "RTE/accuracy, perplexity/adjusted_ppl, perplexity/loss, perplexity/ppl, "
                           "pretrain/unigram_baseline, pretrain/val_loss, table1/avg"),
    (["--runs", "t5"],
     "no finished variant run named 't5' in 'ablations'; runs: glm, no_shuffle, classifier"),
    (["--baseline", "t5"], "unknown baseline 't5'"),
])
def test_sweep_errors_are_one_line(ablations, capsys, argv, message):
    code, out, err = run_main(capsys, "--experiment", EXPERIMENT, "--tracking-uri", ablations, *argv)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_sweep_option_without_sweeps_and_unknown_metric_in_superglue_mode(store, capsys):
    code, _, err = run_main(capsys, "--experiment", "superglue", "--tracking-uri", store, "--sweep", "mini")
    assert code == 2 and err == "error: unknown sweep 'mini' in 'superglue'; sweeps: none\n"
    code, _, err = run_main(capsys, "--experiment", "superglue", "--tracking-uri", store, "--metric", "x/y")
    assert code == 2 and err.startswith("error: unknown metric 'x/y'; available: BoolQ/accuracy, CB/accuracy")


# ---------------------------------------------------------------------------------------------
# Learning curves, plots and the report


def test_curve_groups_draw_a_shared_pretraining_once():
    groups = curve_groups({"glm": ["p1", "p2"], "no_shuffle": ["p3"], "classifier": ["p1"],
                           "masked_lm": [""]})
    assert groups == [(["glm", "classifier"], ["p1", "p2"]), (["no_shuffle"], ["p3"])]


def test_mean_curve_averages_the_steps_all_seeds_logged():
    assert mean_curve([{0: 8.0, 10: 6.0, 20: 5.0}, {0: 8.4, 10: 6.4}]) == ([0, 10], [8.2, 6.2])
    assert mean_curve([]) == ([], [])


def test_curve_data_reads_the_pretraining_histories(ablations):
    sweep = load_sweep(EXPERIMENT, ablations)
    train = curve_data(sweep, "train/loss")
    assert [(label, steps) for label, steps, _ in train] == [("glm, classifier", [0, 10, 20, 30]),
                                                             ("no_shuffle", [0, 10, 20])]
    seed1, seed2 = (HISTORIES["glm", seed]["train/loss"] for seed in (1, 2))
    assert train[0][2] == pytest.approx([(seed1[step] + seed2[step]) / 2 for step in (0, 10, 20, 30)])
    assert train[1][2] == pytest.approx([8.2, 7.2, 6.2])
    assert curve_data(sweep, "val/loss") == [("glm, classifier", [10, 30], pytest.approx([6.6, 4.6])),
                                            ("no_shuffle", [10], pytest.approx([7.7]))]
    assert objective_keys(sweep) == ["train/loss_span"]
    assert objective_keys(load_sweep(EXPERIMENT, ablations, "other")) == ["train/loss_span",
                                                                          "train/loss_masked_lm"]


def assert_png(path: Path) -> tuple[int, ...]:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shape = matplotlib.image.imread(path).shape
    assert shape[0] > 0 and shape[1] > 0
    return shape


def test_plots(ablations, tmp_path):
    sweep = load_sweep(EXPERIMENT, ablations)
    one = assert_png(plot_curves(sweep, tmp_path / "one.png", ["train/loss_span"]))
    two = assert_png(plot_curves(sweep, tmp_path / "two.png"))
    assert two[1] > one[1]  # panels side by side
    assert_png(plot_tasks(sweep.rows, tmp_path / "tasks.png"))
    with pytest.raises(CompareError, match="no pretraining histories"):
        plot_curves(sweep, tmp_path / "none.png", [])


def test_plot_option(ablations, store, capsys, tmp_path):
    code, _, _ = run_main(capsys, "--experiment", EXPERIMENT, "--tracking-uri", ablations,
                          "--plot", str(tmp_path / "sweep"))
    assert code == 0 and sorted(p.name for p in (tmp_path / "sweep").iterdir()) == ["curves.png", "tasks.png"]
    code, _, _ = run_main(capsys, "--experiment", "superglue", "--tracking-uri", store,
                          "--plot", str(tmp_path / "superglue"))
    assert code == 0 and [p.name for p in (tmp_path / "superglue").iterdir()] == ["tasks.png"]


def test_write_report(ablations, tmp_path):
    paths = write_report(EXPERIMENT, ablations, sweep_run_id(ablations), tmp_path / "report")
    assert [p.name for p in paths] == ["comparison.md", "comparison.csv", "differences.csv", "curves.png",
                                       "tasks.png"]
    assert all(p.parent == tmp_path / "report" for p in paths)
    for png in paths[3:]:
        assert_png(png)
    markdown = paths[0].read_text()
    assert markdown.startswith("# Ablation sweep mini (scale mini)\n")
    cells = markdown_cells(markdown[markdown.index("| variant"):])
    assert cells["no_shuffle - glm"] == NO_SHUFFLE_DELTA and cells["classifier - glm"] == CLASSIFIER_DELTA
    assert {name: cells[name] for name in PAPER_ROWS} == PAPER_ROWS
    # Every score's mean is the mean of the logged metrics of the variant's finished seeds.
    for variant, seeds in (("glm", (1, 2)), ("no_shuffle", (1, 2)), ("classifier", (1,))):
        for column, key, scale, digits in (("COPA", "COPA/accuracy", 100, 1), ("RTE", "RTE/accuracy", 100, 1),
                                           ("Avg (3 of 8 tasks)", "table1/avg", 100, 1),
                                           ("pretrain/val_loss", "pretrain/val_loss", 1, 2),
                                           ("perplexity/ppl", "perplexity/ppl", 1, 2)):
            mean = sum(scale * LATEST[variant, seed][key] for seed in seeds) / len(seeds)
            assert cells[variant][HEADER.index(column) - 1].split("±")[0] == f"{mean:.{digits}f}"
    table = list(csv.reader(io.StringIO(paths[1].read_text())))
    assert table[0] == HEADER and table[1] == ["glm", *GLM_ROW] and table[-1][0].startswith("paper: ")
    # differences.csv: as logged (not x100), the classifier's one paired seed without bounds
    rows = csv.DictReader(io.StringIO(paths[2].read_text()))
    differences = {(row["variant"], row["metric"]): row for row in rows}
    avg = differences["no_shuffle", "table1/avg"]
    assert (avg["seeds"], avg["excludes_zero"]) == ("2", "true")
    assert [float(avg[key]) for key in ("difference", "low", "high")] == pytest.approx(
        [-0.095, -0.095 - 0.0635310, -0.095 + 0.0635310], abs=1e-6)
    assert differences["no_shuffle", "perplexity/ppl"]["excludes_zero"] == "false"
    classifier = differences["classifier", "COPA/accuracy"]
    assert (classifier["seeds"], classifier["low"], classifier["high"], classifier["excludes_zero"]) == (
        "1", "", "", "false") and float(classifier["difference"]) == pytest.approx(-0.15)


def test_write_report_of_an_unknown_sweep_run(ablations, tmp_path):
    with pytest.raises(CompareError, match="no sweep run with id 'nope'"):
        write_report(EXPERIMENT, ablations, "nope", tmp_path)


# ---------------------------------------------------------------------------------------------
# Published numbers


def test_paper_rows_are_consistent_with_their_averages():
    from glm_lightning.metrics import TABLE1_METRICS, table_row

    rows = {**paper_results.TABLE1, **paper_results.TABLE6}
    for name, row in rows.items():
        assert len(row) == sum(map(len, TABLE1_METRICS.values())) + 1
        results = {task: {metric: row[f"{task}/{metric}"] for metric in metrics}
                   for task, metrics in TABLE1_METRICS.items()}
        # The spec's check: averaging two-metric tasks first, then the tasks, reproduces the printed
        # average up to rounding; the classifier-head row's cells give 69.9 against the printed 70.0,
        # GLM_Sent's 77.3 against 76.8.
        cells_average = {"- cloze finetune (classifier head)": 0.699, "GLM_Sent": 0.773}
        printed = cells_average.get(name, row["table1/avg"])
        assert round(table_row(results)["avg"], 3) == pytest.approx(printed, abs=0.0005), name
    assert paper_results.TABLE6["- shuffle spans"]["RTE/accuracy"] == 0.545
    assert set(paper_results.VARIANT_ROWS.values()) <= set(paper_results.PUBLISHED)
    confirmed = {**paper_results.TABLE1_CONFIRMED, **paper_results.TABLE6_CONFIRMED}
    assert all(set(keys) <= set(rows[name]) for name, keys in confirmed.items())


@pytest.fixture(scope="module")
def run_store(tmp_path_factory) -> str:
    return build_run_store(tmp_path_factory.mktemp("runs"))


def test_plain_runs_tabulate_with_seeds_grouped_by_run_name(run_store, capsys, tmp_path):
    code, out, err = run_main(capsys, "--experiment", "quickstart", "--tracking-uri", run_store,
                              "--plot", str(tmp_path))
    assert code == 0, err
    assert out.splitlines()[0] == "| run | val/loss | val/ppl |"  # the evaluation metrics by default
    cells = markdown_cells(out)
    assert list(cells) == ["r1", "r2"]  # the FAILED run is left out
    assert cells["r1"] == ["3.00±0.14", "20.19±2.85"] and cells["r2"] == ["2.50", "12.18"]
    assert matplotlib.image.imread(tmp_path / "curves.png").shape[2] in (3, 4)
    assert not (tmp_path / "tasks.png").exists()  # no SuperGLUE scores in a pretraining experiment
    code, out, _ = run_main(capsys, "--experiment", "quickstart", "--tracking-uri", run_store,
                            "--metric", "train/loss", "--baseline", "r1", "--runs", "r2", "r1")
    assert code == 0
    cells = markdown_cells(out)
    assert cells["r2"] == ["2.40"] and cells["r1"] == ["2.75±0.07"] and cells["r2 - r1"] == ["-0.35"]


def test_plain_runs_show_the_held_out_infilling_totals_and_its_breakdowns_when_asked():
    rows = {"r1": [{"infill/accuracy": 0.5, "infill/accuracy/city.region": 0.4, "infill/baseline": 0.15,
                    "infill/baseline/length_1": 0.2, "val/loss": 0.1, "train/loss": 0.2}]}
    assert default_run_metrics(rows) == ["infill/accuracy", "infill/baseline", "val/loss"]


def test_plain_runs_errors_are_one_line(run_store, capsys):
    code, _, err = run_main(capsys, "--experiment", "quickstart", "--tracking-uri", run_store, "--paper")
    assert code == 2 and "--paper needs a SuperGLUE or ablation experiment" in err
    code, _, err = run_main(capsys, "--experiment", "quickstart", "--tracking-uri", run_store,
                            "--metric", "val/bleu")
    assert code == 2 and "unknown metric 'val/bleu'; available: train/loss, val/loss, val/ppl" in err


def test_kind_of_experiment(run_store, tmp_path_factory):
    assert experiment_kind(fetch_runs("quickstart", run_store)) == "runs"
    assert experiment_kind(fetch_runs("superglue", run_store)) == "superglue"
    assert experiment_kind(fetch_runs(EXPERIMENT, shared_store(tmp_path_factory))) == "sweep"
    runs = load_runs("quickstart", run_store)
    assert list(runs.rows) == ["r1", "r2"] and len(runs.pretrain_runs["r1"]) == 2


def test_without_experiment_the_most_recent_runs_experiment_is_shown(run_store, capsys):
    code, out, err = run_main(capsys, "--tracking-uri", run_store)
    assert code == 0, err
    assert err == ("experiment superglue (the most recent run's; others: quickstart; "
                   "choose with --experiment NAME)\n")
    assert "| glm | - | - | - | 71.0±1.4 | - | - | 77.0±2.8/82.0±2.8 | - | 75.2±2.1 |" in out


def test_every_table_heads_a_partial_average_alike(run_store, capsys, tmp_path):
    # The superglue job's table1.md, compare's Table-1 layout and the per-task figure share one rule.
    code, out, _ = run_main(capsys, "--experiment", "superglue", "--tracking-uri", run_store)
    assert code == 0 and out.splitlines()[0].endswith("| MultiRC | Avg (2 of 8 tasks) |")
    rows = load_rows("superglue", run_store)
    assert task_columns(rows)[-1].header == "Avg (2 of 8 tasks)" == avg_header(2)
    rows["glm"][0] = dict(GLM)  # one row with all eight tasks, one with two
    assert task_columns(rows, every_task=True)[-1].header == "Avg (2 to 8 of 8 tasks)"
    assert task_columns({"glm": [GLM]})[-1].header == "Avg" and task_columns()[-1].header == "Avg"


def test_plot_help_says_what_is_written(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert ("tasks.png (per-task bars; SuperGLUE runs and sweeps) and curves.png (learning curves; "
            "sweeps and every other experiment)") in help_text


def test_huge_values_are_written_in_scientific_notation():
    column = Column("perplexity/adjusted_ppl", ("perplexity/adjusted_ppl",), scale=1.0, digits=2)
    huge = [{"perplexity/adjusted_ppl": 1406897417772225280.0}]
    assert stat_cell(huge, column, "±") == "1.41e+18"
    assert stat_cell([*huge, {"perplexity/adjusted_ppl": 1.2e18}], column, "±") == "1.30e+18±1.46e+17"
    assert delta_cell(huge, [{"perplexity/adjusted_ppl": 3.0}], column, "±") == "+1.41e+18"
    assert stat_cell([{"perplexity/adjusted_ppl": 973.456}], column, "±") == "973.46"

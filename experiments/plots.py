"""Figures of an ablation sweep (matplotlib, Agg canvas, no pyplot): pretraining learning curves per
variant read from MLflow metric histories, and per-task bars of the SuperGLUE dev scores."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient

from experiments.tables import Column, CompareError, Rows, Sweep, mean_std, task_columns

CURVE_KEYS = ("train/loss", "val/loss")
OBJECTIVES = ("span", "sentence", "document", "masked_lm")  # the train/loss_<objective> histories


def history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    """{step: value} of one metric history (the last value logged at a step wins)."""
    metrics = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    return {m.step: m.value for m in metrics}


def mean_curve(histories: Sequence[Mapping[int, float]]) -> tuple[list[int], list[float]]:
    """The mean over ``histories`` at the steps that all of them logged."""
    if not histories:
        return [], []
    steps = sorted(set.intersection(*(set(h) for h in histories)))
    return steps, [statistics.fmean(h[step] for h in histories) for step in steps]


def curve_groups(pretrain_runs: Mapping[str, Sequence[str]]) -> list[tuple[list[str], list[str]]]:
    """(variant names, pretraining run ids) of each curve to draw. A variant whose pretraining runs
    were all drawn for an earlier variant (the classifier reuses glm's) joins that curve's names;
    variants without a pretraining run are left out."""
    groups: list[tuple[list[str], list[str]]] = []
    for variant, run_ids in pretrain_runs.items():
        ids = list(dict.fromkeys(run_id for run_id in run_ids if run_id))
        if not ids:
            continue
        shared = next((names for names, drawn in groups if set(ids) <= set(drawn)), None)
        if shared is not None:
            shared.append(variant)
        else:
            groups.append(([variant], ids))
    return groups


def curve_data(sweep: Sweep, key: str) -> list[tuple[str, list[int], list[float]]]:
    """(label, steps, mean over seeds) of metric ``key`` for each curve of ``curve_groups``."""
    client = MlflowClient(tracking_uri=sweep.tracking_uri)
    curves = []
    for names, run_ids in curve_groups(sweep.pretrain_runs):
        histories = [h for h in (history(client, run_id, key) for run_id in run_ids) if h]
        steps, values = mean_curve(histories)
        if steps:
            curves.append((", ".join(names), steps, values))
    return curves


def objective_keys(sweep: Sweep, prefix: str = "train/loss_") -> list[str]:
    """The per-objective loss keys (``prefix`` + objective) some pretraining run of the sweep logged."""
    client = MlflowClient(tracking_uri=sweep.tracking_uri)
    logged = {key for _, run_ids in curve_groups(sweep.pretrain_runs) for run_id in run_ids
              for key in client.get_run(run_id).data.metrics if key.startswith(prefix)}
    logged = {key for key in logged if not key.endswith("_mean")}  # the window means of each objective
    known = [prefix + objective for objective in OBJECTIVES if prefix + objective in logged]
    return [*known, *sorted(logged - set(known))]


def save_png(fig: Figure, path: Path) -> Path:
    """Render ``fig`` with the Agg canvas into the PNG file ``path``."""
    FigureCanvasAgg(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path


def plot_curves(sweep: Sweep, path: Path, keys: Sequence[str] = CURVE_KEYS) -> Path:
    """A PNG of the pretraining histories ``keys`` (one panel each, side by side) against the step,
    one curve per pretraining (mean over seeds); returns ``path``."""
    if not keys:
        raise CompareError(f"no pretraining histories to plot for sweep {sweep.name!r}")
    fig = Figure(figsize=(4.5 * len(keys), 3.5), layout="constrained")
    for ax, key in zip(fig.subplots(1, len(keys), squeeze=False)[0], keys, strict=True):
        for label, steps, values in curve_data(sweep, key):
            ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=label)
        ax.set(title=key, xlabel="step", ylabel="loss")
        if ax.has_data():
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"pretraining ({sweep.name}; mean over seeds)")
    return save_png(fig, Path(path))


def task_scores(seeds: Sequence[Mapping[str, float]], column: Column) -> list[float]:
    """Per-seed score of a task column x100: the mean of its metrics (Table-1 convention)."""
    return [100 * statistics.fmean(seed[key] for key in column.keys)
            for seed in seeds if all(key in seed for key in column.keys)]


def plot_tasks(rows: Rows, path: Path) -> Path:
    """A PNG of grouped bars: one group per task present in ``rows`` (and Avg), one bar per row,
    x100, seed std as error bars; returns ``path``."""
    columns, nan = task_columns(rows), float("nan")
    width = 0.8 / max(len(rows), 1)
    fig = Figure(figsize=(max(6.0, 1.1 * len(columns) + 0.2 * len(columns) * len(rows)), 4),
                 layout="constrained")
    ax = fig.subplots()
    for i, (name, seeds) in enumerate(rows.items()):
        scores = [task_scores(seeds, col) for col in columns]
        stats = [mean_std(values, 1.0) if values else (nan, None) for values in scores]
        ax.bar([c + (i - (len(rows) - 1) / 2) * width for c in range(len(columns))],
               [mean for mean, _ in stats], width, yerr=[nan if std is None else std for _, std in stats],
               capsize=3, label=name)
    ax.set_xticks(range(len(columns)), [col.header for col in columns])
    ax.set(ylabel="dev score (x100)", title="SuperGLUE dev: mean ± std over seeds")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars
    return save_png(fig, Path(path))

"""The table model shared by ``experiments.compare`` (tables) and ``experiments.plots`` (figures):
rows of seeds, columns, sweeps read back from MLflow, and the Table-1 task columns."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from glm_lightning.metrics import TABLE1_METRICS

AVG = "table1/avg"

# One row: row name -> one {metric key: value} dict per run (seed) of that row.
Rows = dict[str, list[dict[str, float]]]


class CompareError(Exception):
    """A problem reported in one line on the command line (exit status 2)."""


@dataclass(frozen=True)
class Column:
    """One table column: the metric keys of its cell ("x/y"), the factor they are shown with, digits."""

    header: str
    keys: tuple[str, ...]
    scale: float = 100.0
    digits: int = 1


@dataclass(frozen=True)
class Sweep:
    """One ablation sweep read back from MLflow: its variants' finished runs (seeds) in table order."""

    run_id: str
    name: str
    tags: dict[str, str]
    rows: Rows  # variant -> metrics of each finished seed
    pretrain_runs: dict[str, list[str]]  # variant -> pretraining run id of each seed ("" if untagged)
    tracking_uri: str
    seeds: dict[str, list[str]] = field(default_factory=dict)  # variant -> seed tag of each run of rows

    @property
    def baseline(self) -> str | None:
        """The sweep's ``baseline`` tag when that variant has finished runs."""
        name = self.tags.get("baseline")
        return name if name in self.rows else None


def cell_keys(task: str) -> list[str]:
    """MLflow metric keys shown in ``task``'s column, in the paper's order."""
    return [f"{task}/{metric}" for metric in TABLE1_METRICS[task]]


def task_columns(rows: Rows | None = None, every_task: bool = False) -> list[Column]:
    """The Table-1 task columns in the paper's order, then Avg (headed for ``rows``); only the tasks
    that some row has unless ``every_task`` (the Table-1 layout) or there are no ``rows``."""
    present = None if rows is None or every_task else \
        {key for seeds in rows.values() for seed in seeds for key in seed}
    tasks = [task for task in TABLE1_METRICS
             if present is None or any(key in present for key in cell_keys(task))]
    return [*(Column(task, tuple(cell_keys(task))) for task in tasks), avg_column(rows)]


def avg_column(rows: Rows | None = None) -> Column:
    """The Avg column, its header saying over how many tasks the rows' averages are (``avg_header``)."""
    return Column(avg_header(*averaged_tasks(rows)) if rows else avg_header(len(TABLE1_METRICS)), (AVG,))


def averaged_tasks(rows: Rows) -> list[int]:
    """How many Table-1 tasks each row has scores of (its average is over those), without repeats."""
    counts = {sum(any(key in seed for seed in seeds for key in cell_keys(task)) for task in TABLE1_METRICS)
              for seeds in rows.values()}
    return sorted(counts) or [len(TABLE1_METRICS)]


def avg_header(*tasks: int) -> str:
    """"Avg", saying over how many tasks when not all eight (the paper's averages are over eight):
    "Avg (2 of 8 tasks)", or "Avg (2 to 8 of 8 tasks)" when the rows differ. The one rule of the
    superglue job's table1.md, compare's tables and the per-task figure."""
    total = len(TABLE1_METRICS)
    if set(tasks) == {total}:
        return "Avg"
    low, high = min(tasks), max(tasks)
    return f"Avg ({low} of {total} tasks)" if low == high else f"Avg ({low} to {high} of {total} tasks)"


def mean_std(values: Sequence[float], scale: float = 100.0) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value) of the values times ``scale``."""
    scaled = [scale * v for v in values]
    return statistics.fmean(scaled), statistics.stdev(scaled) if len(scaled) > 1 else None

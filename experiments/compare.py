"""Compare runs read back from MLflow: SuperGLUE results in the layout of the paper's Table 1,
ablation sweeps in that of Table 6, and the runs of any other experiment side by side.

Three kinds of experiment:

* SuperGLUE sweeps (``exp=superglue``): the parent runs (no parent themselves) that logged
  ``table1/avg``, one row per run name; runs sharing a name are seeds.
* Ablation sweeps (``exp=ablations``): experiments holding sweep runs (tag ``glm.role=sweep``). The
  rows are the variants of one sweep (``--sweep NAME``, default the most recent sweep; a re-run
  sweep name means its most recent run), in the order of the sweep's ``variants`` tag; the finished
  variant runs of a variant are its seeds. Deltas are taken against the sweep's ``baseline`` tag
  unless ``--baseline`` names another row.
* Any other experiment (pretraining, LM evaluation, ...): its finished top-level runs, one row per
  run name (runs sharing a name are seeds), the ``--metric`` columns or by default every
  evaluation metric logged (``val/*``, ``perplexity/*``, ``lambada/*``, ``infill/*``, ``dev/*``,
  ``harness/*``).

Seeds are shown as mean ± sample std. A sweep's delta is paired by seed: the mean of the per-seed
differences from the baseline, ± the half width of its 95 % t interval (``experiments.intervals``),
marked ``*`` when the interval excludes zero; ``write_report`` also writes each difference with its
bounds to differences.csv. Elsewhere a delta is the difference of the means, ± its standard error
when both rows have several seeds. Task columns follow Table 1 (two-metric tasks as "x/y" in the
paper's metric order; for sweeps only the tasks some variant was finetuned on), then the average,
all x100 with one decimal. ``--metric`` adds columns of other logged metrics, shown as logged with two
decimals, the held-out infilling fractions ``infill/*`` x100 (sweeps default to those of
``infill/accuracy``, ``infill/baseline``, ``pretrain/val_loss`` and ``perplexity/ppl`` they logged).
``--paper`` adds the published rows of ``experiments.paper_results`` (for a sweep, those with a
value in some column: Table 6 reports SuperGLUE only). ``--plot DIR`` writes ``tasks.png`` (per-task bars,
SuperGLUE and sweeps) and ``curves.png`` (learning curves: a sweep's pretrainings, or the runs of any
other experiment). Without ``--experiment`` the experiment of the store's most recent run is shown
(as in ``notebooks/compare_runs.ipynb``), the others named on stderr.

    python -m experiments.compare [--experiment NAME] [--tracking-uri URI] [--sweep NAME]
        [--runs NAME ...] [--baseline NAME] [--metric KEY ...] [--paper]
        [--format md|csv|latex] [--output FILE] [--plot DIR]

``write_report`` writes comparison.md, comparison.csv, differences.csv, curves.png and tasks.png of
one sweep run (the ablation job calls it when its variants are done).
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from experiments import paper_results
from experiments.intervals import Interval, by_seed, paired_interval
from experiments.tables import AVG, Column, CompareError, Rows, Sweep, mean_std, task_columns
from glm_lightning.atomic import atomic_write_text

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

USAGE_ERROR = 2
MISSING = "-"
PARENT_TAG = "mlflow.parentRunId"
ROLE_TAG = "glm.role"
# extra columns of a sweep by default (those some variant logged)
SWEEP_METRICS = ("infill/accuracy", "infill/baseline", "pretrain/val_loss", "perplexity/ppl")
INFILL_PREFIX = "infill/"
PAIRED_MARK = "*"  # after a paired delta whose 95 % interval excludes zero
# columns of plain runs
RUN_METRIC_PREFIXES = ("val/", "perplexity/", "lambada/", "infill/", "dev/", "harness/")
PAPER_TABLE1_TITLE = "paper (Table 1)"
PAPER_TABLE6_TITLE = "paper (Tables 1 and 6)"
PAPER_PREFIX = "paper: "
LARGE = 1e6  # cells from here on are written in scientific notation

# ---------------------------------------------------------------------------------------------
# Reading runs


def default_tracking_uri(root: str | Path = ".") -> str:
    """``MLFLOW_TRACKING_URI`` or the default store of ``experiments.run`` started in ``root``
    (``<root>/outputs/mlflow.db``; the working directory unless told)."""
    store = (Path(root) / "outputs").resolve() / "mlflow.db"
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{store}"


def open_store(tracking_uri: str) -> MlflowClient:
    """A client of an existing store (a missing sqlite file is an error, not a new empty store)."""
    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
        raise CompareError(f"no MLflow store at {tracking_uri}")
    return MlflowClient(tracking_uri=tracking_uri)


def latest_experiment(tracking_uri: str) -> str:
    """The experiment of the most recently started run of the store."""
    from mlflow.entities import ViewType

    client = open_store(tracking_uri)
    experiments = client.search_experiments(view_type=ViewType.ACTIVE_ONLY)
    runs = client.search_runs([e.experiment_id for e in experiments], max_results=1,
                              order_by=["attributes.start_time DESC"]) if experiments else []
    if not runs:
        raise CompareError(f"no runs in {tracking_uri}")
    return next(e.name for e in experiments if e.experiment_id == runs[0].info.experiment_id)


def experiment_names(tracking_uri: str) -> list[str]:
    """The names of the store's experiments that hold runs, sorted."""
    from mlflow.entities import ViewType

    client = open_store(tracking_uri)
    return sorted(e.name for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)
                  if client.search_runs([e.experiment_id], max_results=1))


def fetch_runs(experiment: str, tracking_uri: str) -> list[Run]:
    """Every run of the experiment, oldest first."""
    client = open_store(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise CompareError(f"unknown experiment {experiment!r}; "
                           f"existing experiments: {', '.join(names) or 'none'}")
    return client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"],
                              max_results=50000)


def select_rows(rows: Rows, names: Sequence[str] | None, what: str, experiment: str) -> Rows:
    """``rows`` restricted to ``names`` in that order (all rows when ``names`` is empty)."""
    if not names:
        return rows
    missing = [name for name in names if name not in rows]
    if missing:
        raise CompareError(f"no {what} named {', '.join(map(repr, missing))} "
                           f"in {experiment!r}; runs: {', '.join(rows) or 'none'}")
    return {name: rows[name] for name in dict.fromkeys(names)}


def parent_rows(found: Sequence[Run], experiment: str, runs: Sequence[str] | None = None) -> Rows:
    """Metrics of the SuperGLUE parent runs grouped by run name (order of ``runs`` if given, else
    by start time)."""
    rows: Rows = {}
    for run in found:
        if PARENT_TAG not in run.data.tags and AVG in run.data.metrics:
            rows.setdefault(run.info.run_name, []).append(dict(run.data.metrics))
    rows = select_rows(rows, runs, "SuperGLUE parent run", experiment)
    if not rows:
        raise CompareError(f"no SuperGLUE parent runs (with {AVG!r}) in experiment {experiment!r}")
    return rows


def top_level_rows(found: Sequence[Run], experiment: str, tracking_uri: str,
                   runs: Sequence[str] | None = None) -> Sweep:
    """Any experiment's FINISHED top-level runs (pretraining, LM evaluation, ...): one row per run
    name (runs sharing a name are seeds), each run its own curve source for ``plots.plot_curves``."""
    rows: Rows = {}
    run_ids: dict[str, list[str]] = {}
    for run in sorted(found, key=lambda r: r.info.start_time or 0):
        if PARENT_TAG not in run.data.tags and run.info.status == "FINISHED":
            rows.setdefault(run.info.run_name, []).append(dict(run.data.metrics))
            run_ids.setdefault(run.info.run_name, []).append(run.info.run_id)
    rows = select_rows(rows, runs, "finished run", experiment)
    if not rows:
        raise CompareError(f"no finished runs in experiment {experiment!r}")
    return Sweep(run_id="", name=experiment, tags={}, rows=rows,
                 pretrain_runs={name: run_ids[name] for name in rows}, tracking_uri=tracking_uri)


def experiment_kind(found: Sequence[Run]) -> str:
    """"sweep" (ablation sweeps), "superglue" (SuperGLUE parent runs) or "runs" (anything else)."""
    if sweep_runs(found):
        return "sweep"
    if any(PARENT_TAG not in run.data.tags and AVG in run.data.metrics for run in found):
        return "superglue"
    return "runs"


def load_runs(experiment: str, tracking_uri: str, runs: Sequence[str] | None = None) -> Sweep:
    """The finished top-level runs of any experiment (see ``top_level_rows``)."""
    return top_level_rows(fetch_runs(experiment, tracking_uri), experiment, tracking_uri, runs)


def load_rows(experiment: str, tracking_uri: str, runs: Sequence[str] | None = None) -> Rows:
    """Metrics of the experiment's SuperGLUE parent runs grouped by run name."""
    return parent_rows(fetch_runs(experiment, tracking_uri), experiment, runs)


def sweep_runs(found: Sequence[Run]) -> list[Run]:
    """The sweep runs among ``found`` (top-level runs tagged ``glm.role=sweep``), oldest first."""
    return [run for run in found
            if run.data.tags.get(ROLE_TAG) == "sweep" and PARENT_TAG not in run.data.tags]


def choose_sweep(sweeps: Sequence[Run], experiment: str, name: str | None = None,
                 run_id: str | None = None) -> Run:
    """The sweep run with ``run_id``, else the most recent one named ``name``, else the most recent."""
    if run_id is not None:
        chosen = [run for run in sweeps if run.info.run_id == run_id]
        if not chosen:
            raise CompareError(f"no sweep run with id {run_id!r} in {experiment!r}")
    else:
        chosen = [run for run in sweeps if name is None or run.info.run_name == name]
        if not chosen:
            names = sorted({run.info.run_name for run in sweeps})
            raise CompareError(f"unknown sweep {name!r} in {experiment!r}; "
                               f"sweeps: {', '.join(names) or 'none'}")
    return max(chosen, key=lambda run: run.info.start_time or 0)


def variant_runs(found: Sequence[Run], sweep_id: str) -> dict[str, list[Run]]:
    """The sweep's FINISHED variant runs by variant name, one run per seed (the latest)."""
    by_seed: dict[tuple[str, str], Run] = {}
    for run in found:
        tags = run.data.tags
        if (tags.get(PARENT_TAG) == sweep_id and tags.get(ROLE_TAG) == "variant"
                and run.info.status == "FINISHED"):
            by_seed[tags.get("variant", run.info.run_name), tags.get("seed", run.info.run_id)] = run
    variants: dict[str, list[Run]] = {}
    for (variant, _), run in by_seed.items():
        variants.setdefault(variant, []).append(run)
    return variants


def variant_order(sweep: Run, variants: Mapping[str, object]) -> list[str]:
    """The variants in the order of the sweep's ``variants`` tag, then any others as found."""
    listed = [name.strip() for name in sweep.data.tags.get("variants", "").split(",") if name.strip()]
    return [name for name in dict.fromkeys([*listed, *variants]) if name in variants]


def sweep_from_runs(found: Sequence[Run], experiment: str, tracking_uri: str, name: str | None = None,
                    run_id: str | None = None, variants: Sequence[str] | None = None) -> Sweep:
    """The chosen sweep of ``found`` (see ``choose_sweep``), rows restricted to ``variants`` if given."""
    sweep = choose_sweep(sweep_runs(found), experiment, name, run_id)
    runs = variant_runs(found, sweep.info.run_id)
    if not runs:
        raise CompareError(f"no finished variant runs in sweep {sweep.info.run_name!r} "
                           f"({sweep.info.run_id}) of {experiment!r}")
    runs = {variant: runs[variant] for variant in variant_order(sweep, runs)}
    rows = select_rows({v: [dict(r.data.metrics) for r in seeds] for v, seeds in runs.items()},
                       variants, "finished variant run", experiment)
    return Sweep(run_id=sweep.info.run_id, name=sweep.info.run_name, tags=dict(sweep.data.tags), rows=rows,
                 pretrain_runs={v: [r.data.tags.get("pretrain_run_id", "") for r in runs[v]] for v in rows},
                 tracking_uri=tracking_uri,
                 seeds={v: [r.data.tags.get("seed", r.info.run_id) for r in runs[v]] for v in rows})


def load_sweep(experiment: str, tracking_uri: str, name: str | None = None, *, run_id: str | None = None,
               variants: Sequence[str] | None = None) -> Sweep:
    """An ablation sweep of the experiment: by run id, else the latest named ``name``, else the latest."""
    return sweep_from_runs(fetch_runs(experiment, tracking_uri), experiment, tracking_uri, name, run_id,
                           variants)


# ---------------------------------------------------------------------------------------------
# Tables


@dataclass(frozen=True)
class Comparison:
    """What a table shows: rows of seeds, columns, the baseline of the deltas, published rows."""

    rows: Rows
    columns: tuple[Column, ...]
    baseline: str | None = None
    paper: Rows = field(default_factory=dict)
    paper_title: str = PAPER_TABLE1_TITLE
    label: str = "run"  # header of the row-name column
    seeds: dict[str, list[str]] = field(default_factory=dict)  # row -> seed of each run: paired deltas

    def paired(self, name: str) -> bool:
        """Whether the deltas of row ``name`` pair its seeds with the baseline's."""
        return self.baseline is not None and name in self.seeds and self.baseline in self.seeds


@dataclass(frozen=True)
class Block:
    """Body rows under one title (markdown); CSV and LaTeX prefix the row names instead."""

    title: str | None
    rows: list[list[str]]
    prefix: str = ""


def metric_columns(keys: Sequence[str]) -> list[Column]:
    """One column per extra metric, shown as logged with two decimals; the held-out infilling
    fractions (``infill/*``) x100 with one decimal, as the task scores."""
    return [Column(key, (key,)) if key.startswith(INFILL_PREFIX) else Column(key, (key,), scale=1.0, digits=2)
            for key in keys]


def available_metrics(rows: Rows) -> list[str]:
    """Every metric key logged by some run of ``rows``, sorted."""
    return sorted({key for seeds in rows.values() for seed in seeds for key in seed})


def check_metrics(rows: Rows, keys: Sequence[str]) -> None:
    """Fail on a metric key that no run of ``rows`` logged."""
    unknown = [key for key in keys if key not in available_metrics(rows)]
    if unknown:
        raise CompareError(f"unknown metric {', '.join(map(repr, unknown))}; "
                           f"available: {', '.join(available_metrics(rows))}")


def table1_paper_rows() -> Rows:
    """The published Table-1 rows, by paper row name."""
    return {name: [row] for name, row in paper_results.TABLE1.items()}


def table6_paper_rows(variants: Sequence[str]) -> Rows:
    """The published rows of the variants that have one, named "<variant> = <paper row>"."""
    return {f"{variant} = {paper_results.VARIANT_ROWS[variant]}":
            [paper_results.PUBLISHED[paper_results.VARIANT_ROWS[variant]]]
            for variant in variants if variant in paper_results.VARIANT_ROWS}


def plain_comparison(rows: Rows, baseline: str | None = None, metrics: Sequence[str] = (),
                     paper: bool = False) -> Comparison:
    """A SuperGLUE comparison: all eight Table-1 columns, then the ``metrics`` columns."""
    check_metrics(rows, metrics)
    return Comparison(rows, (*task_columns(rows, every_task=True), *metric_columns(metrics)), baseline,
                      table1_paper_rows() if paper else {}, PAPER_TABLE1_TITLE)


def default_run_metrics(rows: Rows) -> list[str]:
    """What a table of plain runs shows unless told: the evaluation metrics some run logged
    (validation, LM evaluation, held-out infilling), in name order; of held-out infilling the
    totals only (its breakdowns by relation and answer length are there for ``--metrics``)."""
    return [key for key in available_metrics(rows) if key.startswith(RUN_METRIC_PREFIXES)
            and not (key.startswith(INFILL_PREFIX) and key.count("/") > 1)]


def runs_comparison(runs: Sweep, baseline: str | None = None, metrics: Sequence[str] | None = None,
                    paper: bool = False) -> Comparison:
    """A table of plain runs: runs as rows (seeds grouped by run name), ``metrics`` as columns (default:
    ``default_run_metrics``), shown as logged."""
    if paper:
        raise CompareError(f"--paper needs a SuperGLUE or ablation experiment; {runs.name!r} has neither")
    metrics = list(metrics) if metrics else default_run_metrics(runs.rows)
    if not metrics:
        raise CompareError(f"no evaluation metrics in {runs.name!r}; name some with --metric "
                           f"(available: {', '.join(available_metrics(runs.rows)) or 'none'})")
    check_metrics(runs.rows, metrics)
    return Comparison(runs.rows, tuple(metric_columns(metrics)), baseline)


def sweep_comparison(sweep: Sweep, baseline: str | None = None, metrics: Sequence[str] | None = None,
                     paper: bool = False) -> Comparison:
    """An ablation comparison: the finetuned tasks, then ``metrics`` (default: those of SWEEP_METRICS
    some variant logged); deltas against ``baseline`` or else the sweep's baseline."""
    if metrics is None:
        metrics = [key for key in SWEEP_METRICS if key in available_metrics(sweep.rows)]
    check_metrics(sweep.rows, metrics)
    has_tasks = any(key in available_metrics(sweep.rows) for col in task_columns() for key in col.keys)
    columns = (*(task_columns(sweep.rows) if has_tasks else ()), *metric_columns(metrics))
    # published rows only where they have a value in some column (Table 6 reports SuperGLUE only)
    published = {name: seeds for name, seeds in table6_paper_rows(list(sweep.rows)).items()
                 if any(key in seeds[0] for col in columns for key in col.keys)} if paper else {}
    return Comparison(sweep.rows, columns, baseline or sweep.baseline, published, PAPER_TABLE6_TITLE,
                      label="variant", seeds=sweep.seeds)


def infill_breakdown_comparison(sweep: Sweep, baseline: str | None = None) -> Comparison | None:
    """Held-out infilling accuracy by relation and by answer length (``infill/accuracy/*``, x100)
    of the variants that logged it; None when none did."""
    keys = [key for key in available_metrics(sweep.rows) if key.startswith(f"{INFILL_PREFIX}accuracy/")]
    lengths = sorted((key for key in keys if key.rpartition("/")[2].startswith("length_")),
                     key=lambda key: int(key.rpartition("_")[2]))
    keys = [*(key for key in keys if key not in lengths), *lengths]
    if not keys:
        return None
    columns = tuple(Column(key.removeprefix(f"{INFILL_PREFIX}accuracy/"), (key,)) for key in keys)
    return Comparison(sweep.rows, columns, baseline or sweep.baseline, label="variant", seeds=sweep.seeds)


def number(value: float, digits: int, sign: bool = False) -> str:
    """``value`` with ``digits`` decimals, or in scientific notation from 1e6 on (the perplexity of a
    barely trained model: 1.41e+18 rather than 19 digits)."""
    plus = "+" if sign else ""
    return f"{value:{plus}.{digits}e}" if math.isfinite(value) and abs(value) >= LARGE \
        else f"{value:{plus}.{digits}f}"


def stat_cell(seeds: Sequence[Mapping[str, float]], column: Column, pm: str) -> str:
    """"x/y" (scaled, ``column.digits`` decimals) with "±std" per metric when there are several seeds."""
    parts = []
    for key in column.keys:
        values = [seed[key] for seed in seeds if key in seed]
        if not values:
            parts.append(MISSING)
            continue
        mean, std = mean_std(values, column.scale)
        d = column.digits
        parts.append(number(mean, d) if std is None else f"{number(mean, d)}{pm}{number(std, d)}")
    return MISSING if all(p == MISSING for p in parts) else "/".join(parts)


def delta_cell(seeds: Sequence[Mapping[str, float]], base: Sequence[Mapping[str, float]],
               column: Column, pm: str) -> str:
    """Signed difference of the means (scaled, ``column.digits`` decimals) per metric, "x/y", with
    "±" its standard error sqrt(s1²/n1 + s2²/n2) when both rows have several seeds."""
    parts = []
    for key in column.keys:
        values = [seed[key] for seed in seeds if key in seed]
        base_values = [seed[key] for seed in base if key in seed]
        if not values or not base_values:
            parts.append(MISSING)
            continue
        mean, std = mean_std(values, column.scale)
        base_mean, base_std = mean_std(base_values, column.scale)
        d = column.digits
        cell = number(mean - base_mean, d, sign=True)
        if std is not None and base_std is not None:
            cell += f"{pm}{number(math.sqrt(std**2 / len(values) + base_std**2 / len(base_values)), d)}"
        parts.append(cell)
    return MISSING if all(p == MISSING for p in parts) else "/".join(parts)


def interval_text(interval: Interval | None, column: Column, pm: str) -> str:
    """A paired difference (scaled, ``column.digits`` decimals), "±" the half width of its 95 %
    interval when there are several seeds, marked when the interval excludes zero."""
    if interval is None:
        return MISSING
    d, scale = column.digits, column.scale
    text = number(scale * interval.difference, d, sign=True)
    if interval.half_width is not None:
        mark = PAIRED_MARK if interval.excludes_zero else ""
        text += f"{pm}{number(scale * interval.half_width, d)}{mark}"
    return text


def paired_intervals(table: Comparison, name: str, key: str) -> Interval | None:
    """Row ``name`` minus the baseline on metric ``key``, paired by seed (``experiments.intervals``)."""
    rows, seeds, baseline = table.rows, table.seeds, table.baseline
    return paired_interval(by_seed(rows[name], seeds[name], key),
                           by_seed(rows[baseline], seeds[baseline], key))


def paired_delta_cell(table: Comparison, name: str, column: Column, pm: str) -> str:
    """"x/y" of ``interval_text`` per metric of ``column``."""
    parts = [interval_text(paired_intervals(table, name, key), column, pm) for key in column.keys]
    return MISSING if all(p == MISSING for p in parts) else "/".join(parts)


def delta_title(table: Comparison) -> str:
    """The title of the delta block, saying what its "±" is."""
    if all(table.paired(name) for name in table.rows):
        return f"delta vs {table.baseline}, paired by seed, ± 95 % t interval, {PAIRED_MARK} = excludes 0"
    return f"delta vs {table.baseline}"


def build_table(table: Comparison, pm: str = "±") -> list[Block]:
    """The body: the scores, the deltas against the baseline (if any; paired by seed when the seeds
    are known), the published rows (if any)."""
    rows, baseline = table.rows, table.baseline
    if baseline is not None and baseline not in rows:
        raise CompareError(f"unknown baseline {baseline!r}; runs: {', '.join(rows)}")
    blocks = [Block(None, [[name, *(stat_cell(seeds, col, pm) for col in table.columns)]
                           for name, seeds in rows.items()])]
    if baseline is not None:
        blocks.append(Block(delta_title(table),
                            [[f"{name} - {baseline}",
                              *(paired_delta_cell(table, name, col, pm) if table.paired(name)
                                else delta_cell(seeds, rows[baseline], col, pm) for col in table.columns)]
                             for name, seeds in rows.items() if name != baseline]))
    if table.paper:
        blocks.append(Block(table.paper_title,
                            [[name, *(stat_cell(seeds, col, pm) for col in table.columns)]
                             for name, seeds in table.paper.items()], prefix=PAPER_PREFIX))
    return [block for block in blocks if block.rows]


def header(table: Comparison) -> list[str]:
    """The header row: the row-name label, then the column headers."""
    return [table.label, *(col.header for col in table.columns)]


def latex_escape(text: str) -> str:
    """``text`` with LaTeX's special characters escaped."""
    for char in "\\&%$#_{}":
        text = text.replace(char, "\\" + char)
    return text


def format_csv(table: Comparison) -> str:
    """The table as CSV; delta and published rows follow, named "<row> - <baseline>", "paper: <row>"."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header(table))
    for block in build_table(table):
        writer.writerows([block.prefix + row[0], *row[1:]] for row in block.rows)
    return out.getvalue()


def format_latex(table: Comparison) -> str:
    """The table as a LaTeX ``tabular`` (booktabs rules), blocks separated by ``\\midrule``."""
    head = header(table)
    lines = ["\\begin{tabular}{l" + "c" * (len(head) - 1) + "}", "\\toprule",
             " & ".join(map(latex_escape, head)) + " \\\\", "\\midrule"]
    for i, block in enumerate(build_table(table, pm="$\\pm$")):
        if i:
            lines.append("\\midrule")
        lines += [" & ".join([latex_escape(block.prefix + row[0]), *row[1:]]) + " \\\\" for row in block.rows]
    return "\n".join([*lines, "\\bottomrule", "\\end{tabular}"]) + "\n"


def format_markdown(table: Comparison) -> str:
    """The table in markdown; later blocks start with an italic title row."""
    head = header(table)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for block in build_table(table):
        if block.title is not None:
            title = block.title.replace("*", "\\*")  # a literal mark inside the italics
            lines.append("| " + " | ".join([f"*{title}*", *[""] * (len(head) - 1)]) + " |")
        lines += ["| " + " | ".join(row) + " |" for row in block.rows]
    return "\n".join(lines) + "\n"


def format_table(table: Comparison, fmt: str = "md") -> str:
    """The table as markdown, CSV or LaTeX, ending with a newline."""
    formats = {"md": format_markdown, "csv": format_csv, "latex": format_latex}
    if fmt not in formats:
        raise CompareError(f"unknown format {fmt!r} (md, csv or latex)")
    return formats[fmt](table)


# ---------------------------------------------------------------------------------------------
# Report and command line


def report_markdown(sweep: Sweep, table: Comparison, breakdown: Comparison | None = None) -> str:
    """comparison.md: a title, what the numbers are, the table, and the held-out infilling by
    relation and answer length when the variants were scored on probes."""
    scale = sweep.tags.get("scale")
    paired = table.baseline is not None and all(table.paired(name) for name in table.rows)
    deltas = ("" if table.baseline is None else
              f"; deltas against {table.baseline} " + (
                  f"as the mean of the per-seed differences ± the half width of its 95 % t interval over the "
                  f"seeds (experiments/intervals.py), marked {PAIRED_MARK} when the interval excludes zero"
                  if paired else "as difference of the means ± its standard error"))
    infill = ""
    if any(col.keys[0].startswith(INFILL_PREFIX) for col in table.columns):
        infill = (" `infill/accuracy` is the exact-match accuracy on the held-out infilling probes (greedy "
                  "fill of each blank; the masked_lm variant is scored as BERT on blanks: one [MASK] per "
                  "answer token, the answer's length given), `infill/baseline` the most-frequent-answer "
                  "baseline on the same probes, both x100.")
    scores = ("SuperGLUE dev scores x100 (two-metric tasks as x/y), other metrics" if any(
        col.keys[0] == AVG for col in table.columns) else "Metrics") + " as logged unless said"
    text = (f"# Ablation sweep {sweep.name}" + (f" (scale {scale})" if scale else "") + "\n\n"
            f"{scores}; seeds as mean ± sample std{deltas}.{infill}\n\n" + format_table(table, "md"))
    if breakdown is not None:
        text += ("\n## Held-out infilling by relation and answer length\n\n"
                 "Exact-match accuracy x100 on the probes of each relation and of each answer length in "
                 "tokens (`infill/accuracy/<relation>`, `infill/accuracy/length_<k>`; the baselines are "
                 "logged beside them as `infill/baseline/...`).\n\n" + format_table(breakdown, "md"))
    return text


DIFFERENCE_FIELDS = ("variant", "baseline", "metric", "seeds", "difference", "low", "high", "excludes_zero")


def differences_csv(tables: Sequence[Comparison]) -> str:
    """differences.csv: one row per variant and metric of ``tables`` (metrics as logged, not x100):
    the mean paired difference against the baseline over the seeds both have, the bounds of its 95 %
    t interval (empty with one seed) and whether it excludes zero."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(DIFFERENCE_FIELDS)
    for table in tables:
        for name in table.rows:
            if name == table.baseline or not table.paired(name):
                continue
            for key in (key for col in table.columns for key in col.keys):
                interval = paired_intervals(table, name, key)
                if interval is None:
                    continue
                bounds = ["", ""] if interval.low is None else [repr(interval.low), repr(interval.high)]
                writer.writerow([name, table.baseline, key, interval.seeds, repr(interval.difference),
                                 *bounds, str(interval.excludes_zero).lower()])
    return out.getvalue()


def write_report(experiment: str, tracking_uri: str, sweep_run_id: str, out_dir: Path) -> list[Path]:
    """Write comparison.md (table, deltas against the sweep's baseline, the paper's rows, held-out
    infilling by relation and length), comparison.csv, differences.csv (paired differences with
    their intervals), curves.png and tasks.png (when the variants were finetuned) of the sweep run
    ``sweep_run_id`` into ``out_dir``; returns their paths. Raises CompareError when the sweep has
    no finished variant runs."""
    from experiments.plots import plot_curves, plot_tasks

    sweep = load_sweep(experiment, tracking_uri, run_id=sweep_run_id)
    table = sweep_comparison(sweep, paper=True)
    breakdown = infill_breakdown_comparison(sweep)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown, table_csv = out_dir / "comparison.md", out_dir / "comparison.csv"
    differences = out_dir / "differences.csv"
    markdown.write_text(report_markdown(sweep, table, breakdown), encoding="utf-8")
    table_csv.write_text(format_table(table, "csv"), encoding="utf-8")
    tables = [t for t in (table, breakdown) if t is not None]
    differences.write_text(differences_csv(tables), encoding="utf-8")
    paths = [markdown, table_csv, differences, plot_curves(sweep, out_dir / "curves.png")]
    if any(col.keys[0] == AVG for col in table.columns):
        paths.append(plot_tasks(sweep.rows, out_dir / "tasks.png"))
    return paths


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.compare",
                                     description="MLflow runs in the layout of Table 1 / Table 6.")
    parser.add_argument("--experiment", default=None,
                        help="MLflow experiment name (default: that of the store's most recent run)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store (default: $MLFLOW_TRACKING_URI or sqlite:///<cwd>/outputs/mlflow.db)")
    parser.add_argument("--sweep", default=None, metavar="NAME",
                        help="ablation sweep to show (default: the most recent one)")
    parser.add_argument("--runs", nargs="+", default=None, metavar="RUN_NAME",
                        help="only these run names (variants of a sweep)")
    parser.add_argument("--baseline", default=None, metavar="RUN_NAME",
                        help="add deltas against this run (default for sweeps: the sweep's baseline)")
    parser.add_argument("--metric", nargs="+", default=None, metavar="KEY",
                        help="extra metric columns (default for sweeps: " + " ".join(SWEEP_METRICS) + ")")
    parser.add_argument("--paper", action="store_true", help="add the paper's published rows")
    parser.add_argument("--format", choices=("md", "csv", "latex"), default="md")
    parser.add_argument("--output", default=None, metavar="FILE", help="write here instead of stdout")
    parser.add_argument("--plot", default=None, metavar="DIR",
                        help="write into DIR tasks.png (per-task bars; SuperGLUE runs and sweeps) and "
                             "curves.png (learning curves; sweeps and every other experiment)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --output file or plots in --plot DIR")
    return parser.parse_args(argv)


def refuse_overwrite(args: argparse.Namespace) -> None:
    """Refuse, before any work, to replace the --output file or plots in --plot without --overwrite."""
    targets = [Path(args.output)] if args.output else []
    if args.plot:
        targets += [Path(args.plot) / "tasks.png", Path(args.plot) / "curves.png"]
    existing = [str(path) for path in targets if path.exists()]
    if existing and not args.overwrite:
        raise CompareError(f"{existing[0]} already exists; give --overwrite to replace it")


def run_command(args: argparse.Namespace) -> str:
    """The table the arguments ask for (plots written on the way)."""
    refuse_overwrite(args)
    tracking_uri = args.tracking_uri or default_tracking_uri()
    if args.experiment is None:
        args.experiment = latest_experiment(tracking_uri)
        others = [name for name in experiment_names(tracking_uri) if name != args.experiment]
        if others:
            print(f"experiment {args.experiment} (the most recent run's; others: {', '.join(others)}; "
                  "choose with --experiment NAME)", file=sys.stderr)
    found = fetch_runs(args.experiment, tracking_uri)
    kind = experiment_kind(found)
    if args.sweep is not None and kind != "sweep":
        raise CompareError(f"unknown sweep {args.sweep!r} in {args.experiment!r}; sweeps: none")
    curves = None
    if kind == "sweep":
        curves = sweep_from_runs(found, args.experiment, tracking_uri, args.sweep, variants=args.runs)
        table = sweep_comparison(curves, args.baseline, args.metric, args.paper)
    elif kind == "superglue":
        table = plain_comparison(parent_rows(found, args.experiment, args.runs), args.baseline,
                                 args.metric or (), args.paper)
    else:
        curves = top_level_rows(found, args.experiment, tracking_uri, args.runs)
        table = runs_comparison(curves, args.baseline, args.metric, args.paper)
    text = format_table(table, args.format)
    if args.plot:
        from experiments.plots import plot_curves, plot_tasks

        if kind != "runs" and any(col.keys[0] == AVG for col in table.columns):  # some task was scored
            plot_tasks(table.rows, Path(args.plot) / "tasks.png")
        if curves is not None:
            plot_curves(curves, Path(args.plot) / "curves.png")
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        text = run_command(args)
    except CompareError as error:
        print(f"error: {error}", file=sys.stderr)
        return USAGE_ERROR
    if args.output:
        atomic_write_text(args.output, text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

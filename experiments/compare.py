"""Compare SuperGLUE sweeps in the layout of the paper's Table 1 (GLM_SPEC §9.1).

Reads the parent runs of an ``exp=superglue`` experiment from MLflow (runs without a parent that
logged ``table1/avg``), one row per run name: several runs with the same name (seeds) are shown as
mean ± std. Columns are the eight tasks in Table-1 order (two-metric tasks as "x/y" in the paper's
metric order) and the average, all x100 with one decimal. ``--baseline`` adds a block of deltas of
every row against the baseline row.

    python -m experiments.compare --experiment superglue [--tracking-uri URI] [--runs NAME ...]
        [--baseline NAME] [--format md|csv|latex] [--output FILE]
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from glm_lightning.metrics import TABLE1_METRICS

USAGE_ERROR = 2
AVG = "table1/avg"
MISSING = "-"

# One row: run name -> one {metric key: value} dict per run (seed) with that name.
Rows = dict[str, list[dict[str, float]]]


class CompareError(Exception):
    """A problem reported in one line on the command line (exit status 2)."""


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` or the default store of ``experiments.run`` (``outputs/mlflow.db``)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('outputs').resolve() / 'mlflow.db'}"


def cell_keys(task: str) -> list[str]:
    """MLflow metric keys shown in ``task``'s column, in the paper's order."""
    return [f"{task}/{metric}" for metric in TABLE1_METRICS[task]]


def load_rows(experiment: str, tracking_uri: str, runs: Sequence[str] | None = None) -> Rows:
    """Metrics of the experiment's parent runs grouped by run name (order of ``runs`` if given,
    else by start time)."""
    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
        raise CompareError(f"no MLflow store at {tracking_uri}")
    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise CompareError(f"unknown experiment {experiment!r}; "
                           f"existing experiments: {', '.join(names) or 'none'}")
    found_runs = client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"],
                                    max_results=50000)
    parents = [run for run in found_runs
               if "mlflow.parentRunId" not in run.data.tags and AVG in run.data.metrics]
    rows: Rows = {}
    for run in parents:
        rows.setdefault(run.info.run_name, []).append(dict(run.data.metrics))
    if runs:
        missing = [name for name in runs if name not in rows]
        if missing:
            raise CompareError(f"no SuperGLUE parent run named {', '.join(map(repr, missing))} "
                               f"in {experiment!r}; runs: {', '.join(rows) or 'none'}")
        rows = {name: rows[name] for name in dict.fromkeys(runs)}
    if not rows:
        raise CompareError(f"no SuperGLUE parent runs (with {AVG!r}) in experiment {experiment!r}")
    return rows


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value), both x100."""
    scaled = [100 * v for v in values]
    return statistics.fmean(scaled), statistics.stdev(scaled) if len(scaled) > 1 else None


def stat_cell(seeds: Sequence[Mapping[str, float]], keys: Sequence[str], pm: str) -> str:
    """"x/y" (x100, one decimal) with "±std" per metric when there are several seeds."""
    parts = []
    for key in keys:
        values = [seed[key] for seed in seeds if key in seed]
        if not values:
            parts.append(MISSING)
            continue
        mean, std = mean_std(values)
        parts.append(f"{mean:.1f}" if std is None else f"{mean:.1f}{pm}{std:.1f}")
    return MISSING if all(p == MISSING for p in parts) else "/".join(parts)


def delta_cell(seeds: Sequence[Mapping[str, float]], base: Sequence[Mapping[str, float]],
               keys: Sequence[str]) -> str:
    """Signed difference of the means (x100, one decimal) per metric, "x/y" like the scores."""
    parts = []
    for key in keys:
        values = [seed[key] for seed in seeds if key in seed]
        base_values = [seed[key] for seed in base if key in seed]
        if not values or not base_values:
            parts.append(MISSING)
        else:
            parts.append(f"{mean_std(values)[0] - mean_std(base_values)[0]:+.1f}")
    return MISSING if all(p == MISSING for p in parts) else "/".join(parts)


def columns() -> list[tuple[str, list[str]]]:
    """(header, metric keys) of every column: the Table-1 tasks, then the average."""
    return [*((task, cell_keys(task)) for task in TABLE1_METRICS), ("Avg", [AVG])]


def build_table(rows: Rows, baseline: str | None = None, pm: str = "±") -> list[list[list[str]]]:
    """Blocks of body rows ([name, cells...]): the scores, then the deltas against ``baseline``."""
    if baseline is not None and baseline not in rows:
        raise CompareError(f"unknown baseline {baseline!r}; runs: {', '.join(rows)}")
    blocks = [[[name, *(stat_cell(seeds, keys, pm) for _, keys in columns())]
               for name, seeds in rows.items()]]
    if baseline is not None:
        blocks.append([[f"{name} - {baseline}",
                        *(delta_cell(seeds, rows[baseline], keys) for _, keys in columns())]
                       for name, seeds in rows.items() if name != baseline])
    return blocks


def latex_escape(text: str) -> str:
    for char in "\\&%$#_{}":
        text = text.replace(char, "\\" + char)
    return text


def format_table(rows: Rows, baseline: str | None = None, fmt: str = "md") -> str:
    """The table as markdown, CSV or LaTeX (a ``tabular``), ending with a newline."""
    header = ["run", *(name for name, _ in columns())]
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(header)
        for block in build_table(rows, baseline):
            writer.writerows(block)
        return out.getvalue()
    if fmt == "latex":
        blocks = build_table(rows, baseline, pm="$\\pm$")
        lines = ["\\begin{tabular}{l" + "c" * (len(header) - 1) + "}", "\\toprule",
                 " & ".join(header) + " \\\\", "\\midrule"]
        for i, block in enumerate(blocks):
            if i:
                lines.append("\\midrule")
            lines += [" & ".join([latex_escape(row[0]), *row[1:]]) + " \\\\" for row in block]
        return "\n".join([*lines, "\\bottomrule", "\\end{tabular}"]) + "\n"
    if fmt != "md":
        raise CompareError(f"unknown format {fmt!r} (md, csv or latex)")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, block in enumerate(build_table(rows, baseline)):
        if i:
            lines.append("| " + " | ".join([f"*delta vs {baseline}*", *[""] * (len(header) - 1)]) + " |")
        lines += ["| " + " | ".join(row) + " |" for row in block]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.compare",
                                     description="SuperGLUE runs from MLflow in the layout of Table 1.")
    parser.add_argument("--experiment", required=True, help="MLflow experiment name")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store (default: $MLFLOW_TRACKING_URI or sqlite:///<cwd>/outputs/mlflow.db)")
    parser.add_argument("--runs", nargs="+", default=None, metavar="RUN_NAME", help="only these run names")
    parser.add_argument("--baseline", default=None, metavar="RUN_NAME", help="add deltas against this run")
    parser.add_argument("--format", choices=("md", "csv", "latex"), default="md")
    parser.add_argument("--output", default=None, metavar="FILE", help="write here instead of stdout")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        rows = load_rows(args.experiment, args.tracking_uri or default_tracking_uri(), args.runs)
        text = format_table(rows, args.baseline, args.format)
    except CompareError as error:
        print(f"error: {error}", file=sys.stderr)
        return USAGE_ERROR
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

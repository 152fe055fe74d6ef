"""Where runs are: ``<output_dir>/<experiment>/<run_name>/``, each with ``checkpoints/last.ckpt``."""

from __future__ import annotations

from pathlib import Path


def latest_run(experiment: str = "quickstart", output_dir: str | Path = "outputs") -> Path:
    """The run directory of ``experiment`` whose ``last.ckpt`` was written most recently, so that
    code can use "the model the quickstart just trained" without knowing its run name."""
    runs = [path.parent.parent for path in Path(output_dir, experiment).glob("*/checkpoints/last.ckpt")]
    if not runs:
        raise FileNotFoundError(f"no run of {experiment!r} with checkpoints/last.ckpt under {output_dir}/; "
                                f"train one first: python -m experiments.run exp={experiment}")
    return max(runs, key=lambda run: (run / "checkpoints" / "last.ckpt").stat().st_mtime)

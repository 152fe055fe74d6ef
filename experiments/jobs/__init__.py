"""The job registry: which function runs each kind of experiment.

Jobs are named as "module:function" strings and imported only when run, so loading or printing a
config never imports Lightning or MLflow. Each function takes the frozen experiment DictConfig.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from omegaconf import DictConfig

JOBS: dict[str, str] = {
    "pretrain": "experiments.jobs.pretrain:run",
    "generate": "experiments.jobs.generate:run",
    "lm_eval": "experiments.jobs.lm_eval:run",
    "seq2seq": "experiments.jobs.seq2seq:run",
    "superglue": "experiments.jobs.superglue:run",
    "ablations": "experiments.jobs.ablations:run",
    "prepare_data": "experiments.jobs.prepare_data:run",
}


def get_job(name: str) -> Callable[[DictConfig], object]:
    """Import and return the function registered for job `name`."""
    if name not in JOBS:
        raise KeyError(f"unknown job {name!r}; valid choices: {', '.join(JOBS)}")
    module_name, _, function_name = JOBS[name].partition(":")
    return getattr(importlib.import_module(module_name), function_name)

"""lm-evaluation-harness job: the tasks of ``harness.tasks`` on a checkpoint through the ``glm``
backend (``glm_lightning.harness``), the results table printed, saved as ``results.json`` and
logged to MLflow as ``harness/<task>/<metric>`` so that ``experiments.compare`` shows them.

The shipped tasks (``experiments/harness_tasks``) read local files; the job runs with
``HF_DATASETS_OFFLINE=1`` and ``HF_HUB_OFFLINE=1`` unless ``harness.builtin_tasks`` asks for the
harness's own tasks, which may download their data.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import mlflow
import torch
from omegaconf import DictConfig

from experiments.config import save_config
from experiments.interruption import stops_deferred
from experiments.jobs.generate import load_model, resolve_tokenizer
from experiments.jobs.lm_eval import mlflow_run
from experiments.jobs.pretrain import run_directory
from experiments.tracking import tracking_uri
from glm_lightning.atomic import atomic_write_text
from glm_lightning.config import ConfigError

TASKS_DIR = Path(__file__).resolve().parents[1] / "harness_tasks"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OFFLINE = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


def task_specs(cfg: DictConfig) -> list[str | dict]:
    """What ``simple_evaluate`` is given for each task: its name, or for a shipped task with a
    ``harness.data_files`` entry its YAML with that file. Every local data file must exist (a
    ConfigError names the key that sets it)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    h = cfg.harness
    if not h.tasks:
        raise ConfigError("'harness.tasks' is empty; name the tasks to run, e.g. harness.tasks=[glm_copa]")
    unknown = sorted(set(h.data_files) - set(h.tasks))
    if unknown:
        raise ConfigError(f"harness.data_files names {', '.join(unknown)}, which harness.tasks does not run")
    specs: list[str | dict] = []
    for task in h.tasks:
        yaml_path = TASKS_DIR / f"{task}.yaml"
        if not yaml_path.is_file():
            if task in h.data_files:
                raise ConfigError(f"harness.data_files.{task}: only the tasks of {TASKS_DIR} "
                                  "take a data file")
            specs.append(task)
            continue
        spec = load_yaml(yaml_path)
        files = dict(spec["dataset_kwargs"]["data_files"])
        key = f"harness.data_files.{task}" if task in h.data_files else f"{yaml_path.name} (data_files)"
        files = {split: str(Path(h.data_files.get(task, path)).resolve()) for split, path in files.items()}
        for path in files.values():
            if not Path(path).is_file():
                raise ConfigError(f"{key}: {path} does not exist; set harness.data_files.{task}=PATH")
        spec["dataset_kwargs"] = {**spec["dataset_kwargs"], "data_files": files}
        specs.append(spec)
    return specs


def metrics_of(results: dict) -> dict[str, float]:
    """``harness/<task>/<metric>`` of every number in the harness's results (``acc,none`` becomes
    ``acc``; another filter than ``none`` is kept as a suffix, ``exact_match_strict``)."""
    metrics = {}
    for task, values in results["results"].items():
        for key, value in values.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            name, _, filter_name = key.partition(",")
            if math.isfinite(value):
                suffix = "" if filter_name == "none" else f"_{filter_name}"
                metrics[f"harness/{task}/{name}{suffix}"] = float(value)
    return metrics


def run(cfg: DictConfig) -> dict[str, float]:
    """Run the tasks, print the results table, save ``results.json`` and log the metrics to MLflow."""
    started = time.time()
    h = cfg.harness
    run_dir = run_directory(cfg)
    if (run_dir / "results.json").exists() and not cfg.overwrite:
        raise ConfigError(f"{run_dir} already holds the results of a harness run; choose another run_name, "
                          "or replace them with overwrite=true")
    if not h.builtin_tasks:  # before datasets is imported: the local tasks never need the network
        for name in OFFLINE:
            os.environ.setdefault(name, "1")
    try:
        from lm_eval import simple_evaluate
    except ImportError:
        raise ConfigError("exp=harness needs lm-evaluation-harness: pip install -e '.[harness]'") from None
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    from glm_lightning.harness import GLMHarnessLM

    specs = task_specs(cfg)
    task_manager = TaskManager(include_path=[str(TASKS_DIR), *map(str, h.include_path)],
                               include_defaults=h.builtin_tasks)
    unknown = [task for task in specs if isinstance(task, str) and task not in task_manager.all_tasks]
    if unknown:
        local = sorted(path.stem for path in TASKS_DIR.glob("*.yaml"))
        raise ConfigError(f"harness.tasks: no task {', '.join(unknown)} (local tasks: {', '.join(local)}; "
                          "harness.include_path adds folders, harness.builtin_tasks=true the harness's own)")
    tokenizer = resolve_tokenizer(cfg)
    model = load_model(cfg, tokenizer).to(DTYPES[h.dtype])
    try:
        lm = GLMHarnessLM.wrap(model, tokenizer, batch_size=cfg.data.batch_size,
                               mask="gMASK" if cfg.data.task_masks else "MASK",
                               max_length=cfg.lm_eval.max_length, stride=cfg.lm_eval.stride,
                               max_gen_toks=h.max_gen_toks, seed=cfg.seed)
    except ValueError as error:
        raise ConfigError(f"lm_eval.max_length: {error}") from None
    save_config(cfg, run_dir / "config.yaml")
    blank = "[gMASK]" if cfg.data.task_masks else "[MASK]"
    print(f"tasks: {', '.join(h.tasks)} (loglikelihood: [CLS] context {blank} eos | [sop] continuation; "
          f"rolling: windows of {lm.window} tokens, stride {lm.stride}; generation: [CLS] context [gMASK] "
          "on the KV cache)", flush=True)
    with mlflow_run(cfg, run_dir) as run_id:
        results = simple_evaluate(model=lm, tasks=specs, task_manager=task_manager, limit=h.limit,
                                  num_fewshot=h.num_fewshot, bootstrap_iters=h.bootstrap_iters,
                                  log_samples=False, random_seed=cfg.seed, numpy_random_seed=cfg.seed,
                                  torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed)
        metrics = metrics_of(results)
        atomic_write_text(run_dir / "results.json",
                          json.dumps({k: results[k] for k in ("results", "versions", "n-shot", "configs")
                                      if k in results}, indent=2, default=str) + "\n")
        if run_id:
            with stops_deferred():
                mlflow.log_metrics(metrics)
                mlflow.log_artifact(str(run_dir / "results.json"))
    print(make_table(results))
    line = f"evaluated {cfg.model.init_from} on {len(h.tasks)} harness tasks in {time.time() - started:.1f} s"
    if run_id:
        line += f"; MLflow run {run_id} at {tracking_uri(cfg)}"
    print(line)
    return metrics

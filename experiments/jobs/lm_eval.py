"""Zero-shot language-model evaluation job (paper §3.3): LAMBADA accuracy or perplexity of a
checkpoint on ``lm_eval.file``, printed and logged as an MLflow run."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
from omegaconf import DictConfig, OmegaConf

from experiments.config import save_config
from experiments.interruption import mlflow_status
from experiments.jobs.generate import load_model, require_checkpoint, resolve_tokenizer
from experiments.jobs.pretrain import run_directory
from experiments.tracking import (
    end_abandoned_runs,
    experiment_id,
    flatten,
    owner_tags,
    run_tags,
    tracking_uri,
)
from glm_lightning.atomic import atomic_write_text
from glm_lightning.config import ConfigError
from glm_lightning.lm_eval import evaluate_lambada, evaluate_perplexity, read_lambada
from glm_lightning.model import GLMModel
from glm_lightning.tokenizer import GLMTokenizer


def load(cfg: DictConfig) -> tuple[GLMModel, GLMTokenizer]:
    """The checkpoint and tokenizer to evaluate, after checking the settings (before any MLflow run)."""
    e = cfg.lm_eval
    require_checkpoint(cfg)
    if not e.file:
        raise ConfigError("'lm_eval.file' is not set; name the text (perplexity) or jsonl (lambada) file")
    if not Path(e.file).is_file():
        raise FileNotFoundError(f"lm_eval.file: {e.file} does not exist")
    tokenizer = resolve_tokenizer(cfg)
    model = load_model(cfg, tokenizer)
    if e.max_length is not None and e.max_length > model.config.max_sequence_length - 1:
        raise ConfigError(f"lm_eval.max_length ({e.max_length}) exceeds the model's position table "
                          f"(max_sequence_length - 1 = {model.config.max_sequence_length - 1})")
    return model, tokenizer


def evaluate(cfg: DictConfig, model: GLMModel, tokenizer: GLMTokenizer) -> dict[str, float]:
    """The metrics of the configured task, named ``<task>/<metric>``."""
    e = cfg.lm_eval
    # Models pretrained with task masks are evaluated with [gMASK], as the official scripts do.
    mask_id = tokenizer.gmask_id if cfg.data.task_masks else tokenizer.mask_id
    batch_size = cfg.data.batch_size
    try:
        if e.task == "lambada":
            max_length = e.max_length + 1 if e.max_length else None
            metrics = evaluate_lambada(model, tokenizer, read_lambada(e.file), mask_id=mask_id,
                                       unidirectional=e.unidirectional, max_length=max_length,
                                       batch_size=batch_size, progress="LAMBADA passages")
        else:
            text = Path(e.file).read_text(encoding="utf-8")
            metrics = evaluate_perplexity(model, tokenizer, text, max_length=e.max_length, stride=e.stride,
                                          mask_id=mask_id, unidirectional=e.unidirectional,
                                          batch_size=batch_size, progress="perplexity windows")
    except ValueError as error:  # unusable input: empty text, a passage too long, bad jsonl
        raise ConfigError(f"lm_eval.file {e.file}: {error}") from error
    return {f"{e.task}/{name}": float(value) for name, value in metrics.items()}


@contextmanager
def mlflow_run(cfg: DictConfig, run_dir: Path) -> Iterator[str | None]:
    """The run's MLflow run (its id; None without logging), open while the evaluation runs, with the
    flattened config as params; it ends FINISHED, KILLED when interrupted, else FAILED."""
    if not cfg.logging.enabled:
        yield None
        return
    mlflow.set_tracking_uri(tracking_uri(cfg))
    experiment = experiment_id(cfg)
    mlflow.set_experiment(experiment_id=experiment)
    end_abandoned_runs(mlflow.MlflowClient(), experiment, run_dir.name)
    params = flatten(OmegaConf.to_container(cfg, resolve=True))
    active = mlflow.start_run(run_name=run_dir.name, tags={**run_tags(cfg), **owner_tags()})
    try:
        mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})
        mlflow.log_artifact(str(run_dir / "config.yaml"))
        yield active.info.run_id
    except BaseException as error:
        mlflow.end_run(mlflow_status(error))
        raise
    mlflow.end_run(mlflow_status(None))


def run(cfg: DictConfig) -> dict[str, float]:
    """Evaluate, print one line per metric, save ``metrics.json`` in the run directory and log
    the run to MLflow."""
    started = time.time()
    run_dir = run_directory(cfg)
    if (run_dir / "metrics.json").exists() and not cfg.overwrite:
        raise ConfigError(f"{run_dir} already holds the metrics of an evaluation; choose another run_name, "
                          "or replace them with overwrite=true")
    model, tokenizer = load(cfg)
    save_config(cfg, run_dir / "config.yaml")
    with mlflow_run(cfg, run_dir) as run_id:
        metrics = evaluate(cfg, model, tokenizer)
        atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        if run_id:
            mlflow.log_metrics(metrics)
            mlflow.log_artifact(str(run_dir / "metrics.json"))
    for name, value in metrics.items():
        print(f"{name}: {value:.6g}")
    line = f"evaluated {cfg.model.init_from} on {cfg.lm_eval.file} in {time.time() - started:.1f} s"
    if run_id:
        line += f"; MLflow run {run_id} at {tracking_uri(cfg)}"
    print(line)
    return metrics

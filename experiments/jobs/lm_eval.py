"""Zero-shot language-model evaluation job (paper §3.3): LAMBADA accuracy or perplexity of a
checkpoint on ``lm_eval.file``, printed and logged as an MLflow run."""

from __future__ import annotations

import json
import time
from pathlib import Path

import mlflow
from omegaconf import DictConfig, OmegaConf

from experiments.config import save_config
from experiments.jobs.generate import load_model, require_checkpoint, resolve_tokenizer
from experiments.jobs.pretrain import run_directory
from experiments.tracking import experiment_id, flatten, run_tags, tracking_uri
from glm_lightning.config import ConfigError
from glm_lightning.lm_eval import evaluate_lambada, evaluate_perplexity, read_lambada


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """The metrics of the configured task, named ``<task>/<metric>``."""
    e = cfg.lm_eval
    require_checkpoint(cfg)
    if not e.file:
        raise ConfigError("'lm_eval.file' is not set; name the text (perplexity) or jsonl (lambada) file")
    if not Path(e.file).is_file():
        raise FileNotFoundError(f"lm_eval.file: {e.file} does not exist")
    tokenizer = resolve_tokenizer(cfg)
    model = load_model(cfg, tokenizer)
    # Models pretrained with task masks are evaluated with [gMASK], as the official scripts do.
    mask_id = tokenizer.gmask_id if cfg.data.task_masks else tokenizer.mask_id
    batch_size = cfg.data.batch_size
    if e.max_length is not None and e.max_length > model.config.max_sequence_length - 1:
        raise ConfigError(f"lm_eval.max_length ({e.max_length}) exceeds the model's position table "
                          f"(max_sequence_length - 1 = {model.config.max_sequence_length - 1})")
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


def log_to_mlflow(cfg: DictConfig, run_dir: Path, metrics: dict[str, float]) -> str:
    """One FINISHED MLflow run with the flattened config as params and the metrics; its id."""
    mlflow.set_tracking_uri(tracking_uri(cfg))
    mlflow.set_experiment(experiment_id=experiment_id(cfg))
    params = flatten(OmegaConf.to_container(cfg, resolve=True))
    with mlflow.start_run(run_name=run_dir.name, tags=run_tags(cfg)) as active:
        mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(str(run_dir / "config.yaml"))
        mlflow.log_artifact(str(run_dir / "metrics.json"))
        return active.info.run_id


def run(cfg: DictConfig) -> dict[str, float]:
    """Evaluate, print one line per metric, save ``metrics.json`` in the run directory and log
    the run to MLflow."""
    started = time.time()
    metrics = evaluate(cfg)
    run_dir = run_directory(cfg)
    save_config(cfg, run_dir / "config.yaml")
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    for name, value in metrics.items():
        print(f"{name}: {value:.6g}")
    line = f"evaluated {cfg.model.init_from} on {cfg.lm_eval.file} in {time.time() - started:.1f} s"
    if cfg.logging.enabled:
        run_id = log_to_mlflow(cfg, run_dir, metrics)
        line += f"; MLflow run {run_id} at {tracking_uri(cfg)}"
    print(line)
    return metrics

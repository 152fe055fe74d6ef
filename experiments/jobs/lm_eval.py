"""Zero-shot language-model evaluation job (paper §3.3): LAMBADA accuracy or perplexity of a
checkpoint on ``lm_eval.file`` under a released protocol (``lm_eval.protocol``), printed and
logged as an MLflow run."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
from omegaconf import DictConfig, OmegaConf

from experiments.config import save_config
from experiments.interruption import mlflow_status, stops_deferred
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
from glm_lightning.lm_eval import (
    PROTOCOLS,
    Protocol,
    default_window,
    evaluate_lambada,
    evaluate_perplexity,
    read_documents,
    read_jsonl_texts,
)
from glm_lightning.model import GLMModel
from glm_lightning.tokenizer import GLMTokenizer


def load(cfg: DictConfig) -> tuple[GLMModel, GLMTokenizer]:
    """The checkpoint and tokenizer to evaluate, after checking the settings (before any MLflow run)."""
    e = cfg.lm_eval
    require_checkpoint(cfg)
    if not e.file:
        raise ConfigError("'lm_eval.file' is not set; name the text or jsonl file to evaluate")
    if not Path(e.file).is_file():
        raise FileNotFoundError(f"lm_eval.file: {e.file} does not exist")
    tokenizer = resolve_tokenizer(cfg)
    model = load_model(cfg, tokenizer)
    if e.max_length is not None and e.max_length > model.config.max_sequence_length - 1:
        raise ConfigError(f"lm_eval.max_length ({e.max_length}) exceeds the model's position table "
                          f"(max_sequence_length - 1 = {model.config.max_sequence_length - 1})")
    return model, tokenizer


@dataclass(frozen=True)
class Settings:
    """What an evaluation runs with once the protocol's defaults are filled in."""

    protocol: Protocol
    documents: str  # stream or lines
    window: int  # text tokens per window (LAMBADA: per sample, less one)
    stride: int
    unidirectional: bool

    @property
    def direction(self) -> str:
        return "unidirectional" if self.unidirectional else "bidirectional"

    def describe(self) -> str:
        """The first line of the job's output: what the numbers will mean."""
        if self.protocol.task == "lambada":
            return (f"protocol lambada ({self.protocol.script}): last-word accuracy, samples of at most "
                    f"{self.window + 1} tokens, {self.direction}")
        detokenizer = "WikiText detokenizer" if self.protocol.detokenize else "no detokenizer"
        split = "the file as one document" if self.documents == "stream" else "each line a document"
        return (f"protocol {self.protocol.name} ({self.protocol.script}): {split}, {detokenizer}, "
                f'words = len(text.split(" ")), windows of {self.window} tokens, stride {self.stride}, '
                f"{self.direction}")


def settings(cfg: DictConfig, model: GLMModel) -> Settings:
    """The protocol's documents and window with the configured overrides."""
    e = cfg.lm_eval
    protocol = PROTOCOLS[e.protocol]
    if protocol.task == "lambada" and e.documents != "auto":
        raise ConfigError("lm_eval.documents applies to the perplexity protocols (wikitext, language_model); "
                          "LAMBADA reads one passage per jsonl line")
    documents = protocol.documents if e.documents == "auto" else e.documents
    window = e.max_length or default_window(model)
    return Settings(protocol, documents, window, min(e.stride, window), e.unidirectional)


def evaluate(cfg: DictConfig, model: GLMModel, tokenizer: GLMTokenizer, run: Settings) -> dict[str, float]:
    """The metrics of the configured protocol, named ``<task>/<metric>``."""
    e = cfg.lm_eval
    # Models pretrained with task masks are evaluated with [gMASK], as the official scripts do.
    mask_id = tokenizer.gmask_id if cfg.data.task_masks else tokenizer.mask_id
    batch_size = cfg.data.batch_size
    try:
        if run.protocol.task == "lambada":
            metrics = evaluate_lambada(model, tokenizer, read_jsonl_texts(e.file), mask_id=mask_id,
                                       unidirectional=run.unidirectional, max_length=run.window + 1,
                                       batch_size=batch_size, progress="LAMBADA passages")
            metrics["max_length"] = run.window + 1
        else:
            documents = read_documents(e.file, run.documents)
            metrics = evaluate_perplexity(model, tokenizer, documents, detokenize=run.protocol.detokenize,
                                          max_length=run.window, stride=run.stride, mask_id=mask_id,
                                          unidirectional=run.unidirectional, batch_size=batch_size,
                                          progress="perplexity windows")
    except ValueError as error:  # unusable input: empty text, a passage too long, bad jsonl
        where = str(error) if str(error).startswith(f"{e.file}:") else f"{e.file}: {error}"
        raise ConfigError(f"lm_eval.file {where}") from error
    return {f"{run.protocol.task}/{name}": float(value) for name, value in metrics.items()}


def result_line(run: Settings, metrics: dict[str, float]) -> str:
    """The one line a reader needs to compare with the paper: protocol, window, stride and counts."""
    if run.protocol.task == "lambada":
        m = {name.removeprefix("lambada/"): value for name, value in metrics.items()}
        return (f"lambada: accuracy {m['accuracy']:.4f} ({m['correct']:.0f} of {m['total']:.0f} passages), "
                f"samples of at most {run.window + 1} tokens, {run.direction}")
    m = {name.removeprefix("perplexity/"): value for name, value in metrics.items()}
    return (f"perplexity ({run.protocol.name}): ppl {m['ppl']:.6g}, adjusted ppl {m['adjusted_ppl']:.6g}, "
            f"window {run.window}, stride {run.stride}, {m['num_tokens']:.0f} tokens, "
            f"{m['num_words']:.0f} words, {m['num_documents']:.0f} document"
            f"{'' if m['num_documents'] == 1 else 's'}, {run.direction}")


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
        with stops_deferred():
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
    resolved = settings(cfg, model)
    print(resolved.describe())
    save_config(cfg, run_dir / "config.yaml")
    with mlflow_run(cfg, run_dir) as run_id:
        metrics = evaluate(cfg, model, tokenizer, resolved)
        atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        if run_id:
            with stops_deferred():
                mlflow.log_metrics(metrics)
                # The window and stride are metrics (<task>/window, /stride); these are the other
                # settings the protocol filled in.
                mlflow.log_params({"lm_eval.resolved.documents": resolved.documents,
                                   "lm_eval.resolved.script": resolved.protocol.script})
                mlflow.log_artifact(str(run_dir / "metrics.json"))
    for name, value in metrics.items():
        print(f"{name}: {value:.6g}")
    print(result_line(resolved, metrics))
    line = f"evaluated {cfg.model.init_from} on {cfg.lm_eval.file} in {time.time() - started:.1f} s"
    if run_id:
        line += f"; MLflow run {run_id} at {tracking_uri(cfg)}"
    print(line)
    return metrics

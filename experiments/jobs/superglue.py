"""SuperGLUE finetuning job: the official protocol (paper §2.3, §3.2; `finetune_glm.py`), task by task.

Per task: finetune from ``model.init_from`` for the configured epochs (in the resumable order of
``datamodules.epoch_order``: a task resumed mid-epoch trains on the batches of an uninterrupted
run, with its dropout masks), validate on the dev set after every epoch, keep the best epoch on the
task's main metric, reload it for the final dev score and the test predictions (leaderboard
``<Task>.jsonl`` files in the run directory). Each task is an MLflow child run of one parent run,
which gets the Table-1 row (two-metric tasks averaged, then the mean over tasks).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, DistributedSampler

from datamodules.superglue import TASKS, read_split, split_path
from datamodules.superglue_data import SuperGLUEDataModule
from datamodules.superglue_download import fetch_superglue
from experiments.interruption import interruption_callback, mlflow_status, training_stopped
from experiments.jobs.generate import require_checkpoint, resolve_tokenizer
from experiments.jobs.pretrain import (
    check_accelerator,
    check_resume,
    launch,
    resume_checkpoint,
    throughput_monitor,
    write_summary,
)
from experiments.resume import RecordConfig, resume_config
from experiments.tables import avg_header
from experiments.tokenizer_identity import check_tokenizer, tokenizer_record
from experiments.tracking import (
    RUN_ID_FILE,
    RunLogger,
    artifact_location,
    end_abandoned_runs,
    mlflow_logger,
    owner_tags,
    recorded_run_id,
    run_tags,
    tracking_uri,
)
from glm_lightning.atomic import atomic_write_text
from glm_lightning.callbacks import LastCheckpoint, StartStep, progress_bar
from glm_lightning.checkpoint import checkpoint_config, read_checkpoint
from glm_lightning.checkpoint_io import AtomicCheckpointIO, RecordTokenizer, checkpoint_problem
from glm_lightning.config import (
    ConfigError,
    activation_checkpointing,
    optimizer_settings,
    superglue_tasks,
    task_pattern_id,
)
from glm_lightning.metrics import TABLE1_METRICS, table_row
from glm_lightning.model import GLMConfig
from glm_lightning.modules.cloze import GLMClozeModule
from glm_lightning.parallel import build_strategy
from glm_lightning.tokenizer import GLMTokenizer

# The metric that picks the best epoch: the first of the official DEFAULT_METRICS of each task.
MAIN_METRIC = {"CB": "accuracy", "MultiRC": "f1a", "ReCoRD": "em"}
# Diagnostics predicted by the RTE model for the leaderboard, when their files are in the data.
DIAGNOSTICS = ("AX-b", "AX-g")
DROPOUT_FIELDS = ("embedding_dropout_prob", "attention_dropout_prob", "output_dropout_prob")


def main_metric(task: str) -> str:
    """Name of the dev metric that selects the best epoch of ``task``."""
    return MAIN_METRIC.get(task, "accuracy")


# Why a task trains on more or fewer examples than its train.jsonl holds (the official finetuning's
# training set, glm_lightning.cloze.preprocess.augment_training_examples), said where the count is printed.
TRAINING_SET = {
    "COPA": "each example of train.jsonl twice, as written and mirrored (choices swapped)",
    "WSC": "the positive examples of train.jsonl only",
    "ReCoRD": "one example per query and gold answer",
}


def superglue_data_dir(cfg: DictConfig, tasks: list[str]) -> Path:
    """``data.superglue_dir``, or the official archive downloaded into the cache; every selected
    task must have its train (or FewGLUE train) and val files."""
    if cfg.data.superglue_dir:
        data_dir = Path(cfg.data.superglue_dir)
        if not data_dir.is_dir():
            raise ConfigError(f"invalid value {cfg.data.superglue_dir!r} for 'data.superglue_dir': "
                              "no such folder")
    else:
        data_dir = fetch_superglue(cfg.superglue.url, cfg.data.cache_dir, cfg.superglue.sha256)
    for task in tasks:
        (train_key, train_dir), (eval_key, eval_dir) = task_folders(cfg, task, data_dir)
        for key, folder, split in ((train_key, train_dir, "train"), (eval_key, eval_dir, "val")):
            path = split_path(task, folder, split)
            if not path.is_file():
                raise ConfigError(f"'{key}': {path} does not exist ({task} needs its {split} split)")
    return data_dir


def task_folders(cfg: DictConfig, task: str, data_dir: Path) -> tuple[tuple[str, Path], tuple[str, Path]]:
    """(config key, folder) of the training and of the evaluation files of ``task``: WSC reads both
    from ``data.wsc_negatives`` when set; FewGLUE replaces the training files of the others."""
    if task == "WSC" and cfg.data.wsc_negatives:
        folder = ("data.wsc_negatives", Path(cfg.data.wsc_negatives))
        return folder, folder
    train = ("data.fewglue_dir", Path(cfg.data.fewglue_dir)) if cfg.data.fewglue_dir else \
        ("data.superglue_dir", data_dir)
    return train, ("data.superglue_dir", data_dir)


def resolve_wsc_mode(cfg: DictConfig, train_dir: Path) -> str:
    """``superglue.tasks.wsc.mode`` with ``auto`` decided by the training file: ``candidates`` iff
    its examples carry negative candidates, else the official generative path. Scoring candidates
    without negatives would predict True for every example, so that is refused."""
    mode = cfg.superglue.tasks.wsc.mode
    has_negatives = any(ex.get("candidates") for ex in read_split("WSC", str(train_dir), "train"))
    if mode == "auto":
        return "candidates" if has_negatives else "generative"
    if mode == "candidates" and not has_negatives:
        raise ConfigError(f"superglue.tasks.wsc.mode=candidates needs negative candidates, but "
                          f"{split_path('WSC', train_dir, 'train')} has no 'candidates' field; set "
                          "data.wsc_negatives to files that carry them, or use mode=generative")
    return mode


def load_backbone(cfg: DictConfig, tokenizer: GLMTokenizer) -> GLMConfig:
    """Config of ``model.init_from`` (sizes from the checkpoint; dropouts from ``model.*`` when set,
    recomputation, attention backend and compilation from ``model.*``), checked against the
    tokenizer. Only shapes are read here: each task's module loads the weights once the Trainer has
    sharded it."""
    path = require_checkpoint(cfg)
    try:
        stored = read_checkpoint(path)
        config = checkpoint_config(stored, cfg.model.num_attention_heads)  # None = inferred
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(f"model.init_from: {error}") from error
    check_tokenizer(cfg, tokenizer, "model.init_from", path, stored.tokenizer)
    if len(tokenizer) > config.vocab_size:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} ids but the checkpoint at 'model.init_from' "
                          f"only {config.vocab_size}; set the tokenizer the model was trained with")
    dropouts = {name: getattr(cfg.model, name) for name in DROPOUT_FIELDS
                if getattr(cfg.model, name) is not None}
    # recomputation, the attention backend and compilation are how this run computes, not what was trained
    return dataclasses.replace(config, **dropouts, checkpoint_activations=activation_checkpointing(cfg.model),
                               attention=cfg.model.attention, compile=cfg.model.compile)


def task_epochs(cfg: DictConfig, task: str) -> int:
    """``superglue.tasks.<task>.epochs`` times ``superglue.epochs_scale`` (at least one epoch)."""
    return max(1, round(cfg.superglue.tasks[task.lower()].epochs * cfg.superglue.epochs_scale))


def device_count(cfg: DictConfig) -> int:
    """Processes that share a global batch (``trainer.devices`` x nodes; "auto" counts as one)."""
    devices = cfg.trainer.devices
    count = len(devices) if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices) else (
        devices if isinstance(devices, int) and devices > 0 else 1)
    return count * cfg.trainer.num_nodes


def leaderboard_rows(task: str, examples: list[dict], predictions: dict) -> list[dict]:
    """Predictions in the SuperGLUE leaderboard format, in file order (``predictions`` maps an
    example's idx to the predicted class or candidate index)."""
    if task == "ReCoRD":  # the predicted entity text, per query
        return [{"idx": ex["idx"][1], "label": ex.get("candidates", ex["entities"])[predictions[ex["idx"]]]}
                for ex in examples]
    labels = TASKS[task].labels
    if task == "MultiRC":  # nested: paragraph -> questions -> answers, each answer 0 or 1
        paragraphs: dict[int, dict[int, list[dict]]] = {}
        for ex in examples:
            p, q, a = ex["idx"]
            paragraphs.setdefault(p, {}).setdefault(q, []).append({"idx": a, "label": predictions[ex["idx"]]})
        return [{"idx": p, "passage": {"questions": [{"idx": q, "answers": answers}
                                                     for q, answers in questions.items()]}}
                for p, questions in paragraphs.items()]
    rows = []
    for ex in examples:
        label = labels[predictions[ex["idx"]]]
        rows.append({"idx": ex["idx"], "label": str(label).lower() if isinstance(label, bool) else label})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def predict(trainer: L.Trainer, module: GLMClozeModule, loader) -> dict:
    """idx -> predicted class or candidate index for every example of ``loader``, gathered from
    every rank. Each rank predicts its part of the file, padded with repeats so that a file shorter
    than the number of ranks still gives every rank a batch (Lightning's own predict sampler
    leaves a rank empty and fails then); the repeats collapse in the mapping."""
    if trainer.world_size > 1:
        sampler = DistributedSampler(loader.dataset, num_replicas=trainer.world_size,
                                     rank=trainer.global_rank, shuffle=False)
        loader = DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler,
                            collate_fn=loader.collate_fn, num_workers=loader.num_workers)
    predictions = {}
    for batch in trainer.predict(module, dataloaders=loader):
        ids = batch["idx"]  # a tensor, or a list where the file's ids are strings (AX-b)
        for idx, prediction in zip(ids if isinstance(ids, list) else ids.tolist(),
                                   batch["prediction"].tolist(), strict=True):
            predictions[tuple(idx) if isinstance(idx, list) else idx] = prediction
    if trainer.world_size > 1:
        parts: list = [None] * trainer.world_size
        torch.distributed.all_gather_object(parts, predictions)
        predictions = {idx: prediction for part in parts for idx, prediction in part.items()}
    return predictions


def markdown_row(results: dict[str, dict[str, float]], row: dict[str, float]) -> str:
    """Header and row of Table 1 (x100; two-metric tasks as "a/b") for the tasks that ran."""
    tasks = [task for task in TABLE1_METRICS if task in results]
    cells = ["/".join(f"{100 * results[t][m]:.1f}" for m in TABLE1_METRICS[t]) for t in tasks]
    header = "| " + " | ".join([*tasks, avg_header(len(tasks))]) + " |"
    return "\n".join([header, "|" + "---|" * (len(tasks) + 1),
                      "| " + " | ".join([*cells, f"{100 * row['avg']:.1f}"]) + " |"])


def child_logger(cfg: DictConfig, parent: RunLogger, run_name: str, task: str, task_dir: Path,
                 resume: bool) -> RunLogger:
    """An MLflow run for one task, nested under the sweep's run; a resumed task continues its run."""
    id_file = task_dir / RUN_ID_FILE
    if rank_zero_only.rank == 0:
        end_abandoned_runs(parent.experiment, parent.experiment_id, f"{run_name}/{task}")
    logger = RunLogger(
        experiment_name=cfg.logging.experiment_name or cfg.exp,
        run_name=f"{run_name}/{task}",
        tracking_uri=tracking_uri(cfg),
        artifact_location=artifact_location(cfg),
        tags={**run_tags(cfg), **owner_tags(), "task": task, "mlflow.parentRunId": parent.run_id},
        run_id=recorded_run_id(id_file) if resume and id_file.exists() else None,
    )
    if rank_zero_only.rank == 0:
        if resume and id_file.exists():
            logger.skip_logged_steps()
            logger.experiment.update_run(logger.run_id, status="RUNNING")  # it may have been marked KILLED
            for key, value in owner_tags().items():
                logger.experiment.set_tag(logger.run_id, key, value)
        task_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(logger.run_id)
    return logger


def run(cfg: DictConfig) -> Path:
    """Finetune and evaluate every selected task; returns the run directory."""
    tasks = superglue_tasks(cfg.task)
    if not Path(require_checkpoint(cfg)).exists():
        raise ConfigError(f"invalid value {cfg.model.init_from!r} for 'model.init_from': no such checkpoint")
    if cfg.resume not in (None, "auto"):
        raise ConfigError("a SuperGLUE sweep resumes per task: use resume=auto with its run_name")
    data_dir = superglue_data_dir(cfg, tasks)
    tokenizer = resolve_tokenizer(cfg)
    model_config = load_backbone(cfg, tokenizer)
    for task in tasks:
        length = cfg.superglue.tasks[task.lower()].max_seq_length
        if length > model_config.max_sequence_length:
            raise ConfigError(f"superglue.tasks.{task.lower()}.max_seq_length ({length}) exceeds the model's "
                              f"position table ({model_config.max_sequence_length})")
    # Every rank runs every task; launch() hands the run directory to the ranks Lightning starts.
    return launch(cfg, lambda cfg, run_dir, _: _run(cfg, tasks, data_dir, tokenizer, model_config, run_dir))


def _run(cfg: DictConfig, tasks: list[str], data_dir: Path, tokenizer: GLMTokenizer, model_config: GLMConfig,
         run_dir: Path) -> Path:
    is_zero = rank_zero_only.rank == 0
    tags = resume_config(cfg, run_dir, resuming=cfg.resume == "auto", checkpoint=sweep_checkpoint(run_dir))
    parent = mlflow_logger(cfg, run_dir, resume=cfg.resume == "auto") if cfg.logging.enabled else None
    for key, value in tags.items() if parent else ():
        parent.experiment.set_tag(parent.run_id, key, value)
    try:
        results = {task: run_task(cfg, task, data_dir, tokenizer, model_config, run_dir, parent)
                   for task in tasks}
        row = table_row(results)
        table = markdown_row(results, row)
        if is_zero:
            summary = json.dumps({"tasks": results, "table1": row}, indent=2)
            atomic_write_text(run_dir / "results.json", summary + "\n")
            atomic_write_text(run_dir / "table1.md", table + "\n")
        if parent:
            parent.log_metrics({**{f"{t}/{m}": v for t, ms in results.items() for m, v in ms.items()},
                                **{f"table1/{k}": v for k, v in row.items()}})
            for name in ("results.json", "table1.md", *(f"{t}.jsonl" for t in [*tasks, *DIAGNOSTICS])):
                if (run_dir / name).exists():
                    parent.experiment.log_artifact(parent.run_id, str(run_dir / name))
    except BaseException as error:
        if parent:
            parent.finalize(mlflow_status(error))
        raise
    if parent:
        parent.finalize(mlflow_status(None))
    if is_zero:
        print(table, flush=True)
        print(f"SuperGLUE average {100 * row['avg']:.1f} over {len(results)} task(s); outputs in {run_dir}"
              + (f"; MLflow run {parent.run_id} at {parent.tracking_uri}" if parent else ""), flush=True)
    return run_dir


def sweep_checkpoint(run_dir: Path) -> Path | None:
    """The newest readable checkpoint of any task of the sweep, whose recorded config a resumed sweep
    is checked against (each task verifies the checkpoint it continues from in full)."""
    found = sorted(run_dir.glob("*/checkpoints/*.ckpt"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    return next((path for path in found if checkpoint_problem(path, verify_content=False) is None), None)


def run_task(cfg: DictConfig, task: str, data_dir: Path, tokenizer: GLMTokenizer, model_config: GLMConfig,
             run_dir: Path, parent: RunLogger | None) -> dict[str, float]:
    """Finetune one task with best-epoch selection; returns its dev metrics (Table-1 names)."""
    tc, t, o = cfg.superglue.tasks[task.lower()], cfg.trainer, cfg.optim
    task_dir = run_dir / task
    result_file = task_dir / "result.json"
    if cfg.resume == "auto" and result_file.exists():  # finished before the sweep was interrupted
        return json.loads(result_file.read_text())["dev"]
    ckpt_path = resume_checkpoint(cfg, task_dir)
    check_resume(cfg, tokenizer, ckpt_path)
    L.seed_everything(cfg.seed, workers=True)
    micro = cfg.superglue.micro_batch_size or tc.batch_size
    epochs = task_epochs(cfg, task)
    (_, train_dir), (_, eval_dir) = task_folders(cfg, task, data_dir)
    wsc_mode = resolve_wsc_mode(cfg, train_dir) if task == "WSC" and cfg.superglue.head == "cloze" \
        else "candidates"
    if task == "WSC" and rank_zero_only.rank == 0 and cfg.superglue.head == "cloze":
        print(f"WSC: {wsc_mode} mode, pattern {task_pattern_id(tc, wsc_mode)}"
              + (" (no negative candidates in the data: the referent is generated, True iff greedy "
                 "decoding reproduces it)" if wsc_mode == "generative" else ""), flush=True)
    datamodule = SuperGLUEDataModule(
        task, eval_dir, tokenizer, pattern_id=task_pattern_id(tc, wsc_mode), max_seq_length=tc.max_seq_length,
        batch_size=micro, eval_batch_size=cfg.superglue.eval_batch_size, head=cfg.superglue.head,
        train_dir=train_dir, seed=cfg.seed, num_workers=cfg.data.num_workers, wsc_mode=wsc_mode,
        shared_context=cfg.superglue.shared_context,
    )
    datamodule.prepare_data()
    try:
        datamodule.setup()
    except ValueError as error:  # e.g. a verbalizer that this vocabulary splits into pieces
        raise ConfigError(f"{task}: {error}") from error
    accumulate = max(1, tc.batch_size // (micro * device_count(cfg)))
    batches = math.ceil(len(datamodule.encoded["train"]) / (micro * device_count(cfg)))
    steps = math.ceil(batches / accumulate)  # optimizer steps per epoch
    if rank_zero_only.rank == 0:
        print(f"{task}: {len(datamodule.encoded['train'])} training examples, {steps} steps per epoch x "
              f"{epochs} epochs = {steps * epochs} optimizer steps (global batch {tc.batch_size})"
              + (f"; {TRAINING_SET[task]}" if task in TRAINING_SET else ""), flush=True)
    module = GLMClozeModule(
        dataclasses.asdict(model_config), task=task, head=cfg.superglue.head, loss_func=tc.loss_func,
        length_penalty=tc.length_penalty, wsc_mode=wsc_mode, init_from=str(require_checkpoint(cfg)),
        **optimizer_settings(o),
    )
    metric = main_metric(task)
    checkpoint = ModelCheckpoint(dirpath=task_dir / "checkpoints", filename="best", monitor=f"val/{metric}",
                                 mode="max", save_top_k=1, save_last=False, enable_version_counter=False)
    start, last = StartStep(), LastCheckpoint(task_dir / "checkpoints" / "last.ckpt")
    resumed = ckpt_path is not None
    logger = child_logger(cfg, parent, run_dir.name, task, task_dir, resumed) if parent else None
    started = time.time()
    try:
        if logger:
            logger.log_hyperparams({"task": task, "head": cfg.superglue.head, "main_metric": metric,
                                    **{f"superglue.{k}": v for k, v in OmegaConf.to_container(tc).items()},
                                    "superglue.pattern_id": datamodule.pattern_id,
                                    "wsc_mode": wsc_mode, "shared_context": datamodule.shared_context,
                                    "epochs_run": epochs,
                                    "train_examples": len(datamodule.encoded["train"]),
                                    "val_examples": len(datamodule.encoded["val"])})
        trainer = L.Trainer(
            max_epochs=epochs, accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes,
            strategy=strategy(cfg), precision=t.precision,
            accumulate_grad_batches=accumulate,
            gradient_clip_val=o.clip_grad or None, check_val_every_n_epoch=1, num_sanity_val_steps=0,
            log_every_n_steps=min(t.log_every_n_steps, batches), default_root_dir=task_dir,
            logger=logger or False,
            callbacks=[checkpoint, last, start, throughput_monitor(), interruption_callback(),
                       RecordTokenizer(tokenizer_record(cfg, tokenizer)), RecordConfig(cfg), progress_bar()],
            enable_model_summary=False, plugins=[AtomicCheckpointIO()],
        )
        try:
            with warnings.catch_warnings():  # the datamodule restores the position the dataloader cannot
                warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended")
                trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=False)  # ours
        except SIGTERMException as stop:
            raise training_stopped(trainer, last.path, f"{task} ") from stop
        if trainer.is_global_zero:
            write_summary(task_dir / "summary.json", trainer, checkpoint, last.path, time.time() - started,
                          logger, start.step)
        dev = evaluate_best(cfg, task, datamodule, module, checkpoint.best_model_path, run_dir, logger)
    except BaseException as error:
        if logger:
            logger.finalize(mlflow_status(error))
        raise
    if logger:
        logger.finalize(mlflow_status(None))
    return dev


def strategy(cfg: DictConfig):
    """A fresh strategy object for each Trainer of the job (ddp/fsdp run the same on every rank)."""
    t = cfg.trainer
    check_accelerator(cfg)
    try:
        return build_strategy(t.strategy, accelerator=t.accelerator, precision=t.precision,
                              checkpoint_format=t.checkpoint_format,
                              collective_timeout_s=t.collective_timeout_s)
    except ValueError as error:
        raise ConfigError(f"trainer settings: {error}") from error


def evaluate_best(cfg: DictConfig, task: str, datamodule: SuperGLUEDataModule, module: GLMClozeModule,
                  best: str, run_dir: Path, logger: RunLogger | None) -> dict[str, float]:
    """Reload the best epoch; score the dev set (and FewGLUE dev32), write the test predictions.

    Every rank evaluates its part of each file: the metrics drop the repeats a distributed sampler
    adds and reduce over the ranks, and the predictions are gathered before rank 0 writes them."""
    t = cfg.trainer
    trainer = L.Trainer(accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes,
                        strategy=strategy(cfg), precision=t.precision, logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    names = TABLE1_METRICS[task]
    # The strategy reads the best epoch into the module, sharded or not; later calls keep it. Only its
    # weights are read, so the callbacks that wrote it are not needed (Lightning warns about them).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Be aware that when using `ckpt_path`, callbacks")
        scores = trainer.validate(module, dataloaders=datamodule.val_dataloader(), ckpt_path=best,
                                  verbose=False, weights_only=False)[0]
    dev = {name: float(scores[f"val/{name}"]) for name in names}
    metrics = {f"dev/{name}": value for name, value in dev.items()}
    if task == "WSC":  # a constant prediction is WSC's failure mode: show how often True is predicted
        predicted = predict(trainer, module, datamodule.val_dataloader())
        metrics["dev/predicted_true"] = sum(predicted.values()) / len(predicted)
    dev32 = Path(cfg.data.fewglue_dir or "") / task / "dev32.jsonl"
    if cfg.data.fewglue_dir and dev32.is_file():
        _, loader = datamodule.eval_loader(task, cfg.data.fewglue_dir, "dev32")
        scores = trainer.validate(module, dataloaders=loader, verbose=False)[0]
        metrics.update({f"dev32/{name}": float(scores[f"val/{name}"]) for name in names})
    files: dict[Path, list[dict]] = {}
    if cfg.superglue.test_predictions and datamodule.has_split("test"):
        predictions = predict(trainer, module, datamodule.predict_dataloader())
        files[run_dir / f"{task}.jsonl"] = leaderboard_rows(task, datamodule.examples["test"], predictions)
    if task == "RTE" and cfg.superglue.test_predictions:  # the diagnostics are scored by the RTE model
        for name in DIAGNOSTICS:
            if split_path(name, datamodule.data_dir, "test").is_file():
                examples, loader = datamodule.eval_loader(name, datamodule.data_dir, "test")
                files[run_dir / f"{name}.jsonl"] = leaderboard_rows(name, examples,
                                                                    predict(trainer, module, loader))
    if not trainer.is_global_zero:
        return dev
    written = [write_jsonl(path, rows) for path, rows in files.items()]
    result = {"task": task, "dev": dev, "metrics": metrics, "best_checkpoint": str(Path(best).resolve()),
              "predictions": [str(p) for p in written]}
    atomic_write_text(run_dir / task / "result.json", json.dumps(result, indent=2) + "\n")
    if logger:
        logger.log_metrics(metrics)
        for path in [*written, run_dir / task / "result.json"]:
            logger.experiment.log_artifact(logger.run_id, str(path))
    print(f"{task}: best epoch reloaded from {best}; "
          + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
    return dev

"""Pretraining job: tokenizer -> packed blank-infilling batches -> GLMPretrainModule on a Trainer."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, ThroughputMonitor
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig

from datamodules.builtin_corpus import write_builtin_corpus
from datamodules.builtin_probes import Probe, builtin_probes, read_probes
from datamodules.content_hash import content_hash
from datamodules.corpus import resolve_inputs
from datamodules.corpus_reader import iter_documents
from datamodules.mixture import SourceShareLogger
from datamodules.pretrain import PretrainDataModule, TooFewDocuments
from datamodules.shard_writer import default_num_proc
from experiments.interruption import INTERRUPTIONS, interruption_callback, mlflow_status, training_stopped
from experiments.lost_rank import RankWatch
from experiments.resume import RecordConfig, resume_config
from experiments.tokenizer_identity import check_tokenizer, tokenizer_record
from experiments.tracking import RunLogger, mlflow_logger, tracking_uri
from glm_lightning.atomic import atomic_copy, atomic_write_text
from glm_lightning.callbacks import LastCheckpoint, StartStep, SummaryWithoutFlops, progress_bar
from glm_lightning.checkpoint import TokenizerRecord, check_weights, load_glm
from glm_lightning.checkpoint_io import (
    AtomicCheckpointIO,
    RecordTokenizer,
    checkpoint_before,
    checkpoint_metadata,
    checkpoint_problem,
    newest_intact_checkpoint,
    recorded_tokenizer,
)
from glm_lightning.config import ConfigError, model_overrides, optimizer_settings
from glm_lightning.infilling_eval import evaluate_infilling
from glm_lightning.model import GLMConfig
from glm_lightning.modules.pretrain import GLMPretrainModule
from glm_lightning.parallel import build_strategy
from glm_lightning.tokenizer import GLMTokenizer, sentencepiece_settings, train_sentencepiece


def training_files(cfg: DictConfig) -> list[str]:
    """The configured corpus, or the built-in one written into the cache."""
    if cfg.data.train_files:
        return [str(p) for p in resolve_inputs(list(cfg.data.train_files))]
    return write_builtin_corpus(Path(cfg.data.cache_dir) / "builtin_corpus")


def build_tokenizer(cfg: DictConfig, files: list[str]) -> GLMTokenizer:
    """The official vocabulary at ``tokenizer.path``, or a sentencepiece model: the given one, or one
    trained on the training files once per (file contents, trainer settings) and cached under
    ``data.cache_dir``."""
    # Sentinel ablation: one [MASK{i}]/<|startofpiece{i}|> pair per span; a sample holds at most
    # int(mask_ratio * seq_length) + 1 spans (each masks at least one token).
    sentinels = int(cfg.data.mask_ratio * cfg.data.seq_length) + 1
    extra = {"num_sentinels": sentinels} if cfg.data.sentinel_tokens else {}
    kind, path = cfg.tokenizer.kind, cfg.tokenizer.path
    try:
        if kind == "wordpiece":
            return GLMTokenizer.from_wordpiece(path, **extra)
        if kind in ("gpt2", "roberta"):
            return GLMTokenizer.from_bpe(path, cfg.tokenizer.merges, kind=kind, **extra)
        if path:
            return GLMTokenizer.from_sentencepiece(path, **extra)
    except ValueError as error:  # a file of another kind of vocabulary, or no vocabulary at all
        raise ConfigError(f"tokenizer.path: {error} (tokenizer.kind={kind}; a BERT vocab.txt needs "
                          "tokenizer.kind=wordpiece, a GPT-2/RoBERTa vocab.json tokenizer.kind=gpt2 or "
                          "roberta with tokenizer.merges, a sentencepiece .model the default)") from None
    # trained on the documents the corpus reader extracts (no jsonl syntax); sentencepiece keeps
    # a uniform sample of at most 2M sentences in memory however large the corpus is
    options = {"input_sentence_size": 2_000_000, "shuffle_input_sentence": True,
               "model_type": cfg.tokenizer.model_type,
               "hard_vocab_limit": False}  # small corpora support fewer pieces
    # keyed by every trainer setting and the files' content hashes (remembered by size and mtime,
    # never by reading them whole): training is deterministic, so the key names one model
    settings = sentencepiece_settings(cfg.tokenizer.vocab_size, **options)
    digest = hashlib.sha256(f"{json.dumps(settings, sort_keys=True)};extracted documents".encode())
    for name in sorted(files):
        memo = Path(cfg.data.cache_dir) / "hashes"
        digest.update(content_hash(name, memo, rehash=cfg.data.rehash).encode())
    model_path = Path(cfg.data.cache_dir) / "tokenizers" / f"sp-{digest.hexdigest()[:16]}.model"
    if not model_path.exists():  # written whole or not at all, so a crash leaves no half model
        try:
            train_sentencepiece(sorted(files), cfg.tokenizer.vocab_size, str(model_path.with_suffix("")),
                                documents=iter_documents, **options)
        except RuntimeError as error:  # sentencepiece's own check, e.g. a vocabulary below the alphabet
            # its message after the source location, without its advice on its own command-line flags
            reason = str(error).rpartition("]")[2].partition(" Increase")[0].strip() or str(error)
            raise ConfigError(f"training a tokenizer on data.train_files with tokenizer.vocab_size="
                              f"{cfg.tokenizer.vocab_size} failed: {reason}") from None
    return GLMTokenizer.from_sentencepiece(str(model_path), **extra)


def build_datamodule(cfg: DictConfig, tokenizer: GLMTokenizer, files: list[str]) -> PretrainDataModule:
    d = cfg.data
    return PretrainDataModule(
        tokenizer, list(d.train_files) if d.train_weights else files, list(d.val_files),
        val_fraction=d.val_fraction, cache_dir=d.cache_dir, seq_length=d.seq_length,
        num_proc=d.num_proc or default_num_proc(), rehash=d.rehash,
        # a mixture keeps the entries as its sources; otherwise the resolved files are one corpus
        **({"train_weights": list(d.train_weights)} if d.train_weights else {}),
        batch_size=d.batch_size, num_workers=d.num_workers, seed=cfg.seed,
        span_prob=d.span_prob, sentence_prob=d.sentence_prob, document_prob=d.document_prob,
        mask_ratio=d.mask_ratio, poisson_lambda=d.poisson_lambda, max_span_length=d.max_span_length,
        shuffle_spans=d.shuffle_spans, block_positions=d.block_positions,
        sentinel_tokens=d.sentinel_tokens, masked_lm=d.masked_lm, task_masks=d.task_masks,
        whole_word_spans=d.whole_word_spans, single_span_prob=d.single_span_prob,
        gpt_infill_prob=d.gpt_infill_prob, gpt_min_ratio=d.gpt_min_ratio,
    )


def model_config_of(cfg: DictConfig, vocab_size: int) -> GLMConfig:
    """The GLMConfig of ``model.name`` with the run's overrides; impossible sizes are a ConfigError."""
    try:
        return GLMConfig.from_name(cfg.model.name, **model_overrides(cfg.model), vocab_size=vocab_size)
    except ValueError as error:  # e.g. a hidden size the heads do not divide
        raise ConfigError(f"invalid model settings (model.* over the {cfg.model.name} preset): "
                          f"{error}") from None


def check_accelerator(cfg: DictConfig) -> None:
    """Refuse a GPU accelerator on a machine without one (Lightning's own error is a traceback)."""
    accelerator = cfg.trainer.accelerator
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"invalid value {accelerator!r} for 'trainer.accelerator': this machine has no GPU "
                          "that PyTorch can use; set trainer.accelerator=auto or cpu")


def build_module(cfg: DictConfig, tokenizer: GLMTokenizer) -> GLMPretrainModule:
    model_config = model_config_of(cfg, len(tokenizer))
    if cfg.data.seq_length > model_config.max_sequence_length:
        raise ConfigError(f"data.seq_length ({cfg.data.seq_length}) exceeds the model's position table "
                          f"(model.max_sequence_length = {model_config.max_sequence_length})")
    check_init_from(cfg, model_config, tokenizer)
    return GLMPretrainModule(model_config, init_from=cfg.model.init_from, **optimizer_settings(cfg.optim))


def check_init_from(cfg: DictConfig, model_config: GLMConfig, tokenizer: GLMTokenizer) -> None:
    """Fail now, in one line, when ``model.init_from`` does not fit the configured model or was
    trained with another tokenizer; the module loads it later, once sharded (reading shapes only,
    so this costs no memory)."""
    if cfg.model.init_from:
        try:
            stored = check_weights(model_config, cfg.model.init_from)
        except (ValueError, FileNotFoundError) as error:
            raise ConfigError(f"model.init_from: {error}") from error
        check_tokenizer(cfg, tokenizer, "model.init_from", cfg.model.init_from, stored.tokenizer)


def check_resume(cfg: DictConfig, tokenizer: GLMTokenizer, ckpt_path: str | None) -> None:
    """Refuse, in one line, to resume from a checkpoint trained with another tokenizer."""
    if ckpt_path is not None:
        check_tokenizer(cfg, tokenizer, "resume", ckpt_path, recorded_tokenizer(ckpt_path))


RUN_DIR_VARIABLE = "GLM_LIGHTNING_RUN_DIR"  # inherited by the processes Lightning launches


def run_directory(cfg: DictConfig) -> Path:
    """``<output_dir>/<exp>/<run_name>``; without a run name a new timestamped run (``-2``, ``-3``,
    ... after the time when runs start within one second), or with ``resume=auto`` the most
    recently active run of the experiment (one killed before its first checkpoint included: it has
    its ``config.yaml``)."""
    root = Path(cfg.output_dir) / cfg.exp
    if cfg.run_name:
        return root / cfg.run_name
    if cfg.resume == "auto" and root.is_dir():
        runs = {run: last_activity(run) for run in root.iterdir() if run.is_dir()}
        runs = {run: when for run, when in runs.items() if when is not None}
        if runs:
            return max(runs, key=runs.get)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir, n = root / stamp, 1
    while run_dir.exists():
        n += 1
        run_dir = root / f"{stamp}-{n}"
    return run_dir


def last_activity(run_dir: Path) -> float | None:
    """When the run last wrote its config or a checkpoint (None: not a run folder)."""
    files = [run_dir / "config.yaml", *(run_dir / "checkpoints").glob("*.ckpt")]
    times = [path.stat().st_mtime for path in files if path.exists()]
    return max(times, default=None)


def throughput_monitor() -> ThroughputMonitor:
    """Samples, tokens and FLOPs per second (and MFU on accelerators whose peak Lightning knows)."""
    return ThroughputMonitor(batch_size_fn=lambda batch: batch["input_ids"].shape[0],
                             length_fn=lambda batch: batch["input_ids"].numel())


def resume_checkpoint(cfg: DictConfig, run_dir: Path) -> str | None:
    """``resume=auto``: the run's newest intact checkpoint, if any (a broken one is skipped with a
    warning); ``resume=PATH``: that checkpoint, if intact. Starting afresh in a run directory that
    has checkpoints is refused, so nothing is overwritten, unless ``overwrite=true``: then its
    checkpoints are removed first."""
    last = run_dir / "checkpoints" / "last.ckpt"
    if cfg.resume is None:
        if any(last.parent.glob("*.ckpt")):
            if not cfg.overwrite:
                raise ConfigError(f"{run_dir} already has checkpoints; continue it with resume=auto, "
                                  "choose another run_name, or replace it with overwrite=true")
            if rank_zero_only.rank == 0:
                shutil.rmtree(last.parent)
        return None
    if cfg.resume == "auto":  # the newest checkpoint an interrupted save did not break
        found, broken = newest_intact_checkpoint(last.parent)
        if broken and found is None:
            raise ConfigError(f"resume=auto: no intact checkpoint in {last.parent}: {'; '.join(broken)}")
        if broken and rank_zero_only.rank == 0:
            print(f"warning: resume=auto skips {'; '.join(broken)}; resuming from {found}", file=sys.stderr)
        if rank_zero_only.rank == 0:
            print(f"resume=auto: {resume_finding(run_dir, found)}", flush=True)
        return None if found is None else str(found)
    problem = checkpoint_problem(cfg.resume)  # a file, or a folder for sharded checkpoints
    if problem:
        raise ConfigError(f"invalid value {cfg.resume!r} for 'resume': {problem}")
    return cfg.resume


def resume_finding(run_dir: Path, checkpoint: Path | None) -> str:
    """What ``resume=auto`` found in ``run_dir``, as it is said before the run starts."""
    if checkpoint is not None:
        step = checkpoint_metadata(checkpoint).get("global_step", "?")
        return f"continuing {run_dir} from {checkpoint} (step {step})"
    if (run_dir / "config.yaml").exists():
        return f"{run_dir} has no checkpoint (it stopped before its first one); starting it again from step 0"
    return f"no earlier run at {run_dir}; starting it"


def run(cfg: DictConfig) -> Path:
    """Pretrain as configured; returns the run directory (config, checkpoints)."""
    L.seed_everything(cfg.seed, workers=True)
    return launch(cfg, _run)


def launch(cfg: DictConfig, body: Callable[[DictConfig, Path, Strategy | str], Path]) -> Path:
    """Resolve the strategy and the run directory, then run ``body(cfg, run_dir, strategy)``.

    Under ddp/fsdp on one machine Lightning starts the other ranks by running the same command
    again; without a run name they find the run directory through the environment they inherit.
    """
    t = cfg.trainer
    check_accelerator(cfg)
    try:
        strategy = build_strategy(t.strategy, accelerator=t.accelerator, precision=t.precision,
                                  checkpoint_format=t.checkpoint_format,
                                  collective_timeout_s=t.collective_timeout_s)
    except ValueError as error:  # an unsupported combination of trainer settings
        raise ConfigError(f"trainer settings: {error}") from error
    if cfg.logging.enabled:  # an MLflow store that cannot be used fails the run before it writes anything
        tracking_uri(cfg)
    # A named run is found by its name; only a timestamped one needs the inherited directory.
    inherited = None if cfg.run_name else os.environ.get(RUN_DIR_VARIABLE)
    run_dir = Path(inherited) if inherited else run_directory(cfg)
    os.environ[RUN_DIR_VARIABLE] = str(run_dir)
    try:
        return body(cfg, run_dir, strategy)
    finally:
        if not inherited:
            del os.environ[RUN_DIR_VARIABLE]


def _run(cfg: DictConfig, run_dir: Path, strategy: Strategy | str) -> Path:
    ckpt_path = resume_checkpoint(cfg, run_dir)
    tags = resume_config(cfg, run_dir, resuming=ckpt_path is not None, checkpoint=ckpt_path)
    files = training_files(cfg)
    tokenizer = build_tokenizer(cfg, files)
    check_resume(cfg, tokenizer, ckpt_path)
    if rank_zero_only.rank == 0 and cfg.tokenizer.kind == "sentencepiece":
        # Beside the checkpoints, so that the run is usable on its own (generation, finetuning).
        atomic_copy(tokenizer.backend.path, run_dir / "tokenizer.model")
    datamodule = build_datamodule(cfg, tokenizer, files)
    datamodule.prepare_data()  # tokenize (or find the cache) now: bad input fails before a run starts
    try:
        datamodule.setup("fit")
    except TooFewDocuments as error:
        raise ConfigError(f"data.train_files: {error.args[0].partition(';')[0]}; set data.val_files to "
                          "held-out text or data.val_fraction=0, or give more documents (a text file is "
                          "one document unless form feeds or WikiText headings split it; a .jsonl file "
                          "holds one per line)") from None
    probes = held_out_probes(cfg)  # a bad probe file fails before training
    module = build_module(cfg, tokenizer)
    run = fit(cfg, run_dir, strategy, module, datamodule, ckpt_path, tags, tokenizer_record(cfg, tokenizer))
    if run.trainer.is_global_zero:
        print(result_line(run.summary, run.logger))
        if probes:  # show what the model learned about the world of its corpus
            try:
                print(held_out_infilling(cfg, run, module, tokenizer, probes, run_dir / "summary.json"))
            except INTERRUPTIONS:  # Lightning ended the MLflow run FINISHED, before these metrics
                if run.logger:
                    run.logger.experiment.set_terminated(run.logger.run_id, "KILLED")
                raise
    return run_dir


def held_out_probes(cfg: DictConfig) -> list[Probe]:
    """The infilling probes scored after training: ``data.probe_file``'s, else the built-in world's
    when training on the built-in corpus, else none."""
    if cfg.data.probe_file:
        try:
            return read_probes(cfg.data.probe_file)
        except ValueError as error:
            raise ConfigError(f"data.probe_file: {error}") from None
    return [] if cfg.data.train_files else builtin_probes()


def held_out_infilling(cfg: DictConfig, run: FittedRun, module: GLMPretrainModule, tokenizer: GLMTokenizer,
                       probes: list[Probe], summary_path: Path) -> str:
    """Greedy infilling accuracy on the held-out probes and the most-frequent-answer baseline,
    overall, per relation and per answer length (``InfillingResult.metrics``), added to the summary
    and the MLflow run; the lines to print. The masked-LM ablation is scored with one [MASK] per
    answer token, the sentinel one with Part B at its trained position (``infilling_eval``)."""
    if run.trainer.world_size == 1:
        model = module.model
    else:  # the weights of rank zero's module may be a shard: read the saved ones
        last = Path(run.summary["last_checkpoint"])
        if not last.is_file():
            return f"held-out infilling not evaluated: {last} is a sharded checkpoint"
        model = load_glm(last)
    part_b_position = cfg.data.seq_length if cfg.data.sentinel_tokens else None
    result = evaluate_infilling(model, tokenizer, probes, masked_lm=cfg.data.masked_lm,
                                part_b_position=part_b_position)
    metrics = result.metrics()
    run.summary["metrics"].update(metrics)
    atomic_write_text(summary_path, json.dumps(run.summary, indent=2) + "\n")
    if run.logger:
        for name, value in metrics.items():
            run.logger.experiment.log_metric(run.logger.run_id, name, value, step=run.summary["global_step"])
        run.logger.experiment.log_artifact(run.logger.run_id, str(summary_path))
    what = (f"{len(probes)} probes of {cfg.data.probe_file}" if cfg.data.probe_file else
            f"{len(probes)} facts of the built-in world, in phrasings its corpus never uses for them")
    how = ("one [MASK] per answer token, the masked-LM baseline's exact match" if cfg.data.masked_lm
           else "greedy exact match")
    lines = [f"held-out infilling ({what}): {how} {result.accuracy:.1%}, most-frequent-answer baseline "
             f"{result.baseline:.1%}"]
    for fill in result.examples(3):
        mark = "right" if fill.correct else f"wrong, the answer is {fill.answer!r}"
        lines.append(f"  {fill.text}  ->  {fill.prediction!r} ({mark})")
    return "\n".join(lines)


@dataclass
class FittedRun:
    """What ``fit`` leaves for a job to report or evaluate further."""

    trainer: L.Trainer
    checkpoint: ModelCheckpoint  # best by val/loss
    logger: RunLogger | None
    summary: dict | None  # summary.json (rank 0 only)


def fit(cfg: DictConfig, run_dir: Path, strategy: Strategy | str, module: L.LightningModule,
        datamodule: L.LightningDataModule, ckpt_path: str | None, tags: dict[str, str],
        tokenizer: TokenizerRecord) -> FittedRun:
    """Train ``module`` with the run's checkpoints (``tokenizer`` recorded in each), MLflow run (``tags``
    added) and interruption handling:
    the MLflow run never stays RUNNING, Ctrl-C/SIGTERM become ``RunInterrupted`` after saving
    ``last.ckpt``, and ``summary.json`` is written however training ends."""
    t = cfg.trainer
    checkpoints = run_dir / "checkpoints"
    checkpoint = ModelCheckpoint(dirpath=checkpoints, filename="step{step}", auto_insert_metric_name=False,
                                 monitor="val/loss", mode="min", save_last=False,
                                 enable_version_counter=False)  # last.ckpt: LastCheckpoint's
    last, start = LastCheckpoint(checkpoints / "last.ckpt"), StartStep()
    watch = RankWatch(run_dir / ".ranks")  # names a rank lost mid-run
    logger = mlflow_logger(cfg, run_dir, resume=ckpt_path is not None) if cfg.logging.enabled else None
    try:
        trainer = L.Trainer(
            max_steps=t.max_steps, accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes,
            strategy=strategy, precision=t.precision, accumulate_grad_batches=t.accumulate_grad_batches,
            gradient_clip_val=cfg.optim.clip_grad or None, val_check_interval=t.val_check_interval,
            check_val_every_n_epoch=None, limit_val_batches=t.limit_val_batches,
            log_every_n_steps=t.log_every_n_steps, default_root_dir=run_dir, logger=logger or False,
            plugins=[AtomicCheckpointIO()],
            callbacks=[checkpoint, last, start, throughput_monitor(), interruption_callback(),
                       RecordTokenizer(tokenizer), RecordConfig(cfg), watch, *mixture_callbacks(datamodule),
                       progress_bar(), SummaryWithoutFlops()],
        )
        if logger:
            logger.experiment.log_artifact(logger.run_id, str(run_dir / "config.yaml"))
            for key, value in tags.items():
                logger.experiment.set_tag(logger.run_id, key, value)
    except BaseException as error:
        if logger:
            logger.finalize(mlflow_status(error))  # never leave the MLflow run RUNNING
        raise
    started = time.time()
    try:
        with warnings.catch_warnings():
            if hasattr(datamodule, "load_state_dict"):  # it restores its sample order itself
                warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended")
            # our own checkpoints, which also hold RNG states and the data position
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=False)
    except SIGTERMException as stop:
        raise training_stopped(trainer, last.path) from stop
    except FloatingPointError as error:
        if ckpt_path is None or last.saved_step >= 0:
            raise
        raise diverged_after_resume(error, Path(ckpt_path)) from error
    except Exception as error:
        if watch.lost:
            raise watch.error(trainer.global_step, last.path) from error
        raise
    finally:
        if trainer.is_global_zero:
            summary = write_summary(run_dir / "summary.json", trainer, checkpoint, last.path,
                                    time.time() - started, logger, start.step)
    return FittedRun(trainer, checkpoint, logger, summary if trainer.is_global_zero else None)


def diverged_after_resume(error: FloatingPointError, resumed_from: Path) -> FloatingPointError:
    """The error of a non-finite loss before a resumed run wrote any checkpoint: the checkpoint it
    resumed from is the suspect (resuming from it again would fail again), so name it and the one
    before it."""
    before = checkpoint_before(resumed_from) if resumed_from.is_file() else None
    advice = (f"continue from the checkpoint before it with resume={before}" if before else
              "there is no checkpoint before it: start afresh under another run_name")
    what = str(error).partition(";")[0]
    return FloatingPointError(f"{what}, after resuming from {resumed_from} and before any newer checkpoint: "
                              f"that checkpoint may hold damaged weights; {advice}")


def mixture_callbacks(datamodule: L.LightningDataModule) -> list[L.Callback]:
    """The per-source token share logger when the training data is a weighted mixture."""
    weights = getattr(datamodule, "train_weights", None)
    if not weights:
        return []
    return [SourceShareLogger([Path(str(entry)).name for entry in datamodule.train_files])]


def result_line(summary: dict, logger: RunLogger | None) -> str:
    """One line saying what the run reached and where to find it."""
    metrics, steps, new = summary["metrics"], summary["global_step"], summary["steps_this_run"]
    if new == 0 and steps:
        line = f"already finished: {steps} steps, nothing left to train"
    else:
        resumed = f" ({new} in this run, resumed at {steps - new})" if new < steps else ""
        line = f"finished {steps} steps{resumed} in {summary['seconds']:.0f} s"
    if "val/loss" in metrics:
        line += f"; val/loss {metrics['val/loss']:.3f}"
    if "val/unigram_baseline" in metrics:
        line += f" (unigram baseline {metrics['val/unigram_baseline']:.3f})"
    line += f"; checkpoints in {Path(summary['last_checkpoint']).parent}"
    if logger:
        line += f"; MLflow run {logger.run_id} at {logger.tracking_uri}"
    return line


def write_summary(path: Path, trainer: L.Trainer, checkpoint: ModelCheckpoint, last_checkpoint: Path,
                  seconds: float, logger: RunLogger | None, start_step: int | None = None) -> dict:
    """What a run reached, as JSON beside its checkpoints (and an MLflow artifact). The best
    checkpoint is the best by ``monitor`` (``best_score`` is that metric's value); paths are
    absolute; ``steps_this_run`` counts the steps trained by this process (``start_step``: where
    it started; None = nothing was left to train)."""
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    summary = {
        "status": trainer.state.status.value,
        "global_step": trainer.global_step,
        "steps_this_run": trainer.global_step - (trainer.global_step if start_step is None else start_step),
        "seconds": round(seconds, 1),
        "monitor": checkpoint.monitor,
        "best_score": None if checkpoint.best_model_score is None else float(checkpoint.best_model_score),
        "best_checkpoint": str(Path(best).resolve()) if (best := checkpoint.best_model_path) else None,
        "last_checkpoint": str(Path(last_checkpoint).resolve()),
        "metrics": metrics,
    }
    atomic_write_text(path, json.dumps(summary, indent=2) + "\n")
    if logger:  # checkpoints by reference: copying them into the artifact store would double the disk
        logger.experiment.log_artifact(logger.run_id, str(path))
        for key in ("best_checkpoint", "last_checkpoint"):
            if summary[key]:
                logger.experiment.set_tag(logger.run_id, key, summary[key])
    return summary

"""Seq2seq finetuning job: jsonl pairs -> GLMSeq2SeqModule on a Trainer -> ROUGE and predictions.

Runs like the pretraining job (run directory, resume, MLflow, checkpoints, summary) and reuses its
helpers; what differs is the data, the module and an optional test pass over ``test.jsonl``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning as L
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig

from datamodules.seq2seq import Seq2SeqDataModule, read_jsonl
from experiments.jobs.pretrain import (
    build_tokenizer,
    check_init_from,
    check_resume,
    fit,
    launch,
    model_config_of,
    result_line,
    resume_checkpoint,
)
from experiments.resume import resume_config
from experiments.tokenizer_identity import tokenizer_record
from glm_lightning.atomic import atomic_copy, atomic_write_text
from glm_lightning.config import ConfigError, optimizer_settings
from glm_lightning.modules.seq2seq import GLMSeq2SeqModule
from glm_lightning.tokenizer import GLMTokenizer


def tokenizer_text(cfg: DictConfig) -> list[str]:
    """Sources and targets of train.jsonl as plain text (one file in the cache), for training a
    sentencepiece model when no ``tokenizer.path`` is given."""
    train = Path(cfg.data.dir) / "train.jsonl"
    text = "".join(f"{e['source']}\n{e['target']}\n" for e in read_jsonl(train))
    path = Path(cfg.data.cache_dir) / "seq2seq_text" / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.txt"
    if not path.exists():
        atomic_write_text(path, text)
    return [str(path)]


def build_module(cfg: DictConfig, tokenizer: GLMTokenizer, run_dir: Path) -> GLMSeq2SeqModule:
    model_config = model_config_of(cfg, len(tokenizer))
    s = cfg.seq2seq
    # Part B positions run to tgt_length and decoding to max_new_tokens; both index the block table.
    needed = max(s.src_length, s.tgt_length, cfg.generation.max_new_tokens)
    if needed > model_config.max_sequence_length:
        raise ConfigError(f"seq2seq.src_length / tgt_length / generation.max_new_tokens ({needed}) "
                          "exceed the model's position table "
                          f"(model.max_sequence_length = {model_config.max_sequence_length})")
    check_init_from(cfg, model_config, tokenizer)
    return GLMSeq2SeqModule(
        model_config, tokenizer, label_smoothing=s.label_smoothing, generation=dict(cfg.generation),
        predictions_dir=str(run_dir / "predictions"), init_from=cfg.model.init_from,
        **optimizer_settings(cfg.optim),
    )


def run(cfg: DictConfig) -> Path:
    """Finetune as configured (then test on test.jsonl if present); returns the run directory."""
    if not cfg.data.dir:
        raise ConfigError("'data.dir' is not set; it must name a folder with train.jsonl and val.jsonl")
    if not Path(cfg.data.dir).is_dir():
        raise ConfigError(f"invalid value {cfg.data.dir!r} for 'data.dir': no such folder")
    L.seed_everything(cfg.seed, workers=True)
    return launch(cfg, _run)


def _run(cfg: DictConfig, run_dir: Path, strategy: Strategy | str) -> Path:
    ckpt_path = resume_checkpoint(cfg, run_dir)
    tags = resume_config(cfg, run_dir, resuming=ckpt_path is not None, checkpoint=ckpt_path)
    tokenizer = build_tokenizer(cfg, [] if cfg.tokenizer.path else tokenizer_text(cfg))
    check_resume(cfg, tokenizer, ckpt_path)
    if rank_zero_only.rank == 0 and cfg.tokenizer.kind == "sentencepiece":
        atomic_copy(tokenizer.backend.path, run_dir / "tokenizer.model")
    s, d = cfg.seq2seq, cfg.data
    datamodule = Seq2SeqDataModule(tokenizer, d.dir, src_length=s.src_length, tgt_length=s.tgt_length,
                                   task_mask=s.task_mask, prompt=s.prompt, batch_size=d.batch_size,
                                   num_workers=d.num_workers, seed=cfg.seed)
    datamodule.prepare_data()  # bad input fails before a run starts
    module = build_module(cfg, tokenizer, run_dir)
    run = fit(cfg, run_dir, strategy, module, datamodule, ckpt_path, tags, tokenizer_record(cfg, tokenizer))
    trainer, logger = run.trainer, run.logger
    if datamodule.split_path("test").exists():  # scored with the best checkpoint by val/loss
        best = "best" if run.checkpoint.best_model_path else None
        test_metrics = trainer.test(module, datamodule=datamodule, ckpt_path=best)
        if trainer.is_global_zero:
            path = run_dir / "test_metrics.json"
            atomic_write_text(path, json.dumps(test_metrics[0], indent=2) + "\n")
            if logger:
                logger.experiment.log_artifact(logger.run_id, str(path))
    if trainer.is_global_zero:
        line = result_line(run.summary, logger)
        rouge = [f"{k} {run.summary['metrics'][f'val/{k}']:.3f}" for k in ("rouge1", "rouge2", "rougeL")
                 if f"val/{k}" in run.summary["metrics"]]
        print(line + (f"; val {', '.join(rouge)}" if rouge else ""))
    return run_dir

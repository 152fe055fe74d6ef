"""The files and folders a job will read, checked before anything else runs.

A missing checkpoint, corpus or data folder is reported before the settings are printed and before
Lightning, torch or a model is loaded, and every missing path at once, one line each, so a run on a
busy machine does not spend a minute of start-up to report one problem, then the next.
"""

from __future__ import annotations

import glob
import re
import textwrap
from collections.abc import Iterator
from pathlib import Path

from omegaconf import DictConfig

from glm_lightning.config import superglue_tasks

# The path settings each job reads (the jobs of experiments.jobs.JOBS).
TOKENIZER_FILES = ("tokenizer.path", "tokenizer.merges")
PATH_KEYS: dict[str, tuple[str, ...]] = {
    "pretrain": ("resume", "model.init_from", *TOKENIZER_FILES, "data.train_files", "data.val_files",
                 "data.probe_file"),
    "prepare_data": (*TOKENIZER_FILES, "data.train_files", "data.val_files"),
    "seq2seq": ("resume", "model.init_from", *TOKENIZER_FILES, "data.dir"),
    "superglue": ("resume", "model.init_from", *TOKENIZER_FILES, "data.superglue_dir", "data.fewglue_dir",
                  "data.wsc_negatives"),
    "generate": ("model.init_from", *TOKENIZER_FILES),
    "lm_eval": ("model.init_from", *TOKENIZER_FILES, "lm_eval.file"),
    "harness": ("model.init_from", *TOKENIZER_FILES, "harness.include_path"),
    "ablations": ("data.train_files", "data.superglue_dir", "lm_eval.file", "data.probe_file"),
}
# Jobs that read the sentencepiece model a pretraining run keeps beside its checkpoints
# (experiments.jobs.generate.resolve_tokenizer) when no tokenizer.path is given.
RUN_TOKENIZER_JOBS = ("generate", "lm_eval", "superglue", "harness")
RUN_TOKENIZER = "tokenizer.model"
HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # glm_lightning.checkpoint.HUB_REPO_ID
GLOB_CHARS = "*?["
MODEL_SIZES = ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "max_sequence_length")


def missing_inputs(cfg: DictConfig) -> list[str]:
    """One line per path of ``cfg`` that its job will read and that does not exist, naming the key."""
    return [f"{key}: {problem}" for key, problem in _problems(cfg)]


def _problems(cfg: DictConfig) -> Iterator[tuple[str, str]]:
    for key in PATH_KEYS.get(cfg.job, ()):
        value = _select(cfg, key)
        if value is None or (key == "resume" and value == "auto"):
            continue
        for path in [value] if isinstance(value, str) else list(value):
            problem = _missing(str(path), key)
            if problem:
                yield key, problem
    yield from _run_tokenizer(cfg)
    yield from _superglue_splits(cfg)


def _select(cfg: DictConfig, key: str) -> object:
    section, _, name = key.rpartition(".")
    node = cfg
    for part in filter(None, section.split(".")):
        node = node[part]
    return node[name]


def _missing(path: str, key: str) -> str | None:
    """Why ``path`` (a file or folder; a glob for corpus keys) cannot be read, or None."""
    if any(char in path for char in GLOB_CHARS) and key in ("data.train_files", "data.val_files"):
        return None if glob.glob(path, recursive=True) else f"{path} matches no files"
    if Path(path).exists():
        return None
    if key == "model.init_from" and HUB_REPO_ID.match(path):
        return None  # a Hugging Face repo id, downloaded by the job
    return f"{path} does not exist"


def _run_tokenizer(cfg: DictConfig) -> Iterator[tuple[str, str]]:
    """The ``<run>/tokenizer.model`` beside a ``<run>/checkpoints/*.ckpt`` that the job will read."""
    init_from = cfg.model.init_from
    if (cfg.job not in RUN_TOKENIZER_JOBS or not init_from or cfg.tokenizer.path
            or cfg.tokenizer.kind != "sentencepiece"):
        return
    checkpoint = Path(init_from)
    candidate = checkpoint.resolve().parent.parent / RUN_TOKENIZER
    if checkpoint.is_file() and checkpoint.parent.name == "checkpoints" and not candidate.is_file():
        yield "tokenizer.path", f"not set, and the run of {init_from} has no {RUN_TOKENIZER} ({candidate})"


def _superglue_splits(cfg: DictConfig) -> Iterator[tuple[str, str]]:
    """The train and val files of every selected task, in the existing SuperGLUE folders (the job
    reads ``<dir>/<Task>/<split>.jsonl``, ``datamodules.superglue.split_path``)."""
    if cfg.job != "superglue" or not cfg.data.superglue_dir:
        return
    for task in superglue_tasks(cfg.task):
        train = ("data.fewglue_dir", cfg.data.fewglue_dir) if cfg.data.fewglue_dir else \
            ("data.superglue_dir", cfg.data.superglue_dir)
        folders = [train, ("data.superglue_dir", cfg.data.superglue_dir)]
        if task == "WSC" and cfg.data.wsc_negatives:
            folders = [("data.wsc_negatives", cfg.data.wsc_negatives)] * 2
        for (key, folder), split in zip(folders, ("train", "val"), strict=True):
            path = split_file(folder, task, split)
            if Path(folder).is_dir() and not path.is_file():
                yield key, f"{path} does not exist ({task} needs its {split} split)"


def split_file(folder: str | Path, task: str, split: str) -> Path:
    """``<folder>/<Task>/<split>.jsonl``: the layout of the official SuperGLUE archive."""
    return Path(folder) / task / f"{split}.jsonl"


def loads_tokenizer(cfg: DictConfig) -> bool:
    """Whether the job reads a tokenizer rather than training one: then ``tokenizer.vocab_size`` and
    ``tokenizer.model_type`` (settings of training) are not used and are left out of the settings."""
    return (cfg.job in RUN_TOKENIZER_JOBS or bool(cfg.tokenizer.path)
            or cfg.tokenizer.kind != "sentencepiece")


def checkpoint_settings(cfg: DictConfig) -> list[str]:
    """For the jobs that take their model (and tokenizer) from ``model.init_from``: its sizes, and the
    tokenizer saved beside it, as printed with the settings; nothing when there is no checkpoint or it
    cannot be read (the job then says why)."""
    if cfg.job not in RUN_TOKENIZER_JOBS or not cfg.model.init_from:
        return []
    from glm_lightning.checkpoint import checkpoint_config, read_checkpoint  # imports torch

    try:
        stored = read_checkpoint(cfg.model.init_from)
        model = checkpoint_config(stored, cfg.model.num_attention_heads)
    except (OSError, ValueError, RuntimeError):
        return []
    sizes = " ".join(f"{key}={getattr(model, key)}" for key in MODEL_SIZES)
    lines = [f"model (from model.init_from, {stored.layout}): {sizes}"]
    checkpoint = Path(cfg.model.init_from)
    beside = checkpoint.resolve().parent.parent / RUN_TOKENIZER
    if not cfg.tokenizer.path and cfg.tokenizer.kind == "sentencepiece" and beside.is_file():
        import sentencepiece

        pieces = sentencepiece.SentencePieceProcessor(model_file=str(beside)).get_piece_size()
        lines.append(f"tokenizer (the run's, beside the checkpoint): {beside} ({pieces} pieces)")
    return [textwrap.fill(line, width=110, subsequent_indent="    ", break_long_words=False,
                          break_on_hyphens=False) for line in lines]

"""The files and folders a job will read, checked before anything else runs.

A missing checkpoint, corpus or data folder is reported before the settings are printed and before
Lightning, torch or a model is loaded, and every missing path at once, one line each, so a run on a
busy machine does not spend a minute of start-up to report one problem, then the next.
"""

from __future__ import annotations

import glob
import re
from collections.abc import Iterator
from pathlib import Path

from omegaconf import DictConfig

from glm_lightning.config import superglue_tasks

# The path settings each job reads (the jobs of experiments.jobs.JOBS).
TOKENIZER_FILES = ("tokenizer.path", "tokenizer.merges")
PATH_KEYS: dict[str, tuple[str, ...]] = {
    "pretrain": ("resume", "model.init_from", *TOKENIZER_FILES, "data.train_files", "data.val_files"),
    "prepare_data": (*TOKENIZER_FILES, "data.train_files", "data.val_files"),
    "seq2seq": ("resume", "model.init_from", *TOKENIZER_FILES, "data.dir"),
    "superglue": ("resume", "model.init_from", *TOKENIZER_FILES, "data.superglue_dir", "data.fewglue_dir",
                  "data.wsc_negatives"),
    "generate": ("model.init_from", *TOKENIZER_FILES),
    "lm_eval": ("model.init_from", *TOKENIZER_FILES, "lm_eval.file"),
    "ablations": ("data.train_files", "data.superglue_dir", "lm_eval.file"),
}
# Jobs that read the sentencepiece model a pretraining run keeps beside its checkpoints
# (experiments.jobs.generate.resolve_tokenizer) when no tokenizer.path is given.
RUN_TOKENIZER_JOBS = ("generate", "lm_eval", "superglue")
RUN_TOKENIZER = "tokenizer.model"
HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # glm_lightning.checkpoint.HUB_REPO_ID
GLOB_CHARS = "*?["


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

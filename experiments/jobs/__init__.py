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
    "harness": "experiments.jobs.harness:run",
    "seq2seq": "experiments.jobs.seq2seq:run",
    "superglue": "experiments.jobs.superglue:run",
    "ablations": "experiments.jobs.ablations:run",
    "prepare_data": "experiments.jobs.prepare_data:run",
}


# What each job reads from the config: whole sections or dotted keys. The command line prints these
# before a run (experiments.config.config_summary); print_config=true prints everything.
SECTIONS: dict[str, tuple[str, ...]] = {
    "pretrain": ("resume", "resume_overrides", "model", "tokenizer", "data", "optim", "trainer", "logging"),
    "generate": ("model.init_from", "tokenizer", "generation", "prompts", "trainer.accelerator"),
    "lm_eval": ("model.init_from", "tokenizer", "lm_eval", "data.batch_size", "data.task_masks", "logging"),
    "harness": ("model.init_from", "tokenizer", "harness", "lm_eval.max_length", "lm_eval.stride",
                "data.batch_size", "data.task_masks", "trainer.accelerator", "logging"),
    "seq2seq": ("resume", "resume_overrides", "model", "tokenizer", "data.dir", "data.batch_size",
                "data.num_workers", "seq2seq", "generation", "optim", "trainer", "logging"),
    "superglue": ("resume", "resume_overrides", "task", "model.init_from", "model.activation_checkpointing",
                  "model.attention", "model.compile", "model.embedding_dropout_prob",
                  "model.attention_dropout_prob", "model.output_dropout_prob", "tokenizer",
                  "data.superglue_dir", "data.fewglue_dir", "data.wsc_negatives", "data.num_workers",
                  "superglue", "optim", "trainer.accelerator", "trainer.devices", "trainer.num_nodes",
                  "trainer.strategy", "trainer.precision", "trainer.log_every_n_steps", "logging"),
    "prepare_data": ("tokenizer", "data.train_files", "data.val_files", "data.cache_dir", "data.num_proc",
                     "data.rehash"),
    "ablations": ("scale", "ablations.variants", "ablations.baseline", "ablations.seeds",
                  "ablations.pretrain", "ablations.finetune", "ablations.lm_eval", "data.train_files",
                  "data.superglue_dir", "lm_eval.file", "task", "logging"),
}


def get_job(name: str) -> Callable[[DictConfig], object]:
    """Import and return the function registered for job `name`."""
    if name not in JOBS:
        raise KeyError(f"unknown job {name!r}; valid choices: {', '.join(JOBS)}")
    module_name, _, function_name = JOBS[name].partition(":")
    return getattr(importlib.import_module(module_name), function_name)

"""exp=prepare_data: tokenize the configured corpus into the cache ahead of training.

It builds the tokenizer exactly as the pretraining job does (the same config gives the same
tokenizer and the same shards), tokenizes ``data.train_files`` and ``data.val_files`` with
``data.num_proc`` processes and a progress bar, and ends with one summary line. A training run
with the same data and tokenizer settings then finds every shard in ``data.cache_dir`` and reads
no text (file content hashes are remembered by size and mtime).
"""

from __future__ import annotations

from omegaconf import DictConfig

from datamodules.corpus import PrepareReport, tokenize_corpus
from datamodules.shard_writer import default_num_proc
from experiments.jobs.pretrain import build_tokenizer, training_files


def run(cfg: DictConfig) -> PrepareReport:
    """Tokenize the training and validation files; print and return what was done."""
    files = training_files(cfg)
    tokenizer = build_tokenizer(cfg, files)
    num_proc = cfg.data.num_proc or default_num_proc()
    groups = [files, list(cfg.data.val_files)] if cfg.data.val_files else [files]
    reports = [
        tokenize_corpus(group, tokenizer, cfg.data.cache_dir, num_proc=num_proc, rehash=cfg.data.rehash,
                        progress=True).report
        for group in groups
    ]
    total = PrepareReport(
        files=sum(r.files for r in reports),
        files_tokenized=sum(r.files_tokenized for r in reports),
        bytes_tokenized=sum(r.bytes_tokenized for r in reports),
        seconds=sum(r.seconds for r in reports),
        documents=sum(r.documents for r in reports),
        tokens=sum(r.tokens for r in reports),
        cache_dir=reports[0].cache_dir,
    )
    print(f"prepared {total.summary()}", flush=True)
    return total

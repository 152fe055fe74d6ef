"""The quickstart's data path per step: sample generators and whole-word spans.

Side by side in one process, alternating the variants so that load on the machine hits both:

* sample generator: `PackedSampleDataset.rng(idx)` builds a new RandomState for every sample (as
  the official code does); `__getitem__` reseeds one instead (the same stream), per 32 samples;
* span collation at the quickstart's settings (32 samples of 32 tokens, 30 % masked, lambda 0.5):
  token-level spans against `whole_word_spans=True`.

    python benchmarks/bench_quickstart_data.py              # about 1 minute on 2 cores
"""

from __future__ import annotations

import datetime
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from machine import cpu_model

from datamodules.builtin_corpus import write_builtin_corpus
from datamodules.corpus import tokenize_corpus
from datamodules.pretrain import PackedSampleDataset
from glm_lightning.blank_infilling import BlankInfillingCollator
from glm_lightning.tokenizer import GLMTokenizer, train_sentencepiece

BATCH, SEQ = 32, 32


def per_call_ms(fn: Callable[[int], object], calls: int, repeats: int = 5) -> float:
    """Median over repeats of the mean time of one call, in ms."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(calls):
            fn(i)
        times.append((time.perf_counter() - start) / calls * 1e3)
    return statistics.median(times)


def data_rows(work: Path) -> list[tuple[str, float, float]]:
    files = write_builtin_corpus(work / "text")
    tok = GLMTokenizer.from_sentencepiece(train_sentencepiece(files, 700, str(work / "sp")))
    corpus = tokenize_corpus(files, tok, work / "cache", progress=False)
    ds = PackedSampleDataset(corpus, tok, SEQ)
    batches = [[ds[b * BATCH + i] for i in range(BATCH)] for b in range(200)]
    settings = {"mask_ratio": 0.3, "poisson_lambda": 0.5, "max_seq_length": SEQ}
    token_spans = BlankInfillingCollator(tok, **settings)
    word_spans = BlankInfillingCollator(tok, whole_word_spans=True, **settings)
    rows = []
    for name, old, new in (
        ("sample generators of 32 samples", lambda b: [ds.rng(b * BATCH + i) for i in range(BATCH)],
         lambda b: [ds._item_rng(b * BATCH + i) for i in range(BATCH)]),
        ("span collation of 32 samples", lambda b: token_spans(batches[b % 200]),
         lambda b: word_spans(batches[b % 200])),
    ):
        pairs = [(per_call_ms(old, 200, 1), per_call_ms(new, 200, 1)) for _ in range(5)]
        rows.append((name, statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)))
    return rows


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rows = data_rows(Path(tmp))
    print(f"{datetime.date.today()}, {cpu_model()}, torch {torch.__version__}, numpy {np.__version__}, "
          f"Python {platform.python_version()}")
    print("\n| what | before (ms) | after (ms) | after / before |\n|---|---:|---:|---:|")
    print("\n".join(f"| {name} | {old:.2f} | {new:.2f} | {new / old:.2f}x |" for name, old, new in rows))


if __name__ == "__main__":
    main()

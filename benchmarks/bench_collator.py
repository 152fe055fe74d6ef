"""Blank-infilling collator throughput per objective, next to the token consumption of a glm-base
training step on the same machine.

Samples are 512-token packed samples (`PackedSampleDataset`) of real English text: the shared corpus
(`../shared/data/corpus`: Gutenberg novels, WikiText-2, Tiny Shakespeare; books and articles are
documents) when it is there, else the built-in generated corpus. Both are tokenized with a
sentencepiece model trained on them for the run.

* Collator: `BlankInfillingCollator` with one objective at a time (span, sentence, document) on
  micro-batches of 16 samples, on ONE core (the process is pinned to one CPU and torch uses one
  thread; the collator is numpy and Python). Tokens/s counts the packed-sample tokens it consumes.
* Training step: `GLMModel(GLMConfig.from_name("glm-base"))`, fp32, dropout as configured, forward
  + loss on Part B + backward + AdamW step, on every core of the machine, on collated span
  micro-batches of the same samples. Its tokens/s counts the same packed-sample tokens (batch x
  sample length per step), so the ratio is how many such training processes one collator core
  keeps fed.

    python benchmarks/bench_collator.py                     # under 2 minutes on 2 cores
    python benchmarks/bench_collator.py --corpus builtin    # without the shared corpus
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from machine import cpu_model

from datamodules.builtin_corpus import write_builtin_corpus
from datamodules.corpus import TokenizedCorpus, resolve_inputs, tokenize_corpus
from datamodules.pretrain import PackedSampleDataset
from glm_lightning.blank_infilling import BlankInfillingCollator
from glm_lightning.model import GLMConfig
from glm_lightning.modules.pretrain import GLMPretrainModule
from glm_lightning.tokenizer import GLMTokenizer, train_sentencepiece

SHARED_CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "corpus"
OBJECTIVES = {
    "span": {},
    "sentence": {"span_prob": 0.0, "sentence_prob": 1.0},
    "document": {"span_prob": 0.0, "document_prob": 1.0},
}
SPAN_TARGET_PER_CORE = 1_000_000
RATIO_TARGET = 20


def load_corpus(choice: str, work: Path) -> tuple[str, TokenizedCorpus, GLMTokenizer]:
    """The text files, a sentencepiece tokenizer trained on them and their tokenized corpus."""
    use_shared = choice == "shared" or (choice == "auto" and SHARED_CORPUS.is_dir())
    if use_shared:
        files = [str(path) for path in resolve_inputs(SHARED_CORPUS)]
        name, vocab = f"shared corpus {SHARED_CORPUS} ({len(files)} files)", 2000
    else:
        files = write_builtin_corpus(work / "builtin", num_documents=400)
        name, vocab = "built-in generated corpus (datamodules.builtin_corpus, 400 documents)", 600
    model = train_sentencepiece(
        files, vocab, str(work / "spm" / "bench"), input_sentence_size=20_000, shuffle_input_sentence=True
    )
    tokenizer = GLMTokenizer.from_sentencepiece(model)
    return name, tokenize_corpus(files, tokenizer, work / "cache", progress=False), tokenizer


@contextmanager
def one_core() -> Iterator[int]:
    """Pin the process to one CPU and torch to one thread for the duration."""
    cpus, threads = sorted(os.sched_getaffinity(0)), torch.get_num_threads()
    os.sched_setaffinity(0, {cpus[-1]})
    torch.set_num_threads(1)
    try:
        yield cpus[-1]
    finally:
        os.sched_setaffinity(0, set(cpus))
        torch.set_num_threads(threads)


def collator_tokens_per_s(
    collator: BlankInfillingCollator, batches: list[list[np.ndarray]], rounds: int
) -> tuple[float, float, float]:
    """Medians over rounds (each one pass over all batches) of ms per batch, of tokens per
    wall-clock second and of tokens per CPU second of this process. The two rates agree on an idle
    core; on a busy machine the CPU-time rate leaves out the time the core ran other processes."""
    collator(batches[0])  # one-time work (the sentence-end table) stays out of the timing
    tokens = sum(len(sample) for batch in batches for sample in batch)
    wall, cpu = [], []
    for _ in range(rounds):
        start, start_cpu = time.perf_counter(), time.process_time()
        for batch in batches:
            collator(batch)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    wall_s, cpu_s = statistics.median(wall), statistics.median(cpu)
    return 1000 * wall_s / len(batches), tokens / wall_s, tokens / cpu_s


def train_step_fn(batch: dict) -> Callable[[], None]:
    """One glm-base training step (forward, loss on Part B, backward, AdamW) on a fixed batch."""
    torch.manual_seed(0)
    module = GLMPretrainModule(GLMConfig.from_name("glm-base"))
    module.train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, weight_decay=0.01)

    def step() -> None:
        loss, _ = module.loss(batch)  # the pretraining loss, logits at Part B only
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", choices=("auto", "shared", "builtin"), default="auto")
    parser.add_argument("--samples", type=int, default=512, help="packed samples the collator cycles over")
    parser.add_argument("--batch-size", type=int, default=16, help="collator micro-batch")
    parser.add_argument("--rounds", type=int, default=5, help="timed passes over the samples per objective")
    parser.add_argument("--train-batch-size", type=int, default=1)
    parser.add_argument("--train-steps", type=int, default=2, help="timed steps after one warm-up step")
    args = parser.parse_args()
    began = time.perf_counter()

    with tempfile.TemporaryDirectory() as work:  # the corpus cache is read while packing
        corpus_name, corpus, tokenizer = load_corpus(args.corpus, Path(work))
        dataset = PackedSampleDataset(corpus, tokenizer, 512, seed=0, num_samples=args.samples)
        samples = [dataset[i] for i in range(len(dataset))]
    batches = [samples[i : i + args.batch_size] for i in range(0, len(samples), args.batch_size)]
    lengths = [len(sample) for sample in samples]
    documents = [int(np.count_nonzero(sample == tokenizer.cls_id)) for sample in samples]
    print(
        f"date {datetime.date.today()}  cpu {cpu_model()}  nproc {os.cpu_count()}  "
        f"torch {torch.__version__}  numpy {np.__version__}  python {platform.python_version()}  "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"corpus: {corpus_name}: {corpus.num_documents} documents, {corpus.num_tokens} tokens, "
        f"vocabulary {len(tokenizer)}"
    )
    print(
        f"samples: {len(samples)} packed, mean length {np.mean(lengths):.1f} (max 512), "
        f"mean documents per sample {np.mean(documents):.2f}"
    )

    collator_rates = {}
    with one_core() as cpu:
        for objective, kwargs in OBJECTIVES.items():
            collator = BlankInfillingCollator(tokenizer, seed=0, **kwargs)
            collator_rates[objective] = collator_tokens_per_s(collator, batches, args.rounds)
    print(
        f"collator: micro-batch {args.batch_size}, pinned to CPU {cpu}, 1 torch thread, "
        f"median of {args.rounds} passes"
    )

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    train_samples = samples[: args.train_batch_size]
    train_tokens = sum(len(sample) for sample in train_samples)
    batch = BlankInfillingCollator(tokenizer, seed=0)(train_samples)
    step = train_step_fn(batch)
    step()  # warm-up: AdamW state, allocator
    seconds = []
    for _ in range(args.train_steps):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    train_rate = train_tokens / statistics.median(seconds)
    print(
        f"train step: glm-base fp32, batch {args.train_batch_size} x {batch['input_ids'].shape[1]} "
        f"({args.train_batch_size} packed samples, {train_tokens} tokens), "
        f"{torch.get_num_threads()} threads, "
        f"steps {', '.join(f'{s:.1f}' for s in seconds)} s -> {train_rate:,.1f} packed tokens/s (median)"
    )

    print()
    print(
        f"| objective | ms per micro-batch of {args.batch_size} | tokens/s, 1 core (wall) "
        "| tokens/s, 1 core (CPU time) | collator / training step (wall) |"
    )
    print("|---|---:|---:|---:|---:|")
    for objective, (ms, rate, cpu_rate) in collator_rates.items():
        print(f"| {objective} | {ms:.2f} | {rate:,.0f} | {cpu_rate:,.0f} | {rate / train_rate:,.0f}x |")
    print(f"| glm-base training step, {torch.get_num_threads()} cores | | {train_rate:,.1f} | | 1x |")
    slowest = min(rate for _, rate, _ in collator_rates.values())
    span_ok = collator_rates["span"][1] >= SPAN_TARGET_PER_CORE
    ratio_ok = slowest / train_rate >= RATIO_TARGET
    print()
    print(
        f"span >= {SPAN_TARGET_PER_CORE:,} tokens/s per core (wall): {'met' if span_ok else 'NOT met'}; "
        f"every objective >= {RATIO_TARGET}x the training step: {'met' if ratio_ok else 'NOT met'} "
        f"(slowest {slowest / train_rate:,.0f}x); load average {os.getloadavg()[0]:.1f}; "
        f"run took {time.perf_counter() - began:.0f} s"
    )


if __name__ == "__main__":
    main()

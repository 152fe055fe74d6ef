"""SuperGLUE finetuning steps on batches cut to their longest row against the same batches padded
to max_seq_length (as every row is encoded), side by side in one run.

Examples are the first 128 training examples of COPA, RTE and CB from the SuperGLUE folder
(default ``../shared/data/superglue``), encoded with the released settings (max_seq_length 256,
the patterns of experiments/configs/superglue.yaml; CB pattern 4) by a sentencepiece tokenizer
trained on the built-in corpus; the model is the ablation sweep's mini GLM (4 layers, hidden 128).
A step is forward + loss + backward + AdamW on a batch of 16 examples, on every core; the two
layouts alternate, and the median over the batches is reported.

    python benchmarks/bench_cloze_padding.py [--data DIR]     # about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from machine import cpu_model

from datamodules.builtin_corpus import write_builtin_corpus
from datamodules.cloze_collate import ROW_KEYS, cloze_collate
from datamodules.superglue import read_split
from glm_lightning.cloze import encode_example
from glm_lightning.model import GLMConfig
from glm_lightning.modules.cloze import GLMClozeModule
from glm_lightning.tokenizer import GLMTokenizer, train_sentencepiece

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "superglue"
TASKS = {"COPA": 0, "RTE": 0, "CB": 4}  # task -> pattern id
MAX_SEQ_LENGTH, BATCH, EXAMPLES = 256, 16, 128


def padded(batch: dict, length: int) -> dict:
    """``batch`` with its rows padded back to ``length`` columns."""
    return {**batch, **{key: torch.nn.functional.pad(batch[key], (0, length - batch[key].shape[-1]))
                        for key in ROW_KEYS if key in batch}}


def step_seconds(module: GLMClozeModule, optimizer: torch.optim.Optimizer, batch: dict) -> float:
    started = time.perf_counter()
    loss = module.loss(module(batch), batch["label"])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED), help="SuperGLUE folder (<dir>/COPA/train.jsonl, ...)")
    args = parser.parse_args()
    if not (Path(args.data) / "COPA" / "train.jsonl").is_file():
        raise SystemExit(f"no SuperGLUE data at {args.data}; pass --data DIR")
    with tempfile.TemporaryDirectory() as work:
        model_path = train_sentencepiece(write_builtin_corpus(Path(work) / "corpus"), 1000,
                                         str(Path(work) / "sp"), hard_vocab_limit=False)
        tokenizer = GLMTokenizer.from_sentencepiece(model_path)
    print(f"# {datetime.date.today()} · {cpu_model()} · {os.cpu_count()} cores · torch {torch.__version__} · "
          f"Python {platform.python_version()}")
    print("| task | columns cut / padded (mean) | step cut (ms) | step padded (ms) | speed-up |")
    print("|---|---|---|---|---|")
    for task, pattern_id in TASKS.items():
        examples = read_split(task, args.data, "train")[:EXAMPLES]
        encoded = [encode_example(task, ex, tokenizer, pattern_id=pattern_id, max_seq_length=MAX_SEQ_LENGTH)
                   for ex in examples]
        batches = [cloze_collate(encoded[i:i + BATCH]) for i in range(0, len(encoded), BATCH)]
        torch.manual_seed(0)
        config = GLMConfig.from_name("tiny", num_layers=4, hidden_size=128, vocab_size=len(tokenizer),
                                     max_sequence_length=MAX_SEQ_LENGTH)
        module = GLMClozeModule(config, task=task)
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
        step_seconds(module, optimizer, padded(batches[0], MAX_SEQ_LENGTH))  # warm-up
        cut, full = [], []
        for batch in batches:
            cut.append(step_seconds(module, optimizer, batch))
            full.append(step_seconds(module, optimizer, padded(batch, MAX_SEQ_LENGTH)))
        columns = statistics.fmean(batch["input_ids"].shape[-1] for batch in batches)
        a, b = statistics.median(cut), statistics.median(full)
        print(f"| {task} | {columns:.0f} / {MAX_SEQ_LENGTH} | {1000 * a:.0f} | {1000 * b:.0f} "
              f"| {b / a:.2f}x |")


if __name__ == "__main__":
    main()

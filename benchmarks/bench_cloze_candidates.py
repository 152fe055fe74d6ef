"""Multi-token cloze tasks scored with the shared-context layout (each example's Part A once, every
candidate's Part B after it) against the row-per-candidate layout, side by side in one run.

Data: ReCoRD from FewGLUE (``train.jsonl``: one training example per gold answer with up to 9 other
entities as candidates; ``dev32.jsonl``: every passage entity is a candidate, max_seq_length 512) and
the COPA dev set (``val.jsonl``, max_seq_length 256; training batches are its examples with their
mirrored copies, as the training set is used). Inputs are encoded with the BERT vocabulary of
GLM-Base/Large and the released patterns; the model is a small GLM (4 layers, hidden 256) so that
the run fits a laptop. A training step is forward + loss + backward + AdamW on a batch of 16
examples; evaluation scores the whole evaluation file in batches of 16 without gradients. The
layouts alternate batch by batch; step times are medians, evaluation times totals. Scores of the
two layouts are compared on every evaluation batch ("equal scores": the largest difference).

    python benchmarks/bench_cloze_candidates.py [--data DIR] [--layers N] [--hidden H]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from machine import cpu_model

from datamodules.cloze_collate import cloze_collate
from datamodules.superglue import read_split
from glm_lightning.cloze import augment_training_examples, encode_example
from glm_lightning.model import GLMConfig
from glm_lightning.modules.cloze import GLMClozeModule
from glm_lightning.tokenizer import GLMTokenizer

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BATCH = 16
# task -> (folder under the data dir, training file, evaluation file, max_seq_length)
TASKS = {"ReCoRD": ("fewglue/ReCoRD", "train", "dev32", 512), "COPA": ("superglue/COPA", "val", "val", 256)}


def batches(task: str, examples: list[dict], tokenizer: GLMTokenizer, length: int) -> list[list[dict]]:
    encoded = [encode_example(task, ex, tokenizer, pattern_id=0, max_seq_length=length) for ex in examples]
    return [encoded[i:i + BATCH] for i in range(0, len(encoded), BATCH)]


def train_step(module: GLMClozeModule, optimizer: torch.optim.Optimizer, batch: dict) -> float:
    started = time.perf_counter()
    module.loss(module(batch), batch["label"]).backward()
    optimizer.step()
    optimizer.zero_grad()
    return time.perf_counter() - started


@torch.no_grad()
def scores(module: GLMClozeModule, batch: dict) -> tuple[torch.Tensor, float]:
    started = time.perf_counter()
    result = module(batch)
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED), help="folder with fewglue/ReCoRD and superglue/COPA")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    args = parser.parse_args()
    vocab = Path(args.data) / "vocab" / "bert-base-uncased" / "vocab.txt"
    if not vocab.is_file() or not (Path(args.data) / "fewglue" / "ReCoRD").is_dir():
        raise SystemExit(f"no FewGLUE/SuperGLUE data or BERT vocabulary under {args.data}; pass --data DIR")
    tokenizer = GLMTokenizer.from_wordpiece(str(vocab))
    print(f"# {datetime.date.today()} · {cpu_model()} · {os.cpu_count()} cores · torch {torch.__version__} · "
          f"Python {platform.python_version()} · GLM {args.layers} layers, hidden {args.hidden}")
    rows = []
    for task, (folder, train_split, eval_split, length) in TASKS.items():
        data = str(Path(args.data) / folder.split("/")[0])
        train = augment_training_examples(task, read_split(task, data, train_split), seed=42)
        train_batches = batches(task, train, tokenizer, length)
        eval_batches = batches(task, read_split(task, data, eval_split), tokenizer, length)
        torch.manual_seed(0)
        config = GLMConfig.from_name("tiny", num_layers=args.layers, hidden_size=args.hidden,
                                     num_attention_heads=args.hidden // 64, vocab_size=len(tokenizer),
                                     max_sequence_length=512, embedding_dropout_prob=0.0,
                                     attention_dropout_prob=0.0, output_dropout_prob=0.0)
        module = GLMClozeModule(config, task=task)
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-5)
        layouts = {"per-row": False, "shared": True}
        train_step(module, optimizer, cloze_collate(train_batches[0]))  # warm-up
        steps: dict[str, list[float]] = {name: [] for name in layouts}
        for examples in train_batches:
            for name, shared in layouts.items():
                batch = cloze_collate(examples, shared_context=shared)
                steps[name].append(train_step(module, optimizer, batch))
        module.eval()
        seconds = dict.fromkeys(layouts, 0.0)
        tokens = dict.fromkeys(layouts, 0)
        worst, same_predictions = 0.0, True
        for examples in eval_batches:
            results = {}
            for name, shared in layouts.items():
                batch = cloze_collate(examples, shared_context=shared)
                results[name], elapsed = scores(module, batch)
                seconds[name] += elapsed
                tokens[name] += batch["input_ids"].numel()
            worst = max(worst, float((results["shared"] - results["per-row"]).abs().max()))
            same_predictions &= bool((results["shared"].argmax(-1) == results["per-row"].argmax(-1)).all())
        step = {name: statistics.median(values) for name, values in steps.items()}
        eval_speedup, train_speedup = seconds["per-row"] / seconds["shared"], step["per-row"] / step["shared"]
        candidates = statistics.fmean(len(ex["input_ids"]) for b in eval_batches for ex in b)
        print(f"{task}: {sum(map(len, eval_batches))} eval examples ({candidates:.1f} candidates each), "
              f"eval {seconds['per-row']:.1f} s -> {seconds['shared']:.1f} s, "
              f"train step {1000 * step['per-row']:.0f} ms -> {1000 * step['shared']:.0f} ms, "
              f"max |score difference| {worst:.1e}, same predictions {same_predictions}; "
              f"speed-up {eval_speedup:.2f}x eval, {train_speedup:.2f}x train", flush=True)
        rows.append(f"| {task} | {candidates:.1f} | {tokens['per-row'] / tokens['shared']:.1f}x | "
                    f"{seconds['per-row']:.1f} / {seconds['shared']:.1f} | {eval_speedup:.2f}x | "
                    f"{1000 * step['per-row']:.0f} / {1000 * step['shared']:.0f} | {train_speedup:.2f}x | "
                    f"{worst:.1e} |")
    print("\n| task | candidates per eval example | tokens per-row / shared | eval s per-row / shared "
          "| eval speed-up | train step ms per-row / shared | train speed-up | max score difference |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()

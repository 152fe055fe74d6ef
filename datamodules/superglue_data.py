"""SuperGLUE finetuning data for one task: read -> augment (train) -> encode -> collate.

Examples are encoded once in ``setup`` (they are small) and batched by ``cloze_collate``. Training
order is drawn from (``seed``, epoch) and its position saved in checkpoints
(``datamodules.epoch_order``), so a run is reproducible and a resumed one continues mid-epoch.
Evaluation examples carry what the metrics need beyond the model inputs: WSC's truth value as the
label, ReCoRD's candidate strings and gold answers; test examples (no labels) get label -1. With
``shared_context`` the multi-token tasks are batched in the packed layout of
``datamodules.cloze_collate.pack_candidates`` (each Part A once per example).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from datamodules.cloze_collate import cloze_collate
from datamodules.epoch_order import ResumableOrder
from datamodules.superglue import read_split, split_path
from glm_lightning.cloze import (
    MULTI_TOKEN_TASKS,
    answer_candidates,
    augment_training_examples,
    encode_example,
)
from glm_lightning.tokenizer import GLMTokenizer

UNLABELLED = -1  # label of examples without a gold label; the module skips them in its metrics


def encode_for_eval(task: str, example: dict, tokenizer: GLMTokenizer, *, pattern_id: int,
                    max_seq_length: int, head: str = "cloze", wsc_mode: str = "candidates") -> dict:
    """Model inputs of one dev/test example plus its ``idx`` and what scoring needs."""
    encoded = encode_example(task, example, tokenizer, pattern_id=pattern_id,
                             max_seq_length=max_seq_length, mode=head, wsc_mode=wsc_mode)
    encoded["idx"] = example["idx"]
    if example["label"] is None:
        encoded["label"] = UNLABELLED
    elif task == "WSC":  # evaluation scores the truth of "the pronoun refers to span 1"
        encoded["label"] = int(example["label"])
    if task == "ReCoRD":
        encoded["candidates"] = answer_candidates(task, example)
        encoded["answers"] = list(example["label"] or [])
    return encoded


class SuperGLUEDataModule(ResumableOrder, L.LightningDataModule):
    """Train / dev / test loaders of one SuperGLUE task.

    ``data_dir`` holds the official ``<Task>/{train,val,test}.jsonl``; ``train_dir`` (FewGLUE)
    replaces the training file only, so few-shot runs are still scored on the full dev set.
    ``wsc_mode="generative"`` trains WSC on its positive examples' referents (see ``encode_example``).
    """

    def __init__(self, task: str, data_dir: str | Path, tokenizer: GLMTokenizer, *, pattern_id: int,
                 max_seq_length: int, batch_size: int, eval_batch_size: int = 16, head: str = "cloze",
                 train_dir: str | Path | None = None, seed: int = 1234, num_workers: int = 0,
                 wsc_mode: str = "candidates", shared_context: bool = False):
        super().__init__()
        self.task, self.tokenizer, self.head, self.wsc_mode = task, tokenizer, head, wsc_mode
        generative = task == "WSC" and wsc_mode == "generative"
        self.shared_context = shared_context and head == "cloze" and task in MULTI_TOKEN_TASKS \
            and not generative
        self.data_dir, self.train_dir = Path(data_dir), Path(train_dir or data_dir)
        self.pattern_id, self.max_seq_length = pattern_id, max_seq_length
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.seed, self.num_workers = seed, num_workers
        self.examples: dict[str, list[dict]] = {}  # raw examples by split, for writing predictions
        self.encoded: dict[str, list[dict]] = {}

    def has_split(self, split: str) -> bool:
        """Whether the task has a file for ``split`` (train from ``train_dir``)."""
        return split_path(self.task, self.train_dir if split == "train" else self.data_dir, split).exists()

    def prepare_data(self) -> None:
        for split in ("train", "val"):
            if not self.has_split(split):
                folder = self.train_dir if split == "train" else self.data_dir
                raise FileNotFoundError(f"no {split} file for {self.task}: "
                                        f"{split_path(self.task, folder, split)} does not exist")

    def setup(self, stage: str | None = None) -> None:
        if self.encoded:
            return
        options = dict(pattern_id=self.pattern_id, max_seq_length=self.max_seq_length, wsc_mode=self.wsc_mode)
        train = read_split(self.task, str(self.train_dir), "train")
        if self.task == "WSC" and self.wsc_mode == "generative":  # positives only, no candidate chunks
            train = [{k: v for k, v in ex.items() if k != "candidates"} for ex in train]
        train = augment_training_examples(self.task, train, seed=42)  # the official fixed seed
        if not train:
            raise ValueError(f"{self.task} has no training examples in "
                             f"{split_path(self.task, self.train_dir, 'train')}")
        self.examples["train"] = train
        self.encoded["train"] = [
            {**encode_example(self.task, ex, self.tokenizer, mode=self.head, **options), "idx": ex["idx"]}
            for ex in train
        ]
        for split in ("val", "test"):
            if split == "test" and not self.has_split(split):
                continue
            self.examples[split] = read_split(self.task, str(self.data_dir), split)
            self.encoded[split] = [encode_for_eval(self.task, ex, self.tokenizer, head=self.head, **options)
                                   for ex in self.examples[split]]

    def _loader(self, split: str) -> DataLoader:
        return DataLoader(self.encoded[split], batch_size=self.eval_batch_size, collate_fn=self.collate,
                          num_workers=self.num_workers)

    @property
    def collate(self) -> partial:
        return partial(cloze_collate, shared_context=self.shared_context)

    def train_dataloader(self) -> DataLoader:
        sampler = self.epoch_sampler(self.encoded["train"], self.batch_size, self.seed)
        return DataLoader(self.encoded["train"], batch_size=self.batch_size, sampler=sampler,
                          collate_fn=self.collate, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")

    def eval_loader(self, task: str, data_dir: str | Path, split: str) -> tuple[list[dict], DataLoader]:
        """Examples and loader of another file scored by this task's model (e.g. AX-b with RTE's,
        or FewGLUE's dev32)."""
        examples = read_split(task, str(data_dir), split)
        encoded = [encode_for_eval(task, ex, self.tokenizer, head=self.head, pattern_id=self.pattern_id,
                                   max_seq_length=self.max_seq_length, wsc_mode=self.wsc_mode)
                   for ex in examples]
        loader = DataLoader(encoded, batch_size=self.eval_batch_size, collate_fn=self.collate,
                            num_workers=self.num_workers)
        return examples, loader

"""Seq2seq finetuning data (official `tasks/seq2seq/`): jsonl files of {"source", "target"} laid out as

    Part A: [CLS] [MASK] prompt source          positions 0 .. S-1,  block positions 0
    Part B: [sop] target[:-1]                   positions = mask position (1), block positions 1 .. T

with the targets ``target + [eop]`` predicted at Part B. Unlike the official dataset, the source is
not padded inside Part A: ``sep`` is each sample's real source length, Part B follows the source
directly and the padding comes last, where no real token can attend to it (padding in Part A
would be attended bidirectionally by every token).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.corpus import CorpusError
from datamodules.epoch_order import ResumableOrder
from datamodules.jsonl import jsonl_records
from glm_lightning.tokenizer import GLMTokenizer

SPLITS = ("train", "val", "test")
FIELDS = ("source", "target")


class Seq2SeqDataError(CorpusError):
    """A jsonl line that is not a {"source": str, "target": str} object; the message names
    the file, the line and the field."""


def read_jsonl(path: str | Path) -> list[dict[str, str]]:
    """The {"source", "target"} pairs of one jsonl file (blank lines skipped)."""
    path = Path(path)
    examples = []
    with path.open(encoding="utf-8") as lines:
        for number, record in jsonl_records(path, lines, Seq2SeqDataError):
            if not isinstance(record, dict):
                raise Seq2SeqDataError(f"{path}:{number}: expected an object with 'source' and 'target'")
            for name in FIELDS:
                if not isinstance(record.get(name), str):
                    problem = "missing" if name not in record else "not a string"
                    raise Seq2SeqDataError(f"{path}:{number}: field '{name}' is {problem}")
            examples.append({"source": record["source"], "target": record["target"]})
    return examples


def encode_source(tokenizer: GLMTokenizer, source: str, *, src_length: int, task_mask: bool = False,
                  prompt: str = " Content:") -> list[int]:
    """``[CLS] [MASK] prompt " " + source``, the source truncated so that all of it fits in
    ``src_length`` tokens. The mask (``[sMASK]`` for task-mask models) is at position 1."""
    mask = tokenizer.smask_id if task_mask else tokenizer.mask_id
    head = [tokenizer.cls_id, mask, *tokenizer.encode(prompt)]
    if len(head) >= src_length:
        raise ValueError(f"src_length ({src_length}) leaves no room for the source after the prompt "
                         f"({len(head)} tokens)")
    return head + tokenizer.encode(" " + source)[: src_length - len(head)]


def build_seq2seq_sample(tokenizer: GLMTokenizer, source: str, target: str, *, src_length: int,
                         tgt_length: int, task_mask: bool = False, prompt: str = " Content:") -> dict:
    """One training sample, unpadded: numpy ``input_ids, target_ids, loss_mask [S+T]``,
    ``position_ids [2, S+T]``, ``sep = S``; for decoding the source ``source_ids [S]``, the
    ``mask_position`` and the ``reference`` text."""
    source_ids = encode_source(tokenizer, source, src_length=src_length, task_mask=task_mask, prompt=prompt)
    targets = (tokenizer.encode(" " + target) + [tokenizer.eop_id])[:tgt_length]
    S, T = len(source_ids), len(targets)
    mask_position = 1
    return {
        "input_ids": np.array(source_ids + [tokenizer.sop_id] + targets[:-1], dtype=np.int64),
        "target_ids": np.array([0] * S + targets, dtype=np.int64),
        "loss_mask": np.array([0] * S + [1] * T, dtype=np.int64),
        "position_ids": np.array([list(range(S)) + [mask_position] * T, [0] * S + list(range(1, T + 1))],
                                 dtype=np.int64),
        "sep": S,
        "source_ids": np.array(source_ids, dtype=np.int64),
        "mask_position": mask_position,
        "reference": target,
    }


class Seq2SeqDataset(Dataset):
    """Encoded samples of one split; each item also carries the reference text."""

    def __init__(self, examples: list[dict[str, str]], tokenizer: GLMTokenizer, **layout):
        self.samples = [build_seq2seq_sample(tokenizer, e["source"], e["target"], **layout) for e in examples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        return self.samples[index]


@dataclass
class Seq2SeqCollator:
    """Right-pads samples to the longest one of the batch; padding (``pad_id``, position 0, no
    loss) sits after each sample's Part B, so no real token attends to it.

    Returns torch tensors ``input_ids, target_ids, loss_mask [B, L]``, ``position_ids [B, 2, L]``,
    ``sep [B]``; for decoding the right-padded sources ``source_ids [B, Ls]``,
    ``source_position_ids [B, 2, Ls]``, ``mask_position [B]``; and the ``references`` (list of str).
    ``pad_to`` pads every batch to at least that length (tests use it to vary the padding).
    """

    pad_id: int
    pad_to: int = 0

    def __call__(self, samples: list[dict]) -> dict:
        length = max(self.pad_to, max(len(s["input_ids"]) for s in samples))
        source_length = max(len(s["source_ids"]) for s in samples)
        B = len(samples)
        batch = {
            "input_ids": torch.full((B, length), self.pad_id, dtype=torch.long),
            "target_ids": torch.zeros(B, length, dtype=torch.long),
            "loss_mask": torch.zeros(B, length, dtype=torch.long),
            "position_ids": torch.zeros(B, 2, length, dtype=torch.long),
            "sep": torch.tensor([s["sep"] for s in samples], dtype=torch.long),
            "source_ids": torch.full((B, source_length), self.pad_id, dtype=torch.long),
            "source_position_ids": torch.zeros(B, 2, source_length, dtype=torch.long),
            "mask_position": torch.tensor([s["mask_position"] for s in samples], dtype=torch.long),
            "references": [s["reference"] for s in samples],
        }
        for b, s in enumerate(samples):
            n, S = len(s["input_ids"]), s["sep"]
            for key in ("input_ids", "target_ids", "loss_mask"):
                batch[key][b, :n] = torch.from_numpy(s[key])
            batch["position_ids"][b, :, :n] = torch.from_numpy(s["position_ids"])
            batch["source_ids"][b, :S] = torch.from_numpy(s["source_ids"])
            batch["source_position_ids"][b, :, :S] = torch.from_numpy(s["position_ids"][:, :S])
        return batch


class Seq2SeqDataModule(ResumableOrder, L.LightningDataModule):
    """train/val(/test).jsonl of ``data_dir`` as batches of ``Seq2SeqCollator``; the training
    order is drawn from (``seed``, epoch), the same for any worker count, and its position is saved
    in checkpoints (``state_dict``) so that a resumed run sees the batches an uninterrupted one would."""

    def __init__(self, tokenizer: GLMTokenizer, data_dir: str | Path, *, src_length: int = 464,
                 tgt_length: int = 48, task_mask: bool = False, prompt: str = " Content:",
                 batch_size: int = 16, num_workers: int = 0, seed: int = 1234):
        super().__init__()
        self.tokenizer = tokenizer
        self.data_dir = Path(data_dir)
        self.layout = dict(src_length=src_length, tgt_length=tgt_length, task_mask=task_mask, prompt=prompt)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.datasets: dict[str, Seq2SeqDataset] = {}
        self.collate = Seq2SeqCollator(tokenizer.pad_id)

    def split_path(self, split: str) -> Path:
        return self.data_dir / f"{split}.jsonl"

    def prepare_data(self) -> None:
        """Fail early, naming the file, when a required split is missing or a line is malformed."""
        self.setup()

    def setup(self, stage: str | None = None) -> None:
        for split in SPLITS:
            path = self.split_path(split)
            if split in self.datasets:
                continue
            if not path.exists():
                if split == "test":
                    continue
                raise FileNotFoundError(f"{path} does not exist; data.dir needs train.jsonl and val.jsonl")
            self.datasets[split] = Seq2SeqDataset(read_jsonl(path), self.tokenizer, **self.layout)

    def _loader(self, split: str) -> DataLoader:
        return DataLoader(self.datasets[split], batch_size=self.batch_size, shuffle=False,
                          collate_fn=self.collate, num_workers=self.num_workers, drop_last=False)

    def train_dataloader(self) -> DataLoader:
        sampler = self.epoch_sampler(self.datasets["train"], self.batch_size, self.seed)
        return DataLoader(self.datasets["train"], batch_size=self.batch_size, sampler=sampler,
                          collate_fn=self.collate, num_workers=self.num_workers, drop_last=False)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        if "test" not in self.datasets:
            raise FileNotFoundError(f"{self.split_path('test')} does not exist")
        return self._loader("test")

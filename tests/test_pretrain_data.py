"""Tests for datamodules.pretrain: sample packing (as `data_utils/datasets.py`), order, resume, workers."""

from __future__ import annotations

from bisect import bisect_right
from itertools import accumulate
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from datamodules.builtin_corpus import write_builtin_corpus
from datamodules.corpus import TokenizedCorpus
from datamodules.pretrain import (
    EvalSampler,
    PackedSampleDataset,
    PretrainDataModule,
    TrainSampler,
    split_by_document,
)
from glm_lightning.tokenizer import GLMTokenizer

CLS, EOS = 1000, 1001


class FakeTokenizer:
    """Ids below 1000 are words; those ending in 4 or 9 (4, 9, 14, ...) end a sentence."""

    cls_id = CLS
    eos_id = EOS

    def sentence_end_table(self) -> np.ndarray:
        table = np.zeros(1024, dtype=bool)
        table[4:1000:5] = True
        return table


def dataset(documents: list[list[int]], seq_length: int, **kwargs: Any) -> PackedSampleDataset:
    return PackedSampleDataset(
        TokenizedCorpus.from_documents(documents), FakeTokenizer(), seq_length, **kwargs
    )


def reference_sample(ds: PackedSampleDataset, idx: int) -> list[int]:
    """The official BlockDataset.__getitem__ loops, token by token on lists (`data_utils/datasets.py`)."""
    rng = ds.rng(idx)
    is_end, max_len = ds.sentence_end, ds.seq_length
    cumulative = list(accumulate(ds.corpus.lengths.tolist()))

    def sample_document() -> list[int]:
        i = bisect_right(cumulative, rng.randint(cumulative[-1]))
        return [int(t) for t in ds.corpus.document(i)] + [EOS]

    def right_strip(tokens: list[int], seq_length: int) -> list[int]:
        strip = len(tokens) - seq_length
        if strip > 0:
            while strip < len(tokens) - 1 and not is_end[tokens[-strip - 1]]:
                strip += 1
            if len(tokens) - strip < seq_length // 2:
                strip = len(tokens) - seq_length
            tokens = tokens[:-strip]
        return tokens

    tokens = sample_document()
    to_strip = len(tokens) - max_len + 1
    if to_strip > 0:
        left, moves = rng.randint(to_strip), 0
        if rng.random() > ds.non_sentence_start:
            if rng.random() < 0.5:
                while moves < max_len // 2 and left > 0 and not is_end[tokens[left - 1]]:
                    left, moves = left - 1, moves + 1
            else:
                while moves < max_len // 2 and left < len(tokens) and not is_end[tokens[left - 1]]:
                    left, moves = left + 1, moves + 1
        tokens = [CLS] + tokens[left:]
        if len(tokens) == 2 and tokens[1] == EOS:
            tokens = []
        return right_strip(tokens, max_len)
    tokens = [CLS] + tokens
    if ds.sample_across_doc:
        while len(tokens) < max_len:
            new = [CLS] + sample_document()
            is_last = len(new) >= max_len - len(tokens)
            tokens += right_strip(new, max_len - len(tokens))
            if is_last:
                break
    return tokens


# -- packing -------------------------------------------------------------------------------------


def test_short_documents_are_concatenated_and_the_last_cut_at_a_sentence_end() -> None:
    doc = [1, 2, 4, 5, 6, 9]  # sentence ends after 4 and after 9
    d = [CLS, *doc, EOS]
    assert dataset([doc], 22)[0].tolist() == d + d + [CLS, 1, 2, 4]  # cut after "4", keeps 4 >= 6 // 2
    assert dataset([doc], 24)[0].tolist() == d + d + d  # fills the budget exactly
    assert dataset([doc], 22, sample_across_doc=False)[0].tolist() == d
    # the sentence-end cut would keep less than half of the room left: cut hard at the budget
    long = [1, 2, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15]
    assert dataset([long], 24)[0].tolist() == [CLS, *long, EOS, CLS, 1, 2, 4, 5, 6, 7, 8, 10, 11]
    # the official quirk: one token of room left takes a lone [CLS]
    assert dataset([doc], 17)[0].tolist() == d + d + [CLS]


def test_long_document_cut_lands_after_a_sentence_end() -> None:
    doc = list(range(300))  # token i at position i; a sentence ends every 5 tokens
    ds = dataset([doc], 32)
    for idx in range(200):
        sample = ds[idx]
        assert sample[0] == CLS and 16 <= len(sample) <= 32
        start = int(sample[1])
        assert start % 5 == 0  # the previous token ends a sentence (or the cut is at 0)
        body = np.append(doc, EOS)[start : start + len(sample) - 1]
        np.testing.assert_array_equal(sample[1:], body)
        assert sample[-1] == EOS or sample[-1] % 5 == 4  # right cut after a sentence end
    # without sentence starts the cut is anywhere
    starts = {int(dataset([doc], 32, non_sentence_start=1.0)[i][1]) % 5 for i in range(100)}
    assert starts == {0, 1, 2, 3, 4}


@settings(max_examples=150, deadline=None)
@given(
    documents=st.lists(st.lists(st.integers(0, 60), min_size=1, max_size=70), min_size=1, max_size=6),
    seq_length=st.integers(4, 48),
    across=st.booleans(),
    non_sentence_start=st.sampled_from([0.0, 0.5]),
    idx=st.integers(0, 1000),
)
def test_packing_matches_the_official_loops(
    documents: list[list[int]], seq_length: int, across: bool, non_sentence_start: float, idx: int
) -> None:
    ds = dataset(
        documents,
        seq_length,
        num_samples=2000,
        sample_across_doc=across,
        non_sentence_start=non_sentence_start,
    )
    sample = ds[idx]
    assert sample.dtype == np.int64
    assert sample.tolist() == reference_sample(ds, idx)
    assert len(sample) <= seq_length


def test_samples_are_deterministic_per_index_and_seed() -> None:
    documents = [list(range(n, n + 40)) for n in range(0, 200, 40)]
    ds = dataset(documents, 64)
    assert len(ds) == 5000  # 1000 samples per document
    assert all(np.array_equal(ds[i], dataset(documents, 64)[i]) for i in range(20))
    assert not all(np.array_equal(ds[i], ds[i + 1]) for i in range(20))
    other = dataset(documents, 64, seed=1)
    assert not all(np.array_equal(ds[i], other[i]) for i in range(20))
    with pytest.raises(IndexError):
        ds[5000]


def test_documents_are_drawn_in_proportion_to_their_length() -> None:
    lengths = [10, 30, 60]
    documents = [[100 * (k + 1)] * n for k, n in enumerate(lengths)]
    ds = dataset(documents, 100, sample_across_doc=False, num_samples=3000)
    counts = np.bincount([lengths.index(len(ds[i]) - 2) for i in range(len(ds))], minlength=3)
    np.testing.assert_allclose(counts / counts.sum(), [0.1, 0.3, 0.6], atol=0.03)


def test_every_sample_fits_and_is_made_of_documents() -> None:
    rng = np.random.default_rng(0)
    documents = [rng.integers(0, 1000, size=n).tolist() for n in rng.integers(1, 300, size=30)]
    ds = dataset(documents, 96)
    for idx in range(300):
        sample = ds[idx]
        assert 0 < len(sample) <= 96 and sample[0] == CLS
        # every piece between [CLS]s is a prefix of a window of one document (+ eos)
        pieces = np.split(sample, np.flatnonzero(sample == CLS)[1:])
        for piece in pieces[:-1]:
            assert piece[-1] == EOS and EOS not in piece[1:-1]


# -- order and sharding --------------------------------------------------------------------------


def test_train_order_depends_on_seed_and_epoch_and_ranks_are_disjoint() -> None:
    def order(seed: int, epoch: int, rank: int = 0, world: int = 1) -> list[int]:
        sampler = TrainSampler(1000, 4, seed=seed, num_replicas=world, rank=rank)
        sampler.set_epoch(epoch)
        return [idx for _, _, idx in sampler]

    full = order(0, 0)
    assert sorted(full) == list(range(1000))  # a permutation
    assert full == order(0, 0) and full != order(0, 1) and full != order(1, 0)
    ranks = [order(0, 0, rank, 3) for rank in range(3)]
    assert all(len(r) == 1000 // 12 * 4 for r in ranks)
    assert not set(ranks[0]) & set(ranks[1]) and not set(ranks[1]) & set(ranks[2])
    # rank r takes the r-th slice of every global batch of the global order
    assert ranks[1][:4] == full[4:8] and ranks[2][4:8] == full[20:24]


def test_eval_batches_are_shared_out_evenly() -> None:
    keys = [list(EvalSampler(12, 2, num_replicas=4, rank=r)) for r in range(4)]
    batches = [[b for _, b, _ in k[::2]] for k in keys]
    assert batches == [[0, 4], [1, 5], [2, 0], [3, 1]]  # 6 batches over 4 ranks: 2 each
    assert [i for _, _, i in keys[1]] == [2, 3, 10, 11]


# -- datamodule ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("builtin")
    write_builtin_corpus(directory, num_documents=60)
    return directory


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def make_datamodule(
    tokenizer: GLMTokenizer, corpus_dir: Path, cache_dir: Path, **kwargs: Any
) -> PretrainDataModule:
    options: dict[str, Any] = dict(
        cache_dir=cache_dir,
        seq_length=64,
        batch_size=4,
        val_samples=8,
        val_fraction=0.1,
        progress=False,
        collator={"span_prob": 0.5, "sentence_prob": 0.25},
        document_prob=0.25,
    )
    options.update(kwargs)
    dm = PretrainDataModule(tokenizer, corpus_dir, **options)
    dm.setup("fit")
    return dm


def take(loader: Any, n: int) -> list[dict]:
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == n:
            break
    return batches


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a
    )


def test_batches_are_deterministic(tokenizer: GLMTokenizer, corpus_dir: Path, cache_dir: Path) -> None:
    first = take(make_datamodule(tokenizer, corpus_dir, cache_dir).train_dataloader(), 4)
    second = take(make_datamodule(tokenizer, corpus_dir, cache_dir).train_dataloader(), 4)
    assert all(same(a, b) for a, b in zip(first, second, strict=True))
    assert first[0]["input_ids"].shape[0] == 4 and first[0]["position_ids"].shape[1] == 2
    assert {b["objective"] for b in first} <= {"span", "sentence", "document"}
    other = take(make_datamodule(tokenizer, corpus_dir, cache_dir, seed=1).train_dataloader(), 4)
    assert not same(first[0], other[0])


def test_worker_count_does_not_change_batches(
    tokenizer: GLMTokenizer, corpus_dir: Path, cache_dir: Path
) -> None:
    serial = take(make_datamodule(tokenizer, corpus_dir, cache_dir, num_workers=0).train_dataloader(), 5)
    loader = make_datamodule(tokenizer, corpus_dir, cache_dir, num_workers=2).train_dataloader()
    assert loader.persistent_workers
    parallel = take(loader, 5)
    assert all(same(a, b) for a, b in zip(serial, parallel, strict=True))


def test_resume_continues_with_the_next_batch(
    tokenizer: GLMTokenizer, corpus_dir: Path, cache_dir: Path
) -> None:
    dm = make_datamodule(tokenizer, corpus_dir, cache_dir)
    original = take(dm.train_dataloader(), 6)
    dm = make_datamodule(tokenizer, corpus_dir, cache_dir)
    take(dm.train_dataloader(), 3)
    state = dm.state_dict()
    assert state["epoch"] == 0 and state["micro_batches"] == 3

    restored = make_datamodule(tokenizer, corpus_dir, cache_dir)
    restored.load_state_dict(state)
    assert restored.state_dict()["micro_batches"] == 3
    resumed = take(restored.train_dataloader(), 3)
    assert all(same(a, b) for a, b in zip(resumed, original[3:], strict=True))
    assert restored.state_dict()["micro_batches"] == 6

    by_count = make_datamodule(tokenizer, corpus_dir, cache_dir)
    by_count.set_train_position(3)
    assert same(take(by_count.train_dataloader(), 1)[0], original[3])
    # a total beyond one epoch moves into the next epoch
    per_epoch = len(by_count.train_dataloader())
    by_count.set_train_position(per_epoch + 2)
    assert by_count.state_dict()["epoch"] == 1 and by_count.state_dict()["micro_batches"] == 2


def test_ranks_get_disjoint_batches(tokenizer: GLMTokenizer, corpus_dir: Path, cache_dir: Path) -> None:
    indices = []
    for rank in range(2):
        dm = make_datamodule(tokenizer, corpus_dir, cache_dir)
        dm.trainer = SimpleNamespace(
            distributed_sampler_kwargs={"rank": rank, "num_replicas": 2},
            current_epoch=0,
            state=SimpleNamespace(fn="validate"),
        )
        sampler = dm.train_dataloader().sampler
        assert isinstance(sampler, torch.utils.data.DistributedSampler)  # Lightning keeps it
        indices.append([idx for _, _, idx in sampler])
    assert len(indices[0]) == len(indices[1]) > 0
    assert not set(indices[0]) & set(indices[1])


def test_validation_set_is_fixed(tokenizer: GLMTokenizer, corpus_dir: Path, cache_dir: Path) -> None:
    dm = make_datamodule(tokenizer, corpus_dir, cache_dir, val_samples=6)
    batches = take(dm.val_dataloader(), 10)
    assert len(batches) == 2  # 6 samples rounded up to whole batches of 4
    again = take(
        make_datamodule(tokenizer, corpus_dir, cache_dir, seed=7, val_samples=6).val_dataloader(), 10
    )
    assert all(same(a, b) for a, b in zip(batches, again, strict=True))
    assert all(same(a, b) for a, b in zip(batches, take(dm.val_dataloader(), 10), strict=True))

    train_docs = {
        dm.train_dataset.corpus.document(i).tobytes() for i in range(dm.train_dataset.corpus.num_documents)
    }
    val_corpus = dm.val_dataset.corpus
    assert val_corpus.num_documents == 6  # 10 % of 60 documents
    assert not any(val_corpus.document(i).tobytes() in train_docs for i in range(val_corpus.num_documents))
    no_val = make_datamodule(tokenizer, corpus_dir, cache_dir, val_fraction=0.0)
    assert no_val.val_dataloader() == []
    with pytest.raises(ValueError, match="cannot split 1 document"):
        split_by_document(TokenizedCorpus.from_documents([[1, 2]]), 0.5)
    ten = TokenizedCorpus.from_documents([[i, i + 1] for i in range(10)])
    assert [part.num_documents for part in split_by_document(ten, 0.9)] == [1, 9]
    with pytest.raises(ValueError, match="val_fraction=0.96 of 10 documents holds out all 10, leaving none"):
        split_by_document(ten, 0.96)  # not shrunk to 9 held out and 1 to train on


class _Recorder(pl.LightningModule):
    """Records the batches it trains on; the single weight only gives the optimizer something."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.seen.append(batch["input_ids"].clone())
        return self.weight * batch["input_ids"].float().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(dm: PretrainDataModule, max_steps: int, root: Path, ckpt_path: str | None = None) -> _Recorder:
    module = _Recorder()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=root,
        callbacks=[pl.callbacks.ModelCheckpoint(dirpath=root, every_n_train_steps=3, save_top_k=-1)],
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module


@pytest.mark.filterwarnings("ignore")
def test_lightning_resume_from_a_mid_epoch_checkpoint(
    tokenizer: GLMTokenizer, corpus_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    full = _fit(make_datamodule(tokenizer, corpus_dir, cache_dir), 6, tmp_path / "full").seen
    _fit(make_datamodule(tokenizer, corpus_dir, cache_dir), 3, tmp_path / "first")
    (checkpoint,) = (tmp_path / "first").glob("*step=3.ckpt")
    resumed = _fit(
        make_datamodule(tokenizer, corpus_dir, cache_dir), 6, tmp_path / "resumed", str(checkpoint)
    )
    assert len(resumed.seen) == 3
    assert all(torch.equal(a, b) for a, b in zip(resumed.seen, full[3:], strict=True))

"""GLM pretraining data: packed samples (the official `BlockDataset`) and the Lightning DataModule.

`PackedSampleDataset` packs documents of a `TokenizedCorpus` into samples of at most
`seq_length` tokens, exactly as the official `BlockDataset` (`data_utils/datasets.py`) does;
`PretrainDataModule` tokenizes the corpora (cached), splits train / validation by document, and
serves micro-batches built by `BlankInfillingCollator`.

Determinism: a sample depends only on (seed, index); the training order only on (seed, epoch);
the corruption of a micro-batch only on (seed, epoch, micro-batch index, rank). Nothing depends on
the number of DataLoader workers, and a run restored at a micro-batch position continues with
exactly the batch that would have come next.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from datamodules.corpus import StrPath, TokenizedCorpus, tokenize_corpus
from datamodules.mixture import MixtureDataset, normalized_weights
from glm_lightning.blank_infilling import BlankInfillingCollator

# Validation never depends on the run's seed, so validation losses compare across runs.
VALIDATION_SEED = 1234
# Seed of the document-level train / validation split when it is taken from the training files.
SPLIT_SEED = 1234

SampleKey = tuple[int, int, int]  # (epoch, micro-batch index, sample index)


class PackedSampleDataset(Dataset):
    """Samples packed from whole documents as the official `data_utils/datasets.py` does.

    Item `idx` seeds its own generator from (seed, idx) and draws a document with probability
    proportional to its length. A document longer than ``seq_length - 1`` (counting its appended
    eos) is cut at a random point moved to a sentence start, prefixed with [CLS] and right-truncated
    at a sentence end when that keeps at least half of the budget. A shorter one becomes
    ``[CLS] doc eos``, followed (when `sample_across_doc`) by further sampled ``[CLS] doc eos``
    until the budget is filled, the last one truncated as above. Items are 1-D int64 arrays of at
    most `seq_length` tokens (shorter when a sentence-end cut leaves room; the collator pads).

    `tokenizer` needs ``cls_id``, ``eos_id`` and ``sentence_end_table()``; `samples_per_document`
    gives the nominal length (1000 x documents in the official code) unless `num_samples` is set.
    """

    def __init__(
        self,
        corpus: TokenizedCorpus,
        tokenizer: Any,
        seq_length: int,
        *,
        seed: int = 0,
        samples_per_document: int = 1000,
        num_samples: int | None = None,
        sample_across_doc: bool = True,
        non_sentence_start: float = 0.0,
    ) -> None:
        if seq_length < 2:
            raise ValueError(f"seq_length must be at least 2, got {seq_length}")
        if corpus.num_tokens == 0:
            raise ValueError("cannot pack samples from a corpus without tokens")
        self.corpus = corpus
        self.seq_length = seq_length
        self.seed = seed
        self.sample_across_doc = sample_across_doc
        self.non_sentence_start = non_sentence_start
        self.num_samples = samples_per_document * corpus.num_documents if num_samples is None else num_samples
        self.cls_id = int(tokenizer.cls_id)
        self.eos_id = int(tokenizer.eos_id)
        self.sentence_end = np.asarray(tokenizer.sentence_end_table(), dtype=bool)
        self._cumulative_lengths = np.cumsum(corpus.lengths)
        self._total_length = int(self._cumulative_lengths[-1])
        self._rng = np.random.RandomState()

    def __len__(self) -> int:
        return self.num_samples

    def rng(self, idx: int) -> np.random.RandomState:
        """The generator of item `idx` (a legacy RandomState, as the official code draws from one)."""
        return np.random.RandomState(self._seed_words(idx))

    def _seed_words(self, idx: int) -> np.ndarray:
        return np.random.SeedSequence([self.seed, idx]).generate_state(16)

    def _item_rng(self, idx: int) -> np.random.RandomState:
        """`rng(idx)` by reseeding one generator: 6x cheaper than building one (which costs 0.1 ms,
        3 ms of every quickstart step), the same stream."""
        self._rng.seed(self._seed_words(idx))
        return self._rng

    def __getitem__(self, idx: int) -> np.ndarray:
        idx = int(idx)
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"sample index {idx} out of range [0, {self.num_samples})")
        rng = self._item_rng(idx)
        cls = np.array([self.cls_id], dtype=np.int64)
        i = self._sample_document(rng)
        n = int(self.corpus.lengths[i]) + 1  # with its eos
        excess = n - self.seq_length + 1
        if excess > 0:  # long document: one window of it
            start = self._cut_start(i, n, excess, rng)
            # one token beyond the budget is enough to decide the right cut
            tokens = np.concatenate((cls, self._tokens(i, start, min(n, start + self.seq_length))))
            if len(tokens) == 2 and tokens[1] == self.eos_id:
                tokens = tokens[:0]
            return self._right_strip(tokens, self.seq_length)
        pieces = [cls, self._tokens(i, 0, n)]
        length = n + 1
        if self.sample_across_doc:
            while length < self.seq_length:
                i = self._sample_document(rng)
                n = int(self.corpus.lengths[i]) + 1
                room = self.seq_length - length
                is_last = n + 1 >= room
                new = self._right_strip(np.concatenate((cls, self._tokens(i, 0, min(n, room)))), room)
                pieces.append(new)
                length += len(new)
                if is_last:
                    break
        return np.concatenate(pieces)

    def _sample_document(self, rng: np.random.RandomState) -> int:
        """Index of a document drawn with probability proportional to its length."""
        position = rng.randint(self._total_length)
        return int(np.searchsorted(self._cumulative_lengths, position, side="right"))

    def _tokens(self, i: int, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of document i with its eos appended, read without copying the rest
        (documents can be whole books)."""
        doc = self.corpus.document(i)
        part = np.asarray(doc[start : min(stop, len(doc))], dtype=np.int64)
        return np.append(part, self.eos_id) if stop > len(doc) else part

    def _ends_before(self, i: int, n: int, positions: np.ndarray) -> np.ndarray:
        """Whether the token before each position ends a sentence; before 0 is the final eos, as
        Python's `tokens[-1]` in the official loop."""
        previous = (positions - 1) % n
        doc = self.corpus.document(i)
        ids = np.full(len(previous), self.eos_id, dtype=np.int64)
        inside = previous < len(doc)
        ids[inside] = doc[previous[inside]]
        return self.sentence_end[ids]

    def _cut_start(self, i: int, n: int, excess: int, rng: np.random.RandomState) -> int:
        """Random left cut, moved (at most seq_length // 2 tokens) to just after a sentence end.

        Follows the official loops exactly, vectorised over the window of allowed moves.
        """
        start = rng.randint(excess)
        if rng.random() <= self.non_sentence_start:
            return start
        limit = self.seq_length // 2
        if rng.random() < 0.5:  # move left
            candidates = np.arange(start, max(start - limit, 0) - 1, -1)
            stop = (candidates == 0) | self._ends_before(i, n, candidates)
            fallback = start - limit
        else:  # move right
            candidates = np.arange(start, min(start + limit, n) + 1)
            stop = (candidates >= n) | self._ends_before(i, n, np.minimum(candidates, n))
            fallback = start + limit
        hits = np.flatnonzero(stop)
        return int(candidates[hits[0]]) if len(hits) else fallback

    def _right_strip(self, tokens: np.ndarray, budget: int) -> np.ndarray:
        """Keep at most `budget` tokens, ending after the last sentence end if that keeps >= half."""
        if len(tokens) <= budget:
            return tokens
        ends = np.flatnonzero(self.sentence_end[tokens[1:budget]]) + 1
        keep = int(ends[-1]) + 1 if len(ends) else 1
        if keep < budget // 2:
            keep = budget
        return tokens[:keep]


# ----------------------------------------------------------------------------------------------
# Sampling order


def _epoch_permutation(size: int, seed: int, epoch: int) -> tuple[int, int]:
    """(a, b) of the permutation k -> (a * k + b) mod size of one epoch.

    Every item is already a random draw seeded by its index, so the order only has to differ
    between epochs; an affine permutation does that in O(1) memory and with random access,
    which makes restoring a position free even for billions of samples.
    """
    rng = np.random.default_rng([seed, epoch])
    a = 1
    if size > 2:
        a = int(rng.integers(1, size))
        while math.gcd(a, size) != 1:
            a = int(rng.integers(1, size))
    return a, int(rng.integers(0, size))


class TrainSampler(DistributedSampler):
    """This rank's sample keys (epoch, micro-batch index, sample index) of the training order.

    The global order of an epoch is a permutation of the dataset indices that depends only on
    (seed, epoch). It is read as global batches of ``batch_size * num_replicas`` samples; rank r
    takes the r-th `batch_size` slice of each (as the official DistributedBatchSampler), so ranks
    are disjoint. Incomplete global batches at the end of an epoch are dropped.
    `set_position(epoch, micro_batches)` makes the next iteration of that epoch skip the
    micro-batches already consumed; `len()` stays the full epoch (what Lightning expects of a
    resumable loader). A DistributedSampler subclass, so Lightning does not replace it.
    """

    def __init__(
        self, dataset_size: int, batch_size: int, *, seed: int, num_replicas: int = 1, rank: int = 0
    ) -> None:
        super().__init__(range(dataset_size), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.batches_per_epoch = dataset_size // (batch_size * num_replicas)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{dataset_size} samples cannot fill one global batch of {batch_size} x {num_replicas}"
            )
        self.consumed = 0  # micro-batches of the current epoch handed out on this rank
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.consumed = 0
        self.epoch = epoch

    def set_position(self, epoch: int, micro_batches: int) -> None:
        self.epoch = epoch
        self._resume = (epoch, micro_batches)

    def position(self) -> tuple[int, int]:
        """(epoch, micro-batches of it consumed) on this rank."""
        return self._resume if self._resume is not None else (self.epoch, self.consumed)

    def __len__(self) -> int:
        return self.batches_per_epoch * self.batch_size

    def __iter__(self) -> Iterator[SampleKey]:
        epoch = self.epoch
        start = self._resume[1] if self._resume is not None and self._resume[0] == epoch else 0
        self._resume = None
        self.consumed = start
        a, b = _epoch_permutation(self.dataset_size, self.seed, epoch)
        step = self.batch_size * self.num_replicas
        for index in range(start, self.batches_per_epoch):
            first = index * step + self.rank * self.batch_size
            for k in range(first, first + self.batch_size):
                yield epoch, index, (a * k + b) % self.dataset_size


class EvalSampler(DistributedSampler):
    """Sample keys of a fixed evaluation set: batch j holds samples j*B .. j*B+B-1 in order.

    Rank r takes batches r, r + W, ...; every rank gets the same number of batches (the first
    ones are repeated on ranks that would get fewer), so collective ops stay in step. Only whole
    batches are used: the dataset size must be a multiple of `batch_size`.
    """

    def __init__(self, dataset_size: int, batch_size: int, *, num_replicas: int = 1, rank: int = 0):
        if dataset_size == 0 or dataset_size % batch_size:
            raise ValueError(f"evaluation set of {dataset_size} samples is not whole batches of {batch_size}")
        super().__init__(range(dataset_size), num_replicas=num_replicas, rank=rank, shuffle=False)
        self.batch_size = batch_size
        self.num_batches = dataset_size // batch_size
        self.batches_per_rank = math.ceil(self.num_batches / num_replicas)

    def batch_indices(self) -> list[int]:
        """The evaluation batches of this rank, in order."""
        return [(j * self.num_replicas + self.rank) % self.num_batches for j in range(self.batches_per_rank)]

    def __len__(self) -> int:
        return self.batches_per_rank * self.batch_size

    def __iter__(self) -> Iterator[SampleKey]:
        for batch in self.batch_indices():
            for i in range(batch * self.batch_size, (batch + 1) * self.batch_size):
                yield 0, batch, i


class _KeyedDataset(Dataset):
    """Looks up the sample of a key and passes the key's (epoch, micro-batch index) along, with the
    source the sample came from (0 unless the dataset is a mixture)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self._source_of = getattr(dataset, "source_of", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: SampleKey) -> tuple[tuple[int, int], np.ndarray, int]:
        epoch, batch, idx = key
        source = self._source_of(idx) if self._source_of is not None else 0
        return (epoch, batch), self.dataset[idx], source


class BatchCollate:
    """Collate function: `BlankInfillingCollator` with the generator of this exact micro-batch.

    The generator comes from (seed, epoch, micro-batch index, rank) carried by the keys, not from
    per-process call counts, so batches do not depend on the number of workers, on persistent
    workers missing `set_epoch`, or on where a restored run starts.
    """

    def __init__(self, collator: BlankInfillingCollator, *, seed: int, rank: int, num_sources: int = 1):
        self.collator = collator
        self.seed = seed
        self.rank = rank
        self.num_sources = num_sources

    def __call__(self, items: Sequence[tuple[Any, ...]]) -> dict[str, Any]:
        keys = {item[0] for item in items}
        if len(keys) != 1:
            raise ValueError(f"a micro-batch mixes samples of several batches: {sorted(keys)}")
        ((epoch, index),) = keys
        rng = BlankInfillingCollator.rng_for(self.seed, epoch, index, self.rank)
        batch = self.collator.collate([item[1] for item in items], rng)
        if self.num_sources > 1:  # tokens of each source in this micro-batch (the mixture's shares)
            sources = [item[2] for item in items]
            lengths = [len(item[1]) for item in items]
            counts = np.bincount(sources, weights=lengths, minlength=self.num_sources)
            batch["source_tokens"] = torch.as_tensor(counts, dtype=torch.float64)
        return batch


class _TrainDataLoader(DataLoader):
    """DataLoader that counts the micro-batches it hands out (the position without a trainer)."""

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        sampler: TrainSampler = self.sampler
        for batch in super().__iter__():
            sampler.consumed += 1
            yield batch


# ----------------------------------------------------------------------------------------------
# DataModule


class TooFewDocuments(ValueError):
    """A corpus with fewer than two documents cannot give up some of them for validation."""


def split_by_document(
    corpus: TokenizedCorpus, val_fraction: float, *, seed: int = SPLIT_SEED
) -> tuple[TokenizedCorpus, TokenizedCorpus]:
    """Deterministic (train, validation) split of whole documents; at least one in each part."""
    n = corpus.num_documents
    if n < 2:
        raise TooFewDocuments(
            f"cannot split {n} document(s) into train and validation; pass val_files, or split the "
            "text into documents (form feeds or document_separator)"
        )
    num_val = max(round(val_fraction * n), 1)
    if num_val >= n:  # never shrunk silently to one training document
        raise TooFewDocuments(f"val_fraction={val_fraction} of {n} documents holds out all {n}, leaving none "
                              "to train on; lower data.val_fraction, pass val_files, or give more documents")
    order = np.random.default_rng(seed).permutation(n)
    return corpus.subset(np.sort(order[num_val:])), corpus.subset(np.sort(order[:num_val]))


class PretrainDataModule(pl.LightningDataModule):
    """Corpus files -> cached tokens -> packed samples -> blank-infilling micro-batches.

    Validation uses `val_files`, or else a `val_fraction` of the training documents (a fixed
    split); it is a fixed set of `val_samples` packed samples corrupted with a fixed seed, so
    validation losses compare across runs. Training batches follow `TrainSampler`; the position
    (epoch, micro-batches consumed on this rank) is saved by `state_dict()` (with a trainer: its
    progress, which accounts for prefetching) and restored by `load_state_dict()` or
    `set_train_position()`. `collator` and extra keyword arguments go to `BlankInfillingCollator`.
    With `train_weights` (one per `train_files` entry) each entry is a source and training samples
    are blended from them in those proportions (`datamodules.mixture`); batches then carry
    ``source_tokens``, the tokens each source contributed. `num_proc` and `rehash` go to
    `tokenize_corpus`.
    """

    def __init__(
        self,
        tokenizer: Any,
        train_files: StrPath | Sequence[StrPath],
        val_files: StrPath | Sequence[StrPath] = (),
        *,
        val_fraction: float = 0.05,
        cache_dir: StrPath | None = None,
        seq_length: int = 512,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        val_samples: int = 256,
        num_workers: int = 0,
        seed: int = 0,
        samples_per_document: int = 1000,
        sample_across_doc: bool = True,
        document_separator: str | None = None,
        progress: bool = True,
        num_proc: int = 1,
        rehash: bool = False,
        train_weights: Sequence[float] | None = None,
        collator: Mapping[str, Any] | None = None,
        **collator_kwargs: Any,
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.train_files = [train_files] if isinstance(train_files, (str, os.PathLike)) else list(train_files)
        self.val_files = [val_files] if isinstance(val_files, (str, os.PathLike)) else list(val_files)
        self.val_fraction = val_fraction
        self.cache_dir = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
        self.seq_length = seq_length
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.val_samples = val_samples
        self.num_workers = num_workers
        self.seed = seed
        self.samples_per_document = samples_per_document
        self.sample_across_doc = sample_across_doc
        self.document_separator = document_separator
        self.progress = progress
        self.num_proc = num_proc
        self.rehash = rehash
        self.train_weights = list(train_weights) if train_weights else None
        if self.train_weights is not None:
            normalized_weights(self.train_weights, len(self.train_files))  # one positive weight each
        self.collator_kwargs = {**(collator or {}), **collator_kwargs}
        for reserved in ("seed", "rank"):
            if reserved in self.collator_kwargs:
                raise ValueError(f"collator option {reserved!r} is set by the datamodule")
        self.collator_kwargs.setdefault("max_seq_length", seq_length)
        self.train_dataset: PackedSampleDataset | MixtureDataset | None = None
        self.val_dataset: PackedSampleDataset | None = None
        self._train_sampler: TrainSampler | None = None
        self._resume: tuple[int | None, int] | None = None  # (epoch or None = count is a total, count)

    # -- data ----------------------------------------------------------------------------------

    def _tokenize(self, files: list[StrPath]) -> TokenizedCorpus:
        return tokenize_corpus(
            files,
            self.tokenizer,
            self.cache_dir,
            document_separator=self.document_separator,
            progress=self.progress,
            num_proc=self.num_proc,
            rehash=self.rehash,
        )

    def prepare_data(self) -> None:
        """Tokenize into the cache once (Lightning calls this on one process per node)."""
        self._tokenize(self.train_files)
        if self.val_files:
            self._tokenize(self.val_files)

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        if self.train_weights is None:
            sources = [self._tokenize(self.train_files)]
        else:  # one source per train_files entry
            sources = [self._tokenize([entry]) for entry in self.train_files]
        if self.val_files:
            val: TokenizedCorpus | None = self._tokenize(self.val_files)
        elif self.val_fraction > 0:
            splits = [split_by_document(source, self.val_fraction) for source in sources]
            sources = [train for train, _ in splits]
            val = TokenizedCorpus.concatenate([held_out for _, held_out in splits])
        else:
            val = None
        num_samples = self.samples_per_document * sum(source.num_documents for source in sources)
        datasets = [
            PackedSampleDataset(
                source,
                self.tokenizer,
                self.seq_length,
                seed=self.seed,
                num_samples=num_samples,
                sample_across_doc=self.sample_across_doc,
            )
            for source in sources
        ]
        if self.train_weights is None:
            self.train_dataset = datasets[0]
        else:
            self.train_dataset = MixtureDataset(datasets, self.train_weights, seed=self.seed,
                                                num_samples=num_samples)
        if val is not None and self.val_samples > 0:
            # whole validation batches: val_samples rounded up to a multiple of the batch size
            num_samples = math.ceil(self.val_samples / self.val_batch_size) * self.val_batch_size
            self.val_dataset = PackedSampleDataset(
                val,
                self.tokenizer,
                self.seq_length,
                seed=VALIDATION_SEED,
                num_samples=num_samples,
                sample_across_doc=self.sample_across_doc,
            )

    def _data_parallel_rank(self) -> tuple[int, int]:
        """(rank, world size) of data parallelism: from the trainer when attached, else (0, 1)."""
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        kwargs = trainer.distributed_sampler_kwargs
        if kwargs:
            return int(kwargs["rank"]), int(kwargs["num_replicas"])
        return int(trainer.global_rank), int(trainer.world_size)

    def _collator(self) -> BlankInfillingCollator:
        return BlankInfillingCollator(self.tokenizer, **self.collator_kwargs)

    def _loader(
        self,
        cls: type[DataLoader],
        dataset: Dataset,
        sampler: TrainSampler | EvalSampler,
        collate: BatchCollate,
    ) -> Any:
        return cls(
            _KeyedDataset(dataset),
            batch_size=sampler.batch_size,
            sampler=sampler,
            collate_fn=collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        self._require_setup()
        rank, world_size = self._data_parallel_rank()
        sampler = TrainSampler(
            len(self.train_dataset), self.batch_size, seed=self.seed, num_replicas=world_size, rank=rank
        )
        if self.trainer is not None:
            # Lightning creates the iterator of a resumed run before it calls set_epoch
            sampler.set_epoch(self.trainer.current_epoch)
        if self._resume is not None:
            sampler.set_position(*self._resolve(self._resume, sampler))
            self._resume = None
        self._train_sampler = sampler
        num_sources = len(self.train_weights) if self.train_weights else 1
        collate = BatchCollate(self._collator(), seed=self.seed, rank=rank, num_sources=num_sources)
        return self._loader(_TrainDataLoader, self.train_dataset, sampler, collate)

    def val_dataloader(self) -> DataLoader | list:
        self._require_setup()
        if self.val_dataset is None:
            return []
        rank, world_size = self._data_parallel_rank()
        sampler = EvalSampler(len(self.val_dataset), self.val_batch_size, num_replicas=world_size, rank=rank)
        # rank 0 for every rank: a validation batch is corrupted the same way wherever it runs
        collate = BatchCollate(self._collator(), seed=VALIDATION_SEED, rank=0)
        return self._loader(DataLoader, self.val_dataset, sampler, collate)

    def _require_setup(self) -> None:
        if self.train_dataset is None:
            self.setup()

    # -- position --------------------------------------------------------------------------------

    @staticmethod
    def _resolve(resume: tuple[int | None, int], sampler: TrainSampler) -> tuple[int, int]:
        epoch, count = resume
        if epoch is None:
            return divmod(count, sampler.batches_per_epoch)
        return epoch, count

    def set_train_position(self, micro_batches_consumed: int, epoch: int | None = None) -> None:
        """Continue training after `micro_batches_consumed` micro-batches of this rank.

        Without `epoch` the count is the total since the start of training (later epochs follow
        from the epoch length); with `epoch` it counts within that epoch. The position applies to
        the next iteration of that epoch (with a trainer: when the trainer's epoch matches).
        """
        if micro_batches_consumed < 0:
            raise ValueError(f"micro_batches_consumed must be >= 0, got {micro_batches_consumed}")
        self._resume = (epoch, int(micro_batches_consumed))
        if self._train_sampler is not None:
            self._train_sampler.set_position(*self._resolve(self._resume, self._train_sampler))
            self._resume = None

    def train_position(self) -> tuple[int, int]:
        """(epoch, micro-batches of it consumed on this rank)."""
        trainer = self.trainer
        if trainer is not None and trainer.state.fn == "fit":
            # the batches the fit loop has taken (restored with the loop state on resume)
            return trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.ready
        if self._train_sampler is not None:
            return self._train_sampler.position()
        if self._resume is not None:
            epoch, count = self._resume
            if epoch is not None:
                return epoch, count
            if self.train_dataset is not None:
                _, world_size = self._data_parallel_rank()
                return divmod(count, len(self.train_dataset) // (self.batch_size * world_size))
            return 0, count
        return 0, 0

    def state_dict(self) -> dict[str, Any]:
        epoch, micro_batches = self.train_position()
        _, world_size = self._data_parallel_rank()
        return {
            "epoch": epoch,
            "micro_batches": micro_batches,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": world_size,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        _, world_size = self._data_parallel_rank()
        current = {"seed": self.seed, "batch_size": self.batch_size, "world_size": world_size}
        changed = {k: (state_dict[k], v) for k, v in current.items() if state_dict.get(k, v) != v}
        if changed:
            warnings.warn(
                f"data settings changed since the checkpoint (saved, now): {changed}; the restored "
                "position no longer continues the same sample order",
                stacklevel=2,
            )
        self.set_train_position(int(state_dict["micro_batches"]), epoch=int(state_dict["epoch"]))


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "glm_lightning" / "tokens"

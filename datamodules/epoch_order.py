"""The training order of the finetuning datamodules (seq2seq, SuperGLUE), resumable inside an epoch.

Each epoch is DistributedSampler's permutation of (seed, epoch), split over the ranks: the same for
any worker count. The position in it, (epoch, batches taken), goes into every checkpoint through the
datamodule's ``state_dict``, so a run resumed mid-epoch trains on exactly the batches, in the same
order, that an uninterrupted run would have.
"""

from __future__ import annotations

from collections.abc import Iterator

import lightning as L
from torch.utils.data import Dataset, DistributedSampler


class EpochSampler(DistributedSampler):
    """The training order: DistributedSampler's permutation of (seed, epoch) and its share of each
    rank, which a resumed run continues inside an epoch by leaving out the ``resume`` batches of it
    that were already trained (``len`` stays the whole epoch, as Lightning expects)."""

    def __init__(self, dataset: Dataset, batch_size: int, *, seed: int, num_replicas: int = 1, rank: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.batch_size = batch_size
        self.resume: tuple[int, int] | None = None  # (epoch, batches of it already trained)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip = self.resume[1] * self.batch_size if self.resume and self.resume[0] == self.epoch else 0
        self.resume = None
        return iter(indices[skip:])


class ResumableOrder:
    """For a ``LightningDataModule``: its training sampler and the checkpointed position in it."""

    _resume: tuple[int, int] | None = None

    def epoch_sampler(self, dataset: Dataset, batch_size: int, seed: int) -> EpochSampler:
        """The sampler of a training DataLoader: this rank's share of the epoch's order, continuing
        from a restored position."""
        trainer: L.Trainer | None = self.trainer  # type: ignore[attr-defined]
        ranks = (trainer.distributed_sampler_kwargs or {}) if trainer is not None else {}
        sampler = EpochSampler(dataset, batch_size, seed=seed, num_replicas=ranks.get("num_replicas", 1),
                               rank=ranks.get("rank", 0))
        if trainer is not None:  # Lightning creates the iterator of a resumed run before set_epoch
            sampler.set_epoch(trainer.current_epoch)
        sampler.resume, self._resume = self._resume, None
        return sampler

    def state_dict(self) -> dict[str, int]:
        """(epoch, batches of it taken by the fit loop) while fitting: where the training order stands."""
        trainer: L.Trainer | None = self.trainer  # type: ignore[attr-defined]
        if trainer is None or trainer.state.fn != "fit":
            return {}
        taken = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        return {"epoch": trainer.current_epoch, "batches": taken}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._resume = (int(state_dict["epoch"]), int(state_dict["batches"])) if state_dict else None

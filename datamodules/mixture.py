"""Weighted mixtures of pretraining sources (``data.train_weights``).

Megatron's blended dataset assigns sample k of the blend to the source whose share so far falls
furthest behind its weight, which needs the whole assignment computed up front. Here the dataset
length can be billions of samples, so sample k goes to the source in whose cumulative-weight
interval ``frac((k + 1) * g + offset)`` falls, g being the golden ratio's fractional part: a
low-discrepancy sequence, so that every prefix of the blend (and every long enough stretch of it)
holds each source within a few samples of its weight, with O(1) random access. The offset comes
from the seed. The assignment depends only on (seed, weights, k), so a run restored at a position
continues the same blend. Within a source, sample k is that source's packed sample k (each packed
sample draws its own documents from an index-seeded generator).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import Dataset

_GOLDEN = (5**0.5 - 1) / 2


def normalized_weights(weights: Sequence[float], num_sources: int) -> np.ndarray:
    """`weights` as probabilities; one positive weight per source is required."""
    if len(weights) != num_sources:
        raise ValueError(f"{len(weights)} weights given for {num_sources} sources; give one per source")
    w = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"source weights must be positive numbers, got {list(weights)}")
    return w / w.sum()


def blend_sources(indices: np.ndarray, weights: np.ndarray, seed: int) -> np.ndarray:
    """The source of each blend index (vectorised; see the module docstring)."""
    offset = np.random.default_rng([seed, 17]).random()
    u = np.modf((np.asarray(indices, dtype=np.float64) + 1) * _GOLDEN + offset)[0]
    return np.minimum(np.searchsorted(np.cumsum(weights), u, side="right"), len(weights) - 1)


class MixtureDataset(Dataset):
    """Packed samples blended from several sources in fixed proportions."""

    def __init__(self, sources: Sequence[Dataset], weights: Sequence[float], *, seed: int,
                 num_samples: int) -> None:
        self.sources = list(sources)
        self.weights = normalized_weights(weights, len(self.sources))
        self.seed = seed
        self.num_samples = num_samples
        for source in self.sources:
            if len(source) < num_samples:
                raise ValueError(f"a source has {len(source)} samples, fewer than the blend's {num_samples}")

    def __len__(self) -> int:
        return self.num_samples

    def source_of(self, idx: int) -> int:
        return int(blend_sources(np.array([idx]), self.weights, self.seed)[0])

    def __getitem__(self, idx: int) -> np.ndarray:
        idx = int(idx)
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"sample index {idx} out of range [0, {self.num_samples})")
        return self.sources[self.source_of(idx)][idx]


class SourceShareLogger(L.Callback):
    """Logs each source's share of the training tokens consumed so far (``data/share/<source>``),
    summed over ranks; the totals are saved in checkpoints, so a resumed run goes on counting."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = [re.sub(r"[^\w.\-]+", "_", name).strip("_") or f"source{k}"
                      for k, name in enumerate(names)]
        self.totals = torch.zeros(len(names), dtype=torch.float64)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if "source_tokens" not in batch:
            return
        counts = trainer.strategy.reduce(batch["source_tokens"].to(pl_module.device), reduce_op="sum")
        self.totals += counts.detach().cpu().to(torch.float64)
        shares = self.totals / self.totals.sum().clamp(min=1)
        pl_module.log_dict({f"data/share/{k}_{name}": float(share)
                            for k, (name, share) in enumerate(zip(self.names, shares, strict=True))},
                           on_step=True, on_epoch=False, batch_size=1, rank_zero_only=True)

    def state_dict(self) -> dict[str, Any]:
        return {"totals": self.totals.tolist()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.totals = torch.tensor(state_dict["totals"], dtype=torch.float64)

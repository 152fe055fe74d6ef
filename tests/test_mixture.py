"""Weighted source mixtures: proportions, determinism, resume, per-source token shares."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from datamodules.builtin_corpus import write_builtin_corpus
from datamodules.mixture import MixtureDataset, blend_sources
from datamodules.pretrain import PackedSampleDataset, PretrainDataModule
from experiments.config import load_config
from glm_lightning.config import ConfigError
from glm_lightning.tokenizer import GLMTokenizer


@pytest.mark.parametrize("weights", [[0.3, 0.7], [0.2, 0.5, 0.3], [1.0, 1.0, 8.0]])
def test_every_prefix_of_the_blend_holds_the_weights(weights: list[float]) -> None:
    w = np.asarray(weights) / sum(weights)
    sources = blend_sources(np.arange(50_000), w, seed=5)
    counts = np.cumsum(np.eye(len(w))[sources], axis=0)
    expected = np.arange(1, 50_001)[:, None] * w
    assert np.abs(counts - expected).max() < 5  # within a few samples at every length
    window = np.bincount(sources[20_000:30_000], minlength=len(w)) / 10_000
    assert np.abs(window - w).max() < 0.001  # and in any long stretch, e.g. after a resume
    assert not np.array_equal(sources, blend_sources(np.arange(50_000), w, seed=6))


def test_mixture_samples_come_from_their_sources(tokenizer: GLMTokenizer) -> None:
    from datamodules.corpus import TokenizedCorpus

    low = TokenizedCorpus.from_documents([[5] * 40, [6] * 30])
    high = TokenizedCorpus.from_documents([[7] * 50])
    datasets = [PackedSampleDataset(c, tokenizer, 16, seed=1, num_samples=2000) for c in (low, high)]
    mixture = MixtureDataset(datasets, [1, 3], seed=1, num_samples=2000)
    for k in range(0, 2000, 7):
        sample = mixture[k]
        assert set(sample.tolist()) & {5, 6, 7} <= ({7} if mixture.source_of(k) else {5, 6})
        assert np.array_equal(sample, datasets[mixture.source_of(k)][k])
    share = np.mean([mixture.source_of(k) for k in range(2000)])
    assert abs(share - 0.75) < 0.005
    with pytest.raises(ValueError, match="one per source"):
        MixtureDataset(datasets, [1.0], seed=1, num_samples=10)


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("sources")
    write_builtin_corpus(root / "a", num_documents=30, seed=1)
    write_builtin_corpus(root / "b", num_documents=30, seed=2)
    return [root / "a", root / "b"]


def mixture_datamodule(tokenizer: GLMTokenizer, sources: list[Path], cache: Path,
                       **kwargs: Any) -> PretrainDataModule:
    dm = PretrainDataModule(tokenizer, sources, cache_dir=cache, seq_length=64, batch_size=4, val_samples=4,
                            val_fraction=0.1, progress=False, train_weights=[0.25, 0.75], **kwargs)
    dm.setup("fit")
    return dm


def test_resume_continues_the_blend_exactly(tokenizer: GLMTokenizer, two_sources: list[Path],
                                            tmp_path: Path) -> None:
    full = []
    for batch in mixture_datamodule(tokenizer, two_sources, tmp_path).train_dataloader():
        full.append(batch)
        if len(full) == 6:
            break
    resumed = mixture_datamodule(tokenizer, two_sources, tmp_path)
    resumed.set_train_position(3)
    after = []
    for batch in resumed.train_dataloader():
        after.append(batch)
        if len(after) == 3:
            break
    for a, b in zip(full[3:], after, strict=True):
        assert a.keys() == b.keys() and "source_tokens" in a
        assert all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def test_batches_carry_each_sources_tokens(tokenizer: GLMTokenizer, two_sources: list[Path],
                                           tmp_path: Path) -> None:
    dm = mixture_datamodule(tokenizer, two_sources, tmp_path)
    totals = torch.zeros(2, dtype=torch.float64)
    for k, batch in enumerate(dm.train_dataloader()):
        assert batch["source_tokens"].sum() > 0
        totals += batch["source_tokens"]
        if k == 49:
            break
    share = totals / totals.sum()
    assert abs(float(share[1]) - 0.75) < 0.03  # 200 samples of about 64 tokens


def test_weights_are_checked_by_the_config() -> None:
    with pytest.raises(ConfigError, match="one weight per 'data.train_files' entry"):
        load_config("pretrain", ["data.train_files=[a,b]", "data.train_weights=[1.0]"])
    with pytest.raises(ConfigError, match="must be positive"):
        load_config("pretrain", ["data.train_files=[a,b]", "data.train_weights=[1.0,0]"])
    cfg = load_config("pretrain", ["data.train_files=[a,b]", "data.train_weights=[0.3,0.7]"])
    assert list(cfg.data.train_weights) == [0.3, 0.7]


@pytest.mark.slow
def test_pretraining_logs_each_sources_share_to_mlflow(tmp_path: Path, two_sources: list[Path]) -> None:
    import mlflow

    from experiments.jobs.pretrain import run

    cfg = load_config("quickstart", [
        f"output_dir={tmp_path / 'outputs'}", f"data.cache_dir={tmp_path / 'cache'}", "run_name=mix",
        "model.num_layers=2", "model.hidden_size=64", "data.seq_length=64", "data.batch_size=4",
        "trainer.max_steps=20", "trainer.val_check_interval=20", "trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=2", "tokenizer.vocab_size=600",
        f"data.train_files=[{two_sources[0]},{two_sources[1]}]", "data.train_weights=[1,3]",
    ])
    run(cfg)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    (result,) = mlflow.search_runs(experiment_names=["quickstart"], output_format="list")
    shares = {k: v for k, v in result.data.metrics.items() if k.startswith("data/share/")}
    assert set(shares) == {"data/share/0_a", "data/share/1_b"}
    assert shares["data/share/0_a"] + shares["data/share/1_b"] == pytest.approx(1.0)
    assert abs(shares["data/share/1_b"] - 0.75) < 0.06  # 80 samples of about 64 tokens

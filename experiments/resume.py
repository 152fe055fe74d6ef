"""Resuming a run with the settings it started with: a changed config is refused before anything is
written, unless the change cannot alter what the run has computed so far or is named explicitly.

Every checkpoint records the resolved config it was trained with (``RecordConfig``), and a resume
is checked against that record: ``config.yaml`` beside the checkpoints is for people and may be
deleted or edited, the checkpoint is what training continues from."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from experiments.config import flatten, format_config, load_saved_config, save_config
from glm_lightning.atomic import atomic_write_text
from glm_lightning.checkpoint_io import checkpoint_metadata
from glm_lightning.config import ConfigError

CONFIG_FILE = "config.yaml"
RUN_CONFIG = "run_config"  # checkpoint entry: the resolved config (a plain dict) it was trained with
# How a run is found and started, not what it computes: never compared.
PLACEMENT = ("output_dir", "run_name", "resume", "resume_overrides", "overwrite", "print_config")
# Keys a resumed run may change freely. Each leaves the steps already trained, their data order and
# their random draws as they were: how far training goes (max_steps), how often and how much it is
# validated, logged and checkpointed, how long a collective waits, how many threads compute, where
# and by how many processes the data is loaded or tokenized (shards are keyed by content, and the
# sample order is derived from the seed and the step, never from the worker count; node-local caches
# differ by node), and
# evaluation-only batching.
RESUME_SAFE = (
    "trainer.max_steps",
    "trainer.val_check_interval",
    "trainer.limit_val_batches",
    "trainer.log_every_n_steps",
    "trainer.collective_timeout_s",
    "trainer.threads",
    "data.cache_dir",
    "data.num_workers",
    "data.num_proc",
    "data.rehash",
    "superglue.eval_batch_size",
    "superglue.test_predictions",
)


class RecordConfig(L.Callback):
    """Writes the run's resolved config into every checkpoint it saves (``RUN_CONFIG``)."""

    def __init__(self, cfg: DictConfig) -> None:
        self.config = OmegaConf.to_container(cfg, resolve=True)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[RUN_CONFIG] = self.config


def recorded_config(checkpoint: str | Path) -> dict | None:
    """The resolved config a checkpoint was trained with, None for a checkpoint that records none."""
    return checkpoint_metadata(checkpoint).get(RUN_CONFIG)


def _flat(tree: dict) -> dict[str, Any]:
    return {k: v for k, v in flatten(tree).items() if k not in PLACEMENT}


def _tree(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def _differences(stored: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {key: (stored.get(key), new.get(key)) for key in sorted(stored.keys() | new.keys())
            if stored.get(key) != new.get(key)}


def config_changes(cfg: DictConfig, stored_path: Path) -> dict[str, tuple[Any, Any]]:
    """key -> (stored, new) for every result-relevant key whose value differs from ``stored_path``."""
    return _differences(_flat(_tree(load_saved_config(stored_path))), _flat(_tree(cfg)))


def resume_config(cfg: DictConfig, run_dir: Path, resuming: bool, checkpoint: str | Path | None = None,
                  ) -> dict[str, str]:
    """Check ``cfg`` against the config the run's ``checkpoint`` was trained with, then record it;
    returns the MLflow tags that record an accepted change (``resume_override.<n>``).

    A new run (or one ``resuming`` nothing) gets ``config.yaml``. A resumed one keeps it: a
    difference in a key outside ``RESUME_SAFE`` and ``resume_overrides`` is a ConfigError listing
    every differing key, raised before any file or MLflow run is touched; accepted differences are
    written beside it as ``config.resume-<n>.yaml``. The reference is the config recorded in
    ``checkpoint``; ``config.yaml`` only for a checkpoint that records none (written by an older
    version). A missing ``config.yaml`` is restored from the checkpoint, with a warning; with
    neither, the resume is refused. Every rank checks; rank zero writes.
    """
    unknown = [key for key in cfg.resume_overrides if key not in _flat(_tree(cfg))]
    if unknown:
        raise ConfigError(f"invalid key {unknown[0]!r} in 'resume_overrides': not a config key "
                          "(write dotted keys, e.g. resume_overrides=[optim.lr])")
    stored = run_dir / CONFIG_FILE
    recorded = recorded_config(checkpoint) if resuming and checkpoint is not None else None
    if recorded is not None:
        reference, source = recorded, f"the config recorded in {checkpoint}"
    elif resuming and stored.is_file():
        reference, source = _tree(load_saved_config(stored)), str(stored)
    elif resuming and checkpoint is not None:
        raise ConfigError(f"resume refused: {checkpoint} records no config and {stored} is missing, so the "
                          "settings it was trained with cannot be checked; restore that config.yaml")
    else:
        if rank_zero_only.rank == 0:
            save_config(cfg, stored)
        return {}
    changes = _differences(_flat(reference), _flat(_tree(cfg)))
    allowed = {*RESUME_SAFE, *cfg.resume_overrides}
    refused = {key: change for key, change in changes.items() if key not in allowed}
    if refused:
        lines = [f"  {key}: {old!r} -> {new!r}" for key, (old, new) in refused.items()]
        raise ConfigError(
            f"resume refused: {len(refused)} keys differ from {source}:\n" + "\n".join(lines) + "\n"
            "resume with the stored values, or accept the change with "
            f"resume_overrides=[{','.join(refused)}] (the original config.yaml is kept)")
    if not stored.is_file() and rank_zero_only.rank == 0:  # recorded is not None: restore it
        atomic_write_text(stored, format_config(OmegaConf.create(recorded)))
        print(f"warning: {stored} was missing; restored from the config recorded in {checkpoint}",
              file=sys.stderr)
    if not changes:
        return {}
    n = len(list(run_dir.glob("config.resume-*.yaml"))) + 1
    if rank_zero_only.rank == 0:
        save_config(cfg, run_dir / f"config.resume-{n}.yaml")
    record = "; ".join(f"{key}: {old} -> {new}" for key, (old, new) in changes.items())
    return {f"resume_override.{n}": record}

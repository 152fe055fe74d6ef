"""Resuming a run with the settings it started with: a changed config is refused before anything is
written, unless the change cannot alter what the run has computed so far or is named explicitly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from experiments.config import flatten, load_saved_config, save_config
from glm_lightning.config import ConfigError

CONFIG_FILE = "config.yaml"
# How a run is found and started, not what it computes: never compared.
PLACEMENT = ("output_dir", "run_name", "resume", "resume_overrides", "print_config")
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


def _flat(cfg: DictConfig) -> dict[str, Any]:
    return {k: v for k, v in flatten(OmegaConf.to_container(cfg, resolve=True)).items() if k not in PLACEMENT}


def config_changes(cfg: DictConfig, stored_path: Path) -> dict[str, tuple[Any, Any]]:
    """key -> (stored, new) for every result-relevant key whose value differs from ``stored_path``."""
    stored, new = _flat(load_saved_config(stored_path)), _flat(cfg)
    return {key: (stored.get(key), new.get(key)) for key in sorted(stored.keys() | new.keys())
            if stored.get(key) != new.get(key)}


def resume_config(cfg: DictConfig, run_dir: Path, resuming: bool) -> dict[str, str]:
    """Check ``cfg`` against the config a run started with, then record it; returns the MLflow tags
    that record an accepted change (``resume_override.<n>``).

    A new run (or one ``resuming`` nothing) gets ``config.yaml``. A resumed one keeps it: a
    difference in a key outside ``RESUME_SAFE`` and ``resume_overrides`` is a ConfigError listing
    every differing key, raised before any file or MLflow run is touched; accepted differences are
    written beside it as ``config.resume-<n>.yaml``. Every rank checks; rank zero writes.
    """
    unknown = [key for key in cfg.resume_overrides if key not in _flat(cfg)]
    if unknown:
        raise ConfigError(f"invalid key {unknown[0]!r} in 'resume_overrides': not a config key "
                          "(write dotted keys, e.g. resume_overrides=[optim.lr])")
    stored = run_dir / CONFIG_FILE
    if not resuming or not stored.is_file():
        if rank_zero_only.rank == 0:
            save_config(cfg, stored)
        return {}
    changes = config_changes(cfg, stored)
    allowed = {*RESUME_SAFE, *cfg.resume_overrides}
    refused = {key: change for key, change in changes.items() if key not in allowed}
    if refused:
        lines = [f"  {key}: {old!r} -> {new!r}" for key, (old, new) in refused.items()]
        raise ConfigError(
            f"resume refused: {len(refused)} keys differ from {stored}:\n" + "\n".join(lines) + "\n"
            "resume with the stored values, or accept the change with "
            f"resume_overrides=[{','.join(refused)}] (the original config.yaml is kept)")
    if not changes:
        return {}
    n = len(list(run_dir.glob("config.resume-*.yaml"))) + 1
    if rank_zero_only.rank == 0:
        save_config(cfg, run_dir / f"config.resume-{n}.yaml")
    record = "; ".join(f"{key}: {old} -> {new}" for key, (old, new) in changes.items())
    return {f"resume_override.{n}": record}

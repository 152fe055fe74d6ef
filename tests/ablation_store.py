"""A real MLflow store holding ablation sweeps laid out as ``exp=ablations`` logs them.

Experiment "ablations":

* sweep "other" (oldest): glm and masked_lm, one seed each, RTE only;
* sweep "mini" (an older run of the same name): glm, one seed, numbers that must never show;
* sweep "broken": a single FAILED variant run;
* sweep "mini" (latest, still RUNNING as when the sweep job writes its report): glm with seeds 1 and 2,
  no_shuffle with seeds 1 and 2, classifier with seed 1 finetuned from glm seed 1's pretraining
  run, and a FAILED glm seed 3 whose numbers must be ignored. Each pretraining stage run logs
  ``train/loss``, ``val/loss`` and ``train/loss_span`` histories; a finetune stage run logs
  SuperGLUE numbers that must not be mistaken for a variant's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

EXPERIMENT = "ablations"
START = 1_700_000_000_000  # start times (ms) are explicit so "most recent" is well defined

# Final metrics of the finished variant runs of the latest "mini" sweep, by (variant, seed).
LATEST: dict[tuple[str, int], dict[str, float]] = {
    ("glm", 1): {"COPA/accuracy": 0.70, "RTE/accuracy": 0.60, "CB/f1": 0.80, "CB/accuracy": 0.75,
                 "table1/avg": 0.69, "pretrain/val_loss": 4.5, "pretrain/unigram_baseline": 6.0,
                 "perplexity/ppl": 25.0, "perplexity/loss": 3.22, "perplexity/adjusted_ppl": 40.0},
    ("glm", 2): {"COPA/accuracy": 0.72, "RTE/accuracy": 0.64, "CB/f1": 0.84, "CB/accuracy": 0.79,
                 "table1/avg": 0.72, "pretrain/val_loss": 4.7, "pretrain/unigram_baseline": 6.0,
                 "perplexity/ppl": 27.0, "perplexity/loss": 3.30, "perplexity/adjusted_ppl": 43.0},
    ("no_shuffle", 1): {"COPA/accuracy": 0.60, "RTE/accuracy": 0.50, "CB/f1": 0.70, "CB/accuracy": 0.70,
                        "table1/avg": 0.60, "pretrain/val_loss": 5.5, "pretrain/unigram_baseline": 6.0,
                        "perplexity/ppl": 30.0, "perplexity/loss": 3.40, "perplexity/adjusted_ppl": 48.0},
    ("no_shuffle", 2): {"COPA/accuracy": 0.62, "RTE/accuracy": 0.54, "CB/f1": 0.74, "CB/accuracy": 0.72,
                        "table1/avg": 0.62, "pretrain/val_loss": 7.9, "pretrain/unigram_baseline": 6.0,
                        "perplexity/ppl": 34.0, "perplexity/loss": 3.53, "perplexity/adjusted_ppl": 55.0},
    ("classifier", 1): {"COPA/accuracy": 0.55, "RTE/accuracy": 0.58, "CB/f1": 0.65, "CB/accuracy": 0.70,
                        "table1/avg": 0.60, "pretrain/val_loss": 4.5, "pretrain/unigram_baseline": 6.0,
                        "perplexity/ppl": 25.0, "perplexity/loss": 3.22, "perplexity/adjusted_ppl": 40.0},
}
# Pretraining histories {key: {step: value}} of the latest sweep's pretraining runs, by (variant, seed).
# no_shuffle seed 2 stopped after step 20, so its seeds align on steps 0-20 only.
HISTORIES: dict[tuple[str, int], dict[str, dict[int, float]]] = {
    ("glm", 1): {"train/loss": {0: 8.0, 10: 6.0, 20: 5.0, 30: 4.0}, "val/loss": {10: 6.5, 30: 4.5},
                 "train/loss_span": {0: 8.0, 10: 6.0, 20: 5.0, 30: 4.0}},
    ("glm", 2): {"train/loss": {0: 8.2, 10: 6.2, 20: 5.2, 30: 4.2}, "val/loss": {10: 6.7, 30: 4.7},
                 "train/loss_span": {0: 8.2, 10: 6.2, 20: 5.2, 30: 4.2}},
    ("no_shuffle", 1): {"train/loss": {0: 8.0, 10: 7.0, 20: 6.0, 30: 5.0}, "val/loss": {10: 7.5, 30: 5.5},
                        "train/loss_span": {0: 8.0, 10: 7.0, 20: 6.0, 30: 5.0}},
    ("no_shuffle", 2): {"train/loss": {0: 8.4, 10: 7.4, 20: 6.4}, "val/loss": {10: 7.9},
                        "train/loss_span": {0: 8.4, 10: 7.4, 20: 6.4}},
}
# The older sweeps.
OTHER = {("glm", 1): {"RTE/accuracy": 0.55, "table1/avg": 0.55, "perplexity/ppl": 31.0},
         ("masked_lm", 1): {"RTE/accuracy": 0.45, "table1/avg": 0.45, "perplexity/ppl": 90.0}}
OTHER_HISTORIES = {
    ("glm", 1): {"train/loss": {0: 7.0, 5: 6.0}, "train/loss_span": {0: 7.0, 5: 6.0}},
    ("masked_lm", 1): {"train/loss": {0: 7.5, 5: 6.5}, "train/loss_masked_lm": {0: 7.5, 5: 6.5}},
}
OLD_MINI = {"COPA/accuracy": 0.11, "RTE/accuracy": 0.11, "CB/f1": 0.11, "CB/accuracy": 0.11,
            "table1/avg": 0.11, "pretrain/val_loss": 9.99, "perplexity/ppl": 999.0}


class StoreWriter:
    """Creates runs in one experiment with increasing start times."""

    def __init__(self, uri: str) -> None:
        self.client = MlflowClient(tracking_uri=uri)
        self.experiment_id = self.client.create_experiment(EXPERIMENT)
        self.clock = START

    def run(self, name: str, tags: dict[str, str], metrics: dict[str, float] | None = None,
            status: str | None = "FINISHED") -> str:
        """A run with final metrics; ``status`` None leaves it RUNNING."""
        self.clock += 1000
        run_id = self.client.create_run(self.experiment_id, start_time=self.clock, tags=tags,
                                        run_name=name).info.run_id
        final = [Metric(key, value, self.clock, 0) for key, value in (metrics or {}).items()]
        self.client.log_batch(run_id, final)
        if status is not None:
            self.client.set_terminated(run_id, status, end_time=self.clock + 500)
        return run_id

    def sweep(self, name: str, variants: str, baseline: str = "glm", status: str | None = "FINISHED") -> str:
        tags = {"glm.role": "sweep", "scale": "mini", "baseline": baseline, "variants": variants}
        return self.run(name, tags, status=status)

    def variant(self, sweep_id: str, variant: str, seed: int, metrics: dict[str, float],
                status: str = "FINISHED", pretrain_run_id: str | None = None) -> str:
        tags = {"glm.role": "variant", "variant": variant, "seed": str(seed), "mlflow.parentRunId": sweep_id}
        if pretrain_run_id is not None:
            tags["pretrain_run_id"] = pretrain_run_id
        return self.run(f"{variant}/seed{seed}", tags, metrics, status)

    def stage(self, variant_id: str, stage: str, histories: dict[str, dict[int, float]] | None = None,
              metrics: dict[str, float] | None = None) -> str:
        tags = {"glm.role": "stage", "stage": stage, "mlflow.parentRunId": variant_id}
        run_id = self.run(stage, tags, metrics)
        # Histories as Lightning logs them: one value per global step.
        logged = [Metric(key, value, self.clock + i, step) for key, steps in (histories or {}).items()
                  for i, (step, value) in enumerate(steps.items())]
        self.client.log_batch(run_id, logged)
        return run_id

    def pretrained_variant(self, sweep_id: str, variant: str, seed: int, metrics: dict[str, float],
                           histories: dict[str, dict[int, float]]) -> tuple[str, str]:
        """A variant run with its pretraining stage run; returns (variant run id, pretraining run id)."""
        variant_id = self.variant(sweep_id, variant, seed, metrics)
        pretrain_id = self.stage(variant_id, "pretrain", histories)
        self.client.set_tag(variant_id, "pretrain_run_id", pretrain_id)
        return variant_id, pretrain_id


def build_store(directory: Path) -> str:
    """Write the store described in the module docstring into ``directory``; returns its URI."""
    uri = f"sqlite:///{directory / 'mlflow.db'}"
    store = StoreWriter(uri)
    other = store.sweep("other", "glm,masked_lm")
    for (variant, seed), metrics in OTHER.items():
        store.pretrained_variant(other, variant, seed, metrics, OTHER_HISTORIES[variant, seed])
    old = store.sweep("mini", "glm")
    store.variant(old, "glm", 1, OLD_MINI)
    broken = store.sweep("broken", "glm")
    store.variant(broken, "glm", 1, OLD_MINI, status="FAILED")

    latest = store.sweep("mini", "glm,no_shuffle,classifier", status=None)
    # Created out of table order: the table follows the sweep's `variants` tag.
    for seed in (1, 2):
        store.pretrained_variant(latest, "no_shuffle", seed, LATEST["no_shuffle", seed],
                                 HISTORIES["no_shuffle", seed])
    glm1, glm1_pretrain = store.pretrained_variant(latest, "glm", 1, LATEST["glm", 1], HISTORIES["glm", 1])
    store.stage(glm1, "finetune", metrics={"RTE/accuracy": 0.99, "table1/avg": 0.99})
    store.stage(glm1, "lm_eval", metrics={"perplexity/ppl": 999.0})
    store.pretrained_variant(latest, "glm", 2, LATEST["glm", 2], HISTORIES["glm", 2])
    store.variant(latest, "classifier", 1, LATEST["classifier", 1], pretrain_run_id=glm1_pretrain)
    store.variant(latest, "glm", 3, OLD_MINI, status="FAILED")
    return uri


_BUILT: dict[Path, str] = {}


def shared_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The store, built once per test session (every test only reads it)."""
    base = tmp_path_factory.getbasetemp()
    if base not in _BUILT:
        _BUILT[base] = build_store(tmp_path_factory.mktemp("ablations"))
    return _BUILT[base]


def sweep_run_id(uri: str, name: str = "mini") -> str:
    """The id of the most recent sweep run called ``name``."""
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], f"tags.`glm.role` = 'sweep' and "
                              f"attributes.run_name = '{name}'", order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id

"""Ablation sweeps (paper §3.4, Table 6): every variant x seed is pretrained (and scored on held-out
infilling probes when it trains on the built-in world or ``data.probe_file`` is set), evaluated as a
language model and finetuned on SuperGLUE (the stages its ``scale`` runs), with the same sizes and
budgets, in one MLflow experiment.

MLflow layout: one sweep run (tag ``glm.role=sweep``) -> one run per variant and seed
(``glm.role=variant``, tags ``variant``, ``seed``, ``pretrain_run_id``) holding the final metrics ->
the stage runs of that variant (``glm.role=stage``, ``stage=pretrain|finetune|lm_eval``) with their
curves. Variants whose pretraining settings coincide (GLM and its classifier-head ablation) share
one pretraining and LM evaluation. The sweep lives in ``<output_dir>/ablations/<run_name or scale>``;
running the same command again continues it: finished variants are skipped (if their settings are
unchanged) and an interrupted pretraining resumes from its last checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_only
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from datamodules.builtin_corpus import builtin_documents
from experiments.config import format_config, load_config, load_saved_config, save_config
from experiments.interruption import mlflow_status
from experiments.jobs import get_job
from experiments.tracking import (
    end_abandoned_runs,
    experiment_id,
    git_tags,
    owner_tags,
    recorded_run_id,
    tracking_uri,
)
from glm_lightning.config import ConfigError

# Stage -> the experiment whose YAML it starts from.
STAGES = {"pretrain": "pretrain", "finetune": "superglue", "lm_eval": "lm_eval"}
# Keys of the sweep's own config handed to a stage when they are set (data paths, task selection).
PASS_THROUGH = {
    "pretrain": ("data.train_files", "data.val_files", "data.cache_dir", "data.probe_file"),
    "finetune": ("task", "data.superglue_dir", "data.fewglue_dir", "data.cache_dir", "superglue.url",
                 "superglue.sha256"),
    "lm_eval": ("lm_eval.file",),
}
# Fields that name or place a run rather than change its result (left out of fingerprints).
PLACEMENT = ("run_name", "output_dir", "resume", "overwrite", "logging", "print_config")
LM_EVAL_TEXT = "lm_eval.txt"  # held-out built-in documents, written when no lm_eval.file is given


@dataclass(frozen=True)
class Variant:
    """One variant x seed of the sweep with the names of its stage runs."""

    name: str
    seed: int
    pretraining: str  # run name of the pretraining (shared by variants with the same settings)
    overrides: dict[str, list[str]]  # stage -> key=value overrides (scale, variant, sweep, seed)
    fingerprint: str  # of the resolved stage configs: a finished variant is reused only if equal

    @property
    def run_name(self) -> str:
        return f"{self.name}-seed{self.seed}"


def override(key: str, value: Any) -> str:
    """``key=value`` with the value written so that the command-line parser reads it back exactly."""
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value)
    return f"{key}={json.dumps(value)}"


def sweep_directory(cfg: DictConfig) -> Path:
    """``<output_dir>/ablations/<run_name or scale>``: the same command finds the same sweep."""
    return Path(cfg.output_dir) / cfg.exp / (cfg.run_name or cfg.scale)


def stage_overrides(cfg: DictConfig, stage: str, variant: str, seed: int) -> list[str]:
    """The overrides of one stage: the scale's, the variant's, the sweep-wide ones, then the sweep's
    data paths and the seed."""
    spec = cfg.ablations.catalogue[variant]
    scale = cfg.ablations.scales[cfg.scale]
    overrides = [*scale[stage], *spec[stage], *cfg.ablations[stage]]
    for key in PASS_THROUGH[stage]:
        value = OmegaConf.select(cfg, key)
        if value not in (None, "") and not (OmegaConf.is_list(value) and len(value) == 0):
            overrides.append(override(key, value))
    return [*overrides, f"seed={seed}"]


def stage_config(cfg: DictConfig, stage: str, overrides: list[str], *, run_name: str | None = None,
                 parent: str | None = None, tags: dict[str, str] | None = None,
                 extra: tuple[str, ...] = ()) -> DictConfig:
    """The validated config of one stage run, placed inside the sweep directory and its MLflow
    experiment."""
    placement = [
        override("output_dir", str(sweep_directory(cfg))),
        override("logging.tracking_uri", tracking_uri(cfg)),
        override("logging.experiment_name", cfg.logging.experiment_name or cfg.exp),
        override("logging.parent_run_id", parent),
        override("logging.tags", tags or {}),
        override("run_name", run_name),
    ]
    return load_config(STAGES[stage], [*overrides, *extra, *placement])


def result_settings(stage_cfg: DictConfig) -> dict:
    """What determines a stage's results: its config without run names and places."""
    settings = OmegaConf.to_container(stage_cfg, resolve=True)
    return {key: value for key, value in settings.items() if key not in PLACEMENT}


def fingerprint(settings: Any) -> str:
    """A short digest of JSON-able settings."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def scale_stages(cfg: DictConfig) -> list[str]:
    """The stages the sweep's scale runs, in the order of ``STAGES`` (pretraining always)."""
    listed = list(cfg.ablations.scales[cfg.scale].stages)
    unknown = [stage for stage in listed if stage not in STAGES]
    if unknown or "pretrain" not in listed:
        raise ConfigError(f"invalid value {listed} for 'ablations.scales.{cfg.scale}.stages': it lists "
                          f"pretrain and any of {', '.join(s for s in STAGES if s != 'pretrain')}")
    return [stage for stage in STAGES if stage in listed]


def sweep_variants(cfg: DictConfig, stages: list[str]) -> list[str]:
    """``ablations.variants``, or by default every catalogue variant but those that change only
    stages the scale does not run (the classifier head changes only finetuning)."""
    a = cfg.ablations

    def unseen(name: str) -> list[str]:  # the stages it changes, when the scale runs none of them
        spec = a.catalogue[name]
        return [] if any(spec[stage] for stage in stages) else [stage for stage in STAGES if spec[stage]]

    if a.variants is None:
        return [name for name in a.catalogue if not unseen(name)]
    if not a.variants:
        raise ConfigError("'ablations.variants' is empty; name the variants to run, e.g. "
                          f"ablations.variants=[{','.join(list(a.catalogue)[:2])}]")
    unknown = [name for name in a.variants if name not in a.catalogue]
    if unknown:
        raise ConfigError(f"unknown variant {unknown[0]!r} in 'ablations.variants'; "
                          f"the catalogue has: {', '.join(a.catalogue)}")
    for name in a.variants:
        if unseen(name):
            raise ConfigError(f"variant {name!r} in 'ablations.variants' changes only the "
                              f"{', '.join(unseen(name))} stage, which scale={cfg.scale} does not run")
    return list(a.variants)


def plan(cfg: DictConfig) -> list[Variant]:
    """Every variant x seed with its overrides, checked now so that a typo stops the sweep before
    anything runs; variants with identical pretraining settings share the first one's pretraining."""
    a = cfg.ablations
    if cfg.scale not in a.scales:
        raise ConfigError(f"invalid value {cfg.scale!r} for 'scale'; valid choices: {', '.join(a.scales)}")
    stages = scale_stages(cfg)
    names = sweep_variants(cfg, stages)
    if a.baseline not in names:
        raise ConfigError(f"invalid value {a.baseline!r} for 'ablations.baseline': it must be one of "
                          f"the variants run ({', '.join(names)})")
    if not a.seeds or len(set(a.seeds)) != len(a.seeds):
        raise ConfigError(f"'ablations.seeds' must list distinct seeds (got {list(a.seeds)})")
    if not cfg.logging.enabled:
        raise ConfigError("an ablation sweep keeps its results in MLflow: logging.enabled must be true")
    variants, pretrainings, checked = [], {}, {}
    for seed in a.seeds:
        for name in names:
            overrides = {stage: stage_overrides(cfg, stage, name, seed) for stage in stages}
            settings = {}
            for stage in stages:
                if (name, stage) in checked:  # validated for the first seed; only the seed differs
                    settings[stage] = {**checked[name, stage], "seed": seed}
                    continue
                try:
                    # A placeholder checkpoint: the real one exists only once the pretraining ran.
                    extra = () if stage == "pretrain" else ("model.init_from=<pretrained>",)
                    settings[stage] = result_settings(stage_config(cfg, stage, overrides[stage], extra=extra))
                except ConfigError as error:
                    raise ConfigError(f"ablation variant {name!r} ({stage} stage): {error}") from None
                checked[name, stage] = settings[stage]
            if ("lm_eval" in stages and settings["lm_eval"]["lm_eval"]["file"] is None
                    and settings["pretrain"]["data"]["train_files"]):
                raise ConfigError("set lm_eval.file to held-out text for the LM evaluation of the sweep "
                                  "(its pretraining reads data.train_files)")
            pretraining = pretrainings.setdefault(fingerprint(settings["pretrain"]), f"{name}-seed{seed}")
            variants.append(Variant(name, seed, pretraining, overrides, fingerprint(settings)))
    return variants


class SweepTracker:
    """The sweep's own MLflow runs (sweep and variants), reopened when the sweep runs again so that
    the stage runs of a resumed variant stay under one parent."""

    def __init__(self, cfg: DictConfig):
        self.client = MlflowClient(tracking_uri=tracking_uri(cfg))
        self.experiment_id = experiment_id(cfg)

    def open(self, id_file: Path, run_name: str, tags: dict[str, str], parent: str | None = None) -> str:
        """The run recorded in ``id_file`` set RUNNING again, or a new run recorded there; runs of
        that name left RUNNING by a dead process are marked KILLED first."""
        end_abandoned_runs(self.client, self.experiment_id, run_name)
        if id_file.exists():
            run_id = recorded_run_id(id_file)
            self.client.update_run(run_id, status="RUNNING")
            for key, value in owner_tags().items():
                self.client.set_tag(run_id, key, value)
            return run_id
        tags = {**git_tags(), **tags, **owner_tags(), **({"mlflow.parentRunId": parent} if parent else {})}
        run_id = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags).info.run_id
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id)
        return run_id

    @contextmanager
    def running(self, run_id: str) -> Iterator[None]:
        """FINISHED when the body completes, KILLED when it was interrupted, FAILED otherwise."""
        try:
            yield
        except BaseException as error:
            self.client.set_terminated(run_id, mlflow_status(error))
            raise
        self.client.set_terminated(run_id, mlflow_status(None))


def run(cfg: DictConfig) -> Path:
    """Run the sweep; returns its directory (config, stage runs, comparison)."""
    variants = plan(cfg)
    sweep_dir = sweep_directory(cfg)
    if rank_zero_only.rank != 0:  # ranks started by a multi-device stage only join its training
        for variant in variants:
            run_variant(cfg, variant, sweep_dir, None, None)
        return sweep_dir
    save_config(cfg, sweep_dir / "config.yaml")
    tracker = SweepTracker(cfg)
    a = cfg.ablations
    sweep_id = tracker.open(sweep_dir / "mlflow_run_id", sweep_dir.name, {
        "glm.role": "sweep", "exp": cfg.exp, "scale": cfg.scale, "baseline": a.baseline,
        "variants": ",".join(dict.fromkeys(variant.name for variant in variants))})
    started = time.time()
    with tracker.running(sweep_id):
        tracker.client.log_text(sweep_id, format_config(cfg), "config.yaml")
        for variant in variants:
            run_variant(cfg, variant, sweep_dir, tracker, sweep_id)
        tracker.client.log_metric(sweep_id, "sweep/seconds", time.time() - started)
        report = write_comparison(cfg, tracker, sweep_id, sweep_dir)
    print(report.read_text(encoding="utf-8"), end="", flush=True)
    print(f"ablation sweep of {len(variants)} run(s) finished; outputs in {sweep_dir}; "
          f"MLflow run {sweep_id} at {tracking_uri(cfg)}", flush=True)
    return sweep_dir


def write_comparison(cfg: DictConfig, tracker: SweepTracker, sweep_id: str, sweep_dir: Path) -> Path:
    """The comparison table and plots in the sweep directory, logged as the sweep run's artifacts;
    returns the markdown table."""
    from experiments.compare import write_report

    paths = write_report(cfg.logging.experiment_name or cfg.exp, tracking_uri(cfg), sweep_id, sweep_dir)
    for path in paths:
        tracker.client.log_artifact(sweep_id, str(path))
    return next(path for path in paths if path.suffix == ".md")


def run_variant(cfg: DictConfig, variant: Variant, sweep_dir: Path, tracker: SweepTracker | None,
                sweep_id: str | None) -> None:
    """Pretrain (or reuse the shared pretraining), LM-evaluate and finetune one variant x seed, then
    log its final metrics to its variant run; skipped when it finished before with the same settings."""
    record = sweep_dir / "variants" / f"{variant.run_name}.json"
    if record.exists():
        finished = json.loads(record.read_text())
        if finished["fingerprint"] != variant.fingerprint:
            raise ConfigError(f"{variant.run_name} of the sweep in {sweep_dir} finished with other settings; "
                              "run the changed sweep under another run_name")
        print(f"{variant.run_name}: finished before, skipped", flush=True)
        return
    tags = {"variant": variant.name, "seed": str(variant.seed), "scale": cfg.scale}
    run_id = None
    if tracker:
        run_id = tracker.open(record.with_suffix(".run_id"), f"{variant.name}/seed{variant.seed}",
                              {**tags, "glm.role": "variant", "exp": cfg.exp}, parent=sweep_id)
    with tracker.running(run_id) if tracker else nullcontext():
        def stage(name: str, run_name: str, extra: tuple[str, ...] = ()) -> DictConfig:
            return stage_config(cfg, name, variant.overrides[name], run_name=run_name, parent=run_id,
                                tags={**tags, "glm.role": "stage", "stage": name}, extra=extra)

        pretrain_dir = run_stage(stage("pretrain", variant.pretraining, ("resume=auto",)),
                                 done=pretraining_finished)
        checkpoint = override("model.init_from", str(pretrain_dir / "checkpoints" / "last.ckpt"))
        lm_dir = finetune_dir = None
        if "lm_eval" in variant.overrides:
            lm_cfg = stage("lm_eval", variant.pretraining, (checkpoint,))
            if lm_cfg.lm_eval.file is None:
                lm_cfg = stage("lm_eval", variant.pretraining, (checkpoint, *held_out_text(sweep_dir)))
            lm_dir = run_stage(lm_cfg, done=lambda run_dir: (run_dir / "metrics.json").is_file())
        if "finetune" in variant.overrides:
            finetune_dir = run_stage(stage("finetune", variant.run_name, (checkpoint, "resume=auto")))
        if tracker is None:
            return
        metrics = variant_metrics(pretrain_dir, lm_dir, finetune_dir)
        client = tracker.client
        client.set_tag(run_id, "pretrain_run_id", (pretrain_dir / "mlflow_run_id").read_text().strip())
        client.log_param(run_id, "description", cfg.ablations.catalogue[variant.name].description[:6000])
        for stage_name, overrides in variant.overrides.items():
            client.log_param(run_id, f"overrides.{stage_name}", " ".join(overrides)[:6000])
        for key, value in metrics.items():
            client.log_metric(run_id, key, value)
        record.write_text(json.dumps({"fingerprint": variant.fingerprint, "run_id": run_id,
                                      "metrics": metrics}, indent=2) + "\n")


def run_stage(stage_cfg: DictConfig, done: Callable[[Path], bool] = lambda _: False) -> Path:
    """Run a stage's job unless ``done(run_dir)`` says an earlier sweep already completed it. A run
    directory left by other settings (an interrupted sweep that was then changed) is never reused."""
    from experiments.jobs.pretrain import run_directory

    run_dir = run_directory(stage_cfg)
    saved = run_dir / "config.yaml"
    if saved.is_file() and result_settings(load_saved_config(saved)) != result_settings(stage_cfg):
        raise ConfigError(f"{run_dir} was run with other settings; run the changed sweep under "
                          "another run_name")
    if not done(run_dir):
        get_job(stage_cfg.job)(stage_cfg)
    return run_dir


def pretraining_finished(run_dir: Path) -> bool:
    summary = run_dir / "summary.json"
    return summary.is_file() and json.loads(summary.read_text())["status"] == "finished"


def held_out_text(sweep_dir: Path) -> tuple[str, str, str]:
    """The LM evaluation's text for sweeps on the built-in corpus: held-out documents of the same
    generator (another seed), written into the sweep directory. Returned as overrides that score
    it as one stream without the WikiText detokenizer (the text is not WikiText)."""
    path = sweep_dir / LM_EVAL_TEXT
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n\n".join(builtin_documents(40, seed=1)), encoding="utf-8")
    return (override("lm_eval.file", str(path)), override("lm_eval.protocol", "language_model"),
            override("lm_eval.documents", "stream"))


def variant_metrics(pretrain_dir: Path, lm_dir: Path | None, finetune_dir: Path | None) -> dict[str, float]:
    """The final numbers of a variant: pretraining validation losses (own objective), held-out
    infilling (``infill/*``, when the pretraining scored probes), LM evaluation, SuperGLUE dev
    scores and their Table-1 average (of the stages that ran)."""
    summary = json.loads((pretrain_dir / "summary.json").read_text())
    metrics = {f"pretrain/val_{key.removeprefix('val/')}": value for key, value in summary["metrics"].items()
               if key.startswith("val/loss") or key == "val/unigram_baseline"}
    metrics.update({key: value for key, value in summary["metrics"].items() if key.startswith("infill/")})
    metrics["pretrain/seconds"] = summary["seconds"]
    if lm_dir is not None:
        metrics.update(json.loads((lm_dir / "metrics.json").read_text()))
    if finetune_dir is None:
        return {key: float(value) for key, value in metrics.items()}
    results = json.loads((finetune_dir / "results.json").read_text())
    for task, scores in results["tasks"].items():
        metrics.update({f"{task}/{name}": value for name, value in scores.items()})
    metrics.update({f"table1/{key}": value for key, value in results["table1"].items()})
    return {key: float(value) for key, value in metrics.items()}

"""exp=ablations: the sweep plan (overrides, shared pretraining, early errors) and a micro sweep end
to end (MLflow parent/child structure, comparison numbers, plots, skipping finished variants)."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from test_superglue_job import write_superglue

from experiments.config import load_config
from experiments.jobs.ablations import fingerprint, plan, result_settings, stage_config, stage_overrides
from experiments.run import main
from glm_lightning.config import ConfigError

DEFAULT_VARIANTS = ["glm", "classifier", "no_shuffle", "sentinel_tokens", "masked_lm", "no_2d_positions",
                    "span_sentence", "span_document"]


def sweep_config(*overrides: str):
    return load_config("ablations", list(overrides))


def test_default_plan_shares_the_pretraining_of_glm_and_classifier():
    variants = plan(sweep_config())
    expected = [(name, seed) for seed in (1, 2, 3) for name in DEFAULT_VARIANTS]
    assert [(v.name, v.seed) for v in variants] == expected
    pretraining = {(v.name, v.seed): v.pretraining for v in variants}
    assert [pretraining["classifier", seed] for seed in (1, 2, 3)] == ["glm-seed1", "glm-seed2", "glm-seed3"]
    others = [v for v in variants if v.name != "classifier"]
    assert all(v.pretraining == v.run_name for v in others)
    assert len({v.fingerprint for v in variants}) == len(variants)


def test_stage_configs_apply_scale_variant_sweep_and_seed_in_order(tmp_path):
    cfg = sweep_config(f"output_dir={tmp_path}", "ablations.pretrain=[trainer.max_steps=7]",
                       "data.train_files=[a.txt]", "lm_eval.file=held_out.txt", "task=[rte]")
    overrides = stage_overrides(cfg, "pretrain", "no_2d_positions", 2)
    pretrain = stage_config(cfg, "pretrain", overrides, run_name="x")
    assert pretrain.job == "pretrain" and pretrain.seed == 2 and pretrain.run_name == "x"
    assert pretrain.model.hidden_size == 128 and pretrain.trainer.max_steps == 7  # scale, then the sweep
    assert not pretrain.data.block_positions and not pretrain.model.block_position_encoding
    assert list(pretrain.data.train_files) == ["a.txt"]
    assert pretrain.output_dir == str(tmp_path / "ablations" / "mini")
    assert pretrain.logging.tracking_uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert pretrain.logging.experiment_name == "ablations"
    finetune = stage_config(cfg, "finetune", stage_overrides(cfg, "finetune", "classifier", 1))
    assert finetune.job == "superglue" and finetune.superglue.head == "classifier"
    assert list(finetune.task) == ["rte"] and finetune.optim.lr == pytest.approx(3e-4)
    lm_eval = stage_config(cfg, "lm_eval", stage_overrides(cfg, "lm_eval", "glm", 1))
    assert lm_eval.job == "lm_eval" and lm_eval.lm_eval.file == "held_out.txt"
    assert lm_eval.lm_eval.stride == 127


def test_paper_scale_is_the_official_setup(tmp_path):
    cfg = sweep_config("scale=paper", f"output_dir={tmp_path}", "data.train_files=[/data/wiki]",
                       "lm_eval.file=/data/wiki.test.tokens", "data.superglue_dir=/data/superglue")
    pretrain = stage_config(cfg, "pretrain", stage_overrides(cfg, "pretrain", "sentinel_tokens", 1))
    assert pretrain.model.name == "glm-large" and pretrain.trainer.max_steps == 200000
    assert pretrain.optim.lr == pytest.approx(2e-4) and pretrain.data.sentinel_tokens
    finetune = stage_config(cfg, "finetune", stage_overrides(cfg, "finetune", "glm", 1))
    assert finetune.task is None  # all eight tasks
    assert (finetune.superglue.tasks.copa.epochs, finetune.superglue.tasks.wsc.loss_func) == (50, "mix")
    assert finetune.superglue.test_predictions and finetune.optim.lr == pytest.approx(1e-5)
    lm_eval = stage_config(cfg, "lm_eval", stage_overrides(cfg, "lm_eval", "glm", 1))
    assert lm_eval.lm_eval.stride == 256 and lm_eval.lm_eval.file == "/data/wiki.test.tokens"


WORLD_VARIANTS = [name for name in DEFAULT_VARIANTS if name != "classifier"]


def flat(settings: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in settings.items():
        out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return out


def test_world_scale_is_the_quickstart_on_a_smaller_budget_without_finetuning(tmp_path):
    from omegaconf import OmegaConf

    cfg = sweep_config("scale=world", f"output_dir={tmp_path}")
    variants = plan(cfg)
    assert [(v.name, v.seed) for v in variants] == [(n, s) for s in (1, 2, 3) for n in WORLD_VARIANTS]
    assert all(sorted(v.overrides) == ["lm_eval", "pretrain"] for v in variants)  # no SuperGLUE stage
    # later seeds reuse the first seed's validated settings: the same fingerprint as validating anew
    last = variants[-1]
    settings = {stage: result_settings(stage_config(cfg, stage, last.overrides[stage], extra=extra))
                for stage, extra in (("pretrain", ()), ("lm_eval", ("model.init_from=<pretrained>",)))}
    assert (last.name, last.seed, last.fingerprint) == ("span_document", 3, fingerprint(settings))
    world = stage_config(cfg, "pretrain", stage_overrides(cfg, "pretrain", "glm", 1))
    quickstart = load_config("quickstart", [])
    differ = {key for key, value in flat(OmegaConf.to_container(world, resolve=True)).items()
              if flat(OmegaConf.to_container(quickstart, resolve=True)).get(key) != value}
    assert differ == {"exp", "description", "seed", "output_dir", "logging.experiment_name",
                      "logging.tracking_uri", "trainer.max_steps"}
    assert (world.trainer.max_steps, quickstart.trainer.max_steps) == (3000, 5500)
    assert list(world.data.train_files) == [] and world.data.probe_file is None  # the built-in world
    lm_eval = stage_config(cfg, "lm_eval", stage_overrides(cfg, "lm_eval", "glm", 1))
    assert (lm_eval.lm_eval.max_length, lm_eval.lm_eval.stride) == (31, 16)


@pytest.mark.parametrize(("overrides", "message"), [
    (["ablations.variants=[glm,nope]"],
     r"unknown variant 'nope' in 'ablations.variants'; the catalogue has: glm,"),
    (["scale=huge"], r"invalid value 'huge' for 'scale'; valid choices: world, mini, paper"),
    (["scale=world", "ablations.variants=[glm,classifier]"],
     r"variant 'classifier' in 'ablations.variants' changes only the finetune stage, which scale=world does "
     r"not run"),
    (["ablations.scales.mini.stages=[lm_eval]"], r"'ablations.scales.mini.stages': it lists pretrain"),
    (["ablations.baseline=masked_lm", "ablations.variants=[glm]"], r"'ablations.baseline'"),
    (["ablations.seeds=[1,1]"], r"distinct seeds"),
    (["ablations.pretrain=[data.shufle_spans=false]"],
     r"ablation variant 'glm' \(pretrain stage\): .*unknown key 'data.shufle_spans' \(did you mean "
     r"'data.shuffle_spans'\?\)"),
    (["data.train_files=[a.txt]"], r"set lm_eval.file"),
    (["logging.enabled=false"], r"logging.enabled must be true"),
])
def test_plan_errors_name_the_problem(overrides, message):
    with pytest.raises(ConfigError, match=message):
        plan(sweep_config(*overrides))


def test_variant_typo_in_the_catalogue_is_named_with_its_variant():
    cfg = sweep_config("ablations.catalogue.no_shuffle.pretrain=[data.shuffle_spans=maybe]")
    with pytest.raises(ConfigError, match=r"variant 'no_shuffle' \(pretrain stage\).*data.shuffle_spans"):
        plan(cfg)


def micro_sweep(tmp_path: Path, *extra: str) -> list[str]:
    """Two variants x two seeds of a 2-layer, 32-wide GLM: a few steps of each stage."""
    return [
        "exp=ablations", f"output_dir={tmp_path / 'outputs'}", f"data.cache_dir={tmp_path / 'cache'}",
        f"data.superglue_dir={write_superglue(tmp_path / 'superglue')}", "task=[rte,copa]",
        "ablations.variants=[glm,classifier]", "ablations.seeds=[1,2]",
        "ablations.pretrain=[model.num_layers=2,model.hidden_size=32,data.batch_size=4,"
        "trainer.max_steps=6,trainer.val_check_interval=3,trainer.limit_val_batches=2,trainer.log_every_n_steps=2,"
        "trainer.accelerator=cpu]",
        "ablations.finetune=[superglue.tasks.rte.epochs=1,superglue.tasks.copa.epochs=1,"
        "superglue.tasks.rte.batch_size=4,superglue.tasks.copa.batch_size=4,superglue.eval_batch_size=4,"
        "trainer.accelerator=cpu]",
        "ablations.lm_eval=[lm_eval.stride=32,trainer.accelerator=cpu]",
        *extra,
    ]


def csv_rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open(encoding="utf-8") as f:
        return {row["variant"]: row for row in csv.DictReader(f)}


def cell(values: list[float], scale: float, digits: int) -> str:
    scaled = [scale * v for v in values]
    mean, std = statistics.fmean(scaled), statistics.stdev(scaled)
    return f"{mean:.{digits}f}±{std:.{digits}f}"


@pytest.mark.slow
def test_micro_sweep_end_to_end(tmp_path, capsys):
    assert main(micro_sweep(tmp_path)) == 0
    sweep_dir = tmp_path / "outputs" / "ablations" / "mini"
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ablations")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    by_role: dict[str, list] = {}
    for run in runs:
        by_role.setdefault(run.data.tags.get("glm.role"), []).append(run)

    # One sweep run > one run per variant x seed > its stage runs; everything FINISHED.
    (sweep,) = by_role["sweep"]
    assert sweep.info.status == "FINISHED" and "mlflow.parentRunId" not in sweep.data.tags
    assert sweep.data.tags["variants"] == "glm,classifier" and sweep.data.tags["baseline"] == "glm"
    variants = {(r.data.tags["variant"], int(r.data.tags["seed"])): r for r in by_role["variant"]}
    assert sorted(variants) == [("classifier", 1), ("classifier", 2), ("glm", 1), ("glm", 2)]
    assert all(r.info.status == "FINISHED" and r.data.tags["mlflow.parentRunId"] == sweep.info.run_id
               for r in variants.values())
    stages, tasks = {}, []
    variant_of = {run.info.run_id: key for key, run in variants.items()}
    for run in by_role["stage"]:
        assert run.info.status == "FINISHED"
        if "task" in run.data.tags:  # a SuperGLUE task, nested under its finetuning run
            tasks.append(run)
            continue
        parent = variant_of[run.data.tags["mlflow.parentRunId"]]
        stages.setdefault(parent, {})[run.data.tags["stage"]] = run
        assert (run.data.tags["variant"], int(run.data.tags["seed"])) == parent
    finetunes = {stage["finetune"].info.run_id for stage in stages.values()}
    assert sorted(run.data.tags["task"] for run in tasks) == ["COPA"] * 4 + ["RTE"] * 4
    assert all(run.data.tags["mlflow.parentRunId"] in finetunes for run in tasks)
    # The classifier ablation finetunes glm's pretraining: no pretraining or LM evaluation of its own.
    for seed in (1, 2):
        assert sorted(stages["glm", seed]) == ["finetune", "lm_eval", "pretrain"]
        assert sorted(stages["classifier", seed]) == ["finetune"]
        pretrain_id = stages["glm", seed]["pretrain"].info.run_id
        assert variants["glm", seed].data.tags["pretrain_run_id"] == pretrain_id
        assert variants["classifier", seed].data.tags["pretrain_run_id"] == pretrain_id
        assert stages["classifier", seed]["finetune"].data.params["superglue.head"] == "classifier"
        assert len(client.get_metric_history(pretrain_id, "train/loss")) >= 1

    # The variant runs hold their stages' results ...
    for (name, seed), run in variants.items():
        pretraining = sweep_dir / "pretrain" / f"glm-seed{seed}"
        summary = json.loads((pretraining / "summary.json").read_text())
        results = json.loads((sweep_dir / "superglue" / f"{name}-seed{seed}" / "results.json").read_text())
        lm = json.loads((sweep_dir / "lm_eval" / f"glm-seed{seed}" / "metrics.json").read_text())
        metrics = run.data.metrics
        assert summary["global_step"] == 6
        assert metrics["pretrain/val_loss"] == pytest.approx(summary["metrics"]["val/loss"])
        assert metrics["perplexity/ppl"] == pytest.approx(lm["perplexity/ppl"])
        assert metrics["RTE/accuracy"] == pytest.approx(results["tasks"]["RTE"]["accuracy"])
        assert metrics["COPA/accuracy"] == pytest.approx(results["tasks"]["COPA"]["accuracy"])
        assert metrics["table1/avg"] == pytest.approx(results["table1"]["avg"])

    # ... and the comparison table shows exactly their mean ± std over the two seeds.
    table = csv_rows(sweep_dir / "comparison.csv")
    assert list(table)[:2] == ["glm", "classifier"]
    for name in ("glm", "classifier"):
        seeds = [variants[name, seed].data.metrics for seed in (1, 2)]
        for column, key, scale, digits in (("RTE", "RTE/accuracy", 100, 1), ("COPA", "COPA/accuracy", 100, 1),
                                           ("Avg (2 of 8 tasks)", "table1/avg", 100, 1),
                                           ("pretrain/val_loss", "pretrain/val_loss", 1, 2),
                                           ("perplexity/ppl", "perplexity/ppl", 1, 2)):
            assert table[name][column] == cell([s[key] for s in seeds], scale, digits), (name, column)
    # deltas paired by seed: mean difference ± t(0.975, 1) * sd / sqrt(2), * when it excludes 0
    avg = {key: run.data.metrics["table1/avg"] for key, run in variants.items()}
    d = [100 * (avg["classifier", s] - avg["glm", s]) for s in (1, 2)]
    mean, half = statistics.fmean(d), 12.7062 * statistics.stdev(d) / 2 ** 0.5
    mark = "*" if mean - half > 0 or mean + half < 0 else ""
    assert table["classifier - glm"]["Avg (2 of 8 tasks)"] == f"{mean:+.1f}±{half:.1f}{mark}"
    # the classifier shares glm's pretraining: its pretraining numbers differ by exactly 0
    assert table["classifier - glm"]["pretrain/val_loss"] == "+0.00±0.00"
    for png in ("curves.png", "tasks.png"):
        data = (sweep_dir / png).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
    artifacts = {a.path for a in client.list_artifacts(sweep.info.run_id)}
    assert {"comparison.md", "comparison.csv", "differences.csv", "curves.png", "tasks.png",
            "config.yaml"} <= artifacts
    out = capsys.readouterr().out
    # the built-in corpus: each pretraining is also scored on the world's held-out probes
    assert ("| variant | COPA | RTE | Avg (2 of 8 tasks) | infill/accuracy | infill/baseline "
            "| pretrain/val_loss | perplexity/ppl |") in out

    # Running the same command again skips every finished variant and starts no new run.
    assert main(micro_sweep(tmp_path)) == 0
    out = capsys.readouterr().out
    assert out.count("finished before, skipped") == 4
    again = client.search_runs([experiment.experiment_id], max_results=1000)
    assert len(again) == len(runs)
    assert client.get_run(sweep.info.run_id).info.status == "FINISHED"
    # A changed setting is not mixed into the finished sweep.
    assert main(micro_sweep(tmp_path, "ablations.lm_eval=[lm_eval.stride=16,trainer.accelerator=cpu]")) == 2
    assert "finished with other settings" in capsys.readouterr().err
    # Nor is a stage that an interrupted sweep left behind with other settings.
    for record in (sweep_dir / "variants").glob("*.json"):
        record.unlink()
    assert main(micro_sweep(tmp_path, "ablations.lm_eval=[lm_eval.stride=16,trainer.accelerator=cpu]")) == 2
    assert f"{sweep_dir / 'lm_eval' / 'glm-seed1'} was run with other settings" in capsys.readouterr().err


@pytest.mark.slow
def test_a_failed_sweep_is_recorded_and_continues_where_it_stopped(tmp_path, capsys):
    args = [*micro_sweep(tmp_path), "ablations.variants=[glm]", "ablations.seeds=[1]"]  # writes the data
    copa_val = tmp_path / "superglue" / "COPA" / "val.jsonl"
    text = copa_val.read_text()
    copa_val.unlink()
    assert main(args) == 2  # the finetuning stage finds no COPA dev set
    assert "COPA/val.jsonl does not exist" in capsys.readouterr().err
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ablations")

    def runs(role: str) -> list:
        return [run for run in client.search_runs([experiment.experiment_id], max_results=1000)
                if run.data.tags.get("glm.role") == role]

    (sweep,), (variant,) = runs("sweep"), runs("variant")
    assert sweep.info.status == "FAILED" and variant.info.status == "FAILED"
    stages = {run.data.tags["stage"]: run for run in runs("stage")}
    assert sorted(stages) == ["lm_eval", "pretrain"] and stages["pretrain"].info.status == "FINISHED"

    copa_val.write_text(text)
    assert main(args) == 0
    # The same sweep and variant runs finish; the pretraining and LM evaluation are not run again.
    assert [r.info.run_id for r in runs("sweep")] == [sweep.info.run_id]
    assert [r.info.run_id for r in runs("variant")] == [variant.info.run_id]
    assert client.get_run(sweep.info.run_id).info.status == "FINISHED"
    assert client.get_run(variant.info.run_id).info.status == "FINISHED"
    stage_names = sorted(run.data.tags["stage"] for run in runs("stage") if "task" not in run.data.tags)
    assert stage_names == ["finetune", "lm_eval", "pretrain"]


def world_sweep(tmp_path: Path, *extra: str) -> list[str]:
    """Two variants x two seeds of the world scale with 8 pretraining steps each."""
    return [
        "exp=ablations", "scale=world", f"output_dir={tmp_path / 'outputs'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "ablations.variants=[glm,masked_lm]", "ablations.seeds=[1,2]",
        "ablations.pretrain=[trainer.max_steps=8,trainer.val_check_interval=4,trainer.limit_val_batches=2,"
        "trainer.log_every_n_steps=4,trainer.accelerator=cpu]",
        "ablations.lm_eval=[trainer.accelerator=cpu]", *extra,
    ]


@pytest.mark.slow
def test_world_sweep_reports_paired_differences_with_t_intervals(tmp_path, capsys):
    from experiments.compare import main as compare
    from experiments.intervals import T_975

    assert main(world_sweep(tmp_path)) == 0
    sweep_dir = tmp_path / "outputs" / "ablations" / "world"
    uri = f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("ablations")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    variants = {(r.data.tags["variant"], r.data.tags["seed"]): r.data.metrics for r in runs
                if r.data.tags.get("glm.role") == "variant"}
    assert sorted(variants) == [("glm", "1"), ("glm", "2"), ("masked_lm", "1"), ("masked_lm", "2")]
    stages = sorted(r.data.tags["stage"] for r in runs if r.data.tags.get("glm.role") == "stage")
    assert stages == ["lm_eval"] * 4 + ["pretrain"] * 4  # no finetuning at this scale

    # Every variant x seed holds its pretraining's probe scores (114 probes: counts of exact fills).
    for (name, seed), metrics in variants.items():
        summary = json.loads((sweep_dir / "pretrain" / f"{name}-seed{seed}" / "summary.json").read_text())
        infill = {key: value for key, value in summary["metrics"].items() if key.startswith("infill/")}
        assert infill and {key: metrics[key] for key in infill} == pytest.approx(infill)
        assert metrics["infill/baseline"] == pytest.approx(17 / 114)
        assert round(metrics["infill/accuracy"] * 114, 6).is_integer()
        assert {"infill/accuracy/city.river", "infill/accuracy/person.pet", "infill/accuracy/length_1",
                "infill/baseline/length_1"} <= set(metrics)

    # differences.csv: masked_lm - glm per metric, paired by seed, with the 95 % t interval (1 df).
    with (sweep_dir / "differences.csv").open(encoding="utf-8") as f:
        rows = {row["metric"]: row for row in csv.DictReader(f)}
    assert list(next(iter(rows.values()))) == ["variant", "baseline", "metric", "seeds", "difference", "low",
                                               "high", "excludes_zero"]
    assert {"infill/accuracy", "pretrain/val_loss", "perplexity/ppl", "infill/accuracy/city.river"} \
        <= set(rows)
    for key, row in rows.items():
        d = [variants["masked_lm", seed][key] - variants["glm", seed][key] for seed in ("1", "2")]
        mean, half = statistics.fmean(d), T_975[0] * statistics.stdev(d) / 2 ** 0.5
        assert (row["variant"], row["baseline"], row["seeds"]) == ("masked_lm", "glm", "2")
        assert float(row["difference"]) == pytest.approx(mean, abs=1e-12)
        assert (float(row["low"]), float(row["high"])) == pytest.approx((mean - half, mean + half), abs=1e-12)
        assert row["excludes_zero"] == str(mean - half > 0 or mean + half < 0).lower()

    # The same intervals in comparison.md and in compare --paper (x100 for infill/*; marked * when
    # they exclude zero).
    def delta(key: str, scale: float, digits: int) -> str:
        row = rows[key]
        mark = "*" if row["excludes_zero"] == "true" else ""
        return (f"{scale * float(row['difference']):+.{digits}f}"
                f"±{scale * (float(row['high']) - float(row['difference'])):.{digits}f}{mark}")

    cells = [delta("infill/accuracy", 100, 1), delta("infill/baseline", 100, 1),
             delta("pretrain/val_loss", 1, 2), delta("perplexity/ppl", 1, 2)]
    expected = "| masked_lm - glm | " + " | ".join(cells) + " |"
    report = (sweep_dir / "comparison.md").read_text()
    assert "| variant | infill/accuracy | infill/baseline | pretrain/val_loss | perplexity/ppl |" in report
    assert expected in report and "paired by seed, ± 95 % t interval" in report
    assert "## Held-out infilling by relation and answer length" in report
    assert not (sweep_dir / "tasks.png").exists() and (sweep_dir / "curves.png").is_file()
    capsys.readouterr()
    assert compare(["--experiment", "ablations", "--tracking-uri", uri, "--paper", "--plot",
                    str(tmp_path / "plots")]) == 0
    printed = capsys.readouterr().out
    assert expected in printed and "paper" not in printed  # Table 6 has no probe or perplexity column
    assert [p.name for p in (tmp_path / "plots").iterdir()] == ["curves.png"]  # no SuperGLUE bars

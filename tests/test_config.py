"""Tests of the experiment config: schema, YAML layering, validation messages and the command line."""

from __future__ import annotations

import dataclasses
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ReadonlyConfigError
from timeouts import HANG_S

from experiments.config import (
    CONFIGS_DIR,
    config_summary,
    list_experiments,
    load_config,
    load_saved_config,
    save_config,
)
from experiments.jobs import JOBS, SECTIONS, get_job
from glm_lightning.config import (
    CHOICES,
    MODEL_NAMES,
    MODEL_OVERRIDE_FIELDS,
    ConfigError,
    ExperimentConfig,
    OptimConfig,
    model_overrides,
)

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(path.stem for path in CONFIGS_DIR.glob("*.yaml") if path.stem != "base")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "experiments.run", *args], cwd=REPO, capture_output=True, text=True,
        timeout=HANG_S,
    )


def write_configs(folder: Path, **files: str) -> Path:
    for name, text in files.items():
        (folder / f"{name}.yaml").write_text(text)
    return folder


# --- shipped experiments ------------------------------------------------------------------------


def test_shipped_experiments_are_discovered() -> None:
    assert {"quickstart", "pretrain"} <= set(SHIPPED)
    assert list(list_experiments()) == SHIPPED


@pytest.mark.parametrize("exp", SHIPPED)
def test_shipped_experiment_loads_against_schema(exp: str) -> None:
    cfg = load_config(exp, [])
    assert isinstance(cfg, DictConfig)
    assert cfg.exp == exp
    assert cfg.job in JOBS
    assert cfg.description.strip()
    # The merged config converts back into the typed dataclass, so every value has its schema type.
    assert isinstance(OmegaConf.to_object(cfg), ExperimentConfig)


def test_quickstart_is_small() -> None:
    cfg = load_config("quickstart", [])
    assert cfg.model.name == "tiny"
    assert list(cfg.data.train_files) == []
    assert cfg.data.num_workers <= 1 and cfg.data.seq_length <= 128
    assert cfg.model.num_layers * cfg.model.hidden_size <= 512
    assert cfg.data.batch_size * cfg.data.seq_length <= 1024
    assert cfg.trainer.max_steps <= 6000 and cfg.trainer.precision == "32-true"


def test_pretrain_matches_official_glm_large_script() -> None:
    cfg = load_config("pretrain", [])
    assert cfg.model.name == "glm-large"
    optim = cfg.optim
    assert (optim.lr, optim.weight_decay, list(optim.betas), optim.eps) == (2e-4, 0.1, [0.9, 0.98], 1e-6)
    assert (optim.lr_decay_style, optim.lr_decay_iters, optim.warmup, optim.lr_decay_ratio) == (
        "cosine",
        160_000,
        0.05,
        0.05,
    )
    assert optim.clip_grad == 1.0
    assert cfg.trainer.max_steps == 200_000
    assert (cfg.data.seq_length, cfg.data.batch_size) == (512, 16)
    assert cfg.trainer.precision == "bf16-mixed"
    assert (cfg.data.span_prob, cfg.data.sentence_prob, cfg.data.document_prob) == (1.0, 0.0, 0.0)
    assert "data.train_files" in cfg.description


def test_schema_defaults_follow_glm_pretraining() -> None:
    optim = OptimConfig()
    assert (optim.lr, optim.weight_decay, optim.betas, optim.eps) == (4e-4, 0.1, [0.9, 0.98], 1e-6)
    assert (optim.warmup, optim.lr_decay_style, optim.lr_decay_ratio, optim.clip_grad) == (
        0.05,
        "cosine",
        0.05,
        1.0,
    )
    data = ExperimentConfig().data
    assert (data.mask_ratio, data.poisson_lambda, data.max_span_length) == (0.15, 3.0, 40)


# --- layering and freezing ----------------------------------------------------------------------


def test_precedence_base_then_experiment_then_overrides(tmp_path: Path) -> None:
    configs = write_configs(
        tmp_path,
        base="seed: 1\noptim:\n  lr: 0.1\n  eps: 0.5\ntrainer:\n  max_steps: 5\n",
        demo="description: demo\njob: pretrain\noptim:\n  lr: 0.2\ntrainer:\n  max_steps: 7\n",
    )
    cfg = load_config("demo", [], configs_dir=configs)
    assert (cfg.seed, cfg.optim.eps) == (1, 0.5)  # from base
    assert (cfg.optim.lr, cfg.trainer.max_steps) == (0.2, 7)  # experiment beats base
    assert cfg.optim.weight_decay == 0.1  # schema default
    cfg = load_config(
        "demo", ["optim.lr=0.3", "trainer.max_steps=9", "trainer.max_steps=11"], configs_dir=configs
    )
    assert (cfg.optim.lr, cfg.trainer.max_steps, cfg.seed) == (0.3, 11, 1)  # overrides win, last one last


def test_overrides_parse_yaml_values() -> None:
    cfg = load_config(
        "quickstart",
        ["data.train_files=[a.txt,b/*.txt]", "run_name=null", "trainer.devices=2", "optim.lr=3e-4"],
    )
    assert list(cfg.data.train_files) == ["a.txt", "b/*.txt"]
    assert cfg.run_name is None
    assert cfg.trainer.devices == 2
    assert cfg.optim.lr == 3e-4


def test_interpolations_are_resolved() -> None:
    cfg = load_config("quickstart", ["run_name=${exp}-${seed}"])
    assert cfg.run_name == "quickstart-1234"
    with pytest.raises(ConfigError, match=r"cannot resolve 'run_name': Interpolation key 'nope' not found$"):
        load_config("quickstart", ["run_name=${nope}"])


def test_frozen_config_cannot_be_modified() -> None:
    cfg = load_config("quickstart", [])
    with pytest.raises(ReadonlyConfigError):
        cfg.seed = 1
    with pytest.raises(ReadonlyConfigError):
        cfg.optim.lr = 1.0
    with pytest.raises(ReadonlyConfigError):
        cfg.data.train_files.append("more.txt")
    with pytest.raises(Exception):  # noqa: B017 - new keys are refused (read-only and struct)
        cfg.new_key = 1
    assert cfg.seed == 1234


def test_save_and_reload_round_trip(tmp_path: Path) -> None:
    cfg = load_config("pretrain", ["data.train_files=[x.txt]", "run_name=r1"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert yaml.safe_load(path.read_text())["run_name"] == "r1"
    again = load_saved_config(path)
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)
    with pytest.raises(ReadonlyConfigError):
        again.seed = 0


# --- validation messages ------------------------------------------------------------------------


def test_unknown_key_names_it_and_lists_valid_keys() -> None:
    with pytest.raises(ConfigError) as error:
        load_config("quickstart", ["optim.lrr=1"])
    message = str(error.value)
    assert "'optim.lrr'" in message
    assert "did you mean 'optim.lr'" in message
    for field in dataclasses.fields(OptimConfig):
        assert field.name in message
    assert "\n" not in message


def test_unknown_section_lists_top_level_keys() -> None:
    with pytest.raises(
        ConfigError, match=r"unknown key 'optm'.*valid keys of the top level: exp, description"
    ):
        load_config("quickstart", ["optm.lr=1"])


def test_wrong_type_names_key_value_and_type() -> None:
    with pytest.raises(ConfigError, match=r"invalid value 'abc' for 'trainer.max_steps': expected int$"):
        load_config("quickstart", ["trainer.max_steps=abc"])
    with pytest.raises(ConfigError, match=r"'optim.betas': expected a list of float"):
        load_config("quickstart", ["optim.betas=0.9"])
    with pytest.raises(ConfigError, match=r"'model.num_layers': expected int or null"):
        load_config("quickstart", ["model.num_layers=1.5"])


@pytest.mark.parametrize("key", [*CHOICES, "job"])
def test_invalid_choice_lists_valid_choices(key: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config("quickstart", [f"{key}=bogus"])
    message = str(error.value)
    assert f"invalid value 'bogus' for '{key}'" in message
    for choice in {**CHOICES, "job": tuple(JOBS)}[key]:
        assert choice in message


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_preset_is_accepted(name: str) -> None:
    assert load_config("quickstart", [f"model.name={name}"]).model.name == name


def test_objective_probabilities_must_sum_to_one() -> None:
    with pytest.raises(
        ConfigError, match=r"'data.span_prob' \+ 'data.sentence_prob' \+ 'data.document_prob'"
    ):
        load_config("quickstart", ["data.span_prob=0.5", "data.sentence_prob=0.3"])
    cfg = load_config("quickstart", ["data.span_prob=0.5", "data.document_prob=0.5"])
    assert cfg.data.document_prob == 0.5


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("data.mask_ratio=1.5", "data.mask_ratio"),
        ("data.sentence_prob=-0.1", "data.sentence_prob"),
        ("data.batch_size=0", "data.batch_size"),
        ("model.hidden_size=-8", "model.hidden_size"),
        ("trainer.max_steps=0", "trainer.max_steps"),
        ("data.num_workers=-1", "data.num_workers"),
        ("model.attention_dropout_prob=2", "model.attention_dropout_prob"),
    ],
)
def test_out_of_range_values_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"argument '{override}': invalid value .* for '{key}'"):
        load_config("quickstart", [override])


@pytest.mark.parametrize(("override", "reason"), [
    ("data.mask_ratio=0", "0 masks no token, so there is nothing to predict"),
    ("data.val_fraction=1.0", "1 holds out every document, so none is left to train on"),
    ("seq2seq.label_smoothing=1", "1 makes every target the uniform distribution"),
    ("model.output_dropout_prob=1.0", "1 drops every activation"),
    ("model.attention_dropout_prob=1", "1 drops every attention weight"),
    ("generation.top_p=0", "0 leaves no token to sample from"),
])
def test_values_that_leave_nothing_to_learn_are_refused(override: str, reason: str) -> None:
    key = override.partition("=")[0]
    with pytest.raises(ConfigError) as raised:
        load_config("quickstart", [override])
    assert re.fullmatch(rf"argument '{re.escape(override)}': invalid value [\d.]+ for '{key}': "
                        rf"{re.escape(reason)}[^\n]*", str(raised.value)), str(raised.value)


@pytest.mark.parametrize("name", ["..", "../elsewhere", "a/b", "/tmp/run", ".", "a\\b", "''"])
def test_a_run_name_that_leaves_its_folder_is_refused(name: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config("quickstart", [f"run_name={name}"])
    assert str(raised.value).startswith(f"invalid value {name.strip(chr(39))!r} for 'run_name': must be one "
                                        "folder name") and "\n" not in str(raised.value)
    assert load_config("quickstart", ["run_name=lr-3e-4.seed1"]).run_name == "lr-3e-4.seed1"


def test_betas_must_be_a_pair() -> None:
    with pytest.raises(ConfigError, match="'optim.betas'"):
        load_config("quickstart", ["optim.betas=[0.9]"])


def test_unknown_experiment_lists_available_ones() -> None:
    with pytest.raises(ConfigError) as error:
        load_config("nonexistent", [])
    assert "'nonexistent'" in str(error.value)
    for name in SHIPPED:
        assert name in str(error.value)


def test_malformed_yaml_value_is_one_line_that_shows_how_to_quote() -> None:
    with pytest.raises(ConfigError) as error:
        load_config("quickstart", ["optim.betas=[0.9"])
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("argument 'optim.betas=[0.9': the value is not valid YAML")
    assert "'optim.betas=[0.9,0.98]'" in message


def test_malformed_override_explains_syntax() -> None:
    with pytest.raises(
        ConfigError, match=r"argument 'trainer.max_steps': malformed override; write key=value"
    ):
        load_config("quickstart", ["trainer.max_steps"])


def test_yaml_errors_name_the_file(tmp_path: Path) -> None:
    configs = write_configs(
        tmp_path,
        broken="job: pretrain\ndata: [1,\n",
        typo="job: pretrain\ntrainer:\n  max_step: 3\n",
        badtype="job: pretrain\ntrainer:\n  precision: 64\n",
    )
    with pytest.raises(ConfigError, match=r"broken\.yaml: "):
        load_config("broken", [], configs_dir=configs)
    with pytest.raises(ConfigError, match=r"typo\.yaml: unknown key 'trainer.max_step'"):
        load_config("typo", [], configs_dir=configs)
    with pytest.raises(
        ConfigError, match=r"badtype\.yaml: invalid value '64' for 'trainer.precision'; valid"
    ):
        load_config("badtype", [], configs_dir=configs)


def test_missing_job_is_reported(tmp_path: Path) -> None:
    configs = write_configs(tmp_path, nojob="description: no job\n")
    with pytest.raises(ConfigError, match=r"'job' is not set; valid choices: pretrain"):
        load_config("nojob", [], configs_dir=configs)


# --- model section and job registry -------------------------------------------------------------


def test_model_overrides_keep_only_what_is_set() -> None:
    cfg = load_config("quickstart", ["model.num_layers=3", "model.attention_dropout_prob=0.1"])
    overrides = model_overrides(cfg.model)
    assert overrides == {
        "num_layers": 3,
        "hidden_size": 128,
        "embedding_dropout_prob": 0.0,
        "attention_dropout_prob": 0.1,
        "output_dropout_prob": 0.0,
        "block_position_encoding": True,
        "checkpoint_activations": False,
        "attention": "auto",
        "compile": False,
    }
    assert set(model_overrides(ExperimentConfig().model)) == {
        "block_position_encoding",
        "checkpoint_activations",
        "attention",
        "compile",
    }


def test_model_section_matches_glm_config() -> None:
    model = pytest.importorskip("glm_lightning.model")
    names = {field.name for field in dataclasses.fields(model.GLMConfig)}
    assert set(MODEL_OVERRIDE_FIELDS) <= names
    for name in MODEL_NAMES:
        model.GLMConfig.from_name(name, num_layers=2)


def test_job_registry_is_lazy_strings() -> None:
    assert JOBS["pretrain"] == "experiments.jobs.pretrain:run"
    for target in JOBS.values():
        module, _, function = target.partition(":")
        assert module and function
    with pytest.raises(KeyError, match="valid choices: pretrain"):
        get_job("nope")


# --- command line -------------------------------------------------------------------------------


@pytest.mark.parametrize("exp", SHIPPED)
def test_cli_print_config_prints_resolved_yaml(exp: str) -> None:
    result = run_cli(f"exp={exp}", "print_config=true", "seed=7")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == f"# running exp={exp}"
    printed = yaml.safe_load(result.stdout)
    assert printed == OmegaConf.to_container(load_config(exp, ["print_config=true", "seed=7"]))
    assert printed["exp"] == exp and printed["seed"] == 7


@pytest.mark.parametrize("exp", SHIPPED)
def test_summary_names_every_setting_the_job_reads(exp: str) -> None:
    cfg = load_config(exp, ["task=[rte,cb]"] if exp == "superglue" else [])
    summary = config_summary(cfg, SECTIONS[cfg.job])
    assert summary.startswith(f"exp={exp} job={cfg.job} seed={cfg.seed} ")
    assert len(summary.splitlines()) < 40  # the full YAML of any experiment is well over 100 lines
    printed = dict(item.split("=", 1) for item in shlex.split(summary))
    for key in SECTIONS[cfg.job]:
        node = OmegaConf.select(cfg, key)
        flat = {key: node} if not OmegaConf.is_dict(node) else {
            f"{key}.{k}": v for k, v in _flat(OmegaConf.to_container(node)).items()}
        for name, value in flat.items():
            unselected = name.startswith("superglue.tasks.") and name.split(".")[2] not in ("rte", "cb")
            if value is None or unselected:
                assert name not in printed, name
            else:
                assert name in printed, name
    if exp == "superglue":
        assert printed["superglue.tasks.rte.epochs"] == "50" and "superglue.tasks.copa.epochs" not in printed


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def test_cli_defaults_to_quickstart_and_imports_nothing_heavy() -> None:
    code = (
        "import sys\nfrom experiments.run import main\n"
        "assert main(['print_config=true']) == 0\n"
        "heavy = {'torch', 'lightning', 'mlflow'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=HANG_S
    )
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["exp"] == "quickstart"
    first = result.stdout.splitlines()[0]
    assert first == "# running exp=quickstart (the default; see --help for the others)"


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_cli_help_lists_experiments(flag: str) -> None:
    result = run_cli(flag)
    assert result.returncode == 0
    assert "key=value" in result.stdout and "example" in result.stdout
    for name, description in list_experiments().items():
        assert any(name in line and description in line for line in result.stdout.splitlines())


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["optim.lrr=1"], "unknown key 'optim.lrr'"),
        (["trainer.max_steps=abc"], "invalid value 'abc' for 'trainer.max_steps': expected int"),
        (["trainer.strategy=mpi"], "valid choices: auto, ddp, fsdp"),
        (["data.span_prob=0.7"], "must sum to 1"),
        (["exp=nope"], "available experiments: " + ", ".join(SHIPPED)),
        (["max_steps"], "malformed override; write key=value"),
        (["--max-steps", "3"], "unknown option '--max-steps'"),
    ],
)
def test_cli_errors_are_one_line_with_exit_code_2(args: list[str], expected: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("error: ")
    assert result.stderr.count("\n") == 1 and result.stderr.endswith("\n")
    assert expected in result.stderr


def test_every_registered_job_is_importable() -> None:
    for name in JOBS:
        assert callable(get_job(name)), name


def test_generation_compile_is_auto_or_a_bool() -> None:
    assert load_config("quickstart", []).generation.compile == "auto"
    assert load_config("quickstart", ["generation.compile=true"]).generation.compile is True
    assert load_config("quickstart", ["generation.compile=false"]).generation.compile is False
    with pytest.raises(ConfigError) as raised:
        load_config("quickstart", ["generation.compile=sometimes"])
    assert str(raised.value) == ("argument 'generation.compile=sometimes': invalid value 'sometimes' for "
                                 "'generation.compile'; valid choices: auto, true, false")

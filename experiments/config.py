"""Load an experiment config: base.yaml < <exp>.yaml < command-line overrides, checked and frozen.

Every problem is raised as a one-line ConfigError that says where it came from (which YAML file or
which command-line argument) and what would be valid, so a typo never silently starts a long run.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import textwrap
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from experiments.jobs import JOBS
from glm_lightning.atomic import atomic_write_text
from glm_lightning.config import CHOICES, ConfigError, ExperimentConfig, check_value, validate

__all__ = [
    "CONFIGS_DIR",
    "ConfigError",
    "format_config",
    "freeze",
    "list_experiments",
    "load_config",
    "load_saved_config",
    "save_config",
]

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
BASE = "base"
# Valid values of every enumerated string field: the library's table plus the registered jobs.
ALL_CHOICES = {**CHOICES, "job": tuple(JOBS)}


def list_experiments(configs_dir: Path = CONFIGS_DIR) -> dict[str, str]:
    """Experiment name -> first line of its `description`, for every YAML file but base.yaml."""
    experiments = {}
    for path in sorted(Path(configs_dir).glob("*.yaml")):
        if path.stem == BASE:
            continue
        try:
            description = str(_read_yaml(path).get("description", ""))
        except ConfigError as error:
            description = f"(unreadable: {error})"
        experiments[path.stem] = description.strip().splitlines()[0] if description.strip() else ""
    return experiments


def load_config(exp: str, overrides: Sequence[str] = (), *, configs_dir: Path = CONFIGS_DIR) -> DictConfig:
    """The validated, read-only config of experiment `exp` with `key=value` overrides applied."""
    configs_dir = Path(configs_dir)
    available = list_experiments(configs_dir)
    if exp not in available:
        raise ConfigError(
            f"unknown experiment {exp!r}; available experiments: {', '.join(available) or 'none'}"
        )
    cfg = OmegaConf.structured(ExperimentConfig)
    base = configs_dir / f"{BASE}.yaml"
    if base.exists():
        _merge(cfg, _read_yaml(base), f"{_show(base)}: ")
    _merge(cfg, _read_yaml(configs_dir / f"{exp}.yaml"), f"{_show(configs_dir / f'{exp}.yaml')}: ")
    for argument in overrides:
        where = f"argument {argument!r}: "
        key = argument.partition("=")[0].strip()
        if "=" not in argument or not key:
            raise ConfigError(f"{where}malformed override; write key=value, e.g. trainer.max_steps=100")
        if key == "exp":
            raise ConfigError(f"{where}the experiment is chosen by the exp argument, not an override")
        try:
            override = OmegaConf.to_container(OmegaConf.from_dotlist([argument]))
        except OmegaConfBaseException as error:
            raise ConfigError(f"{where}{_one_line(error)}") from None
        except yaml.YAMLError as error:  # the value is not YAML, e.g. an unclosed list
            problem = getattr(error, "problem", None) or _one_line(error)
            raise ConfigError(f"{where}the value is not valid YAML ({problem}); write lists whole and "
                              "quote them for the shell, e.g. 'optim.betas=[0.9,0.98]'") from None
        _merge(cfg, override, where)
    cfg.exp = exp
    return _finish(cfg)


def load_saved_config(path: str | os.PathLike) -> DictConfig:
    """Reload a config written by save_config (e.g. to resume or compare a run), checked and frozen."""
    cfg = OmegaConf.structured(ExperimentConfig)
    _merge(cfg, _read_yaml(Path(path)), f"{_show(Path(path))}: ")
    return _finish(cfg)


def freeze(cfg: DictConfig) -> DictConfig:
    """Make `cfg` read-only, so no part of a run can change what gets logged as its config."""
    OmegaConf.set_struct(cfg, True)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def format_config(cfg: DictConfig) -> str:
    """The resolved config as YAML, in schema order."""
    return OmegaConf.to_yaml(cfg, resolve=True)


def config_summary(cfg: DictConfig, keys: Sequence[str], omit: Sequence[str] = ()) -> str:
    """The settings a job reads (``keys``: sections or dotted keys), as ``key=value`` lines, one
    wrapped paragraph per section, unset (null) values and the ``omit`` keys left out and, for
    SuperGLUE, only the selected tasks: short enough to read before a run starts."""
    from glm_lightning.config import superglue_tasks  # the selected tasks, for superglue.tasks.*

    selected = {task.lower() for task in superglue_tasks(cfg.task)} if "task" in keys else None
    lines = [f"exp={cfg.exp} job={cfg.job} seed={cfg.seed} output_dir={cfg.output_dir}"
             + (f" run_name={cfg.run_name}" if cfg.run_name else "")]
    for key in keys:
        value = OmegaConf.select(cfg, key)
        flat = flatten(OmegaConf.to_container(value, resolve=True), f"{key}.") if OmegaConf.is_dict(value) \
            else {key: OmegaConf.to_container(value) if OmegaConf.is_list(value) else value}
        items = [f"{k}={_compact(v)}" for k, v in flat.items() if v is not None and k not in omit
                 and not (selected is not None and k.startswith("superglue.tasks.")
                          and k.split(".")[2] not in selected)]
        if items:
            lines.append(textwrap.fill(" ".join(items), width=110, subsequent_indent="    ",
                                       break_long_words=False, break_on_hyphens=False))
    return "\n".join(lines) + "\n"


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"optim.lr": ...}: keys named exactly as command-line overrides."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _compact(value: Any) -> str:
    """A value as it would be written on the command line."""
    if isinstance(value, list):
        return "[" + ",".join(_compact(v) for v in value) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    text = str(value)
    return json.dumps(text) if not text or any(c.isspace() or c in ",[]'\"" for c in text) else text


def save_config(cfg: DictConfig, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML (creating folders); load_saved_config reads it back."""
    path = Path(path)
    return atomic_write_text(path, format_config(cfg))


def _finish(cfg: DictConfig) -> DictConfig:
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as error:
        reason = str(error).splitlines()[0]
        raise ConfigError(f"cannot resolve '{getattr(error, 'full_key', '?')}': {reason}") from None
    validate(cfg, ALL_CHOICES)
    return freeze(cfg)


def _read_yaml(path: Path) -> dict[str, Any]:
    # OmegaConf's YAML loader (unlike plain PyYAML) reads 1e-3 as a float, so use it.
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except (OSError, yaml.YAMLError, OmegaConfBaseException) as error:
        raise ConfigError(f"{_show(path)}: {_one_line(error)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{_show(path)}: expected a mapping of keys to values, got {type(data).__name__}")
    return data


def _merge(cfg: DictConfig, data: dict[str, Any], where: str) -> None:
    """Merge plain `data` into `cfg` in place, reporting unknown keys and bad types as ConfigError."""
    _check_keys(data, ExperimentConfig, "", where)
    try:
        cfg.merge_with(data)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None)
        if not key:
            raise ConfigError(f"{where}{_one_line(error)}") from None
        value = getattr(error, "value", None)
        expected = _describe(_field_type(key))
        raise ConfigError(f"{where}invalid value {value!r} for '{key}': expected {expected}") from None
    # Check the values this source sets now, so a bad choice or range is blamed on its file or argument.
    for key, value in _leaves(data):
        if isinstance(value, str) and "${" in value:
            continue  # interpolations are checked once resolved
        try:
            check_value(key, OmegaConf.select(cfg, key), ALL_CHOICES)
        except ConfigError as error:
            raise ConfigError(f"{where}{error}") from None


def _leaves(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) for every non-mapping value of a nested dict."""
    leaves = []
    for key, value in data.items():
        if isinstance(value, dict):
            leaves.extend(_leaves(value, f"{prefix}{key}."))
        else:
            leaves.append((f"{prefix}{key}", value))
    return leaves


def _check_keys(data: Any, schema: type, prefix: str, where: str) -> None:
    """Walk `data` along the schema so unknown keys are named in full with the valid alternatives."""
    if not isinstance(data, dict):
        return
    hints = typing.get_type_hints(schema)
    names = [f.name for f in dataclasses.fields(schema)]
    section = f"'{prefix[:-1]}'" if prefix else "the top level"
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(
                f"{where}unknown key '{dotted}'{hint}; valid keys of {section}: {', '.join(names)}"
            )
        expected = hints[key]
        if typing.get_origin(expected) is dict:  # a mapping of user-chosen names (ablations.catalogue)
            item = typing.get_args(expected)[1]
            if isinstance(value, dict) and dataclasses.is_dataclass(item):
                for name, entry in value.items():
                    _check_keys(entry, item, f"{dotted}.{name}.", where)
        elif dataclasses.is_dataclass(expected):
            if isinstance(value, dict):
                _check_keys(value, expected, f"{dotted}.", where)
            else:
                first = dataclasses.fields(expected)[0].name
                raise ConfigError(
                    f"{where}'{dotted}' is a section; set its keys instead, e.g. {dotted}.{first}=..."
                )
        elif isinstance(value, dict) and expected is not Any:
            inner = ".".join([dotted, *map(str, value)][:2])
            raise ConfigError(
                f"{where}unknown key '{inner}': '{dotted}' is a value ({_describe(expected)}), not a section"
            )


def _field_type(dotted: str) -> Any:
    node: Any = ExperimentConfig
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(node):
            return Any
        node = typing.get_type_hints(node).get(part, Any)
    return node


def _describe(tp: Any) -> str:
    """A readable name for a schema type, as used in error messages."""
    if tp is Any:
        return "any value"
    args = [arg for arg in typing.get_args(tp) if arg is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return f"{' or '.join(_describe(arg) for arg in args)} or null"
    if typing.get_origin(tp) is list:
        return f"a list of {_describe(args[0])}, written [a,b,...]"
    if dataclasses.is_dataclass(tp):
        return "a section of keys"
    return getattr(tp, "__name__", str(tp))


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _show(path: Path) -> str:
    """`path` relative to the working directory when it lies below it (shorter messages)."""
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative

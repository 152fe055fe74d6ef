"""The dependency pins live in pyproject.toml; environment.yml and CI must agree with them."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_environment_yml_installs_the_pyproject_pins():
    project = pyproject()["project"]
    extras = project["optional-dependencies"]
    pinned = project["dependencies"] + extras["dev"] + extras["harness"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert sorted(pip_section) == sorted(pinned)
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
    minimum = project["requires-python"].removeprefix(">=")
    assert tuple(map(int, python.split("=")[1].split("."))) >= tuple(map(int, minimum.split(".")))


def test_torch_is_pinned_and_compromised_lightning_releases_are_excluded():
    deps = pyproject()["project"]["dependencies"]
    assert "torch==2.13.0" in deps
    lightning = next(d for d in deps if d.startswith("lightning"))
    assert ">=2.6.4" in lightning and "!=2.6.2" in lightning and "!=2.6.3" in lightning


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"^(python -m pytest[^\n]*)$", readme, re.M)
    assert command, "README must show the test command"
    assert command.group(1) in (ROOT / ".ci" / "run").read_text()

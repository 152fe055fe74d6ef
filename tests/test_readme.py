"""The README's Python blocks run as written, in order, after a (shortened) quickstart."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from ablation_store import shared_store
from mlflow.tracking import MlflowClient
from readme_commands import argv, bash_commands, free_port, readme_command, serving
from timeouts import HANG_S

from experiments.config import ConfigError, load_config
from experiments.run import parse_args

ROOT = Path(__file__).resolve().parents[1]


# The README's Python blocks that cannot run here, by their first line, with the reason.
NOT_RUN = {"# needs the hub": "transformers fetches the released modeling_glm.py from the hub "
                              "(tests/test_hf_folder.py checks the folder and the auto_map it follows)"}


def python_blocks(markdown: str) -> list[str]:
    """The Python blocks this file runs: every one not named in NOT_RUN."""
    blocks = re.findall(r"^```py(?:thon)?\n(.*?)^```", markdown, flags=re.MULTILINE | re.DOTALL)
    return [block for block in blocks if not block.startswith(tuple(NOT_RUN))]


def test_python_blocks_are_found():
    markdown = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = python_blocks(markdown)
    assert len(blocks) >= 2 and "latest_run" in blocks[0] and "fill_blanks" in blocks[1]
    assert len(re.findall(r"^```py(?:thon)?\n", markdown, flags=re.MULTILINE)) == len(blocks) + len(NOT_RUN)


@pytest.mark.slow
def test_readme_python_blocks_and_commands_run_after_the_quickstart(tmp_path, tmp_path_factory):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for key in ("MLFLOW_TRACKING_URI", "GLM_TRACKING_URI"):
        env.pop(key, None)
    quickstart = subprocess.run(
        [sys.executable, "-m", "experiments.run", "exp=quickstart", "trainer.max_steps=20",
         "trainer.val_check_interval=10", "trainer.limit_val_batches=2",
         f"data.cache_dir={tmp_path / 'cache'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_S)
    assert quickstart.returncode == 0, quickstart.stderr[-3000:]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    script = tmp_path / "readme_blocks.py"
    script.write_text("\n".join(python_blocks(readme)))
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=HANG_S)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("torch.Size([1, ") and "Arlen" in result.stdout  # logits, then the filled text

    # README's `mlflow ui` on the quickstart's store (on a free port): its REST API lists the run.
    port = free_port()
    with serving(argv(readme_command("mlflow ui")) + ["--port", str(port)], cwd=tmp_path, port=port):
        url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=5"
        with urllib.request.urlopen(url, timeout=HANG_S) as response:
            assert "quickstart" in [e["name"] for e in json.load(response)["experiments"]]

    # The commands of the main uses, in README order, on the quickstart's checkpoint.
    run = next((tmp_path / "outputs" / "quickstart").iterdir()).name
    substitutions = {"<run>": run, "/data/superglue": str(superglue_data(tmp_path / "superglue"))}
    wiki = " = Arlen = \n\n The city of Arlen lies on the river Vesk . \n"
    (tmp_path / "wiki.test.raw").write_text(wiki * 20)
    (tmp_path / "lambada.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in (
        "From the walls of Arlen you can see the river Vesk", "By trade, Edda Quill is a librarian")))
    ablations = {**env, "MLFLOW_TRACKING_URI": shared_store(tmp_path_factory)}
    printed = {}
    for command in bash_commands(readme):
        if command.startswith(RUN_HERE):
            if "<run name>" in command:  # a SuperGLUE run of the commands above
                store = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
                found = store.search_runs([store.get_experiment_by_name("superglue").experiment_id],
                                          filter_string="tags.mlflow.parentRunId IS NULL")
                substitutions["<run name>"] = found[0].info.run_name
            printed[command] = readme_run(command, tmp_path, ablations if "ablations" in command else env,
                                          substitutions)
    assert len(printed) == 12
    quickstart_table = printed["python -m experiments.compare --experiment quickstart"]
    assert quickstart_table.startswith("| run | infill/accuracy | infill/baseline |")
    assert (tmp_path / "figures" / "tasks.png").is_file()


# The commands this file runs after the quickstart (at a reduced size: the overrides appended), by
# the start of the command; every other command of the README is named in ELSEWHERE with where it runs.
RUN_HERE = ("python -m experiments.run exp=superglue model.init_from=outputs/quickstart/<run>/",
            "python -m experiments.run exp=generate model.init_from=outputs/quickstart/<run>/",
            "python -m experiments.run exp=lm_eval model.init_from=outputs/quickstart/<run>/",
            "python -m experiments.compare --experiment quickstart",
            "python -m experiments.compare --experiment superglue --baseline <run name>",
            "python -m experiments.compare --experiment ablations",
            "python -m experiments.run --help",
            "python -m experiments.run exp=quickstart print_config=true",
            "python -m experiments.run exp=quickstart trainer.max_steps=50")
SHORTER = {"exp=superglue": ["superglue.tasks.rte.epochs=1", "superglue.tasks.cb.epochs=1",
                             "superglue.tasks.rte.max_seq_length=64", "superglue.tasks.cb.max_seq_length=64"],
           "exp=generate": ["generation.max_new_tokens=4"],
           "trainer.max_steps=50": ["trainer.max_steps=4", "trainer.val_check_interval=2",
                                    "trainer.limit_val_batches=1", "logging.enabled=false"]}
ELSEWHERE = {
    "python -m venv .venv": ".ci/run (a fresh virtualenv, pip install -e \".[dev]\")",
    "python -m pytest -q": ".ci/run",
    "python -m experiments.run": "this file: the quickstart before the other commands (fewer steps)",
    "mlflow ui": "this file: started on the quickstart's store (a free port), its REST API lists the run",
    "jupyter nbconvert": "tests/test_notebook.py (as written, in a checkout with outputs/mlflow.db)",
    "pip install": "not run: the PyTorch CUDA index (GPU machines; .ci/run installs the project)",
    "PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/gpu_check.py": "tests/test_gpu_check.py (--smoke)",
    "python -m glm_lightning.checkpoint": "tests/test_checkpoint.py (inspect and convert, small checkpoints)",
    "mlflow server": "tests/test_fault_injection_storage.py (with the run command below pointed at it)",
    "python -m experiments.run exp=pretrain": "settings checked here (GLM-Large on 8 GPUs); "
                                              "tests/test_pretrain_job.py runs the job small",
    "python -m experiments.run exp=prepare_data": "tests/test_prepare_data.py (the job on small files)",
    "python -m experiments.run exp=seq2seq": "tests/test_seq2seq.py (the job on small data)",
    "python -m experiments.run exp=quickstart trainer.accelerator=cpu trainer.devices=2":
        "tests/test_parallel.py (fsdp on 2 CPU processes)",
    "python -m experiments.run exp=superglue model.init_from=/ckpt/": "settings checked here (the "
        "released weights); tests/test_superglue_job.py runs it on a checkpoint in the official layout",
    "python -m experiments.run exp=ablations": "tests/test_ablations.py (micro sweeps of the job)",
    "python -m experiments.run exp=harness": "tests/test_harness.py (the three local tasks on small files)",
    "python -m glm_lightning.harness": "tests/test_harness.py (as written, on a tiny checkpoint and a "
                                       "small COPA file)",
    "torchrun": "settings checked here; tests/test_multinode.py (two nodes of one process on one CPU host)",
}


def test_every_readme_command_is_run_here_or_named_with_where_it_runs():
    commands = bash_commands((ROOT / "README.md").read_text(encoding="utf-8"))
    assert "python -m experiments.run" in commands and len(commands) > 20
    unplaced = [c for c in commands if c != "python -m experiments.run" and not c.startswith(RUN_HERE)
                and not any(c.startswith(prefix) for prefix in ELSEWHERE)]
    assert unplaced == []


def run_arguments(markdown: str) -> list[list[str]]:
    """The arguments of every ``experiments.run`` command of the README: its bash blocks (torchrun's
    included) and the flags of its tables, with the elided ``...`` left out."""
    commands = [c for c in bash_commands(markdown) if "-m experiments.run" in c]
    commands += [f"-m experiments.run {flags}" for flags in re.findall(r"^\|[^|]+\| `(exp=[^`]+)` \|$",
                                                                        markdown, flags=re.MULTILINE)]
    split = [shlex.split(c.partition("-m experiments.run")[2]) for c in commands]
    return [[a for a in arguments if a != "..."] for arguments in split if arguments != ["--help"]]


def test_every_run_command_of_the_readme_is_a_valid_configuration():
    """The commands that need GPUs, released weights or a cluster cannot run here: their settings
    are checked as the command line checks them, against the typed schema and every rule."""
    commands = run_arguments((ROOT / "README.md").read_text(encoding="utf-8"))
    assert len(commands) >= 25 and any("trainer.devices=8" in c for c in commands)
    problems = []
    for arguments in commands:
        try:
            load_config(*parse_args(arguments))
        except ConfigError as error:
            problems.append(f"{shlex.join(arguments)}: {error}")
    assert problems == []


def test_a_mistyped_readme_setting_would_be_found():
    assert run_arguments("```bash\npython -m experiments.run exp=pretrain ... trainer.devises=8\n```\n") == [
        ["exp=pretrain", "trainer.devises=8"]]
    with pytest.raises(ConfigError, match="trainer.devises"):
        load_config(*parse_args(["exp=pretrain", "trainer.devises=8"]))


def superglue_data(root: Path) -> Path:
    """RTE and CB with a few examples per split, in the official jsonl layout."""
    labels = {"RTE": ("entailment", "not_entailment"), "CB": ("entailment", "contradiction", "neutral")}
    for task, names in labels.items():
        for split, n in (("train", 6), ("val", 4), ("test", 2)):
            rows = [{"idx": i, "premise": "Mira Tolan keeps a grey cat in Arlen.",
                     "hypothesis": "The cat is grey." if i % 2 else "Arlen lies on the river Vesk.",
                     **({} if split == "test" else {"label": names[i % len(names)]})} for i in range(n)]
            (root / task).mkdir(parents=True, exist_ok=True)
            (root / task / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def readme_run(command: str, cwd: Path, env: dict, substitutions: dict[str, str]) -> str:
    """Run one README command as written (placeholders filled, SHORTER overrides appended)."""
    for placeholder, value in substitutions.items():
        command = command.replace(placeholder, value)
    argv = shlex.split(command)
    argv = [sys.executable if arg == "python" else arg for arg in argv]
    argv += [arg for marker, extra in SHORTER.items() if marker in command for arg in extra]
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=HANG_S)
    assert result.returncode == 0, (command, result.stderr[-3000:])
    return result.stdout

"""exp=generate and exp=lm_eval end to end in a subprocess (usage errors through the same entry
point, in-process), on a random tiny checkpoint laid out as a pretraining run
(``<run>/checkpoints/last.ckpt`` beside ``<run>/tokenizer.model``)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from timeouts import HANG_S

from experiments.jobs.generate import readable
from experiments.run import main

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The curious student [MASK] the story.", "A famous doctor visits the"]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=HANG_S, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def test_generate_prints_one_filled_text_per_prompt(run_dir, tmp_path):
    prompts = "prompts=[" + ",".join(json.dumps(p) for p in PROMPTS) + "]"
    result = cli("exp=generate", f"model.init_from={run_dir / 'checkpoints' / 'last.ckpt'}", prompts,
                 "generation.max_new_tokens=4", f"output_dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    printed = result.stdout[result.stdout.index("filled texts (greedy"):].split("\n", 1)[1]
    blocks = printed.split("\n[2] ")
    assert len(blocks) == len(PROMPTS) and blocks[0].startswith(f"[1] {PROMPTS[0]}\n    ")
    filled = ["\n".join(line.removeprefix("    ") for line in block.splitlines()[1:]) for block in blocks]
    assert filled[0].startswith("The curious student") and filled[0].endswith(" the story.")
    assert "[MASK]" not in filled[0]
    assert filled[1].startswith("A famous doctor visits the")


def test_filled_text_is_printed_with_its_line_breaks():
    assert readable(3, "A [MASK] B", "A x\ny B\n") == "[3] A [MASK] B\n    A x\n    y B"


@pytest.mark.parametrize("args, message", [
    (["'prompts=[\"a [MASK]\"]'"], "'model.init_from' is not set"),
    (["model.init_from=CKPT"], "'prompts' is empty"),
])
def test_generate_usage_errors_are_one_line(run_dir, tmp_path, capsys, args, message):
    args = [a.strip("'").replace("CKPT", str(run_dir / "checkpoints" / "last.ckpt")) for a in args]
    assert main(["exp=generate", *args, f"output_dir={tmp_path}"]) == 2
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and stderr.startswith(f"error: {message}")


def test_generate_needs_a_tokenizer_beside_a_foreign_checkpoint(run_dir, tmp_path, capsys):
    lone = tmp_path / "model.ckpt"
    shutil.copyfile(run_dir / "checkpoints" / "last.ckpt", lone)
    assert main(["exp=generate", f"model.init_from={lone}", "prompts=[hello]", f"output_dir={tmp_path}"]) == 2
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and "'tokenizer.path' is not set" in stderr


def test_lm_eval_prints_and_logs_metrics(run_dir, tmp_path, make_text):
    text_file = tmp_path / "eval.txt"
    text_file.write_text(make_text(6, seed=3), encoding="utf-8")
    result = cli("exp=lm_eval", f"model.init_from={run_dir / 'checkpoints' / 'last.ckpt'}",
                 f"lm_eval.file={text_file}", "lm_eval.max_length=32", "lm_eval.stride=8",
                 f"output_dir={tmp_path / 'out'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    printed = dict(line.split(": ", 1) for line in result.stdout.splitlines()
                   if line.startswith("perplexity/"))
    assert {"perplexity/ppl", "perplexity/adjusted_ppl", "perplexity/num_predicted"} <= set(printed)
    assert int(float(printed["perplexity/num_predicted"])) == int(float(printed["perplexity/num_tokens"])) - 1

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["lm_eval"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.metrics["perplexity/ppl"] == pytest.approx(float(printed["perplexity/ppl"]), rel=1e-5)
    assert run.data.params["lm_eval.stride"] == "8"
    assert run.data.params["model.init_from"].endswith("last.ckpt")


def test_lm_eval_refuses_to_replace_a_named_runs_metrics_without_overwrite(run_dir, tmp_path, capsys,
                                                                          make_text):
    text_file = tmp_path / "eval.txt"
    text_file.write_text(make_text(2, seed=3), encoding="utf-8")
    args = ["exp=lm_eval", f"model.init_from={run_dir / 'checkpoints' / 'last.ckpt'}",
            f"lm_eval.file={text_file}",
            "lm_eval.max_length=32", "lm_eval.stride=16", f"output_dir={tmp_path}", "run_name=e1",
            "logging.enabled=false"]
    assert main(args) == 0
    metrics = tmp_path / "lm_eval" / "e1" / "metrics.json"
    metrics.write_text("kept\n")
    capsys.readouterr()
    assert main(args) == 2
    assert capsys.readouterr().err == (f"error: {metrics.parent} already holds the metrics of an evaluation; "
                                       "choose another run_name, or replace them with overwrite=true\n")
    assert metrics.read_text() == "kept\n"
    assert main([*args, "overwrite=true"]) == 0
    assert "perplexity/ppl" in json.loads(metrics.read_text())

"""The pretraining job end to end: quickstart config, MLflow run, checkpoints, resume."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from timeouts import HANG_S

from datamodules.builtin_probes import builtin_probes
from experiments.config import load_config
from experiments.jobs import pretrain
from experiments.jobs.pretrain import build_datamodule, build_module, build_tokenizer, result_line, run
from glm_lightning.config import ConfigError
from glm_lightning.infilling_eval import most_frequent_answer_baseline
from glm_lightning.tokenizer import GLMTokenizer

ROOT = Path(__file__).resolve().parents[1]


def quickstart(tmp_path: Path, *overrides: str):
    return load_config("quickstart", [
        f"output_dir={tmp_path / 'outputs'}", f"data.cache_dir={tmp_path / 'cache'}", "run_name=r1",
        "model.num_layers=2", "model.hidden_size=64", "data.seq_length=64", "data.batch_size=4",
        "trainer.max_steps=8", "trainer.val_check_interval=4", "trainer.limit_val_batches=2",
        "trainer.log_every_n_steps=2", *overrides,
    ])


@pytest.mark.slow
def test_quickstart_trains_tracks_and_resumes(tmp_path, capsys):
    run_dir = run(quickstart(tmp_path))
    printed = capsys.readouterr().out.splitlines()
    assert run_dir == tmp_path / "outputs" / "quickstart" / "r1"
    assert (run_dir / "config.yaml").exists()
    assert GLMTokenizer.from_sentencepiece(str(run_dir / "tokenizer.model")).encode("Arlen lies") != []
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 8

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["quickstart"], output_format="list")
    assert len(runs) == 1
    first = runs[0]
    assert first.info.status == "FINISHED" and first.info.run_name == "r1"
    assert first.data.params["optim.lr"] == "0.006" and first.data.params["model.num_layers"] == "2"
    assert {"train/loss", "train/loss_span", "val/loss", "val/loss_span", "val/ppl", "train/lr",
            "train/tokens_seen", "train/samples", "val/unigram_baseline", "infill/accuracy",
            "infill/baseline"} <= set(first.data.metrics)
    assert first.data.metrics["train/tokens_seen"] == last["tokens_seen"] > 8 * 4
    assert first.data.tags["git_commit"] and first.data.tags["exp"] == "quickstart"
    assert (run_dir / "mlflow_run_id").read_text() == first.info.run_id
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(first.info.run_id)}
    assert artifacts == {"config.yaml", "summary.json"}  # checkpoints are referenced, not copied
    assert first.data.tags["last_checkpoint"] == str(run_dir.resolve() / "checkpoints" / "last.ckpt")
    assert Path(first.data.tags["best_checkpoint"]).parent == run_dir.resolve() / "checkpoints"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_step"] == 8 and summary["metrics"]["val/loss"] == pytest.approx(
        first.data.metrics["val/loss"])
    assert summary["steps_this_run"] == 8 and summary["monitor"] == "val/loss"
    val_history = mlflow.MlflowClient().get_metric_history(first.info.run_id, "val/loss")
    assert summary["best_score"] == pytest.approx(min(m.value for m in val_history))
    assert Path(summary["best_checkpoint"]).is_absolute() and Path(summary["last_checkpoint"]).is_file()

    # After training on the built-in corpus: held-out infilling accuracy next to its baseline.
    probes = builtin_probes()
    accuracy, baseline = summary["metrics"]["infill/accuracy"], summary["metrics"]["infill/baseline"]
    assert baseline == pytest.approx(most_frequent_answer_baseline(probes)) == pytest.approx(17 / 114)
    assert accuracy * len(probes) == pytest.approx(round(accuracy * len(probes)))  # a count of exact fills
    assert (first.data.metrics["infill/accuracy"], first.data.metrics["infill/baseline"]) == pytest.approx(
        (accuracy, baseline))
    logged = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=first.info.run_id, artifact_path="summary.json", dst_path=str(tmp_path / "dl"))).read_text())
    assert logged["metrics"]["infill/baseline"] == baseline
    (result,) = [i for i, line in enumerate(printed) if line.startswith("held-out infilling")]
    assert printed[result - 1].startswith("finished 8 steps")
    numbers = f"greedy exact match {accuracy:.1%}, most-frequent-answer baseline {baseline:.1%}"
    assert numbers in printed[result]
    examples = printed[result + 1 : result + 4]
    assert len(examples) == 3 and all("[MASK]" in line and "  ->  " in line for line in examples)

    # Starting again in the same run directory would overwrite it: refused with a clear message.
    with pytest.raises(ConfigError, match="resume=auto"):
        run(quickstart(tmp_path))

    # resume=auto continues the same MLflow run from the last checkpoint.
    run(quickstart(tmp_path, "resume=auto", "trainer.max_steps=12"))
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 12
    runs = mlflow.search_runs(experiment_names=["quickstart"], output_format="list")
    assert [r.info.run_id for r in runs] == [first.info.run_id]
    history = mlflow.MlflowClient().get_metric_history(first.info.run_id, "train/loss")
    assert max(m.step for m in history) >= 10
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_step"] == 12 and summary["steps_this_run"] == 4
    assert result_line(summary, None).startswith("finished 12 steps (4 in this run, resumed at 8) in ")
    # Resuming a run that already reached max_steps trains nothing, and says so.
    run(quickstart(tmp_path, "resume=auto", "trainer.max_steps=12"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps_this_run"] == 0
    assert result_line(summary, None).startswith("already finished: 12 steps, nothing left to train")


def test_missing_resume_checkpoint_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="resume"):
        run(quickstart(tmp_path, f"resume={tmp_path / 'nothing.ckpt'}"))


def test_cli_reports_a_bad_training_file_in_one_line(tmp_path):
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\x00\x01\x02 not text")
    result = subprocess.run(
        [sys.executable, "-m", "experiments.run", "exp=quickstart", f"data.train_files=[{binary}]",
         f"output_dir={tmp_path / 'out'}", f"data.cache_dir={tmp_path / 'cache'}",
         "tokenizer.vocab_size=300"],
        cwd=ROOT, capture_output=True, text=True, timeout=HANG_S,
    )
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and str(binary) in last_line
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_the_command_line_says_what_it_runs_and_prints_no_library_noise(tmp_path):
    """The first line names the experiment; Lightning's adverts, its deprecation warnings and its
    note on ``weights_only`` (a last checkpoint saved off the validation schedule) never show."""
    result = subprocess.run(
        [sys.executable, "-m", "experiments.run", f"output_dir={tmp_path / 'outputs'}",
         f"data.cache_dir={tmp_path / 'cache'}", "model.num_layers=1", "model.hidden_size=64",
         "data.seq_length=32", "data.batch_size=4", "trainer.max_steps=3", "trainer.val_check_interval=2",
         "trainer.limit_val_batches=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=HANG_S,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("# running exp=quickstart")
    (run_dir,) = (tmp_path / "outputs" / "quickstart").iterdir()
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3
    output = result.stdout + result.stderr
    for noise in ("Tip:", "litlogger", "LeafSpec", "weights_only", "Warning", "already configured", "Flops"):
        assert noise not in output
    # Into a pipe: one progress line per tenth of the steps (and per validation), no bar redrawn.
    assert "\r" not in result.stdout and "\x1b" not in result.stdout
    assert "step 3/3 (100%), " in result.stdout and "validation at step 2: val/loss " in result.stdout


def step_losses(tracking_db: Path, run_name: str) -> dict[int, float]:
    mlflow.set_tracking_uri(f"sqlite:///{tracking_db}")
    client = mlflow.MlflowClient()
    (found,) = mlflow.search_runs(experiment_names=["quickstart"], output_format="list",
                                  filter_string=f"attributes.run_name = '{run_name}'")
    return {m.step: m.value for m in client.get_metric_history(found.info.run_id, "train/loss")}


@pytest.mark.slow
def test_resume_equals_uninterrupted_training(tmp_path):
    """2N steps straight == N steps, stop, resume for N more: same losses and weights (dropout on)."""
    common = ("trainer.log_every_n_steps=1", "trainer.val_check_interval=5", "optim.lr_decay_iters=10",
              "model.embedding_dropout_prob=0.1", "model.attention_dropout_prob=0.1",
              "model.output_dropout_prob=0.1")
    straight = run(quickstart(tmp_path, "run_name=straight", "trainer.max_steps=10", *common))
    run(quickstart(tmp_path, "run_name=halves", "trainer.max_steps=5", *common))
    halves = run(quickstart(tmp_path, "run_name=halves", "trainer.max_steps=10", "resume=auto", *common))
    db = tmp_path / "outputs" / "mlflow.db"
    a, b = step_losses(db, "straight"), step_losses(db, "halves")
    assert len(a) == 10 and a == b
    wa = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    wb = torch.load(halves / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_interruption_saves_a_checkpoint_ends_the_run_killed_and_resumes_it(tmp_path, stop_signal):
    args = [f"output_dir={tmp_path / 'outputs'}", f"data.cache_dir={tmp_path / 'cache'}", "run_name=r1",
            "model.num_layers=2", "model.hidden_size=64", "data.seq_length=64", "data.batch_size=4",
            "trainer.val_check_interval=1000", "trainer.log_every_n_steps=1"]
    process = subprocess.Popen([sys.executable, "-m", "experiments.run", "trainer.max_steps=100000", *args],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "outputs" / "quickstart" / "r1"
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    deadline = time.time() + HANG_S
    while time.time() < deadline and not (run_dir / "mlflow_run_id").exists():
        time.sleep(0.5)
    run_id = (run_dir / "mlflow_run_id").read_text()
    client = mlflow.MlflowClient()
    while time.time() < deadline and len(client.get_metric_history(run_id, "train/loss")) < 3:
        time.sleep(0.5)  # training is under way
    process.send_signal(stop_signal)
    _, stderr = process.communicate(timeout=HANG_S)
    assert process.returncode == 130, stderr
    assert "continue with resume=auto" in stderr.strip().splitlines()[-1]
    assert client.get_run(run_id).info.status == "KILLED"
    stopped_at = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    assert stopped_at >= 3

    resumed = subprocess.run([sys.executable, "-m", "experiments.run", "resume=auto",
                              f"trainer.max_steps={stopped_at + 3}", *args],
                             cwd=ROOT, capture_output=True, text=True, timeout=HANG_S)
    assert resumed.returncode == 0, resumed.stderr
    assert (run_dir / "mlflow_run_id").read_text() == run_id
    assert client.get_run(run_id).info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert max(steps) >= stopped_at + 2
    final = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert final["global_step"] == stopped_at + 3


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_cpu_run_through_the_command_line(tmp_path, strategy):
    """Lightning relaunches the command for rank 1; both ranks share one run directory and one
    MLflow run."""
    result = subprocess.run(
        [sys.executable, "-m", "experiments.run", f"output_dir={tmp_path / 'outputs'}",
         f"data.cache_dir={tmp_path / 'cache'}", "model.num_layers=2", "model.hidden_size=64",
         "data.seq_length=64", "data.batch_size=4", "trainer.max_steps=4", "trainer.val_check_interval=2",
         "trainer.limit_val_batches=2", "trainer.log_every_n_steps=1", "trainer.accelerator=cpu",
         "trainer.devices=2", f"trainer.strategy={strategy}"],
        cwd=ROOT, capture_output=True, text=True, timeout=HANG_S,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs" / "quickstart").iterdir()
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    (found,) = mlflow.search_runs(experiment_names=["quickstart"], output_format="list")
    assert found.info.status == "FINISHED" and found.info.run_id == (run_dir / "mlflow_run_id").read_text()
    assert "val/loss" in found.data.metrics and found.data.params["trainer.strategy"] == strategy
    # Rank zero scores the saved weights on the held-out blanks (its module may hold a shard only).
    assert {"infill/accuracy", "infill/baseline"} <= set(found.data.metrics)
    assert result.stdout.count("held-out infilling") == 1


def test_seq_length_beyond_the_position_table_is_a_config_error(tokenizer):
    with pytest.raises(ConfigError, match="data.seq_length"):
        build_module(load_config("quickstart", ["data.seq_length=512"]), tokenizer)


ABLATIONS = {
    "sentinel_tokens": ["data.sentinel_tokens=true"],
    "masked_lm": ["data.masked_lm=true"],
    "no_shuffle": ["data.shuffle_spans=false"],
    "no_2d_positions": ["data.block_positions=false", "model.block_position_encoding=false"],
    "span_document": ["data.span_prob=0.5", "data.document_prob=0.5", "data.task_masks=true"],
    "span_sentence": ["data.span_prob=0.5", "data.sentence_prob=0.5", "data.task_masks=true"],
    "token_level_spans": ["data.whole_word_spans=false"],  # the quickstart's spans are whole words
}


@pytest.mark.parametrize(("exp", "whole_words"), [("quickstart", True), ("pretrain", False)])
def test_span_settings_reach_the_collator(tokenizer, exp, whole_words):
    collator = build_datamodule(load_config(exp, []), tokenizer, ["corpus.txt"])._collator()
    assert collator.whole_word_spans is whole_words and collator.single_span_prob == 0.0
    cfg = load_config(exp, ["data.single_span_prob=0.25"])
    assert build_datamodule(cfg, tokenizer, ["corpus.txt"])._collator().single_span_prob == 0.25


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_every_objective_and_ablation_trains_end_to_end(tmp_path, ablation):
    run_dir = run(quickstart(tmp_path, "logging.enabled=false", "trainer.max_steps=4",
                             "trainer.val_check_interval=4", *ABLATIONS[ablation]))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_step"] == 4 and np.isfinite(summary["metrics"]["val/loss"])
    # the built-in world's probes, scored as the variant can fill a blank (infilling_eval)
    assert summary["metrics"]["infill/baseline"] == pytest.approx(17 / 114)
    assert {"infill/accuracy", "infill/accuracy/person.job", "infill/accuracy/length_1"} \
        <= set(summary["metrics"])


def test_a_probe_file_is_scored_after_pretraining_on_any_corpus(tmp_path, capsys):
    from datamodules.builtin_corpus import write_builtin_corpus

    corpus = write_builtin_corpus(tmp_path / "corpus")
    probes = [builtin_probes()[i] for i in (0, 1, 2, 60)]  # three rivers and a person's city
    probe_file = tmp_path / "probes.jsonl"
    probe_file.write_text("".join(json.dumps({"relation": p.relation, "text": p.text, "answer": p.answer})
                                  + "\n" for p in probes))
    short = ("logging.enabled=false", "trainer.max_steps=2", "trainer.val_check_interval=2",
             f"data.train_files={json.dumps(corpus)}")
    run_dir = run(quickstart(tmp_path, *short, f"data.probe_file={probe_file}"))
    metrics = json.loads((run_dir / "summary.json").read_text())["metrics"]
    assert metrics["infill/baseline"] == pytest.approx(most_frequent_answer_baseline(probes))
    assert round(metrics["infill/accuracy"] * 4, 6).is_integer()
    assert {key.rpartition("/")[2] for key in metrics if key.startswith("infill/accuracy/")} >= {
        "city.river", "person.city"}
    assert f"held-out infilling (4 probes of {probe_file})" in capsys.readouterr().out

    # Without a probe file, a configured corpus has no probes; a bad file fails before training.
    no_probes = run(quickstart(tmp_path, *short, "run_name=r2"))
    assert "infill/accuracy" not in json.loads((no_probes / "summary.json").read_text())["metrics"]
    probe_file.write_text('{"relation": "r", "text": "no blank here", "answer": "x"}\n')
    with pytest.raises(ConfigError, match=rf"data.probe_file: {probe_file}:1: field .text.: expected"):
        run(quickstart(tmp_path, *short, "run_name=r3", f"data.probe_file={probe_file}"))
    assert not (tmp_path / "outputs" / "quickstart" / "r3" / "checkpoints").exists()


def test_official_vocabularies_are_selected_by_the_config(tmp_path):
    vocab = tmp_path / "vocab.txt"
    special = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]"}
    words = iter("the a river city market road garden . , !".split())
    vocab.write_text("\n".join(special.get(i) or next(words, f"[unused{i}]") for i in range(30522)) + "\n")
    cfg = load_config("quickstart", ["tokenizer.kind=wordpiece", f"tokenizer.path={vocab}"])
    tokenizer = build_tokenizer(cfg, [])
    assert (tokenizer.eos_id, tokenizer.cls_id, tokenizer.sop_id, len(tokenizer)) == (0, 101, 30522, 30592)
    with pytest.raises(ConfigError, match="tokenizer.path"):
        load_config("quickstart", ["tokenizer.kind=wordpiece"])
    with pytest.raises(ConfigError, match="tokenizer.merges"):
        load_config("quickstart", ["tokenizer.kind=gpt2", f"tokenizer.path={vocab}"])


def test_runs_started_within_one_second_get_folders_of_their_own(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrain.time, "strftime", lambda _: "20261207-120000")  # one second for all
    cfg = load_config("lm_eval", [f"output_dir={tmp_path}"])
    folders = []
    for _ in range(3):
        folders.append(pretrain.run_directory(cfg))
        folders[-1].mkdir(parents=True)
    assert [f.name for f in folders] == ["20261207-120000", "20261207-120000-2", "20261207-120000-3"]

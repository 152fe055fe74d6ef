"""exp=superglue end to end on tiny SuperGLUE-format data, the archive download, task selection,
the WSC modes and evaluation on every rank of a 2-process run."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import lightning as L
import mlflow
import pytest
import torch
from timeouts import HANG_S

from datamodules.superglue_download import fetch_superglue
from experiments.config import load_config
from experiments.jobs import superglue as superglue_job
from experiments.jobs.superglue import leaderboard_rows, main_metric, run
from experiments.run import main
from glm_lightning.checkpoint import save_ours
from glm_lightning.config import ConfigError, superglue_tasks
from glm_lightning.metrics import TABLE1_METRICS, table_row
from glm_lightning.model import GLMConfig, GLMModel
from glm_lightning.tokenizer import GLMTokenizer, train_sentencepiece

WORDS = "the student reads a story river city doctor visits market".split()


def write_jsonl(root: Path, task: str, split: str, rows: list[dict]) -> None:
    path = root / task / f"{split}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def sentence(i: int) -> str:
    return " ".join(WORDS[(i + k) % len(WORDS)] for k in range(5)).capitalize() + "."


def write_superglue(root: Path) -> Path:
    """RTE and COPA with a few examples per split (test without labels)."""
    for split, n in (("train", 8), ("val", 6), ("test", 3)):
        write_jsonl(root, "RTE", split, [
            {"idx": i, "premise": sentence(i), "hypothesis": sentence(i + i % 2),
             **({} if split == "test" else {"label": "entailment" if i % 2 == 0 else "not_entailment"})}
            for i in range(n)])
        write_jsonl(root, "COPA", split, [
            {"idx": i, "premise": sentence(i), "choice1": sentence(i + 1), "choice2": sentence(i + 3),
             "question": "cause" if i % 2 else "effect", **({} if split == "test" else {"label": i % 2})}
            for i in range(n // 2 + 1)])
    return root


def span(text: str, word: str) -> tuple[int, int]:
    """Character offsets [start, end) of `word` after its first preceding space in `text`."""
    start = text.index(f" {word}") + 1
    return start, start + len(word)


def write_all_tasks(root: Path) -> Path:
    """All eight tasks in the official jsonl formats (RTE and COPA from `write_superglue`); the
    test splits have no labels. Returns `root`."""
    write_superglue(root)
    cb_labels = ("entailment", "contradiction", "neutral")
    entities = ("student", "doctor", "market", "river")
    for split, n in (("train", 6), ("val", 6), ("test", 3)):
        labeled = split != "test"

        def label(value, labeled=labeled):
            return {"label": value} if labeled else {}

        write_jsonl(root, "BoolQ", split, [
            {"idx": i, "passage": sentence(i), "question": sentence(i + 2).lower().rstrip("."),
             **label(i % 2 == 0)} for i in range(n)])
        write_jsonl(root, "CB", split, [
            {"idx": i, "premise": sentence(i), "hypothesis": sentence(i + 1), **label(cb_labels[i % 3])}
            for i in range(n)])
        wic = []
        for i in range(n):
            s1, s2 = sentence(i), sentence(i + 1)
            word = s1.split()[2]  # also word 1 of s2
            (start1, end1), (start2, end2) = span(s1, word), span(s2, word)
            wic.append({"idx": i, "word": word, "sentence1": s1, "sentence2": s2, "start1": start1,
                        "end1": end1, "start2": start2, "end2": end2, **label(i % 2 == 1)})
        write_jsonl(root, "WiC", split, wic)
        # "The doctor visits the student and he reads a story.": span 1 is word 3 or 0, "he" word 6.
        write_jsonl(root, "WSC", split, [
            {"idx": i, "text": "The doctor visits the student and he reads a story.",
             "target": {"span1_text": "the student" if i % 2 == 0 else "The doctor",
                        "span1_index": 3 if i % 2 == 0 else 0, "span2_text": "he", "span2_index": 6},
             **label(i % 2 == 0)} for i in range(n)])
        multirc = []
        for p in range(max(1, n // 3)):  # two paragraphs (one on test), two questions each
            questions = []
            for q in range(2):
                qi = 2 * p + q
                answers = [{"idx": 3 * qi + a, "text": WORDS[(qi + a) % len(WORDS)], **label((qi + a) % 2)}
                           for a in range(2 + q)]
                questions.append({"idx": qi, "question": sentence(qi + 1).rstrip("."), "answers": answers})
            multirc.append({"idx": p, "passage": {"text": sentence(p) + " " + sentence(p + 4),
                                                  "questions": questions}})
        write_jsonl(root, "MultiRC", split, multirc)
        record = []
        for p in range(max(1, n // 3)):  # two passages (one on test), two queries each
            first, second = entities[p % 4], entities[(p + 1) % 4]
            text = f"The {first} reads a story.\n@highlight\nThe {second} visits the city"
            spans = [span(text, first), span(text, second)]
            qas = []
            for q in range(2):
                gold = (first, second)[q]
                start, end = spans[q]
                answers = {"answers": [{"start": start, "end": end - 1, "text": gold}]} if labeled else {}
                query = "A story for the @placeholder in the city."
                qas.append({"idx": 2 * p + q, "query": query, **answers})
            record.append({"idx": p, "passage": {"text": text, "entities": [
                {"start": start, "end": end - 1} for start, end in spans]}, "qas": qas})
        write_jsonl(root, "ReCoRD", split, record)
    return root


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, make_text) -> Path:
    """A random tiny checkpoint laid out as a pretraining run, with a tokenizer trained here in
    which the verbalizers " Yes" / " No" / " Maybe" are single pieces."""
    run_dir = tmp_path_factory.mktemp("pretrain_run")
    text = run_dir / "text.txt"
    answers = "".join(f"{sentence(i)} Yes, it is. No, it is not. Maybe.\n" for i in range(200))
    text.write_text(make_text() + answers, encoding="utf-8")
    model_path = train_sentencepiece([str(text)], 400, str(run_dir / "sp"), character_coverage=1.0,
                                     user_defined_symbols=["\u2581Yes", "\u2581No", "\u2581Maybe"],
                                     hard_vocab_limit=False)
    shutil.copyfile(model_path, run_dir / "tokenizer.model")
    tokenizer = GLMTokenizer.from_sentencepiece(str(run_dir / "tokenizer.model"))
    torch.manual_seed(0)
    model = GLMModel(GLMConfig.from_name("tiny", vocab_size=len(tokenizer), max_sequence_length=64))
    return save_ours(model, run_dir / "checkpoints" / "last.ckpt")


def overrides(tmp_path: Path, checkpoint: Path, *extra: str) -> list[str]:
    return [
        f"output_dir={tmp_path / 'outputs'}", f"data.cache_dir={tmp_path / 'cache'}", "run_name=sweep",
        f"model.init_from={checkpoint}", "trainer.accelerator=cpu", "optim.lr=1e-3",
        "superglue.eval_batch_size=4", *extra,
    ]


# Epochs per task (RTE and COPA run more than one, to check the best-epoch reload), and the lines
# of each leaderboard file: one per test example, per MultiRC paragraph, per ReCoRD query.
EPOCHS = {"BoolQ": 1, "CB": 1, "COPA": 2, "MultiRC": 1, "ReCoRD": 1, "RTE": 2, "WiC": 1, "WSC": 1}
TEST_LINES = {"BoolQ": 3, "CB": 3, "COPA": 2, "MultiRC": 1, "ReCoRD": 2, "RTE": 3, "WiC": 3, "WSC": 3}


def test_sweep_end_to_end(tmp_path, pretrained):
    data = write_all_tasks(tmp_path / "superglue")
    per_task = [f"superglue.tasks.{task.lower()}.{key}={value}" for task, epochs in EPOCHS.items()
                for key, value in (("epochs", epochs), ("max_seq_length", 64), ("batch_size", 4))]
    code = main(["exp=superglue", *overrides(
        tmp_path, pretrained, f"data.superglue_dir={data}",
        "task=[boolq,cb,copa,multirc,record,rte,wic,wsc]", *per_task,
        "superglue.tasks.wsc.pattern_id=0")])  # pattern 2's question does not fit 64 positions here
    assert code == 0
    run_dir = tmp_path / "outputs" / "superglue" / "sweep"

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    runs = mlflow.search_runs(experiment_names=["superglue"], output_format="list")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    children = {r.data.tags["task"]: r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == set(EPOCHS)

    dev = {}
    for task, epochs in EPOCHS.items():
        child = children[task]
        assert child.info.status == "FINISHED"
        metric = main_metric(task)
        history = client.get_metric_history(child.info.run_id, f"val/{metric}")
        assert len(history) == epochs  # validated after every epoch
        # The best epoch was reloaded: the final dev score is the best per-epoch score.
        assert child.data.metrics[f"dev/{metric}"] == pytest.approx(max(m.value for m in history))
        assert (run_dir / task / "checkpoints" / "best.ckpt").exists()
        summary = json.loads((run_dir / task / "summary.json").read_text())
        assert summary["monitor"] == f"val/{metric}"
        assert summary["best_score"] == pytest.approx(max(m.value for m in history))
        assert Path(summary["best_checkpoint"]) == (run_dir / task / "checkpoints" / "best.ckpt").resolve()
        dev[task] = {name: child.data.metrics[f"dev/{name}"] for name in TABLE1_METRICS[task]}
        assert all(0.0 <= value <= 1.0 for value in dev[task].values())
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert f"{task}.jsonl" in artifacts
    row = table_row(dev)
    assert parent.data.metrics["table1/avg"] == pytest.approx(row["avg"])
    for task in EPOCHS:
        assert parent.data.metrics[f"table1/{task}"] == pytest.approx(row[task])
    parent_artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {*(f"{task}.jsonl" for task in EPOCHS), "table1.md"} <= parent_artifacts

    lines = {task: [json.loads(line) for line in (run_dir / f"{task}.jsonl").read_text().splitlines()]
             for task in EPOCHS}
    assert {task: len(rows) for task, rows in lines.items()} == TEST_LINES
    labels = {"BoolQ": ("true", "false"), "CB": ("entailment", "contradiction", "neutral"), "COPA": (0, 1),
              "RTE": ("entailment", "not_entailment"), "WiC": ("true", "false"), "WSC": ("true", "false")}
    for task, allowed in labels.items():
        assert [r["idx"] for r in lines[task]] == list(range(TEST_LINES[task]))
        assert all(set(r) == {"idx", "label"} and r["label"] in allowed for r in lines[task]), task
    # MultiRC: nested per paragraph (one on the test split), one 0/1 label per answer option
    predicted = [[a["label"] for a in q["answers"]] for q in lines["MultiRC"][0]["passage"]["questions"]]
    assert all(label in (0, 1) for labels in predicted for label in labels)
    assert lines["MultiRC"] == [{"idx": 0, "passage": {"questions": [
        {"idx": q, "answers": [{"idx": 3 * q + a, "label": predicted[q][a]} for a in range(2 + q)]}
        for q in range(2)]}}]
    # ReCoRD: one line per query, labelled with one of the passage's entity strings
    assert [r["idx"] for r in lines["ReCoRD"]] == [0, 1]
    assert all(set(r) == {"idx", "label"} and r["label"] in ("student", "doctor") for r in lines["ReCoRD"])
    header = "| ReCoRD | COPA | WSC | RTE | BoolQ | WiC | CB | MultiRC | Avg |"
    assert header in (run_dir / "table1.md").read_text()


def test_leaderboard_formats():
    multirc = [{"idx": (0, 0, 0)}, {"idx": (0, 0, 1)}, {"idx": (0, 1, 2)}, {"idx": (1, 2, 3)}]
    rows = leaderboard_rows("MultiRC", multirc, {ex["idx"]: i % 2 for i, ex in enumerate(multirc)})
    assert rows == [
        {"idx": 0, "passage": {"questions": [
            {"idx": 0, "answers": [{"idx": 0, "label": 0}, {"idx": 1, "label": 1}]},
            {"idx": 1, "answers": [{"idx": 2, "label": 0}]}]}},
        {"idx": 1, "passage": {"questions": [{"idx": 2, "answers": [{"idx": 3, "label": 1}]}]}},
    ]
    record = [{"idx": (4, 7), "entities": ["Paris", "Oslo"]}]
    assert leaderboard_rows("ReCoRD", record, {(4, 7): 1}) == [{"idx": 7, "label": "Oslo"}]
    assert leaderboard_rows("BoolQ", [{"idx": 3}], {3: 1}) == [{"idx": 3, "label": "true"}]
    assert leaderboard_rows("WSC", [{"idx": 3}], {3: 0}) == [{"idx": 3, "label": "false"}]
    assert leaderboard_rows("CB", [{"idx": 3}], {3: 2}) == [{"idx": 3, "label": "neutral"}]


@pytest.fixture
def served_zip(tmp_path):
    """An HTTP server on localhost serving a SuperGLUE-like archive; yields (url, sha256)."""
    data = write_superglue(tmp_path / "src" / "combined")
    site = tmp_path / "site"
    site.mkdir()
    archive = site / "combined.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(data.rglob("*.jsonl")):
            zf.write(path, path.relative_to(data.parent).as_posix())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        digest = hashlib.sha256(archive.read_bytes()).hexdigest()
        yield f"http://127.0.0.1:{server.server_port}/combined.zip", digest
    finally:
        server.shutdown()
        server.server_close()


def test_download_checks_sha256_and_caches(tmp_path, served_zip):
    url, digest = served_zip
    with pytest.raises(ConfigError, match=f"expected sha256 {'0' * 64}, got {digest}"):
        fetch_superglue(url, tmp_path / "cache", "0" * 64, progress=False)
    folder = fetch_superglue(url, tmp_path / "cache", digest, progress=False)
    assert folder.name == "combined" and (folder / "RTE" / "train.jsonl").is_file()
    (tmp_path / "site" / "combined.zip").unlink()  # a second call uses the cache
    assert fetch_superglue(url, tmp_path / "cache", digest, progress=False) == folder


def test_task_selection_and_config_errors(tmp_path, pretrained, capsys):
    assert superglue_tasks(None) == ["ReCoRD", "COPA", "WSC", "RTE", "BoolQ", "WiC", "CB", "MultiRC"]
    assert superglue_tasks("rte") == ["RTE"] and superglue_tasks(["cb", "RECORD", "CB"]) == ["CB", "ReCoRD"]
    assert main(["exp=superglue", "task=[rte,squad]"]) == 2
    assert "invalid value 'squad' for 'task'; valid choices: ReCoRD, COPA, WSC" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="'model.init_from' is not set"):
        run(load_config("superglue", [f"output_dir={tmp_path}", "task=rte"]))
    def config(*extra: str):
        return load_config("superglue", overrides(tmp_path, pretrained, *extra))

    with pytest.raises(ConfigError, match="'data.superglue_dir'"):
        run(config(f"data.superglue_dir={tmp_path / 'nope'}"))
    data = write_superglue(tmp_path / "superglue")
    with pytest.raises(ConfigError, match=r"'data.superglue_dir': .*CB/train.jsonl does not exist"):
        run(config(f"data.superglue_dir={data}", "task=cb"))
    with pytest.raises(ConfigError, match="superglue.tasks.rte.max_seq_length"):  # 256 > 64 positions
        run(config(f"data.superglue_dir={data}", "task=rte"))
    with pytest.raises(ConfigError, match="model.init_from"):
        run(config(f"data.superglue_dir={data}", "task=rte", f"model.init_from={tmp_path / 'none.ckpt'}"))
    with pytest.raises(ConfigError, match="superglue.head"):
        load_config("superglue", ["superglue.head=mlp"])
    (data / "RTE" / "train.jsonl").write_text("")  # an empty training file: one line, no traceback
    assert main(["exp=superglue", *overrides(tmp_path, pretrained, f"data.superglue_dir={data}", "task=rte",
                                             "superglue.tasks.rte.max_seq_length=64", "logging.enabled=false",
                                             "run_name=empty")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "RTE has no training examples in" in err


def write_wsc(root: Path, negatives: bool) -> Path:
    """WSC train/val (the sentence of `write_all_tasks`), with or without negative candidates."""
    for split, n in (("train", 6), ("val", 4)):
        write_jsonl(root, "WSC", split, [
            {"idx": i, "text": "The doctor visits the student and he reads a story.",
             "target": {"span1_text": "the student" if i % 2 == 0 else "The doctor",
                        "span1_index": 3 if i % 2 == 0 else 0, "span2_text": "he", "span2_index": 6},
             "label": i % 2 == 0, **({"candidates": ["the doctor", "a story"]} if negatives else {})}
            for i in range(n)])
    return root


def test_wsc_mode_follows_the_data(tmp_path, pretrained, capsys):
    plain, negatives = write_wsc(tmp_path / "plain", False), write_wsc(tmp_path / "negatives", True)
    settings = ["task=wsc", "logging.enabled=false", *(f"superglue.tasks.wsc.{key}" for key in (
        "epochs=1", "max_seq_length=64", "batch_size=4"))]
    # the generative default is pattern 0 (task_wsc_generative.sh); pattern 2 would not fit 64 positions
    assert main(["exp=superglue", *overrides(tmp_path / "a", pretrained, f"data.superglue_dir={plain}",
                                             *settings)]) == 0
    assert "WSC: generative mode, pattern 0 (no negative candidates in the data" in capsys.readouterr().out
    settings.append("superglue.tasks.wsc.pattern_id=0")
    result_file = tmp_path / "a" / "outputs" / "superglue" / "sweep" / "WSC" / "result.json"
    result = json.loads(result_file.read_text())
    assert result["metrics"]["dev/predicted_true"] in (0.0, 0.25, 0.5, 0.75, 1.0)  # share of 4 dev examples
    # data.wsc_negatives replaces WSC's files: its candidates switch auto to the candidates layout
    assert main(["exp=superglue", *overrides(tmp_path / "b", pretrained, f"data.superglue_dir={plain}",
                                             f"data.wsc_negatives={negatives}", *settings,
                                             "superglue.tasks.wsc.epochs=4",
                                             "superglue.epochs_scale=0.5")]) == 0
    out = capsys.readouterr().out
    assert "WSC: candidates mode" in out
    # 3 positives, global batch 4: one step per epoch; 4 epochs x 0.5
    assert ("WSC: 3 training examples, 1 steps per epoch x 2 epochs = 2 optimizer steps (global batch 4); "
            "the positive examples of train.jsonl only\n") in out  # why 3 of the file's examples
    assert main(["exp=superglue", *overrides(tmp_path / "c", pretrained, f"data.superglue_dir={plain}",
                                             "superglue.tasks.wsc.mode=candidates", *settings)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "superglue.tasks.wsc.mode=candidates needs negative candidates" in err[0]
    assert main(["exp=superglue", "superglue.tasks.wsc.mode=negative"]) == 2
    assert "valid choices: auto, generative, candidates" in capsys.readouterr().err


def _cli(args: list[str]) -> None:
    """``python -m experiments.run`` in a fresh process group (Lightning starts any second rank)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PL_", "TORCHELASTIC_"))
           and k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK")}
    env.update(MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, "-m", "experiments.run", *args], env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        log, _ = process.communicate(timeout=HANG_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"{args} did not finish within {HANG_S} s:\n{process.communicate()[0][-3000:]}")
    assert process.returncode == 0, log[-20000:]


@pytest.mark.slow
def test_two_processes_score_and_predict_like_one(tmp_path, pretrained):
    """DDP and FSDP2 on 2 CPU processes: both ranks evaluate their part of the dev and test files, and the
    Table-1 row and the leaderboard files equal those of one process. The runs train on the same
    gradients: each epoch is one optimizer step over all 8 training examples (two micro-batches of 4
    accumulated, or one per rank), and dropout is off."""
    data = tmp_path / "superglue"
    for split, n in (("train", 8), ("val", 7), ("test", 3)):  # odd sizes: the sampler pads with repeats
        write_jsonl(data, "RTE", split, [
            {"idx": i, "premise": sentence(i), "hypothesis": sentence(i + i % 3),
             **({} if split == "test" else {"label": "entailment" if i % 3 == 0 else "not_entailment"})}
            for i in range(n)])
        write_jsonl(data, "COPA", split, [  # 4 training examples, 8 with their mirrored copies
            {"idx": i, "premise": sentence(i), "choice1": sentence(i + 1), "choice2": sentence(i + 3),
             "question": "cause" if i % 2 else "effect", **({} if split == "test" else {"label": i % 2})}
            for i in range(n // 2)])
    settings = [f"data.superglue_dir={data}", "task=[rte,copa]", "superglue.micro_batch_size=4",
                "logging.enabled=false", "optim.lr=3e-3", "optim.warmup=0.0",
                *(f"model.{name}=0.0" for name in ("embedding_dropout_prob", "attention_dropout_prob",
                                                   "output_dropout_prob")),
                *(f"superglue.tasks.{t}.{k}={v}" for t in ("rte", "copa")
                  for k, v in (("epochs", 3), ("batch_size", 8), ("max_seq_length", 64)))]
    outputs = {}
    for strategy in ("single", "ddp", "fsdp"):
        root = tmp_path / strategy
        devices = [] if strategy == "single" else [f"trainer.strategy={strategy}", "trainer.devices=2",
                                                   "trainer.accelerator=cpu"]
        _cli(["exp=superglue", *overrides(root, pretrained, *settings, *devices)])
        outputs[strategy] = root / "outputs" / "superglue" / "sweep"
    one = json.loads((outputs["single"] / "results.json").read_text())
    assert one["tasks"]["RTE"]["accuracy"] * 7 == pytest.approx(round(one["tasks"]["RTE"]["accuracy"] * 7))
    for strategy in ("ddp", "fsdp"):
        two = json.loads((outputs[strategy] / "results.json").read_text())
        assert two["table1"] == pytest.approx(one["table1"], abs=1e-6), strategy
        for task in ("RTE", "COPA"):
            assert two["tasks"][task] == pytest.approx(one["tasks"][task], abs=1e-6), (strategy, task)
        for name in ("RTE.jsonl", "COPA.jsonl"):
            lines = (outputs[strategy] / name).read_text().splitlines()
            assert lines == (outputs["single"] / name).read_text().splitlines(), (strategy, name)
        assert [json.loads(line)["idx"] for line in lines] == list(range(len(lines)))  # in order, once


class StopAtStep(L.Callback):
    """A scheduler's SIGTERM to this process right after optimizer step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.slow
def test_a_task_resumed_mid_epoch_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, pretrained,
                                                                               monkeypatch):
    """RTE, 10 training examples in batches of 4 (3 steps per epoch, the last one short), 3 epochs,
    dropout on: stopped after step 5, inside the second epoch, and resumed, the task ends with
    bit-identical weights (same batches in the same order, same dropout masks)."""
    data = tmp_path / "superglue"
    for split, n in (("train", 10), ("val", 4)):
        write_jsonl(data, "RTE", split, [
            {"idx": i, "premise": sentence(i), "hypothesis": sentence(i + i % 3),
             "label": "entailment" if i % 3 == 0 else "not_entailment"} for i in range(n)])
    settings = [f"data.superglue_dir={data}", "task=rte", "logging.enabled=false",
                "superglue.test_predictions=false",
                *(f"superglue.tasks.rte.{k}={v}" for k, v in (("epochs", 3), ("batch_size", 4),
                                                               ("max_seq_length", 64)))]

    def last_weights(root: Path) -> dict[str, torch.Tensor]:
        last = root / "outputs" / "superglue" / "sweep" / "RTE" / "checkpoints" / "last.ckpt"
        return torch.load(last, weights_only=False)

    assert main(["exp=superglue", *overrides(tmp_path / "straight", pretrained, *settings)]) == 0
    straight = last_weights(tmp_path / "straight")
    assert straight["global_step"] == 9

    stopped = tmp_path / "stopped"
    with monkeypatch.context() as patch:  # the stop in place of the throughput monitor (it only logs)
        patch.setattr(superglue_job, "throughput_monitor", lambda: StopAtStep(5))
        assert main(["exp=superglue", *overrides(stopped, pretrained, *settings)]) == 130
    assert last_weights(stopped)["global_step"] == 5
    assert main(["exp=superglue", *overrides(stopped, pretrained, *settings, "resume=auto")]) == 0
    resumed = last_weights(stopped)
    assert resumed["global_step"] == 9
    assert resumed["state_dict"].keys() == straight["state_dict"].keys()
    for key, value in straight["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key

"""exp=superglue end to end on tiny SuperGLUE-format data, the archive download, task selection."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import shutil
import threading
import zipfile
from pathlib import Path

import mlflow
import pytest
import torch

from datamodules.superglue_download import fetch_superglue
from experiments.config import load_config
from experiments.jobs.superglue import leaderboard_rows, run
from experiments.run import main
from glm_lightning.checkpoint import save_ours
from glm_lightning.config import ConfigError, superglue_tasks
from glm_lightning.metrics import table_row
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


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, make_text) -> Path:
    """A random tiny checkpoint laid out as a pretraining run, with a tokenizer trained here in
    which the verbalizers " Yes" / " No" are single pieces."""
    run_dir = tmp_path_factory.mktemp("pretrain_run")
    text = run_dir / "text.txt"
    answers = "".join(f"{sentence(i)} Yes, it is. No, it is not.\n" for i in range(200))
    text.write_text(make_text() + answers, encoding="utf-8")
    model_path = train_sentencepiece([str(text)], 400, str(run_dir / "sp"), character_coverage=1.0,
                                     user_defined_symbols=["\u2581Yes", "\u2581No"], hard_vocab_limit=False)
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


def test_sweep_end_to_end(tmp_path, pretrained):
    data = write_superglue(tmp_path / "superglue")
    code = main(["exp=superglue", *overrides(
        tmp_path, pretrained, f"data.superglue_dir={data}", "task=[rte,COPA]",
        "superglue.tasks.rte.epochs=3", "superglue.tasks.rte.max_seq_length=64",
        "superglue.tasks.rte.batch_size=4", "superglue.tasks.copa.epochs=2",
        "superglue.tasks.copa.max_seq_length=64", "superglue.tasks.copa.batch_size=4")])
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
    assert set(children) == {"RTE", "COPA"}

    dev = {}
    for task, epochs in (("RTE", 3), ("COPA", 2)):
        child = children[task]
        assert child.info.status == "FINISHED"
        history = client.get_metric_history(child.info.run_id, "val/accuracy")
        assert len(history) == epochs  # validated after every epoch
        # The best epoch was reloaded: the final dev score is the best per-epoch score.
        assert child.data.metrics["dev/accuracy"] == pytest.approx(max(m.value for m in history))
        assert (run_dir / task / "checkpoints" / "best.ckpt").exists()
        dev[task] = {"accuracy": child.data.metrics["dev/accuracy"]}
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert f"{task}.jsonl" in artifacts
    row = table_row(dev)
    assert parent.data.metrics["table1/avg"] == pytest.approx(row["avg"])
    assert parent.data.metrics["table1/RTE"] == pytest.approx(row["RTE"])
    parent_artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"RTE.jsonl", "COPA.jsonl", "table1.md"} <= parent_artifacts

    rte = [json.loads(line) for line in (run_dir / "RTE.jsonl").read_text().splitlines()]
    assert [r["idx"] for r in rte] == [0, 1, 2]
    assert all(r["label"] in ("entailment", "not_entailment") for r in rte)
    copa = [json.loads(line) for line in (run_dir / "COPA.jsonl").read_text().splitlines()]
    assert len(copa) == 2 and all(r["label"] in (0, 1) for r in copa)
    assert "| COPA | RTE | Avg |" in (run_dir / "table1.md").read_text()


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

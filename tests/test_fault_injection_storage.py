"""Storage faults on a shared cluster disk: kills during saves, a full disk, concurrent runs on one
MLflow store, damaged cache shards, concurrent writers of the built-in corpus.

The faults are real: runs are subprocesses of ``python -m experiments.run`` killed with SIGKILL; a
full disk and a rename across file systems come from ``tests/fault_injection/sitecustomize.py``,
which makes the process's own writes fail as the kernel would, below the code under test.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from readme_commands import argv, free_port, readme_command, serving
from timeouts import HANG_S

from datamodules.builtin_corpus import write_builtin_corpus
from datamodules.corpus import tokenize_corpus
from datamodules.pretrain import PretrainDataModule
from experiments.config import load_config
from experiments.jobs.pretrain import resume_checkpoint
from experiments.run import main
from experiments.tracking import mlflow_logger
from glm_lightning.atomic import atomic_write, atomic_write_text, remove_abandoned, temporary_path
from glm_lightning.checkpoint_io import AtomicCheckpointIO, checkpoint_problem
from glm_lightning.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
FAULTS = Path(__file__).resolve().parent / "fault_injection"
TINY = ["model.num_layers=2", "model.hidden_size=64", "data.seq_length=64", "data.batch_size=4",
        "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1"]


# exp=pretrain (GLM-Large) at the size of TINY, on the built-in text, for 4 steps on one CPU process
SMALL_PRETRAIN = ["model.num_attention_heads=4", "tokenizer.vocab_size=1000", "data.num_workers=0",
                  "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.devices=1",
                  "trainer.strategy=auto", "trainer.precision=32-true"]


def command(tmp_path: Path, *overrides: str, start: list[str] | None = None) -> list[str]:
    """``start`` (by default the quickstart's command) in ``tmp_path``, one run named r1, TINY."""
    return [*(start or [sys.executable, "-m", "experiments.run"]), f"output_dir={tmp_path / 'outputs'}",
            f"data.cache_dir={tmp_path / 'cache'}", "run_name=r1", *TINY, *overrides]


def faulty_env(**variables: str) -> dict[str, str]:
    """The environment of a subprocess with the fault injection loaded (see its docstring)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(FAULTS), str(ROOT)]), **variables}


def temporaries(*folders: Path) -> list[Path]:
    return [p for folder in folders if folder.is_dir() for p in folder.iterdir() if p.name.endswith(".tmp")
            or p.name.startswith("tmp")]


# ---------------------------------------------------------------------------------------------
# Atomic writes


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = atomic_write_text(tmp_path / "summary.json", "old\n")

    def fail_halfway(f):
        f.write(b"new and longer")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError) as raised:
        atomic_write(target, fail_halfway)
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(target)
    assert target.read_text() == "old\n" and sorted(tmp_path.iterdir()) == [target]


def test_a_later_write_removes_what_a_killed_writer_left(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    pid = int(dead.stdout)
    host = socket.gethostname()
    abandoned = tmp_path / f".step4.ckpt~0123abcd~{pid}~{host}.tmp"
    other_host_old = tmp_path / ".last.ckpt~0123abcd~1~elsewhere.tmp"
    other_host_fresh = tmp_path / ".last.ckpt~4567abcd~1~elsewhere.tmp"
    mine = temporary_path(tmp_path / "last.ckpt")  # this live process's: being written
    unrelated = tmp_path / ".notes.tmp"
    for path in (abandoned, other_host_old, other_host_fresh, mine, unrelated):
        path.write_bytes(b"partial")
    os.utime(other_host_old, (time.time() - 3600, time.time() - 3600))
    assert set(remove_abandoned(tmp_path)) == {abandoned, other_host_old}
    assert {p.name for p in tmp_path.iterdir()} == {other_host_fresh.name, mine.name, unrelated.name}


def small_checkpoint(path: Path, step: int) -> Path:
    checkpoint = {"global_step": step, "state_dict": {"w": torch.arange(5000.0)}}
    AtomicCheckpointIO().save_checkpoint(checkpoint, path)
    return path


def overwrite_tensor(path: Path) -> None:
    """Overwrite 8 bytes inside the first tensor record of a checkpoint, leaving its zip archive intact."""
    with zipfile.ZipFile(path) as archive:
        record = next(m for m in archive.infolist() if m.filename.endswith("/data/0"))
    with path.open("rb+") as f:
        f.seek(record.header_offset + 26)
        name_length, extra_length = np.frombuffer(f.read(4), dtype="<u2")
        f.seek(record.header_offset + 30 + name_length + extra_length + 64)
        f.write(b"\x7f" * 8)


def break_file(path: Path, how: str) -> None:
    if how == "tensor":
        return overwrite_tensor(path)
    data = path.read_bytes()
    broken = {"empty": b"", "truncated": data[: len(data) // 2], "garbage": os.urandom(len(data))}[how]
    path.write_bytes(broken)


@pytest.mark.parametrize("how", ["empty", "truncated", "garbage", "tensor"])
def test_resume_auto_skips_a_broken_checkpoint_and_explicit_resume_names_it(tmp_path, capsys, how):
    checkpoints = tmp_path / "outputs" / "quickstart" / "r1" / "checkpoints"
    older = small_checkpoint(checkpoints / "step4.ckpt", 4)
    last = small_checkpoint(checkpoints / "last.ckpt", 8)
    os.utime(older, ns=(1, 1_000_000_000))  # written before last.ckpt
    break_file(last, how)
    assert checkpoint_problem(older) is None and checkpoint_problem(last) is not None
    cfg = load_config("quickstart", [f"output_dir={tmp_path / 'outputs'}", "run_name=r1", "resume=auto"])
    assert resume_checkpoint(cfg, checkpoints.parent) == str(older)
    (warning,) = capsys.readouterr().err.splitlines()
    assert warning.startswith("warning: resume=auto skips ") and str(last) in warning
    assert f"resuming from {older}" in warning

    explicit = load_config("quickstart", [f"resume={last}"])
    with pytest.raises(ConfigError) as raised:
        resume_checkpoint(explicit, checkpoints.parent)
    reason = {"empty": "empty file (0 bytes)", "truncated": "truncated",
              "garbage": "not a PyTorch checkpoint",
              "tensor": "damaged content: archive/data/0 does not match its checksum (CRC-32)"}
    assert str(last) in str(raised.value) and reason[how] in str(raised.value)
    assert "\n" not in str(raised.value)

    break_file(older, how)  # nothing intact left: one line that lists what was found
    with pytest.raises(ConfigError, match="no intact checkpoint") as raised:
        resume_checkpoint(cfg, checkpoints.parent)
    assert str(older) in str(raised.value) and str(last) in str(raised.value)
    assert "\n" not in str(raised.value)


def test_starting_afresh_over_a_runs_checkpoints_needs_overwrite(tmp_path):
    checkpoints = tmp_path / "outputs" / "quickstart" / "r1" / "checkpoints"
    small_checkpoint(checkpoints / "step4.ckpt", 4)
    cfg = load_config("quickstart", [f"output_dir={tmp_path / 'outputs'}", "run_name=r1"])
    with pytest.raises(ConfigError) as raised:
        resume_checkpoint(cfg, checkpoints.parent)
    assert str(raised.value) == (f"{checkpoints.parent} already has checkpoints; continue it with "
                                 "resume=auto, choose another run_name, or replace it with overwrite=true")
    assert (checkpoints / "step4.ckpt").is_file()
    replacing = load_config("quickstart", [f"output_dir={tmp_path / 'outputs'}", "run_name=r1",
                                           "overwrite=true"])
    assert resume_checkpoint(replacing, checkpoints.parent) is None and not checkpoints.exists()


def second_filesystem(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A TMPDIR on another file system than ``tmp_path`` (/dev/shm when it is one), or a folder of
    the same one whose renames to elsewhere fail with EXDEV as across file systems."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shm.stat().st_dev != tmp_path.stat().st_dev:
        return Path(tempfile.mkdtemp(dir=shm, prefix="glm-test-")), {}
    folder = tmp_path / "tmpdir"
    folder.mkdir()
    return folder, {"GLM_FAULT_EXDEV_DIR": str(folder)}


def kill_during_a_save(process: subprocess.Popen, checkpoints: Path, tmpdir: Path, delay: float) -> bool:
    """SIGKILL ``process`` ``delay`` seconds after a checkpoint save is seen under way (a temporary
    file beside the checkpoints or in TMPDIR) once one checkpoint exists; False if it ended first."""
    while process.poll() is None:
        if any(checkpoints.glob("*.ckpt")) and temporaries(checkpoints, tmpdir):
            time.sleep(delay)
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.002)
    return False


@pytest.mark.slow
def test_sigkill_during_checkpoint_saves_with_tmpdir_on_another_filesystem(tmp_path):
    tmpdir, extra = second_filesystem(tmp_path)
    env = faulty_env(TMPDIR=str(tmpdir), **extra)
    checkpoints = tmp_path / "outputs" / "quickstart" / "r1" / "checkpoints"
    # Checkpoints of about 40 MB saved at every second step, so saves take most of the time.
    big = ["model.hidden_size=256", "model.num_layers=4", "trainer.val_check_interval=2",
           "trainer.max_steps=100000"]
    rng = random.Random(20261206)
    try:
        kills = 0
        for _ in range(3):
            process = subprocess.Popen(command(tmp_path, *big, "resume=auto"), cwd=ROOT, env=env,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            killed = kill_during_a_save(process, checkpoints, tmpdir, rng.uniform(0.0, 0.05))
            assert killed, process.stderr.read()[-3000:]
            kills += 1
            saved = sorted(checkpoints.glob("*.ckpt"))
            assert saved, "a killed run kept no checkpoint"
            assert {p.name: checkpoint_problem(p) for p in saved} == {p.name: None for p in saved}
        step = max(torch.load(p, weights_only=False, mmap=True)["global_step"]
                   for p in checkpoints.glob("*.ckpt"))
        resumed = subprocess.run(command(tmp_path, *big, "resume=auto", f"trainer.max_steps={step + 2}"),
                                 cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_S)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"] == step + 2
        assert temporaries(checkpoints, checkpoints.parent, tmpdir) == []
        assert kills == 3
    finally:
        if tmpdir.parent == Path("/dev/shm"):
            subprocess.run(["rm", "-rf", str(tmpdir)], check=True)


@pytest.mark.slow
def test_the_final_checkpoint_is_written_once_and_a_redundant_save_cannot_fail_the_run(tmp_path, monkeypatch):
    written = []
    save = AtomicCheckpointIO.save_checkpoint

    def record(self, checkpoint, path, storage_options=None):
        save(self, checkpoint, path, storage_options)
        written.append((Path(path).name, Path(path).stat().st_size))

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", record)
    arguments = command(tmp_path / "once", "trainer.max_steps=2", "trainer.val_check_interval=2",
                        f"data.cache_dir={tmp_path / 'cache'}")  # the cache of the run below
    assert main(arguments[3:]) == 0
    assert [name for name, _ in written] == ["step2.ckpt", "last.ckpt"]  # the best, then last.ckpt once

    # Room for one checkpoint only: the best of the final step is saved, last.ckpt (the same step)
    # cannot be; nothing is lost, so the run finishes.
    checkpoints = tmp_path / "outputs" / "quickstart" / "r1" / "checkpoints"
    env = faulty_env(GLM_FAULT_ENOSPC_AFTER=str(written[0][1] * 3 // 2),
                     GLM_FAULT_ENOSPC_DIRS=str(checkpoints))
    result = subprocess.run(command(tmp_path, "trainer.max_steps=2", "trainer.val_check_interval=2"),
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_S)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (f"warning: {checkpoints / 'last.ckpt'} not updated (No space left on device); step 2 is saved in "
            "the run's other checkpoint of that step") in result.stderr.splitlines()
    assert [p.name for p in checkpoints.iterdir()] == ["step2.ckpt"]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    (found,) = mlflow.search_runs(experiment_names=["quickstart"], output_format="list")
    assert found.info.status == "FINISHED"
    cfg = load_config("quickstart", [f"output_dir={tmp_path / 'outputs'}", "run_name=r1", "resume=auto"])
    assert resume_checkpoint(cfg, checkpoints.parent) == str(checkpoints / "step2.ckpt")


@pytest.mark.slow
def test_a_full_disk_during_a_save_keeps_no_partial_file_and_fails_the_run(tmp_path):
    checkpoints = tmp_path / "outputs" / "quickstart" / "r1" / "checkpoints"
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    # The checkpoints and TMPDIR share a disk with 300 KB free: the first save (2 MB) fills it.
    env = faulty_env(TMPDIR=str(tmpdir), GLM_FAULT_ENOSPC_AFTER="300000",
                     GLM_FAULT_ENOSPC_DIRS=os.pathsep.join([str(checkpoints), str(tmpdir)]))
    result = subprocess.run(command(tmp_path, "trainer.max_steps=8", "trainer.val_check_interval=4"),
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_S)
    assert result.returncode == 1, result.stderr[-3000:]
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: No space left on device while writing ")
    assert str(checkpoints / "step4.ckpt") in last_line and "Traceback" not in result.stderr
    assert list(checkpoints.iterdir()) == [] and temporaries(tmpdir) == []  # nothing partial
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    (found,) = mlflow.search_runs(experiment_names=["quickstart"], output_format="list")
    assert found.info.status == "FAILED"
    assert json.loads((checkpoints.parent / "summary.json").read_text())["global_step"] == 4
    assert np.isfinite(found.data.metrics["train/loss"])


# ---------------------------------------------------------------------------------------------
# Concurrent runs on one MLflow store


def run_metrics(tracking: str, experiment: str = "quickstart") -> dict[str, tuple[str, dict[str, list[int]]]]:
    """run name -> (status, metric -> logged steps) of every run of ``experiment`` in a store."""
    client = mlflow.MlflowClient(tracking_uri=tracking)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return {run.info.run_name: (run.info.status, {key: sorted(m.step for m in client.get_metric_history(
        run.info.run_id, key)) for key in ("train/loss", "val/loss")}) for run in runs}


COMPLETE = ("FINISHED", {"train/loss": [0, 1, 2, 3], "val/loss": [1, 3]})  # 4 steps, validated twice


@pytest.mark.slow
def test_runs_started_together_on_a_fresh_mlflow_store_all_finish(tmp_path):
    processes = [subprocess.Popen(command(tmp_path, f"run_name=r{k}", "trainer.max_steps=4",
                                          "trainer.val_check_interval=2"),
                                  cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for k in range(4)]
    errors = [p.communicate(timeout=HANG_S)[1] for p in processes]
    assert [p.returncode for p in processes] == [0] * 4, "\n".join(e[-2000:] for e in errors)
    found = run_metrics(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    assert found == {f"r{k}": COMPLETE for k in range(4)}


LOGGER = """
import sys
from pathlib import Path
from experiments.config import load_config
from experiments.tracking import mlflow_logger
cfg = load_config("quickstart", [f"output_dir={sys.argv[1]}", f"run_name={sys.argv[2]}"])
logger = mlflow_logger(cfg, Path(sys.argv[1]) / "quickstart" / sys.argv[2])
for step in range(4):
    logger.log_metrics({"train/loss": 1.0 / (step + 1)}, step)
logger.log_metrics({"val/loss": 0.5}, 1)
logger.log_metrics({"val/loss": 0.25}, 3)
logger.finalize("success")
"""


@pytest.mark.slow
def test_loggers_opening_a_fresh_mlflow_store_together_all_log(tmp_path):
    """The store-creation race alone, without training: four processes open a new store at once."""
    out = tmp_path / "outputs"
    processes = [subprocess.Popen([sys.executable, "-c", LOGGER, str(out), f"r{k}"], cwd=ROOT,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for k in range(4)]
    errors = [p.communicate(timeout=HANG_S)[1] for p in processes]
    assert [p.returncode for p in processes] == [0] * 4, "\n".join(e[-2000:] for e in errors)
    assert run_metrics(f"sqlite:///{out / 'mlflow.db'}") == {f"r{k}": COMPLETE for k in range(4)}


STORE_MAKER = """
import os, signal, sys
from sqlalchemy import event
from sqlalchemy.engine import Engine
import experiments.tracking as tracking
database, point = sys.argv[1], sys.argv[2]
statements = 0

def killed(*_):
    os.kill(os.getpid(), signal.SIGKILL)

@event.listens_for(Engine, "before_cursor_execute")
def statement(connection, *_):
    global statements
    statements += 1
    if point == str(statements) or (point == "opened" and connection.engine.url.database == database):
        killed()

if point == "rename":
    tracking.publish = killed
tracking.ready_store(f"sqlite:///{database}")
sys.exit(f"made the store without being killed ({statements} statements)")
"""


@pytest.mark.slow
@pytest.mark.parametrize("point", ["1", "800", "rename", "opened"])
def test_a_kill_while_the_mlflow_store_is_made_leaves_a_store_the_next_run_uses(tmp_path, point):
    """SIGKILL at the first SQL statement of making the store, amid its migrations, just before the
    complete store is renamed into place, and once it is there (before MLflow's default experiment):
    the next run logs, completely, and nothing the killed process wrote is left over."""
    out = tmp_path / "outputs"
    out.mkdir()
    maker = subprocess.run([sys.executable, "-c", STORE_MAKER, str(out / "mlflow.db"), point], cwd=ROOT,
                           capture_output=True, text=True, timeout=HANG_S)
    assert maker.returncode == -signal.SIGKILL, maker.stderr[-2000:]
    assert (out / "mlflow.db").exists() == (point == "opened")  # before the rename: no store at all
    cfg = load_config("quickstart", [f"output_dir={out}", "run_name=r1"])  # the next run
    logger = mlflow_logger(cfg, out / "quickstart" / "r1")
    for step in range(4):
        logger.log_metrics({"train/loss": 1.0 / (step + 1)}, step)
    logger.log_metrics({"val/loss": 0.5}, 1)
    logger.log_metrics({"val/loss": 0.25}, 3)
    logger.finalize("success")
    assert run_metrics(f"sqlite:///{out / 'mlflow.db'}") == {"r1": COMPLETE}
    assert [p.name for p in out.iterdir() if p.name.startswith((".", "mlflow.db"))] == ["mlflow.db"]
    assert not temporaries(out) and not (out / "mlflow.db.lock").exists()


@pytest.mark.slow
def test_the_readme_mlflow_server_and_a_run_pointed_at_it(tmp_path):
    """README's server command (its port free here, one worker) and its run command (``...``: a small
    model, 4 steps): the run logs everything to the server's store and writes no store of its own."""
    port = free_port()
    server = readme_command("mlflow server").replace("--port 5000", f"--port {port}") + " --workers 1"
    run = readme_command("python -m experiments.run exp=pretrain logging.tracking_uri=")
    run = run.replace("HOST:5000", f"127.0.0.1:{port}").replace(" ...", "")
    with serving(argv(server), cwd=tmp_path, port=port):
        result = subprocess.run(command(tmp_path, *SMALL_PRETRAIN, start=argv(run)), cwd=ROOT,
                                capture_output=True, text=True, timeout=HANG_S)
        assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "outputs" / "mlflow.db").exists()  # everything went to the server
    assert run_metrics(f"sqlite:///{tmp_path / 'mlflow.db'}", "pretrain") == {"r1": COMPLETE}


# ---------------------------------------------------------------------------------------------
# The built-in corpus, written by runs that start together

CORPUS_WRITER = """
import sys
from pathlib import Path
from datamodules.builtin_corpus import DOCUMENT_SEPARATOR as SEPARATOR, DOCUMENTS_PER_FILE as PER_FILE
from datamodules.builtin_corpus import builtin_documents, write_builtin_corpus
documents = builtin_documents()
expected = [SEPARATOR.join(documents[k:k + PER_FILE]) + "\\n" for k in range(0, len(documents), PER_FILE)]
for _ in range(int(sys.argv[2])):
    paths = write_builtin_corpus(sys.argv[1])
    seen = [Path(p).read_text(encoding="utf-8") for p in paths]
    if seen != expected:
        sys.exit(f"incomplete built-in corpus: {[len(s) for s in seen]} characters, expected "
                 f"{[len(e) for e in expected]}")
"""


def test_runs_writing_the_builtin_corpus_together_all_see_complete_files(tmp_path):
    directory = tmp_path / "builtin_corpus"
    writers = [subprocess.Popen([sys.executable, "-c", CORPUS_WRITER, str(directory), "10"], cwd=ROOT,
                                stderr=subprocess.PIPE, text=True) for _ in range(4)]
    errors = [w.communicate(timeout=HANG_S)[1] for w in writers]
    assert [w.returncode for w in writers] == [0] * 4, errors
    assert sorted(p.name for p in directory.iterdir()) == [f"builtin_{k:02d}.txt" for k in range(4)]

    # A later call leaves identical files alone: their modification times stay.
    for path in directory.iterdir():
        os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    write_builtin_corpus(directory)
    assert {p.stat().st_mtime_ns for p in directory.iterdir()} == {1_000_000_000}


# ---------------------------------------------------------------------------------------------
# Damaged cache shards


def training_batches(tokenizer, files: list[Path], cache: Path) -> list[dict]:
    datamodule = PretrainDataModule(tokenizer, files, cache_dir=cache, seq_length=64, batch_size=4,
                                    progress=False, seed=3)
    datamodule.prepare_data()
    datamodule.setup("fit")
    loader = iter(datamodule.train_dataloader())
    return [next(loader) for _ in range(3)]


@pytest.mark.parametrize("fill", [b"\x00", b"\xff"], ids=["zeros", "0xFF"])
def test_a_damaged_shard_is_detected_and_tokenized_again(tmp_path, tokenizer, capfd, fill):
    cache = tmp_path / "cache"
    (corpus_file,) = map(Path, write_builtin_corpus(tmp_path / "corpus", num_documents=40))
    original = tokenize_corpus(corpus_file, tokenizer, cache, progress=False)
    documents = [original.document(i).tolist() for i in range(len(original))]
    expected = training_batches(tokenizer, [corpus_file], cache)
    (tokens,) = cache.glob("*.tokens")
    intact = tokens.read_bytes()
    capfd.readouterr()

    tokens.write_bytes(fill * len(intact))  # same size: only the checksum can tell
    rebuilt = training_batches(tokenizer, [corpus_file], cache)
    (warning,) = capfd.readouterr().err.splitlines()
    assert warning == (f"warning: cached shard {tokens} of {corpus_file.name} does not match its checksum "
                       "(the file was changed or damaged); tokenizing it again")
    assert tokens.read_bytes() == intact
    for got, want in zip(rebuilt, expected, strict=True):
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want if isinstance(want[k], torch.Tensor))
    again = tokenize_corpus(corpus_file, tokenizer, cache, progress=False)
    assert [again.document(i).tolist() for i in range(len(again))] == documents
    assert capfd.readouterr().err == ""  # verified, nothing to report


def test_a_shard_without_a_checksum_is_tokenized_again(tmp_path, tokenizer, corpus_file, capfd):
    cache = tmp_path / "cache"
    tokenize_corpus(corpus_file, tokenizer, cache, progress=False)
    (description,) = cache.glob("*.json")
    meta = json.loads(description.read_text())
    checksum = meta["parts"][0].pop("blake2b")
    description.write_text(json.dumps(meta))  # as an older version wrote it
    capfd.readouterr()
    tokenize_corpus(corpus_file, tokenizer, cache, progress=False)
    assert "has no checksum (written by an older version); tokenizing it again" in capfd.readouterr().err
    assert json.loads(description.read_text())["parts"][0]["blake2b"] == checksum

"""experiments.tracking on a real sqlite store: a resumed run logs each step of a metric once; the store
is made whole or not at all, and waited for while another writer locks it."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
from mlflow.tracking import MlflowClient
from sqlalchemy import event
from sqlalchemy.engine import Engine

from experiments import tracking
from experiments.run import main
from experiments.tracking import HOST_TAG, PID_TAG, RunLogger, end_abandoned_runs, ready_store
from glm_lightning.errors import ConfigError


def test_resumed_run_keeps_one_value_per_step(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = RunLogger(experiment_name="e", run_name="r", tracking_uri=uri)
    for step in range(1, 9):  # trained to step 8, last checkpoint at step 5
        first.log_metrics({"train/loss": 10.0 - step}, step=step)
    first.log_metrics({"val/loss": 3.0}, step=4)
    first.finalize("success")

    resumed = RunLogger(experiment_name="e", run_name="r", tracking_uri=uri, run_id=first.run_id)
    resumed.skip_logged_steps()
    for step in range(6, 11):  # steps 6-8 are trained again, then 9-10 are new
        resumed.log_metrics({"train/loss": 100.0 + step}, step=step)
    resumed.log_metrics({"val/loss": 2.5}, step=8)  # a step the metric does not have yet
    resumed.finalize("success")

    client = MlflowClient(tracking_uri=uri)
    history = sorted((m.step, m.value) for m in client.get_metric_history(first.run_id, "train/loss"))
    assert [s for s, _ in history] == list(range(1, 11))  # no step twice
    assert dict(history)[7] == 3.0 and dict(history)[9] == 109.0  # the first value of a step is kept
    assert sorted(m.step for m in client.get_metric_history(first.run_id, "val/loss")) == [4, 8]


# ---------------------------------------------------------------------------------------------
# Making the sqlite store: a store locked by another writer, half-made stores of earlier versions


def fresh_process(monkeypatch) -> None:
    """Forget which stores this process has made ready, as a new process would."""
    monkeypatch.setattr(tracking, "_READY_STORES", set())


def test_a_store_locked_by_another_writer_is_waited_for(tmp_path, monkeypatch):
    database = tmp_path / "mlflow.db"
    uri = ready_store(f"sqlite:///{database}")
    fresh_process(monkeypatch)
    holder = sqlite3.connect(database, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another writer, mid-transaction
    pauses = []

    def pause(seconds: float) -> None:  # the writer finishes while this process waits
        pauses.append(seconds)
        holder.execute("ROLLBACK")

    monkeypatch.setattr(tracking.time, "sleep", pause)
    assert ready_store(uri) == uri
    assert pauses == [0.25]
    MlflowClient(tracking_uri=uri).create_experiment("after the wait")
    holder.close()


def test_a_store_that_stays_locked_is_one_line_and_no_run_folder(tmp_path, monkeypatch, capsys):
    out = tmp_path / "outputs"
    database = out / "mlflow.db"
    ready_store(f"sqlite:///{database}")
    fresh_process(monkeypatch)
    capsys.readouterr()  # MLflow's notes on making the store
    monkeypatch.setattr(tracking, "LOCKED_WAIT_SECONDS", 0.0)  # give up at the first refusal
    holder = sqlite3.connect(database, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        code = main([f"output_dir={out}", f"data.cache_dir={tmp_path / 'cache'}", "run_name=r1",
                     "trainer.max_steps=2"])
    finally:
        holder.close()
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "Traceback" not in err
    assert err.startswith("error: logging.tracking_uri:") and str(database) in err and "locked" in err
    assert not (out / "quickstart").exists() and not (tmp_path / "cache").exists()  # nothing written


def half_made_store(database: Path, statements: int) -> None:
    """A store that MLflow made in place and stopped after `statements` SQL statements, as a kill
    leaves it (MLflow's own in-place making, without this project's temporary file)."""
    class Killed(BaseException):
        pass

    count = 0

    def stop(*_):
        nonlocal count
        count += 1
        if count > statements:
            raise Killed

    event.listen(Engine, "before_cursor_execute", stop)
    try:
        SqlAlchemyStore(f"sqlite:///{database}", str(database.parent))
    except Killed:
        pass
    finally:
        event.remove(Engine, "before_cursor_execute", stop)
    SqlAlchemyStore._engine_map.pop(f"sqlite:///{database}").dispose()


@pytest.mark.parametrize("statements", [40, 900])
def test_a_half_made_store_is_made_anew(tmp_path, statements):
    database = tmp_path / "mlflow.db"
    half_made_store(database, statements)
    # (MLflow itself, opening it, fails on the tables it finds: "table ... already exists")
    client = MlflowClient(tracking_uri=ready_store(f"sqlite:///{database}"))
    run = client.create_run(client.create_experiment("e"))
    client.log_metric(run.info.run_id, "m", 1.0)
    assert client.get_run(run.info.run_id).data.metrics == {"m": 1.0}


def test_a_store_of_an_older_schema_that_holds_runs_is_never_remade(tmp_path, monkeypatch):
    database = tmp_path / "mlflow.db"
    uri = ready_store(f"sqlite:///{database}")
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    with closing(sqlite3.connect(database)) as connection, connection:
        connection.execute("UPDATE alembic_version SET version_num = 'c48cb773bb87'")  # MLflow 1.x
    fresh_process(monkeypatch)
    again = f"sqlite:///{tmp_path}/./mlflow.db"  # the same file by another URI: MLflow caches stores by URI
    with pytest.raises(ConfigError, match=r"logging.tracking_uri: MLflow cannot open .*mlflow.db: "
                                          r"Detected out-of-date database schema"):
        ready_store(again)
    with closing(sqlite3.connect(database)) as connection:
        assert connection.execute("SELECT run_uuid FROM runs").fetchall() == [(run_id,)]


def test_runs_left_running_by_a_dead_process_of_this_host_are_marked_killed(tmp_path, capsys):
    store = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = store.create_experiment("lm_eval")
    capsys.readouterr()  # MLflow's own lines about creating the store
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    host = socket.gethostname()

    def running(name: str, tags: dict[str, str]) -> str:
        return store.create_run(experiment, run_name=name, tags=tags).info.run_id

    abandoned = running("e1", {HOST_TAG: host, PID_TAG: dead})
    alive = running("e1", {HOST_TAG: host, PID_TAG: str(os.getppid())})
    elsewhere = running("e1", {HOST_TAG: "another-host", PID_TAG: dead})
    untagged = running("e1", {})
    other_name = running("e2", {HOST_TAG: host, PID_TAG: dead})
    assert end_abandoned_runs(store, experiment, "e1") == [abandoned]
    statuses = {run_id: store.get_run(run_id).info.status
                for run_id in (abandoned, alive, elsewhere, untagged, other_name)}
    assert statuses == {abandoned: "KILLED", alive: "RUNNING", elsewhere: "RUNNING", untagged: "RUNNING",
                        other_name: "RUNNING"}
    assert capsys.readouterr().err == (f"note: MLflow run {abandoned} (e1) was left RUNNING by process "
                                       f"{dead}, which is gone; marked KILLED\n")
    assert end_abandoned_runs(store, experiment, "e1") == []  # once

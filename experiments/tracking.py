"""MLflow tracking for runs: a real store (sqlite by default), the config as params, git tags."""

from __future__ import annotations

import os
import re
import socket
import sqlite3
import subprocess
import sys
import time
from argparse import Namespace
from contextlib import closing
from pathlib import Path

import sqlalchemy
from lightning.fabric.utilities.logger import _convert_params, _flatten_dict
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from mlflow.exceptions import MlflowException
from mlflow.store.db import utils as mlflow_db_utils
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from datamodules.cache_lock import CacheLock
from experiments.config import flatten
from glm_lightning.atomic import atomic_write_text, process_alive, publish, remove_abandoned, temporary_path
from glm_lightning.errors import ConfigError

RUN_ID_FILE = "mlflow_run_id"
HOST_TAG, PID_TAG = "glm.host", "glm.pid"  # the process that runs an MLflow run, to tell when it died


_READY_STORES: set[str] = set()  # sqlite stores this process has found created and migrated
LOCKED_WAIT_SECONDS = 120.0  # how long a store locked by another writer is waited for


def tracking_uri(cfg: DictConfig) -> str:
    """``logging.tracking_uri`` or a sqlite store beside the runs (MLflow 3's file store is deprecated),
    ready to use (see ``ready_store``)."""
    default = f"sqlite:///{Path(cfg.output_dir).resolve() / 'mlflow.db'}"
    return ready_store(cfg.logging.tracking_uri or default)


def ready_store(uri: str) -> str:
    """``uri``, after creating and migrating its sqlite store once, under a lock file beside it.

    MLflow creates the tables of a new sqlite store, and runs its schema migrations, in every
    process that opens it, in place: processes that open a fresh store together crash on each
    other's half-made tables (``duplicate column name``), and a process killed meanwhile leaves a
    half-migrated store that breaks every later run (``table ... already exists``). So a new store
    is made in a temporary file and renamed into place once complete; a half-made one that an
    earlier version left (not migrated to the end, no experiment yet) is made anew. A store
    locked by another writer is waited for, ``LOCKED_WAIT_SECONDS`` at most. A server store
    (``http://``) is the server's business.
    """
    if uri in _READY_STORES or not uri.startswith("sqlite:///"):
        return uri
    database = Path(uri.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)
    with CacheLock(database.with_name(f"{database.name}.lock")).acquire():
        remove_abandoned(database.parent)  # stores a killed process was making
        if database.exists():
            _wait_until_writable(database)
            if _half_made(database):
                for leftover in (database, *(Path(f"{database}{s}") for s in ("-journal", "-wal", "-shm"))):
                    leftover.unlink(missing_ok=True)
        if not database.exists():
            _create_store(database)
        try:
            MlflowClient(tracking_uri=uri)  # opening it adds MLflow's default experiment
        except MlflowException as error:  # a store of an older MLflow, say
            raise ConfigError(f"logging.tracking_uri: MLflow cannot open {database}: "
                              f"{error.message.partition('. ')[0]}") from None
    _READY_STORES.add(uri)
    return uri


def _create_store(database: Path) -> None:
    """MLflow's tables, migrated to its newest schema, in a temporary file renamed to ``database``
    when complete, so that no kill leaves a half-made store behind."""
    temporary = temporary_path(database)
    engine = sqlalchemy.create_engine(f"sqlite:///{temporary}")
    # the rollback journal in memory, so that a killed maker leaves one file (remove_abandoned finds
    # it), and no fsync per migration: the file is fsynced once, complete, before the rename
    sqlalchemy.event.listen(engine, "connect", lambda connection, _: connection.executescript(
        "PRAGMA journal_mode=MEMORY; PRAGMA synchronous=OFF;"))
    try:
        mlflow_db_utils._initialize_tables(engine)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    finally:
        engine.dispose()
    publish(temporary, database)


def _half_made(database: Path) -> bool:
    """Whether ``database`` is a store whose making stopped halfway: its schema short of the newest
    and no experiment in it (MLflow adds its default experiment once the migrations are done)."""
    with closing(sqlite3.connect(database)) as connection:
        def first(query: str) -> tuple | None:
            try:
                return connection.execute(query).fetchone()
            except sqlite3.OperationalError as error:
                if "no such table" in str(error):
                    return None
                raise
        revision = first("SELECT version_num FROM alembic_version")
        if revision is not None and revision[0] == mlflow_db_utils._get_latest_schema_revision():
            return False
        return first("SELECT experiment_id FROM experiments LIMIT 1") is None


def _wait_until_writable(database: Path) -> None:
    """Return once this process could write to ``database``; while another writer holds it, wait with
    growing pauses, and after ``LOCKED_WAIT_SECONDS`` fail in one line."""
    deadline, pause = time.monotonic() + LOCKED_WAIT_SECONDS, 0.25
    while True:
        try:
            with closing(sqlite3.connect(database, timeout=1.0, isolation_level=None)) as connection:
                connection.execute("BEGIN IMMEDIATE")  # takes the write lock, or waits 1 s for it
                connection.execute("ROLLBACK")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error):
                raise
            left = deadline - time.monotonic()
            if left <= 0:
                raise ConfigError(f"logging.tracking_uri: the MLflow store {database} is locked by another "
                                  f"writer and stayed locked for {LOCKED_WAIT_SECONDS:.0f} s; run again once "
                                  "it is free, or log to another store") from None
            time.sleep(min(pause, left))
            pause = min(2 * pause, 8.0)


def git_tags() -> dict[str, str]:
    """The code version a run used: commit and whether the work tree had uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    try:
        return {"git_commit": git("rev-parse", "HEAD"), "git_dirty": str(bool(git("status", "--porcelain")))}
    except (OSError, subprocess.CalledProcessError):
        return {"git_commit": "unknown", "git_dirty": "unknown"}


def artifact_location(cfg: DictConfig) -> str:
    """Where new MLflow experiments keep their artifacts: ``<output_dir>/mlartifacts``."""
    return (Path(cfg.output_dir).resolve() / "mlartifacts").as_uri()


def experiment_id(cfg: DictConfig) -> str:
    """The id of the run's MLflow experiment (``logging.experiment_name`` or the exp name), created
    with its artifacts under ``output_dir`` when it does not exist yet."""
    client = MlflowClient(tracking_uri=tracking_uri(cfg))
    name = cfg.logging.experiment_name or cfg.exp
    found = client.get_experiment_by_name(name)
    if found:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location(cfg))
    except MlflowException:  # created by a run that started at the same time
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def run_tags(cfg: DictConfig) -> dict[str, str]:
    """Tags of a run: code version, experiment, ``logging.tags`` and the parent run of a sweep."""
    tags = {**git_tags(), "exp": cfg.exp, **cfg.logging.tags}
    if cfg.logging.parent_run_id:
        tags["mlflow.parentRunId"] = cfg.logging.parent_run_id
    return tags


def owner_tags() -> dict[str, str]:
    """Tags naming this process as the one that runs an MLflow run (set again when it is resumed)."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}


def end_abandoned_runs(client: MlflowClient, experiment: str, run_name: str) -> list[str]:
    """Mark KILLED the runs named ``run_name`` in ``experiment`` that are still RUNNING although the
    process that ran them, on this host, is gone (SIGKILL or a crash leave them so); says so in one
    line each and returns their ids. Runs of other hosts, or without the owner tags, are left."""
    host, ended = socket.gethostname(), []
    name = run_name.replace("'", "\\'")
    for run in client.search_runs([experiment], f"attributes.status = 'RUNNING' and "
                                  f"tags.mlflow.runName = '{name}'"):
        tags = run.data.tags
        pid = tags.get(PID_TAG, "")
        ours = tags.get(HOST_TAG) == host and pid.isdigit()
        if not ours or int(pid) == os.getpid() or process_alive(int(pid)):
            continue
        client.set_terminated(run.info.run_id, "KILLED")
        ended.append(run.info.run_id)
        print(f"note: MLflow run {run.info.run_id} ({run_name}) was left RUNNING by process {pid}, which is "
              "gone; marked KILLED", file=sys.stderr)
    return ended


class RunLogger(MLFlowLogger):
    """MLFlowLogger whose run ends as KILLED (not FAILED) when training was interrupted on purpose,
    and that logs each step of a metric once (see ``skip_logged_steps``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tracking_uri = kwargs.get("tracking_uri")
        self._killed = False
        self._logged_through: dict[str, int] = {}  # metric -> last step the run already holds
        self._kept_params: set[str] = set()  # params of a resumed run, which are not logged again

    def skip_logged_steps(self) -> None:
        """A run resumed from an older checkpoint trains some steps again; MLflow keeps every value
        it is sent, so the steps a metric already has are not logged again (one value per step).
        Its params keep the values the run started with (MLflow cannot change them; an accepted
        change is a ``resume_override`` tag)."""
        client, run_id = self.experiment, self.run_id
        run = client.get_run(run_id)
        for key in run.data.metrics:
            self._logged_through[key] = max(m.step for m in client.get_metric_history(run_id, key))
        self._kept_params = set(run.data.params)

    @rank_zero_only
    def log_hyperparams(self, params: dict | Namespace) -> None:
        flat = _flatten_dict(_convert_params(params))
        super().log_hyperparams({k: v for k, v in flat.items() if k not in self._kept_params})

    @rank_zero_only
    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        if step is not None and self._logged_through:
            metrics = {k: v for k, v in metrics.items() if step > self._logged_through.get(k, -1)}
        if metrics:
            super().log_metrics(metrics, step)

    def mark_killed(self) -> None:
        self._killed = True

    def finalize(self, status: str = "success") -> None:
        super().finalize("KILLED" if self._killed and status == "failed" else status)


def recorded_run_id(run_id_file: Path) -> str:
    """The MLflow run id a run folder records; a damaged file is a ConfigError naming it."""
    run_id = run_id_file.read_text(errors="replace").strip()
    if not re.fullmatch(r"[0-9a-f]{32}", run_id):
        raise ConfigError(f"{run_id_file} does not hold an MLflow run id (found {run_id[:40]!r}); delete it "
                          "to log the resumed run as a new MLflow run")
    return run_id


def mlflow_logger(cfg: DictConfig, run_dir: Path, *, resume: bool = False) -> RunLogger:
    """A logger for this run; a resumed run continues the MLflow run recorded in its directory."""
    run_id_file = run_dir / RUN_ID_FILE
    run_id = recorded_run_id(run_id_file) if resume and run_id_file.exists() else None
    experiment = experiment_id(cfg)  # created here, where runs that start together cannot both create it
    if rank_zero_only.rank == 0:
        end_abandoned_runs(MlflowClient(tracking_uri=tracking_uri(cfg)), experiment, run_dir.name)
    logger = RunLogger(
        experiment_name=cfg.logging.experiment_name or cfg.exp,
        run_name=run_dir.name,
        tracking_uri=tracking_uri(cfg),
        artifact_location=artifact_location(cfg),
        tags={**run_tags(cfg), **owner_tags()},
        run_id=run_id,
        log_model=False,  # checkpoints stay in the run directory; the run records their paths
    )
    if run_id is None:
        logger.log_hyperparams(flatten(OmegaConf.to_container(cfg, resolve=True)))
    elif rank_zero_only.rank == 0:
        logger.skip_logged_steps()
        logger.experiment.update_run(run_id, status="RUNNING")  # it may have been marked KILLED
        for key, value in owner_tags().items():
            logger.experiment.set_tag(run_id, key, value)
    if rank_zero_only.rank == 0:  # other ranks log nothing; Lightning routes them to a no-op
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_id_file, logger.run_id)
    return logger

"""experiments.tracking: a resumed run logs each step of a metric once (a real sqlite store)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from mlflow.tracking import MlflowClient

from experiments.tracking import HOST_TAG, PID_TAG, RunLogger, end_abandoned_runs


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

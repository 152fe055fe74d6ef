"""experiments.tracking: a resumed run logs each step of a metric once (a real sqlite store)."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from experiments.tracking import RunLogger


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

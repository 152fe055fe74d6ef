"""Real MLflow stores of plain experiments for the comparison tests and the notebook test.

``quickstart``: pretraining runs as ``exp=quickstart`` logs them: "r1" twice (two seeds) and "r2",
with ``train/loss`` / ``val/loss`` histories and final ``val/*`` metrics, plus a FAILED run that
is left out. ``superglue``: SuperGLUE parent runs ("glm" with two seeds, "bert") and a child run.
"""

from __future__ import annotations

from pathlib import Path

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

FINAL = {("r1", 1): {"val/loss": 2.9, "val/ppl": 18.17, "train/loss": 2.7},
         ("r1", 2): {"val/loss": 3.1, "val/ppl": 22.2, "train/loss": 2.8},
         ("r2", 1): {"val/loss": 2.5, "val/ppl": 12.18, "train/loss": 2.4}}
SUPERGLUE = {("glm", 1): {"RTE/accuracy": 0.70, "CB/accuracy": 0.80, "CB/f1": 0.75, "table1/avg": 0.7375},
             ("glm", 2): {"RTE/accuracy": 0.72, "CB/accuracy": 0.84, "CB/f1": 0.79, "table1/avg": 0.7675},
             ("bert", 1): {"RTE/accuracy": 0.66, "CB/accuracy": 0.80, "CB/f1": 0.70, "table1/avg": 0.7},
             }
START = 1_700_000_000_000


def build_run_store(directory: Path) -> str:
    """Write both experiments into ``directory``; returns the store URI."""
    uri = f"sqlite:///{directory / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    pretrain = client.create_experiment("quickstart")
    for i, ((name, _seed), final) in enumerate(FINAL.items()):
        run = client.create_run(pretrain, run_name=name, start_time=START + i)
        curve = [Metric("train/loss", 4.0 - 0.4 * step / 100, START + step, step) for step in (100, 200)]
        curve += [Metric(key, value, START + 300, 300) for key, value in final.items()]
        curve += [Metric("val/loss", final["val/loss"] + 0.5, START + 200, 200)]
        client.log_batch(run.info.run_id, curve)
        client.set_terminated(run.info.run_id)
    failed = client.create_run(pretrain, run_name="r3", start_time=START + 9)
    client.log_metric(failed.info.run_id, "val/loss", 9.9)
    client.set_terminated(failed.info.run_id, status="FAILED")

    superglue = client.create_experiment("superglue")
    for i, ((name, _seed), metrics) in enumerate(SUPERGLUE.items()):
        run = client.create_run(superglue, run_name=name, start_time=START + 100 + i)  # the latest runs
        for key, value in metrics.items():
            client.log_metric(run.info.run_id, key, value)
        child = client.create_run(superglue, run_name=f"{name}/RTE", start_time=START + 100 + i,
                                  tags={"mlflow.parentRunId": run.info.run_id, "task": "RTE"})
        client.log_metric(child.info.run_id, "RTE/accuracy", metrics["RTE/accuracy"])
        client.set_terminated(child.info.run_id)
        client.set_terminated(run.info.run_id)
    return uri

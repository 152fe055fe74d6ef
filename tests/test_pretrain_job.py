"""The pretraining job end to end: quickstart config, MLflow run, checkpoints, resume."""

import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch

from experiments.config import load_config
from experiments.jobs.pretrain import run
from glm_lightning.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def quickstart(tmp_path: Path, *overrides: str):
    return load_config("quickstart", [
        f"output_dir={tmp_path / 'outputs'}", f"data.cache_dir={tmp_path / 'cache'}", "run_name=r1",
        "model.num_layers=2", "model.hidden_size=64", "data.seq_length=64", "data.batch_size=4",
        "trainer.max_steps=8", "trainer.val_check_interval=4", "trainer.limit_val_batches=2",
        "trainer.log_every_n_steps=2", *overrides,
    ])


@pytest.mark.slow
def test_quickstart_trains_tracks_and_resumes(tmp_path):
    run_dir = run(quickstart(tmp_path))
    assert run_dir == tmp_path / "outputs" / "quickstart" / "r1"
    assert (run_dir / "config.yaml").exists()
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 8

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["quickstart"], output_format="list")
    assert len(runs) == 1
    first = runs[0]
    assert first.info.status == "FINISHED" and first.info.run_name == "r1"
    assert first.data.params["optim.lr"] == "0.001" and first.data.params["model.num_layers"] == "2"
    assert {"train/loss", "train/loss_span", "val/loss", "val/loss_span", "val/ppl", "train/lr"} <= set(
        first.data.metrics)
    assert first.data.tags["git_commit"] and first.data.tags["exp"] == "quickstart"
    assert (run_dir / "mlflow_run_id").read_text() == first.info.run_id
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(first.info.run_id)}
    assert "config.yaml" in artifacts

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
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and str(binary) in last_line
    assert "Traceback" not in result.stderr

"""Resuming with a changed config: refused before anything is written, unless the keys are safe or
named in resume_overrides, which are recorded beside the original config and as MLflow tags."""

from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from omegaconf import OmegaConf

from experiments.config import load_config, save_config
from experiments.resume import RESUME_SAFE, config_changes
from experiments.run import main


def args(tmp_path: Path, *extra: str) -> list[str]:
    return ["exp=quickstart", f"output_dir={tmp_path / 'outputs'}", f"data.cache_dir={tmp_path / 'cache'}",
            "run_name=r1", "model.num_layers=2", "model.hidden_size=64", "data.seq_length=64",
            "data.batch_size=4", "trainer.max_steps=2", "trainer.val_check_interval=2",
            "trainer.limit_val_batches=1", "data.num_workers=0", *extra]


def test_changes_are_the_differing_result_keys(tmp_path):
    stored = save_config(load_config("quickstart", ["data.batch_size=4"]), tmp_path / "config.yaml")
    changed = load_config("quickstart", ["data.batch_size=8", "optim.lr=0.1", "resume=auto", "run_name=x",
                                         f"output_dir={tmp_path}", "resume_overrides=[optim.lr]"])
    assert config_changes(changed, stored) == {"data.batch_size": (4, 8), "optim.lr": (0.006, 0.1)}
    for key in RESUME_SAFE:  # every safe key is a real config key
        assert OmegaConf.select(changed, key, default="missing") != "missing", key


@pytest.mark.slow
def test_resume_refuses_a_changed_config_before_touching_anything(tmp_path, capsys):
    assert main(args(tmp_path)) == 0
    run_dir = tmp_path / "outputs" / "quickstart" / "r1"
    original = (run_dir / "config.yaml").read_bytes()
    store = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    run_id = (run_dir / "mlflow_run_id").read_text()
    capsys.readouterr()

    assert main(args(tmp_path, "resume=auto", "data.batch_size=8", "model.hidden_size=128")) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: resume refused: 2 keys differ from {run_dir / 'config.yaml'}:",
        "  data.batch_size: 4 -> 8",
        "  model.hidden_size: 64 -> 128",
        "resume with the stored values, or accept the change with "
        "resume_overrides=[data.batch_size,model.hidden_size] (the original config.yaml is kept)"]
    assert (run_dir / "config.yaml").read_bytes() == original
    assert store.get_run(run_id).info.status == "FINISHED" and not list(run_dir.glob("config.resume-*"))

    assert main(args(tmp_path, "resume=auto", "resume_overrides=[data.batch_sise]")) == 2
    assert "invalid key 'data.batch_sise' in 'resume_overrides'" in capsys.readouterr().err

    # A named override and a safe key: accepted, recorded beside the original and as a tag.
    assert main(args(tmp_path, "resume=auto", "optim.lr=0.003", "trainer.max_steps=3",
                     "resume_overrides=[optim.lr]")) == 0
    assert (run_dir / "config.yaml").read_bytes() == original
    resumed = yaml.safe_load((run_dir / "config.resume-1.yaml").read_text())
    assert resumed["optim"]["lr"] == 0.003 and resumed["trainer"]["max_steps"] == 3
    run = store.get_run(run_id)
    assert run.data.tags["resume_override.1"] == "optim.lr: 0.006 -> 0.003; trainer.max_steps: 2 -> 3"
    assert run.data.params["optim.lr"] == "0.006" and run.info.status == "FINISHED"
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3

"""Resuming with a changed config: refused before anything is written, unless the keys are safe or
named in resume_overrides, which are recorded beside the original config and as MLflow tags."""

import re
import shutil
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from omegaconf import OmegaConf

from experiments.config import load_config, save_config
from experiments.errors import RunInterrupted
from experiments.resume import RESUME_SAFE, config_changes
from experiments.run import main
from glm_lightning.checkpoint_io import AtomicCheckpointIO, newest_intact_checkpoint


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
        "error: resume refused: 2 keys differ from the config recorded in "
        f"{newest_intact_checkpoint(run_dir / 'checkpoints')[0]}:",
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


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished quickstart run of 2 steps (outputs and cache), trained once for this module."""
    root = tmp_path_factory.mktemp("finished")
    assert main(args(root)) == 0
    return root


def copy_of(finished: Path, tmp_path: Path) -> Path:
    """The finished run's outputs, copied to ``tmp_path`` (its cache is shared); returns its run folder."""
    shutil.copytree(finished / "outputs", tmp_path / "outputs")
    return tmp_path / "outputs" / "quickstart" / "r1"


def resumed(finished: Path, tmp_path: Path, *extra: str) -> list[str]:
    """The arguments that resume the copy of the finished run."""
    return args(tmp_path, "resume=auto", f"data.cache_dir={finished / 'cache'}", *extra)


@pytest.mark.slow
def test_resume_checks_the_config_the_checkpoint_records_when_config_yaml_is_gone(finished, tmp_path, capsys):
    run_dir = copy_of(finished, tmp_path)
    original = (run_dir / "config.yaml").read_bytes()
    (run_dir / "config.yaml").unlink()
    capsys.readouterr()
    assert main(resumed(finished, tmp_path, "optim.lr=0.003")) == 2
    err = capsys.readouterr().err.splitlines()
    source = newest_intact_checkpoint(run_dir / "checkpoints")[0]
    assert err[:2] == [f"error: resume refused: 1 keys differ from the config recorded in {source}:",
                       "  optim.lr: 0.006 -> 0.003"]
    assert not (run_dir / "config.yaml").exists()  # nothing written before the check

    assert main(resumed(finished, tmp_path, "trainer.max_steps=3")) == 0
    assert (f"warning: {run_dir / 'config.yaml'} was missing; restored from the config recorded in {source}"
            in capsys.readouterr().err.splitlines())
    assert (run_dir / "config.yaml").read_bytes() == original


@pytest.mark.slow
def test_a_non_finite_loss_right_after_a_resume_names_the_checkpoint_and_the_one_before(finished, tmp_path,
                                                                                         capsys):
    checkpoints = copy_of(finished, tmp_path) / "checkpoints"
    last = checkpoints / "last.ckpt"
    state = torch.load(last, weights_only=False)
    AtomicCheckpointIO().save_checkpoint({**state, "global_step": 1}, checkpoints / "step1.ckpt")
    state["state_dict"] = {k: v.clone().fill_(float("nan")) if v.is_floating_point() else v
                           for k, v in state["state_dict"].items()}
    AtomicCheckpointIO().save_checkpoint(state, last)  # intact file (checksums match), weights of NaN
    capsys.readouterr()
    assert main(resumed(finished, tmp_path, "trainer.max_steps=3")) == 1
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert re.fullmatch(
        rf"error: non-finite loss \(nan\) at step 2 on a '\w+' batch, after resuming from "
        rf"{re.escape(str(last))} and before any newer checkpoint: that checkpoint may hold damaged weights; "
        rf"continue from the checkpoint before it with resume={re.escape(str(checkpoints / 'step1.ckpt'))}",
        line), line


@pytest.mark.slow
def test_a_stop_during_the_final_held_out_evaluation_ends_the_mlflow_run_killed(finished, tmp_path, capsys,
                                                                                 monkeypatch):
    run_dir = copy_of(finished, tmp_path)

    def stopped(*args, **kwargs):  # what the SIGTERM handler raises outside a training step
        raise RunInterrupted("terminated by SIGTERM outside a training step (no checkpoint written now)")

    monkeypatch.setattr("experiments.jobs.pretrain.evaluate_infilling", stopped)
    assert main(resumed(finished, tmp_path)) == 130
    assert capsys.readouterr().err.splitlines()[-1].startswith("stopped: terminated by SIGTERM")
    store = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    assert store.get_run((run_dir / "mlflow_run_id").read_text()).info.status == "KILLED"

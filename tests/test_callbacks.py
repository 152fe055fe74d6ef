"""glm_lightning.callbacks: progress a person can read in a log file, and a model summary without
Lightning's FLOPs count of 0."""

from __future__ import annotations

import io
import logging

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from torch.utils.data import DataLoader, TensorDataset

from glm_lightning.callbacks import LineProgress, SummaryWithoutFlops, progress_bar


class Regression(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", torch.nn.functional.mse_loss(self.layer(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(80, 4, generator=generator)  # 20 batches: validations at steps 10 and 20
    return DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=4)


def fit(callbacks: list, **trainer_args) -> L.Trainer:
    settings = dict(max_steps=20, val_check_interval=10, limit_val_batches=2, logger=False,
                    enable_checkpointing=False, accelerator="cpu", callbacks=callbacks)
    trainer = L.Trainer(**{**settings, **trainer_args})
    trainer.fit(Regression(), loader(), loader())
    return trainer


def test_a_log_file_gets_a_line_every_tenth_and_per_validation(capsys):
    fit([LineProgress()], enable_model_summary=False)
    lines = capsys.readouterr().out.splitlines()
    steps = [line for line in lines if line.startswith("step ")]
    assert [line.split()[1] for line in steps] == [f"{step}/20" for step in range(2, 21, 2)]
    assert steps[0].startswith("step 2/20 (10%), ") and "s left, train/loss " in steps[0]
    assert steps[-1].startswith("step 20/20 (100%), ") and "left" not in steps[-1]
    validations = [line for line in lines if line.startswith("validation at step ")]
    assert [line.split(":")[0] for line in validations] == ["validation at step 10", "validation at step 20"]
    assert all(" val/loss " in line for line in validations)
    assert len(lines) == 12 and not any("\r" in line or "\x1b" in line for line in lines)


def test_a_terminal_gets_the_bar_redrawn_in_place():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert isinstance(progress_bar(Terminal()), TQDMProgressBar)
    assert isinstance(progress_bar(io.StringIO()), LineProgress)


def test_the_model_summary_has_no_flops_count_of_zero(caplog):
    with caplog.at_level(logging.INFO):
        fit([LineProgress(), SummaryWithoutFlops()], max_steps=1)
    messages = [record.getMessage() for record in caplog.records]
    summary = "\n".join(message for message in messages if "Total params" in message)
    assert "0 | layer | Linear | 5      | train" in summary and "5         Total params" in summary
    assert "FLOPs" not in summary and "Flops" not in summary

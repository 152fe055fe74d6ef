"""Blank-infilling pretraining as a LightningModule (GLM_SPEC §6)."""

from __future__ import annotations

from dataclasses import asdict

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from glm_lightning.model import GLMConfig, GLMModel
from glm_lightning.optim import annealing_lr, parameter_groups

OBJECTIVES = ("span", "sentence", "document", "masked_lm")


def blank_infilling_loss(logits: Tensor, target_ids: Tensor, loss_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Token-weighted loss ``sum(CE * mask) / sum(mask)`` over the micro-batch, in fp32.

    Targets are already aligned with the inputs (no shift). Returns the loss and the number of
    predicted tokens (the weight of this micro-batch in averages).
    """
    ce = F.cross_entropy(logits.float().flatten(0, 1), target_ids.flatten(), reduction="none")
    mask = loss_mask.flatten().float()
    tokens = mask.sum()
    return (ce * mask).sum() / tokens.clamp(min=1.0), tokens


class TokenWeightedLoss(Metric):
    """Sum of per-token losses and token count, reduced across ranks before dividing.

    ``compute`` returns NaN when no tokens were seen (an objective not drawn in this validation)."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("loss_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, loss: Tensor, tokens: Tensor) -> None:
        self.loss_sum = self.loss_sum + loss.detach().double() * tokens.double()
        self.tokens = self.tokens + tokens.double()

    def compute(self) -> Tensor:
        return (self.loss_sum / self.tokens).float() if self.tokens > 0 else torch.tensor(float("nan"))


class GLMPretrainModule(L.LightningModule):
    """GLMModel trained on batches of the BlankInfillingCollator; losses logged per objective."""

    def __init__(
        self,
        model_config: GLMConfig | dict,
        *,
        lr: float = 4e-4,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        warmup: float = 0.05,
        lr_decay_style: str = "cosine",
        lr_decay_iters: int | None = None,
        lr_decay_ratio: float = 0.05,
    ):
        super().__init__()
        if isinstance(model_config, GLMConfig):
            model_config = asdict(model_config)
        self.save_hyperparameters()
        self.model = GLMModel(GLMConfig(**model_config))
        # Token-weighted validation losses: one per objective, and "all" over every objective.
        self.val_loss = torch.nn.ModuleDict({name: TokenWeightedLoss() for name in (*OBJECTIVES, "all")})

    def forward(self, batch: dict) -> Tensor:
        return self.model(batch["input_ids"], batch["position_ids"], batch["sep"])

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss, tokens = blank_infilling_loss(self(batch), batch["target_ids"], batch["loss_mask"])
        batch_size = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log(f"train/loss_{batch['objective']}", loss, batch_size=batch_size)
        self.log("train/tokens", tokens, reduce_fx="sum", batch_size=batch_size)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=batch_size)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, tokens = blank_infilling_loss(self(batch), batch["target_ids"], batch["loss_mask"])
        # Every metric is updated on every batch (with zero tokens when the objective differs), so
        # all ranks hold and synchronise the same metrics whatever objectives they drew.
        for name, metric in self.val_loss.items():
            metric.update(loss, tokens if name in (batch["objective"], "all") else torch.zeros_like(tokens))

    def on_validation_epoch_end(self) -> None:
        for name, metric in self.val_loss.items():
            loss = metric.compute()
            metric.reset()
            if torch.isnan(loss):
                continue
            suffix = "" if name == "all" else f"_{name}"
            self.log(f"val/loss{suffix}", loss, prog_bar=name == "all")
            self.log(f"val/ppl{suffix}", torch.exp(loss))

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(parameter_groups(self.model, hp.weight_decay), lr=hp.lr,
                                      betas=tuple(hp.betas), eps=hp.eps)
        decay_iters = hp.lr_decay_iters or self.trainer.max_steps
        if decay_iters is None or decay_iters <= 0:
            raise ValueError("lr_decay_iters or trainer.max_steps must be a positive number of steps")
        scheduler = annealing_lr(optimizer, decay_iters=decay_iters, warmup=hp.warmup,
                                 style=hp.lr_decay_style, decay_ratio=hp.lr_decay_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


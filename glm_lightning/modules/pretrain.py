"""Blank-infilling pretraining as a LightningModule (paper §2.1, §3.1; official `pretrain_glm.py`)."""

from __future__ import annotations

import random
from dataclasses import asdict

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from glm_lightning.checkpoint import new_glm
from glm_lightning.flops import training_flops_per_batch
from glm_lightning.model import GLMConfig, check_trainable
from glm_lightning.optim import adamw_with_annealing
from glm_lightning.parallel import configure_glm_module

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


def rng_states() -> dict:
    """The global random generators (dropout, sampling) of this process, as tensors and plain
    Python values so that checkpoints stay loadable with ``weights_only=True``."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]
    states = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class ResumesRandomState:
    """LightningModule hooks that save the random generators of this process (every CUDA device's
    too) in each checkpoint and restore them at the first resumed training step, so that dropout
    draws after a resume are those of an uninterrupted run. (Data loader workers are seeded from
    these generators when their iterator starts.)"""

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rng_states"] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._pending_rng_states = checkpoint.get("rng_states")

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        # Applied at the first resumed training step, not on loading: data loaders draw from the
        # global generator when they start, which the uninterrupted run did before the checkpoint.
        if getattr(self, "_pending_rng_states", None) is not None:
            set_rng_states(self._pending_rng_states)
            self._pending_rng_states = None


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


class UnigramBaseline(Metric):
    """Cross-entropy of the best context-free predictor of the predicted tokens: the entropy (nats)
    of their empirical distribution. A model that learned nothing from context cannot get below it,
    so training should take the validation loss well under this number."""

    full_state_update = False

    def __init__(self, vocab_size: int):
        super().__init__()
        self.add_state("counts", torch.zeros(vocab_size, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, target_ids: Tensor, loss_mask: Tensor) -> None:
        predicted = target_ids[loss_mask.bool()]
        self.counts = self.counts + torch.bincount(predicted, minlength=len(self.counts)).double()

    def compute(self) -> Tensor:
        p = self.counts[self.counts > 0] / self.counts.sum()
        return -(p * p.log()).sum().float()


def lightning_logging_step(trainer: L.Trainer) -> int | None:
    """The step at which Lightning writes the training metrics of the batch that just ended (as
    ``_LoggerConnector.update_train_step_metrics`` decides, called right after
    ``on_train_batch_end``), or None when it writes none for it."""
    loop = trainer.fit_loop
    if loop._should_accumulate() or not trainer._logger_connector.should_update_logs:
        return None
    return loop.epoch_loop._batches_that_stepped


class GLMPretrainModule(ResumesRandomState, L.LightningModule):
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
        init_from: str | None = None,
    ):
        super().__init__()
        if isinstance(model_config, GLMConfig):
            model_config = asdict(model_config)
        # init_from is not kept: a checkpoint of this module carries the weights themselves
        self.save_hyperparameters(ignore=["init_from"])
        self.init_from = init_from  # loaded in configure_model, after any sharding
        self.model = new_glm(GLMConfig(**model_config), init_from)
        # Token-weighted validation losses: one per objective, and "all" over every objective.
        self.val_loss = torch.nn.ModuleDict({name: TokenWeightedLoss() for name in (*OBJECTIVES, "all")})
        self.val_unigram = UnigramBaseline(self.model.config.vocab_size)
        self.tokens_seen = 0  # input tokens trained on, across resumes (kept in checkpoints)
        # objective -> (sum, count, last) of its step losses since Lightning last wrote training metrics
        self.objective_losses: dict[str, tuple[Tensor, int, Tensor]] = {}
        self.flops_per_batch = 0.0  # model FLOPs of the latest micro-batch, read by ThroughputMonitor

    def forward(self, batch: dict) -> Tensor:
        return self.model(batch["input_ids"], batch["position_ids"], batch["sep"])

    def loss(self, batch: dict) -> tuple[Tensor, Tensor]:
        """``blank_infilling_loss`` with logits computed at the predicted positions only (the
        loss mask is 0/1, so this is the same number for a fraction of the output projection)."""
        predicted = batch["loss_mask"].bool()
        logits = self.model(batch["input_ids"], batch["position_ids"], batch["sep"], output_mask=predicted)
        tokens = predicted.sum()
        ce = F.cross_entropy(logits, batch["target_ids"][predicted], reduction="sum")
        return ce / tokens.clamp(min=1), tokens

    def on_fit_start(self) -> None:
        check_trainable(self.model.config, self.device)  # one line now, not a traceback at step 1

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss, tokens = self.loss(batch)
        if not torch.isfinite(loss):
            # Stop rather than train on: the last checkpoint written before this step is intact.
            raise FloatingPointError(
                f"non-finite loss ({loss.item()}) at step {self.global_step} on a "
                f"{batch['objective']!r} batch; lower optim.lr or use bf16-mixed instead of 16-mixed, "
                "then continue from the last checkpoint with resume=auto"
            )
        batch_size, length = batch["input_ids"].shape
        self.flops_per_batch = training_flops_per_batch(self.model.config, batch_size, length)
        self.tokens_seen += batch_size * length * self.trainer.world_size
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/tokens_seen", float(self.tokens_seen), batch_size=batch_size)
        self.log("train/tokens", tokens.float(), reduce_fx="sum", batch_size=batch_size)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=batch_size)
        total, count, _ = self.objective_losses.get(batch["objective"], (0.0, 0, None))
        self.objective_losses[batch["objective"]] = (total + loss.detach(), count + 1, loss.detach())
        return loss

    def on_train_batch_end(self, outputs: Tensor | dict, batch: dict, batch_idx: int) -> None:
        """The per-objective losses, written beside Lightning's training metrics (same steps).

        ``self.log`` would not do: Lightning writes the last value of every key it was ever given at
        each logging step, so a mixed-objective run would repeat an objective's stale loss at steps
        that trained another. Written here: ``train/loss_<objective>`` only when this step trained
        that objective, and ``train/loss_<objective>_mean``, the mean over the objective's own steps
        since Lightning last wrote, for every objective trained in that window."""
        step = lightning_logging_step(self.trainer)
        if step is None:
            return
        metrics = {f"train/loss_{batch['objective']}": float(self.objective_losses[batch["objective"]][2])}
        metrics.update({f"train/loss_{name}_mean": float(total) / count
                        for name, (total, count, _) in self.objective_losses.items()})
        self.objective_losses = {}
        for logger in self.loggers:
            logger.log_metrics(metrics, step=step)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["tokens_seen"] = self.tokens_seen

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.tokens_seen = checkpoint.get("tokens_seen", 0)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, tokens = self.loss(batch)
        # Every metric is updated on every batch (with zero tokens when the objective differs), so
        # all ranks hold and synchronise the same metrics whatever objectives they drew.
        for name, metric in self.val_loss.items():
            metric.update(loss, tokens if name in (batch["objective"], "all") else torch.zeros_like(tokens))
        self.val_unigram.update(batch["target_ids"], batch["loss_mask"])

    def on_validation_epoch_end(self) -> None:
        for name, metric in self.val_loss.items():
            loss = metric.compute()
            metric.reset()
            if torch.isnan(loss):
                continue
            suffix = "" if name == "all" else f"_{name}"
            self.log(f"val/loss{suffix}", loss, prog_bar=name == "all")
            self.log(f"val/ppl{suffix}", torch.exp(loss))
        if self.val_unigram.update_count:
            self.log("val/unigram_baseline", self.val_unigram.compute())
            self.val_unigram.reset()

    def configure_model(self) -> None:
        """FSDP2 sharding under the ``fsdp`` strategy, then the ``init_from`` weights
        (``glm_lightning.parallel.configure_glm_module``)."""
        configure_glm_module(self)

    def configure_optimizers(self):
        decay_iters = self.hparams.lr_decay_iters or self.trainer.max_steps
        return adamw_with_annealing(self.model, self.hparams, decay_iters)


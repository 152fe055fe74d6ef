"""Seq2seq finetuning (paper §3.3): label-smoothed loss on Part B, ROUGE of the decoded text."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import MLFlowLogger
from torch import Tensor
from torchmetrics.text.rouge import ROUGEScore

from glm_lightning.checkpoint import new_glm
from glm_lightning.flops import training_flops_per_batch
from glm_lightning.generation import generate
from glm_lightning.model import GLMConfig, check_trainable
from glm_lightning.modules.pretrain import ResumesRandomState, TokenWeightedLoss
from glm_lightning.optim import adamw_with_annealing
from glm_lightning.parallel import configure_glm_module, gathered
from glm_lightning.tokenizer import GLMTokenizer

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")


def label_smoothed_loss(logits: Tensor, targets: Tensor, epsilon: float) -> Tensor:
    """``(1 - eps) * CE + eps * mean over the vocabulary of -log p``, averaged over the tokens.

    ``logits [N, V]`` cover the whole padded vocabulary, as in the official code (its smoothing
    term averages ``-log_softmax`` over the padded logits), so the mean runs over all ``V`` rows.
    This is exactly what ``F.cross_entropy(label_smoothing=eps)`` computes (checked in the tests).
    """
    return F.cross_entropy(logits.float(), targets, label_smoothing=epsilon)


class GLMSeq2SeqModule(ResumesRandomState, L.LightningModule):
    """GLMModel finetuned on ``Seq2SeqCollator`` batches; validation and test decode the sources
    with the ``generation`` settings (keywords of ``glm_lightning.generation.generate``) and score
    the text against the references with ROUGE-1/2/L F1. The last predictions are written as
    jsonl to ``predictions_dir`` (and to MLflow when the logger is one)."""

    def __init__(
        self,
        model_config: GLMConfig | dict,
        tokenizer: GLMTokenizer,
        *,
        label_smoothing: float = 0.1,
        lr: float = 1e-5,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        warmup: float = 0.06,
        lr_decay_style: str = "linear",
        lr_decay_iters: int | None = None,
        lr_decay_ratio: float = 0.0,
        generation: dict | None = None,
        predictions_dir: str | None = None,
        init_from: str | None = None,
    ):
        super().__init__()
        if isinstance(model_config, GLMConfig):
            model_config = asdict(model_config)
        self.save_hyperparameters(ignore=["tokenizer", "init_from"])
        self.init_from = init_from  # loaded in configure_model, after any sharding
        self.model = new_glm(GLMConfig(**model_config), init_from)
        self.flops_per_batch = 0.0  # model FLOPs of the latest training micro-batch (ThroughputMonitor)
        self.tokenizer = tokenizer
        self.generation = dict(generation or {})
        self.eval_loss = TokenWeightedLoss()
        self.rouge = ROUGEScore(rouge_keys=ROUGE_KEYS)
        self.predictions: list[dict] = []

    def forward(self, batch: dict) -> Tensor:
        return self.model(batch["input_ids"], batch["position_ids"], batch["sep"])

    def loss(self, batch: dict) -> tuple[Tensor, Tensor]:
        """Label-smoothed loss over the target tokens (logits computed at Part B only) and their count."""
        predicted = batch["loss_mask"].bool()
        logits = self.model(batch["input_ids"], batch["position_ids"], batch["sep"], output_mask=predicted)
        return label_smoothed_loss(logits, batch["target_ids"][predicted], self.hparams.label_smoothing), \
            predicted.sum()

    def on_fit_start(self) -> None:
        check_trainable(self.model.config, self.device)  # one line now, not a traceback at step 1

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss, tokens = self.loss(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss ({loss.item()}) at step {self.global_step}; lower "
                                     "optim.lr, then continue from the last checkpoint with resume=auto")
        batch_size, length = batch["input_ids"].shape
        self.flops_per_batch = training_flops_per_batch(self.model.config, batch_size, length)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/tokens", tokens.float(), reduce_fx="sum", batch_size=batch_size)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=batch_size)
        return loss

    @torch.no_grad()
    def decode(self, batch: dict) -> list[str]:
        """The generated text of each source of the batch (decoded as configured, stopped at ``[eop]``)."""
        tok = self.tokenizer
        with gathered(self.model):  # ranks may decode different numbers of steps
            ids = generate(self.model, batch["source_ids"], batch["source_position_ids"], batch["sep"],
                           batch["mask_position"], sop_id=tok.sop_id, eop_id=tok.eop_id, eos_id=tok.eos_id,
                           **self.generation)
        return [tok.decode(row).strip() for row in ids]

    def _eval_step(self, batch: dict) -> None:
        loss, tokens = self.loss(batch)
        self.eval_loss.update(loss, tokens)
        hypotheses = self.decode(batch)
        self.rouge.update(hypotheses, batch["references"])
        pairs = zip(hypotheses, batch["references"], strict=True)
        self.predictions += [{"prediction": h, "reference": r} for h, r in pairs]

    def _eval_epoch_end(self, stage: str) -> None:
        self.log(f"{stage}/loss", self.eval_loss.compute(), prog_bar=True)
        self.eval_loss.reset()
        scores = self.rouge.compute()
        self.rouge.reset()
        for key in ROUGE_KEYS:
            self.log(f"{stage}/{key}", scores[f"{key}_fmeasure"], prog_bar=key == "rougeL")
        predictions, self.predictions = self.predictions, []
        if not self.trainer.sanity_checking:
            self.write_predictions(predictions, f"{stage}_predictions.jsonl")

    def write_predictions(self, predictions: list[dict], name: str) -> Path | None:
        """Gather every rank's predictions and write them on rank 0; returns the file (or None)."""
        if self.trainer.world_size > 1:
            gathered: list[list[dict] | None] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, predictions)
            predictions = [p for part in gathered for p in part or []]
        if not self.trainer.is_global_zero or not self.hparams.predictions_dir:
            return None
        path = Path(self.hparams.predictions_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as out:
            for record in predictions:
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
        if isinstance(self.logger, MLFlowLogger):
            self.logger.experiment.log_artifact(self.logger.run_id, str(path), "predictions")
        return path

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def configure_model(self) -> None:
        """FSDP2 sharding under the ``fsdp`` strategy, then the ``init_from`` weights
        (``glm_lightning.parallel.configure_glm_module``)."""
        configure_glm_module(self)

    def configure_optimizers(self):
        decay_iters = self.hparams.lr_decay_iters or self.trainer.max_steps
        return adamw_with_annealing(self.model, self.hparams, decay_iters)

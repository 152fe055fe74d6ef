"""SuperGLUE finetuning as cloze questions, or with a classifier head (paper §2.3; `tasks/superglue/`).

Batches come from ``datamodules.cloze_collate.cloze_collate``: ``input_ids [B, C, L]``,
``position_ids [B, C, 2, L]``, ``sep [B, C]``, ``target_ids``/``logit_mask [B, C, L]``,
``candidate_mask [B, C]``, ``label [B]``, ``idx`` and, for single-token tasks, ``verbalizer_ids [K]``.

* Single-token tasks score class ``k`` by the raw logit of verbalizer token ``k`` at the ``[sop]``
  slot (index ``sep``); the softmax of the cross-entropy then equals p(v(y) | x) normalised over
  the verbalizers, as in the paper.
* Multi-token tasks score a candidate by the sum of log p of its answer tokens and ``[eop]``,
  optionally divided by ``#targets ** length_penalty``; cross-entropy runs over the candidates.
  Batches in the shared-context layout (``datamodules.cloze_collate.pack_candidates``: one Part A
  per example, then every candidate's Part B) give the same scores with Part A computed once.
* WSC without negative candidates (``wsc_mode="generative"``, the official path then): the loss is
  the language-model loss of span1_text after ``[sop]``, and an example is predicted True iff the
  argmax reproduces span1_text and ``[eop]`` at every target position.
* The classifier head pools the ``[CLS]`` hidden state (the non-cloze ablation baseline).
"""

from __future__ import annotations

from dataclasses import asdict

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glm_lightning.attention_mask import candidate_attention_mask
from glm_lightning.checkpoint import new_glm
from glm_lightning.flops import training_flops_per_batch
from glm_lightning.metrics import ReCoRDMetric, superglue_metrics
from glm_lightning.model import GLMConfig, GLMModel, check_trainable
from glm_lightning.modules.pretrain import ResumesRandomState
from glm_lightning.optim import adamw_with_annealing
from glm_lightning.parallel import configure_glm_module

LOSS_FUNCS = ("cross_entropy", "mix", "generative")
HEADS = ("cloze", "classifier")
WSC_MODES = ("candidates", "generative")
# Tasks whose examples are a set of candidates (one score per candidate, not one per class).
MULTIPLE_CHOICE_TASKS = ("COPA", "WSC", "ReCoRD")
NUM_CLASSES = {"CB": 3}  # every other classification task is binary
PADDED_CANDIDATE_PENALTY = 10000.0  # subtracted from filler candidates' scores, as the official code


def single_token_scores(model: GLMModel, input_ids: Tensor, position_ids: Tensor, sep: Tensor,
                        verbalizer_ids: Tensor) -> Tensor:
    """Raw logits ``[N, K]`` of the verbalizer tokens at the ``[sop]`` slot (index ``sep``) of each
    row; the output projection runs at that one position per row only."""
    at_sop = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :] == sep[:, None]
    logits = model(input_ids, position_ids, sep, output_mask=at_sop)  # [N, V], one row per input row
    return logits[:, verbalizer_ids]


def multi_token_scores(model: GLMModel, input_ids: Tensor, position_ids: Tensor, sep: Tensor,
                       target_ids: Tensor, logit_mask: Tensor, length_penalty: float = 0.0) -> Tensor:
    """Per row ``sum log p(target)`` over the ``logit_mask`` positions (answer tokens and ``[eop]``),
    divided by ``#targets ** length_penalty`` when it is non-zero. Returns ``[N]`` (float32)."""
    predicted = logit_mask.bool()
    logits = model(input_ids, position_ids, sep, output_mask=predicted)  # [M, V], row-major order
    rows = predicted.nonzero()[:, 0]
    return _candidate_scores(logits, target_ids[predicted], rows, len(input_ids), length_penalty)


def shared_context_scores(model: GLMModel, input_ids: Tensor, position_ids: Tensor, sep: Tensor,
                          target_ids: Tensor, logit_mask: Tensor, candidate_index: Tensor,
                          num_candidates: int, length_penalty: float = 0.0) -> Tensor:
    """The scores of ``multi_token_scores`` from the packed layout of
    ``datamodules.cloze_collate.pack_candidates``: each Part A runs once, every candidate's Part B
    attends to it and causally to itself. Returns ``[num_candidates]`` indexed by
    ``candidate_index`` (zero for candidates that are not in the batch)."""
    predicted = logit_mask.bool()
    mask = candidate_attention_mask(sep, candidate_index)
    logits = model(input_ids, position_ids, attention_mask=mask, output_mask=predicted)
    return _candidate_scores(logits, target_ids[predicted], candidate_index[predicted], num_candidates,
                             length_penalty)


def _candidate_scores(logits: Tensor, targets: Tensor, slots: Tensor, num_slots: int,
                      length_penalty: float) -> Tensor:
    """Sum of the targets' log-probabilities per slot (candidate), length-normalised if asked."""
    log_p = torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None])[:, 0]
    scores = log_p.new_zeros(num_slots).index_add(0, slots, log_p)
    if length_penalty:
        counts = log_p.new_zeros(num_slots).index_add(0, slots, torch.ones_like(log_p))
        scores = scores / counts.clamp(min=1) ** length_penalty
    return scores


def greedy_reproduces(logits: Tensor, targets: Tensor, rows: Tensor, num_rows: int) -> Tensor:
    """Bool ``[num_rows]``: whether the argmax of ``logits [M, V]`` equals ``targets [M]`` at every
    target position of each row (``rows [M]`` says which row a position belongs to), the official
    ``classify`` metric of the generative WSC evaluation; a row without targets counts as reproduced."""
    wrong = (logits.argmax(-1) != targets).float()
    return wrong.new_zeros(num_rows).index_add(0, rows, wrong) == 0


def cloze_loss(scores: Tensor, label: Tensor, loss_func: str = "cross_entropy") -> Tensor:
    """``cross_entropy`` over the scores; ``generative`` = -mean(score of the correct choice);
    ``mix`` = both summed (the official WSC setting)."""
    if loss_func not in LOSS_FUNCS:
        raise ValueError(f"loss_func must be one of {LOSS_FUNCS}, got {loss_func!r}")
    scores = scores.float()
    if loss_func == "cross_entropy":
        return F.cross_entropy(scores, label)
    generative = -scores.gather(1, label[:, None]).mean()
    return generative if loss_func == "generative" else generative + F.cross_entropy(scores, label)


class ClassificationHead(nn.Module):
    """``[CLS]`` hidden state -> Linear(H, H) -> tanh -> dropout -> Linear(H, outputs)."""

    def __init__(self, hidden_size: int, outputs: int, dropout: float = 0.1):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_size, outputs)

    def forward(self, pooled: Tensor) -> Tensor:
        return self.out(self.dropout(torch.tanh(self.dense(pooled))))


class GLMClozeModule(ResumesRandomState, L.LightningModule):
    """GLMModel finetuned on one SuperGLUE task; evaluation feeds ``superglue_metrics(task)``.

    Defaults are the released finetuning settings (``config_tasks/task_*.sh``): AdamW lr 1e-5, weight
    decay 0.1 (none on biases and LayerNorm), betas (0.9, 0.999), eps 1e-8, warmup 10 % then linear
    decay to 0.1 x lr over the run (``lr_decay_iters`` or the Trainer's total steps). Gradient
    clipping (1.0) is a Trainer setting. ``self.predictions`` holds ``(idx, prediction)`` pairs of the
    latest validation or test run on this process (for WSC the prediction is 1 = "refers to span 1").
    ``wsc_mode`` ("candidates" or "generative") chooses WSC's formulation.
    """

    def __init__(
        self,
        model_config: GLMConfig | dict,
        *,
        task: str = "RTE",
        head: str = "cloze",
        num_classes: int | None = None,
        loss_func: str = "cross_entropy",
        length_penalty: float = 0.0,
        classifier_dropout: float = 0.1,
        lr: float = 1e-5,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        warmup: float = 0.1,
        lr_decay_style: str = "linear",
        lr_decay_iters: int | None = None,
        lr_decay_ratio: float = 0.1,
        init_from: str | None = None,
        wsc_mode: str = "candidates",
    ):
        super().__init__()
        if isinstance(model_config, GLMConfig):
            model_config = asdict(model_config)
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if loss_func not in LOSS_FUNCS:
            raise ValueError(f"loss_func must be one of {LOSS_FUNCS}, got {loss_func!r}")
        if wsc_mode not in WSC_MODES:
            raise ValueError(f"wsc_mode must be one of {WSC_MODES}, got {wsc_mode!r}")
        if num_classes is None:
            num_classes = NUM_CLASSES.get(task, 2)
        # init_from is not kept: a checkpoint of this module carries the weights themselves
        self.save_hyperparameters(ignore=["init_from"])
        self.init_from = init_from  # loaded in configure_model, after any sharding
        self.model = new_glm(GLMConfig(**model_config), init_from)
        self.multiple_choice = task in MULTIPLE_CHOICE_TASKS
        self.generative = task == "WSC" and wsc_mode == "generative" and head == "cloze"
        self.head = None
        if head == "classifier":
            outputs = 1 if self.multiple_choice else num_classes
            self.head = ClassificationHead(self.model.config.hidden_size, outputs, classifier_dropout)
        self.val_metrics = nn.ModuleDict(superglue_metrics(task))
        self.test_metrics = nn.ModuleDict(superglue_metrics(task))
        self.predictions: list[tuple] = []
        self.flops_per_batch = 0.0  # model FLOPs of the latest training micro-batch

    # Scoring

    def forward(self, batch: dict) -> Tensor:
        """Scores ``[B, K]`` (one per class) or ``[B, C]`` (one per candidate; filler candidates get
        candidate 0's score minus 10000, so they never win and add nothing to the softmax)."""
        real = batch.get("candidate_mask")
        if "candidate_index" in batch:  # shared-context layout: only real candidates are packed
            B, C = real.shape
            scores = shared_context_scores(
                self.model, batch["input_ids"], batch["position_ids"], batch["sep"], batch["target_ids"],
                batch["logit_mask"], batch["candidate_index"], B * C, self.hparams.length_penalty)
            return self._mask_fillers(scores.reshape(B, C), real.bool())
        input_ids = batch["input_ids"]
        B, C, Lx = input_ids.shape
        real = torch.ones(B, C, dtype=torch.bool, device=input_ids.device) if real is None else real.bool()
        rows = real.flatten()  # only real candidates go through the model
        ids = input_ids.reshape(B * C, Lx)[rows]
        pos = batch["position_ids"].reshape(B * C, 2, Lx)[rows]
        sep = batch["sep"].reshape(B * C)[rows]
        if self.head is not None:
            pooled = self.model(ids, pos, sep, return_hidden=True)[:, 0]
            logits = self.head(pooled).float()
            if not self.multiple_choice:
                return logits.reshape(B, -1)
            scores = logits[:, 0]
        elif "verbalizer_ids" in batch:
            scores = single_token_scores(self.model, ids, pos, sep, batch["verbalizer_ids"])
            return scores.float().reshape(B, -1)
        else:
            target = batch["target_ids"].reshape(B * C, Lx)[rows]
            mask = batch["logit_mask"].reshape(B * C, Lx)[rows]
            scores = multi_token_scores(self.model, ids, pos, sep, target, mask, self.hparams.length_penalty)
        return self._mask_fillers(scores.new_zeros(B * C).masked_scatter(rows, scores).reshape(B, C), real)

    @staticmethod
    def _rows_run(batch: dict) -> tuple[int, int]:
        """(rows, length) that went through the model: packed rows, or the real candidate rows."""
        ids, real = batch["input_ids"], batch.get("candidate_mask")
        if ids.dim() == 2:
            return len(ids), ids.shape[-1]
        return (int(real.sum()) if real is not None else ids.shape[0] * ids.shape[1]), ids.shape[-1]

    @staticmethod
    def _mask_fillers(scores: Tensor, real: Tensor) -> Tensor:
        """Filler candidates get candidate 0's score minus 10000: they never win and add nothing to
        the softmax, as the official ``loss_mask``."""
        return torch.where(real, scores, scores[:, :1] - PADDED_CANDIDATE_PENALTY)

    def loss(self, scores: Tensor, label: Tensor) -> Tensor:
        return cloze_loss(scores, label, self.hparams.loss_func)

    # Training and evaluation

    def generative_wsc(self, batch: dict) -> tuple[Tensor, Tensor]:
        """The official WSC path without negatives (``tasks/language_model/finetune.py``): the
        token-level cross-entropy of span1_text and [eop] after [sop] at the pronoun's [MASK], and
        per example 1 (True) iff the argmax at every target position reproduces them."""
        ids, target, mask = (batch[key].flatten(0, 1) for key in ("input_ids", "target_ids", "logit_mask"))
        predicted = mask.bool()
        logits = self.model(ids, batch["position_ids"].flatten(0, 1), batch["sep"].flatten(),
                            output_mask=predicted).float()
        targets = target[predicted]
        reproduced = greedy_reproduces(logits, targets, predicted.nonzero()[:, 0], len(ids))
        return F.cross_entropy(logits, targets), reproduced.long()

    def on_fit_start(self) -> None:
        check_trainable(self.model.config, self.device)  # one line now, not a traceback at step 1

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        if self.generative:
            loss = self.generative_wsc(batch)[0]
        else:
            loss = self.loss(self(batch), batch["label"])
        self.flops_per_batch = training_flops_per_batch(self.model.config, *self._rows_run(batch))
        batch_size = len(batch["label"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=batch_size)
        return loss

    def on_validation_epoch_start(self) -> None:
        self.predictions = []

    def on_test_epoch_start(self) -> None:
        self.predictions = []

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, "test")

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(self.val_metrics, "val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics(self.test_metrics, "test")

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        return {"idx": batch.get("idx"), "prediction": self._predict(batch)[1]}

    def _predict(self, batch: dict) -> tuple[Tensor | None, Tensor]:
        """Scores (None for generative WSC) and the prediction of each example (see ``prediction``;
        generative WSC: 1 iff span 1 is reproduced)."""
        if self.generative:
            return None, self.generative_wsc(batch)[1]
        scores = self(batch)
        return scores, self.prediction(scores)

    def prediction(self, scores: Tensor) -> Tensor:
        """Class or candidate index with the highest score; for WSC 1 (True) iff it is span 1."""
        predicted = scores.argmax(-1)
        return (predicted == 0).long() if self.hparams.task == "WSC" else predicted

    def _evaluate(self, batch: dict, metrics: nn.ModuleDict, stage: str) -> None:
        scores, predicted = self._predict(batch)
        ids = batch.get("idx")
        if ids is not None:
            ids_list = ids.tolist() if isinstance(ids, Tensor) else list(ids)
            ids_list = [tuple(i) if isinstance(i, list) else i for i in ids_list]
            self.predictions.extend(zip(ids_list, predicted.tolist(), strict=True))
        label = batch.get("label")
        if not isinstance(label, Tensor):
            label = None
        # WSC evaluation labels are truth values, not candidate indices: no loss for them.
        if label is not None and self.hparams.task != "WSC" and bool((label >= 0).all()):
            self.log(f"{stage}/loss", self.loss(scores, label), batch_size=len(scores))
        if ids is None or not isinstance(ids, Tensor):
            return
        for metric in metrics.values():
            if isinstance(metric, ReCoRDMetric):
                candidates = batch.get("candidates")
                golds = batch.get("answers", batch.get("label"))
                if isinstance(candidates, list) and isinstance(golds, list):
                    answers = [cands[p] for cands, p in zip(candidates, predicted.tolist(), strict=True)]
                    metric.update(answers, golds, ids)
            elif label is not None:
                labelled = label >= 0  # unlabelled (test) examples carry no target
                if labelled.any():
                    metric.update(predicted[labelled], label[labelled], ids[labelled])

    def _log_metrics(self, metrics: nn.ModuleDict, stage: str) -> None:
        for name, metric in metrics.items():
            if metric.update_count:
                self.log(f"{stage}/{name}", metric.compute(), prog_bar=name in ("accuracy", "f1"))
            metric.reset()

    def configure_model(self) -> None:
        """FSDP2 sharding under the ``fsdp`` strategy (the classifier head as a group of its own),
        then the ``init_from`` weights (``glm_lightning.parallel.configure_glm_module``)."""
        configure_glm_module(self)

    def configure_optimizers(self):
        total_steps = int(self.trainer.estimated_stepping_batches)
        return adamw_with_annealing(self, self.hparams, self.hparams.lr_decay_iters or total_steps)

"""SuperGLUE metrics as torchmetrics Metrics (official `tasks/superglue/finetune.py`, the paper's Table 1).

Every metric keeps per-example rows (example id, prediction, target) in "cat" states and reduces
them only in `compute`. That makes them correct under DDP, where the distributed sampler pads the
last batch by repeating samples: rows are de-duplicated by example id before scoring, so each
example counts once whatever the number of processes.

Example ids are integer tensors of shape [N] or [N, K] (MultiRC: (paragraph, question, answer);
ReCoRD: (passage, query)), as `datamodules.superglue.read_split` gives them in `idx`.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.classification import binary_f1_score, multiclass_f1_score

__all__ = [
    "TABLE1_METRICS",
    "Accuracy",
    "MacroF1",
    "MultiRCF1a",
    "MultiRCExactMatch",
    "ReCoRDMetric",
    "normalize_answer",
    "token_f1",
    "superglue_metrics",
    "table_row",
]

# The metrics of each task's Table-1 column, in the paper's order (tasks in column order).
TABLE1_METRICS: dict[str, tuple[str, ...]] = {
    "ReCoRD": ("f1", "em"),
    "COPA": ("accuracy",),
    "WSC": ("accuracy",),
    "RTE": ("accuracy",),
    "BoolQ": ("accuracy",),
    "WiC": ("accuracy",),
    "CB": ("f1", "accuracy"),
    "MultiRC": ("f1a", "em"),
}


def _as_ids(ids: Tensor | Sequence, device: torch.device) -> Tensor:
    ids = torch.as_tensor(ids, dtype=torch.long, device=device)
    return ids.unsqueeze(1) if ids.dim() == 1 else ids


def _cat(state: list[Tensor] | Tensor) -> Tensor:
    """A "cat" state is a list of update tensors locally and one tensor after a DDP sync."""
    if isinstance(state, list):
        return torch.cat(state) if state else torch.empty(0)
    return state


def _first_occurrence(ids: Tensor) -> Tensor:
    """Indices of the first row of every distinct id, in order of first appearance."""
    unique, inverse = torch.unique(ids, dim=0, return_inverse=True)
    positions = torch.arange(len(ids), device=ids.device)
    first = torch.full((len(unique),), len(ids), dtype=torch.long, device=ids.device)
    first = first.scatter_reduce(0, inverse, positions, reduce="amin")
    return first.sort().values


class _PerExampleMetric(Metric):
    """Stores (ids, preds, target) rows; subclasses score the de-duplicated rows."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("ids", default=[], dist_reduce_fx="cat")
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, preds: Tensor, target: Tensor, ids: Tensor | Sequence) -> None:
        """preds, target: class ids [N]; ids: example ids [N] or [N, K]."""
        preds = torch.as_tensor(preds, device=self.device).long().reshape(-1)
        target = torch.as_tensor(target, device=self.device).long().reshape(-1)
        ids = _as_ids(ids, self.device)
        if not len(preds) == len(target) == len(ids):
            raise ValueError(f"preds {len(preds)}, target {len(target)} and ids {len(ids)} differ in length")
        self.ids.append(ids)
        self.preds.append(preds)
        self.target.append(target)

    def _rows(self) -> tuple[Tensor, Tensor, Tensor]:
        ids, preds, target = _cat(self.ids), _cat(self.preds), _cat(self.target)
        if len(ids) == 0:
            raise ValueError(f"{type(self).__name__}.compute() called before any update")
        keep = _first_occurrence(ids)
        return ids[keep], preds[keep], target[keep]

    def compute(self) -> Tensor:
        return self._score(*self._rows())

    def _score(self, ids: Tensor, preds: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError


class Accuracy(_PerExampleMetric):
    """Fraction of examples whose predicted class equals the target."""

    def _score(self, ids: Tensor, preds: Tensor, target: Tensor) -> Tensor:
        return (preds == target).float().mean()


class MacroF1(_PerExampleMetric):
    """Unweighted mean of per-class F1 (CB). Classes absent from both predictions and targets are
    left out of the mean, as sklearn's f1_score(average="macro") does without a label list."""

    def __init__(self, num_classes: int, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes

    def _score(self, ids: Tensor, preds: Tensor, target: Tensor) -> Tensor:
        return multiclass_f1_score(preds, target, num_classes=self.num_classes, average="macro")


class MultiRCF1a(_PerExampleMetric):
    """Binary F1 of the "correct answer" class over all answer options."""

    def _score(self, ids: Tensor, preds: Tensor, target: Tensor) -> Tensor:
        return binary_f1_score(preds, target)


class MultiRCExactMatch(_PerExampleMetric):
    """Fraction of questions whose answer options are all classified right. Ids are
    (paragraph, question, answer) rows; options are grouped by (paragraph, question)."""

    def _score(self, ids: Tensor, preds: Tensor, target: Tensor) -> Tensor:
        _, question = torch.unique(ids[:, :2], dim=0, return_inverse=True)
        wrong = torch.zeros(int(question.max()) + 1, device=ids.device)
        wrong = wrong.index_add(0, question, (preds != target).float())
        return (wrong == 0).float().mean()


# ReCoRD: SQuAD-style answer normalisation and token F1.

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace (SQuAD)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def token_f1(prediction: str, gold: str) -> float:
    """F1 over the bags of normalised tokens of prediction and gold."""
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


class ReCoRDMetric(Metric):
    """Max-over-gold EM (`kind="em"`) or token F1 (`kind="f1"`) of predicted answer strings.

    Strings cannot be synced across processes, so each example is scored in `update` and only the
    (id, score) rows are kept.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, kind: str = "f1", **kwargs):
        super().__init__(**kwargs)
        if kind not in ("em", "f1"):
            raise ValueError(f"kind must be 'em' or 'f1', got {kind!r}")
        self.kind = kind
        self.add_state("ids", default=[], dist_reduce_fx="cat")
        self.add_state("scores", default=[], dist_reduce_fx="cat")

    def update(self, preds: Sequence[str], golds: Sequence[Sequence[str]], ids: Tensor | Sequence) -> None:
        """preds: one answer string per query; golds: the gold answers of each query."""
        ids = _as_ids(ids, self.device)
        if not len(preds) == len(golds) == len(ids):
            raise ValueError(f"preds {len(preds)}, golds {len(golds)} and ids {len(ids)} differ in length")
        score = self._exact if self.kind == "em" else token_f1
        values = [max((score(p, g) for g in gs), default=0.0) for p, gs in zip(preds, golds, strict=True)]
        self.ids.append(ids)
        self.scores.append(torch.tensor(values, dtype=torch.float, device=self.device))

    @staticmethod
    def _exact(prediction: str, gold: str) -> float:
        return float(normalize_answer(prediction) == normalize_answer(gold))

    def compute(self) -> Tensor:
        ids, scores = _cat(self.ids), _cat(self.scores)
        if len(ids) == 0:
            raise ValueError("ReCoRDMetric.compute() called before any update")
        return scores[_first_occurrence(ids)].mean()


def superglue_metrics(task: str) -> dict[str, Metric]:
    """Fresh metrics of one task, keyed by the Table-1 metric names (the diagnostics AX-b/AX-g and
    every single-metric task use accuracy)."""
    if task == "CB":
        return {"f1": MacroF1(num_classes=3), "accuracy": Accuracy()}
    if task == "MultiRC":
        return {"f1a": MultiRCF1a(), "em": MultiRCExactMatch()}
    if task == "ReCoRD":
        return {"f1": ReCoRDMetric("f1"), "em": ReCoRDMetric("em")}
    if task in TABLE1_METRICS or task in ("AX-b", "AX-g"):
        return {"accuracy": Accuracy()}
    raise ValueError(f"unknown task {task!r}")


def table_row(results: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The paper's Table-1 convention: a two-metric task's score is the mean of its two metrics,
    and the average is the mean over tasks. Only the Table-1 tasks present in `results` count
    (diagnostics and extra metrics are ignored). Returns {task: score, ..., "avg": mean}."""
    row: dict[str, float] = {}
    for task, names in TABLE1_METRICS.items():
        if task not in results:
            continue
        missing = [name for name in names if name not in results[task]]
        if missing:
            raise KeyError(f"{task}: missing metric(s) {missing}; Table 1 uses {list(names)}")
        row[task] = sum(float(results[task][name]) for name in names) / len(names)
    if not row:
        raise ValueError(f"no Table-1 task in results (expected some of {list(TABLE1_METRICS)})")
    row["avg"] = sum(row.values()) / len(row)
    return row

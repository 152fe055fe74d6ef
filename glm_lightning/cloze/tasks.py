"""The SuperGLUE tasks as the cloze encoding and the readers see them: label sets (in class-index
order) and Table-1 metric names. Lives in the library so that the encoding needs no data module;
``datamodules.superglue`` re-exports it for its readers.
"""

from __future__ import annotations

from dataclasses import dataclass

from glm_lightning.metrics import TABLE1_METRICS

__all__ = ["BOOL_LABELS", "NLI_LABELS", "TASKS", "TaskSpec"]


@dataclass(frozen=True)
class TaskSpec:
    """What a task's examples look like: its label set (None for ReCoRD, whose labels are answer
    strings), its Table-1 metric names, and whether the official reader standardises punctuation."""

    labels: tuple | None
    metrics: tuple[str, ...]
    standardize: bool = True


NLI_LABELS = ("entailment", "not_entailment")
BOOL_LABELS = (False, True)  # index == int(label), so class ids follow the boolean value

TASKS: dict[str, TaskSpec] = {
    "BoolQ": TaskSpec(BOOL_LABELS, TABLE1_METRICS["BoolQ"]),
    "CB": TaskSpec(("entailment", "contradiction", "neutral"), TABLE1_METRICS["CB"]),
    "COPA": TaskSpec((0, 1), TABLE1_METRICS["COPA"], standardize=False),
    "MultiRC": TaskSpec(BOOL_LABELS, TABLE1_METRICS["MultiRC"]),
    "ReCoRD": TaskSpec(None, TABLE1_METRICS["ReCoRD"]),
    "RTE": TaskSpec(NLI_LABELS, TABLE1_METRICS["RTE"]),
    "WiC": TaskSpec(BOOL_LABELS, TABLE1_METRICS["WiC"]),
    "WSC": TaskSpec(BOOL_LABELS, TABLE1_METRICS["WSC"]),
    "AX-b": TaskSpec(NLI_LABELS, TABLE1_METRICS["RTE"]),
    "AX-g": TaskSpec(NLI_LABELS, TABLE1_METRICS["RTE"]),
}

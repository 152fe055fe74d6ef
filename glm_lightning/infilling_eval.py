"""Exact-match accuracy of blank infilling on held-out sentences.

Each sentence has one ``[MASK]`` and one correct answer; the model fills it with greedy
``fill_blanks`` (GLM's infilling inference, as in the official ``generate_samples.py``), and a fill
counts when it equals the answer after stripping surrounding whitespace.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from glm_lightning.generation import fill_blanks
from glm_lightning.model import GLMModel
from glm_lightning.tokenizer import GLMTokenizer


class BlankSentence(Protocol):
    """What the evaluation needs of a held-out sentence."""

    relation: str
    text: str  # one [MASK]
    answer: str


@dataclass(frozen=True)
class Fill:
    """The model's fill of one sentence."""

    text: str
    answer: str
    prediction: str

    @property
    def correct(self) -> bool:
        return self.prediction == self.answer


@dataclass(frozen=True)
class InfillingResult:
    """Accuracy of the fills and of the most-frequent-answer baseline on the same sentences."""

    accuracy: float
    baseline: float
    fills: list[Fill]

    def examples(self, count: int = 3) -> list[Fill]:
        """Up to ``count`` fills spread evenly over the sentences (so over the relations)."""
        step = max(1, len(self.fills) // count)
        return self.fills[::step][:count]


def most_frequent_answer_baseline(sentences: Sequence[BlankSentence]) -> float:
    """Accuracy of answering every sentence with the most frequent answer among the sentences of
    its relation: the sum over relations of that answer's count, divided by the number of sentences."""
    if not sentences:
        raise ValueError("no sentences to evaluate")
    by_relation: dict[str, Counter[str]] = {}
    for sentence in sentences:
        by_relation.setdefault(sentence.relation, Counter())[sentence.answer] += 1
    return sum(counts.most_common(1)[0][1] for counts in by_relation.values()) / len(sentences)


def evaluate_infilling(model: GLMModel, tokenizer: GLMTokenizer, sentences: Sequence[BlankSentence],
                       *, max_new_tokens: int = 8) -> InfillingResult:
    """Fill each sentence's blank greedily and score exact matches against its answer."""
    baseline = most_frequent_answer_baseline(sentences)
    fills = []
    for sentence in sentences:
        (ids,) = fill_blanks(model, tokenizer, sentence.text, strategy="greedy",
                             max_new_tokens=max_new_tokens, return_ids=True)
        fills.append(Fill(sentence.text, sentence.answer, tokenizer.decode(ids).strip()))
    accuracy = sum(fill.correct for fill in fills) / len(fills)
    return InfillingResult(accuracy, baseline, fills)

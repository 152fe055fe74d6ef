"""Exact-match accuracy of blank infilling on held-out sentences.

Each sentence has one ``[MASK]`` and one correct answer. A GLM fills it with greedy ``fill_blanks``
(GLM's infilling inference, as in the official ``generate_samples.py``); a fill counts when it
equals the answer after stripping surrounding whitespace. Two pretraining ablations need their own
reading of the same blank:

* sentinel tokens (paper Table 6): Part B was trained at one fixed dim-1 position (T5-style), so
  the fill is generated there (``part_b_position``) instead of at the mask's position;
* the masked language model (Table 6's BERT baseline) cannot generate a blank of unknown length:
  as BERT is scored on blanks, the blank becomes one ``[MASK]`` per token of the answer (the
  answer's length is given) and each is filled with its most likely token in one pass.

An answer's length is counted in the tokens it takes in the filled sentence (``answer_span``).

Scores are also broken down by relation and by the answer's length in tokens, each next to the
most-frequent-answer baseline on the same sentences.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from glm_lightning.generation import fill_blanks, infilling_context
from glm_lightning.model import GLMModel
from glm_lightning.tokenizer import GLMTokenizer

MASK = "[MASK]"


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
    relation: str = ""
    answer_tokens: int = 0  # the answer's length in tokens
    baseline_correct: bool = False  # the relation's most frequent answer is this one's

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

    def metrics(self, prefix: str = "infill") -> dict[str, float]:
        """``<prefix>/accuracy`` and ``<prefix>/baseline`` over all sentences, then per relation
        (``<prefix>/accuracy/<relation>``) and per answer length in tokens
        (``<prefix>/accuracy/length_<k>``), each with its baseline."""
        groups: dict[str, list[Fill]] = {"": self.fills}
        for fill in self.fills:
            groups.setdefault(f"/{fill.relation}", []).append(fill)
        for fill in sorted(self.fills, key=lambda f: f.answer_tokens):
            groups.setdefault(f"/length_{fill.answer_tokens}", []).append(fill)
        metrics = {}
        for group, fills in groups.items():
            metrics[f"{prefix}/accuracy{group}"] = sum(f.correct for f in fills) / len(fills)
            metrics[f"{prefix}/baseline{group}"] = sum(f.baseline_correct for f in fills) / len(fills)
        return metrics


def most_frequent_answers(sentences: Sequence[BlankSentence]) -> dict[str, str]:
    """The most frequent answer of each relation (the first seen among equally frequent ones)."""
    by_relation: dict[str, Counter[str]] = {}
    for sentence in sentences:
        by_relation.setdefault(sentence.relation, Counter())[sentence.answer] += 1
    return {relation: counts.most_common(1)[0][0] for relation, counts in by_relation.items()}


def most_frequent_answer_baseline(sentences: Sequence[BlankSentence]) -> float:
    """Accuracy of answering every sentence with the most frequent answer among the sentences of
    its relation: the sum over relations of that answer's count, divided by the number of sentences."""
    if not sentences:
        raise ValueError("no sentences to evaluate")
    answers = most_frequent_answers(sentences)
    return sum(sentence.answer == answers[sentence.relation] for sentence in sentences) / len(sentences)


@torch.no_grad()
def greedy_fill(model: GLMModel, tokenizer: GLMTokenizer, text: str, *, part_b_position: int,
                max_new_tokens: int = 8) -> list[int]:
    """Greedy fill of the one blank of ``text`` with Part B at dim-1 position ``part_b_position``
    (recomputed in full at each token: the sentences are short). At the mask's position it is
    ``fill_blanks``'s greedy fill; the sentinel ablation trained Part B at ``data.seq_length``."""
    context, _ = infilling_context(tokenizer, text)
    device = model.word_embeddings.weight.device
    ids, fill = [*context, tokenizer.sop_id], []
    for _ in range(max_new_tokens):
        part_b = len(ids) - len(context)
        positions = torch.tensor([[*range(len(context)), *[part_b_position] * part_b],
                                  [*[0] * len(context), *range(1, part_b + 1)]], device=device)
        logits = model(torch.tensor([ids], device=device), positions[None],
                       torch.tensor([len(context)], device=device))
        token = int(logits[0, -1].argmax())
        if token in (tokenizer.eop_id, tokenizer.eos_id):
            break
        ids.append(token)
        fill.append(token)
    return fill


def answer_span(tokenizer: GLMTokenizer, text: str, answer: str) -> tuple[list[int], int, int]:
    """The ids of ``text`` with its blank filled by ``answer``, and the half-open range of the
    answer's tokens in them: the tokens where they differ from the ids of ``text`` (whose [MASK]
    occurs in neither common end), so the answer is counted as the sentence tokenizes it."""
    blank, filled = tokenizer.encode(text), tokenizer.encode(text.replace(MASK, answer, 1))
    start = 0
    while start < min(len(blank), len(filled)) and blank[start] == filled[start]:
        start += 1
    end = 0
    while end < min(len(blank), len(filled)) - start and blank[-1 - end] == filled[-1 - end]:
        end += 1
    return filled, start, len(filled) - end


@torch.no_grad()
def masked_lm_fill(model: GLMModel, tokenizer: GLMTokenizer, text: str, answer: str) -> list[int]:
    """The masked-LM baseline's fill: the filled sentence with each token of ``answer`` replaced by
    [MASK] (its length is given, as BERT is scored on blanks), all of it bidirectional with plain
    positions (as ``build_masked_lm_sample`` trains it), and the most likely token at each [MASK]."""
    filled, start, end = answer_span(tokenizer, text, answer)
    context = [tokenizer.cls_id, *filled[:start], *[tokenizer.mask_id] * (end - start), *filled[end:],
               tokenizer.eos_id]
    device = model.word_embeddings.weight.device
    positions = torch.stack([torch.arange(len(context)), torch.zeros(len(context), dtype=torch.long)])
    logits = model(torch.tensor([context], device=device), positions[None].to(device),
                   torch.tensor([len(context)], device=device))
    return logits[0, 1 + start:1 + end].argmax(-1).tolist()


def evaluate_infilling(model: GLMModel, tokenizer: GLMTokenizer, sentences: Sequence[BlankSentence],
                       *, max_new_tokens: int = 8, masked_lm: bool = False,
                       part_b_position: int | None = None) -> InfillingResult:
    """Fill each sentence's blank greedily and score exact matches against its answer: with
    ``fill_blanks``, or at Part-B position ``part_b_position`` (sentinel tokens), or as the
    masked-LM baseline with the answer's length given (``masked_lm``)."""
    if masked_lm and part_b_position is not None:
        raise ValueError("a masked language model has no Part B: give masked_lm or part_b_position, not both")
    baseline = most_frequent_answer_baseline(sentences)
    answers = most_frequent_answers(sentences)
    training = model.training
    model.eval()
    fills = []
    try:
        for sentence in sentences:
            if masked_lm:
                ids = masked_lm_fill(model, tokenizer, sentence.text, sentence.answer)
            elif part_b_position is not None:
                ids = greedy_fill(model, tokenizer, sentence.text, part_b_position=part_b_position,
                                  max_new_tokens=max_new_tokens)
            else:
                (ids,) = fill_blanks(model, tokenizer, sentence.text, strategy="greedy",
                                     max_new_tokens=max_new_tokens, return_ids=True)
            _, start, end = answer_span(tokenizer, sentence.text, sentence.answer)
            fills.append(Fill(sentence.text, sentence.answer, tokenizer.decode(ids).strip(),
                              sentence.relation, end - start, sentence.answer == answers[sentence.relation]))
    finally:
        model.train(training)
    accuracy = sum(fill.correct for fill in fills) / len(fills)
    return InfillingResult(accuracy, baseline, fills)

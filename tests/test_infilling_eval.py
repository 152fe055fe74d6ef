"""Held-out infilling evaluation: exact-match scoring and the most-frequent-answer baseline."""

from dataclasses import dataclass

import pytest
import torch

import glm_lightning.infilling_eval as infilling_eval
from glm_lightning.generation import fill_blanks
from glm_lightning.infilling_eval import evaluate_infilling, most_frequent_answer_baseline
from glm_lightning.model import GLMConfig, GLMModel
from glm_lightning.tokenizer import GLMTokenizer


@dataclass(frozen=True)
class Sentence:
    relation: str
    text: str
    answer: str


SENTENCES = [
    Sentence("river", "Arlen lies on the river [MASK].", "Vesk"),
    Sentence("river", "Corvel lies on the river [MASK].", "Vesk"),
    Sentence("river", "Brisk lies on the river [MASK].", "Oma"),
    Sentence("goods", "Arlen makes [MASK].", "glass"),
    Sentence("goods", "Corvel makes [MASK].", "wool"),
]


def test_baseline_answers_the_most_frequent_answer_of_each_relation() -> None:
    # river: "Vesk" is right 2 times of 3; goods: a tie, either is right once of 2 -> (2 + 1) / 5
    assert most_frequent_answer_baseline(SENTENCES) == pytest.approx(3 / 5)
    assert most_frequent_answer_baseline(SENTENCES[:2]) == 1.0
    with pytest.raises(ValueError):
        most_frequent_answer_baseline([])


def test_accuracy_counts_exact_fills(monkeypatch: pytest.MonkeyPatch, tokenizer: GLMTokenizer) -> None:
    # A model that answers "Vesk" everywhere scores the river sentences whose answer is "Vesk".
    calls = []

    def fill(model, tok, text, **options):  # noqa: ANN001, ANN003, ANN202
        calls.append((text, options))
        return [tok.encode(" Vesk")]

    monkeypatch.setattr(infilling_eval, "fill_blanks", fill)
    result = evaluate_infilling(None, tokenizer, SENTENCES)  # type: ignore[arg-type]
    assert [f.prediction for f in result.fills] == ["Vesk"] * 5
    assert [f.correct for f in result.fills] == [True, True, False, False, False]
    assert result.accuracy == pytest.approx(2 / 5) and result.baseline == pytest.approx(3 / 5)
    assert [text for text, _ in calls] == [s.text for s in SENTENCES]
    assert all(options["strategy"] == "greedy" and options["return_ids"] for _, options in calls)
    assert [f.text for f in result.examples(3)] == [SENTENCES[0].text, SENTENCES[1].text, SENTENCES[2].text]
    assert len(result.examples(2)) == 2 and result.examples(2)[1].text == SENTENCES[2].text


def test_a_real_model_fills_every_sentence(tokenizer: GLMTokenizer) -> None:
    torch.manual_seed(0)
    model = GLMModel(GLMConfig.from_name("tiny", vocab_size=len(tokenizer)))
    result = evaluate_infilling(model, tokenizer, SENTENCES, max_new_tokens=3)
    assert [f.text for f in result.fills] == [s.text for s in SENTENCES]
    for fill in result.fills:
        (ids,) = fill_blanks(model, tokenizer, fill.text, max_new_tokens=3, return_ids=True)
        assert len(ids) <= 3 and fill.prediction == tokenizer.decode(ids).strip()
    assert result.accuracy == sum(f.correct for f in result.fills) / 5

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
    model = GLMModel(GLMConfig.from_name("tiny", vocab_size=len(tokenizer)))
    result = evaluate_infilling(model, tokenizer, SENTENCES)
    assert [f.prediction for f in result.fills] == ["Vesk"] * 5
    assert [f.correct for f in result.fills] == [True, True, False, False, False]
    assert result.accuracy == pytest.approx(2 / 5) and result.baseline == pytest.approx(3 / 5)
    metrics = result.metrics()  # the baseline answers "Vesk" for rivers, "glass" (seen first) for goods
    river = metrics["infill/accuracy/river"], metrics["infill/baseline/river"]
    goods = metrics["infill/accuracy/goods"], metrics["infill/baseline/goods"]
    assert river == pytest.approx((2 / 3, 2 / 3)) and goods == pytest.approx((0.0, 1 / 2))
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


def training_layout_predictions(model: GLMModel, tokenizer: GLMTokenizer, text: str, fill: list[int],
                                **layout) -> list[int]:
    """Argmax at each Part-B slot of the pretraining layout (``build_block_sample``) of ``text``
    with its blank holding ``fill``: what the model predicts for the fill, teacher-forced."""
    import numpy as np

    from glm_lightning.blank_infilling import build_block_sample

    blank = tokenizer.encode(text)
    m = blank.index(tokenizer.mask_id)
    tokens = [tokenizer.cls_id, *blank[:m], *fill, *blank[m + 1:], tokenizer.eos_id]
    sample = build_block_sample(np.array(tokens), [(1 + m, 1 + m + len(fill))], tokenizer=tokenizer, **layout)
    with torch.no_grad():
        logits = model(torch.from_numpy(sample["input_ids"])[None],
                       torch.from_numpy(sample["position_ids"])[None], torch.tensor([sample["sep"]]))
    return logits[0, sample["sep"]:].argmax(-1).tolist()


@pytest.mark.parametrize("sentinel", [False, True])
def test_greedy_fill_follows_the_pretraining_layout(tokenizer: GLMTokenizer, sentinel: bool) -> None:
    """The fill is what the model predicts, token by token, in the layout it was trained on: Part B
    at the mask's position, or (sentinel tokens) at the fixed position max_seq_length."""
    from glm_lightning.infilling_eval import greedy_fill

    torch.manual_seed(0)
    model = GLMModel(GLMConfig.from_name("tiny", vocab_size=len(tokenizer))).eval()
    text = SENTENCES[0].text
    if sentinel:
        fill = greedy_fill(model, tokenizer, text, part_b_position=32, max_new_tokens=3)
        layout = {"sentinel_tokens": True, "max_seq_length": 32}
    else:
        (fill,) = fill_blanks(model, tokenizer, text, max_new_tokens=3, return_ids=True)
        context, (mask,) = infilling_eval.infilling_context(tokenizer, text)
        assert greedy_fill(model, tokenizer, text, part_b_position=mask, max_new_tokens=3) == fill
        layout = {}
    assert len(fill) == 3  # an untrained model does not stop
    assert training_layout_predictions(model, tokenizer, text, fill, **layout)[:3] == fill
    other = greedy_fill(model, tokenizer, text, part_b_position=32 if not sentinel else 5, max_new_tokens=3)
    assert other != fill  # the position matters


def test_masked_lm_fill_masks_each_answer_token_in_place(tokenizer: GLMTokenizer) -> None:
    """One [MASK] per token of the answer, as the masked-LM baseline trained (``build_masked_lm_sample``)."""
    import numpy as np

    from glm_lightning.blank_infilling import build_masked_lm_sample
    from glm_lightning.infilling_eval import answer_span, masked_lm_fill

    torch.manual_seed(0)
    model = GLMModel(GLMConfig.from_name("tiny", vocab_size=len(tokenizer))).eval()
    sentence = Sentence("goods", "Brisk makes [MASK] for the region.", "salt fish")
    filled, start, end = answer_span(tokenizer, sentence.text, sentence.answer)
    assert filled == tokenizer.encode("Brisk makes salt fish for the region.")
    assert tokenizer.decode(filled[start:end]).strip() == "salt fish" and end - start >= 2
    tokens = np.array([tokenizer.cls_id, *filled, tokenizer.eos_id])
    sample = build_masked_lm_sample(tokens, [(1 + start, 1 + end)], tokenizer=tokenizer)
    with torch.no_grad():
        logits = model(torch.from_numpy(sample["input_ids"])[None],
                       torch.from_numpy(sample["position_ids"])[None], torch.tensor([sample["sep"]]))
    expected = logits[0, sample["loss_mask"].astype(bool)].argmax(-1).tolist()
    assert masked_lm_fill(model, tokenizer, sentence.text, sentence.answer) == expected
    result = evaluate_infilling(model, tokenizer, [sentence], masked_lm=True)
    assert result.fills[0].prediction == tokenizer.decode(expected).strip()
    assert result.fills[0].answer_tokens == end - start
    with pytest.raises(ValueError, match="no Part B"):
        evaluate_infilling(model, tokenizer, [sentence], masked_lm=True, part_b_position=32)


def test_metrics_by_relation_and_answer_length() -> None:
    from glm_lightning.infilling_eval import Fill, InfillingResult

    fills = [Fill("a", "Vesk", "Vesk", "river", 1, True), Fill("b", "Vesk", "Oma", "river", 1, True),
             Fill("c", "Oma", "Oma", "river", 2, False), Fill("d", "glass", "wool", "goods", 1, True)]
    metrics = InfillingResult(2 / 4, 3 / 4, fills).metrics()
    assert metrics == pytest.approx({
        "infill/accuracy": 2 / 4, "infill/baseline": 3 / 4,
        "infill/accuracy/river": 2 / 3, "infill/baseline/river": 2 / 3,
        "infill/accuracy/goods": 0.0, "infill/baseline/goods": 1.0,
        "infill/accuracy/length_1": 1 / 3, "infill/baseline/length_1": 1.0,
        "infill/accuracy/length_2": 1.0, "infill/baseline/length_2": 0.0})
    assert list(metrics)[:2] == ["infill/accuracy", "infill/baseline"]

"""Zero-shot LM evaluation: exact layouts, sliding-window coverage, perplexity against one forward
pass, and LAMBADA accuracy on a model whose predictions the test controls."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from glm_lightning.lm_eval import (
    evaluate_lambada,
    evaluate_perplexity,
    lambada_sample,
    lambada_tokens,
    perplexities,
    perplexity_windows,
    score_samples,
)
from glm_lightning.model import GLMConfig, GLMModel

TEXT = ("The curious student reads a story about the ancient river. The teacher answers quickly "
        "while the painter crosses the narrow bridge. A famous doctor visits the quiet village.")


@pytest.fixture(scope="module")
def model(tokenizer) -> GLMModel:
    torch.manual_seed(0)
    config = GLMConfig.from_name("tiny", vocab_size=len(tokenizer), max_sequence_length=64)
    return GLMModel(config).eval()


def test_lambada_layouts_exact(tokenizer):
    t = tokenizer
    c1, c2, c3, a1, a2 = 101, 102, 103, 201, 202
    s = lambada_sample([c1, c2, c3], [a1, a2], t)
    assert s["input_ids"].tolist() == [t.cls_id, c1, c2, c3, t.mask_id, t.eos_id, t.sop_id, a1]
    assert s["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 4, 4], [0, 0, 0, 0, 0, 0, 1, 2]]
    assert s["sep"] == 6
    assert s["target_ids"].tolist() == [0, 0, 0, 0, 0, 0, a1, a2]
    assert s["loss_mask"].tolist() == [0, 0, 0, 0, 0, 0, 1, 1]

    u = lambada_sample([c1, c2, c3], [a1, a2], t, mask_id=t.gmask_id, unidirectional=True)
    assert u["input_ids"].tolist() == [t.cls_id, c1, t.gmask_id, t.eos_id, t.sop_id, c2, c3, a1]
    assert u["position_ids"].tolist() == [[0, 1, 2, 3, 2, 2, 2, 2], [0, 0, 0, 0, 1, 2, 3, 4]]
    assert u["sep"] == 4
    assert u["target_ids"].tolist() == [0, 0, 0, 0, c2, c3, a1, a2]
    assert u["loss_mask"].tolist() == [0, 0, 0, 0, 0, 0, 1, 1]

    # Too long: the context is cut on the left so the sample has max_length tokens.
    cut = lambada_sample([c1, c2, c3], [a1, a2], t, max_length=7)
    assert cut["input_ids"].tolist() == [t.cls_id, c2, c3, t.mask_id, t.eos_id, t.sop_id, a1]


def test_lambada_tokens_split_last_word(tokenizer):
    context, answer = lambada_tokens(tokenizer, "The teacher crosses the bridge ")
    assert context == tokenizer.encode("The teacher crosses the")
    assert answer == tokenizer.encode(" bridge")


def test_perplexity_window_layout_exact(tokenizer):
    t = tokenizer
    tokens = [10, 11, 12, 13, 14, 15]
    w0, w1 = perplexity_windows(tokens, t, max_length=4, stride=2)
    assert w0["input_ids"].tolist() == [t.cls_id, 10, t.mask_id, t.sop_id, 11, 12]
    assert w0["position_ids"].tolist() == [[0, 1, 2, 2, 2, 2], [0, 0, 0, 1, 2, 3]]
    assert w0["sep"] == 3
    assert w0["target_ids"].tolist() == [0, 0, 0, 11, 12, 13]
    assert w0["loss_mask"].tolist() == [0, 0, 0, 1, 1, 1]
    assert w1["input_ids"].tolist() == [t.cls_id, 12, 13, t.mask_id, t.sop_id, 14]
    assert w1["position_ids"].tolist() == [[0, 1, 2, 3, 3, 3], [0, 0, 0, 0, 1, 2]]
    assert w1["sep"] == 4
    assert w1["target_ids"].tolist() == [0, 0, 0, 0, 14, 15]
    assert w1["loss_mask"].tolist() == [0, 0, 0, 0, 1, 1]


@pytest.mark.parametrize("n", [2, 7, 16, 17, 40, 41])
@pytest.mark.parametrize("unidirectional", [False, True])
def test_every_token_but_the_first_is_predicted_once(tokenizer, n, unidirectional):
    tokens = list(range(300, 300 + n))
    windows = perplexity_windows(tokens, tokenizer, max_length=16, stride=5, unidirectional=unidirectional)
    predicted = Counter()
    for w in windows:
        predicted.update(w["target_ids"][w["loss_mask"] == 1].tolist())
        assert len(w["input_ids"]) <= 16 + 2  # [CLS], [MASK] and [sop] around the text tokens
    assert sum(predicted.values()) == n - 1
    assert predicted == Counter(tokens[1:])


def test_single_window_equals_one_forward(model, tokenizer):
    tokens = tokenizer.encode(TEXT)
    n = len(tokens)
    result = evaluate_perplexity(model, tokenizer, TEXT, max_length=n, stride=8)
    assert result["num_windows"] == 1 and result["num_predicted"] == n - 1

    # Independent: [CLS] t0 [MASK] | [sop] t1 .. t_{n-2}, predicting t1 .. t_{n-1}, in one pass.
    t = tokenizer
    ids = torch.tensor([[t.cls_id, tokens[0], t.mask_id, t.sop_id, *tokens[1:-1]]])
    dim1 = torch.tensor([0, 1, 2] + [2] * (n - 1))
    dim2 = torch.tensor([0, 0, 0] + list(range(1, n)))
    with torch.no_grad():
        logits = model(ids, torch.stack([dim1, dim2])[None], torch.tensor([3]))
    total = -F.log_softmax(logits[0, 3:].double(), dim=-1).gather(1, torch.tensor(tokens[1:])[:, None]).sum()
    expected_ppl = math.exp(total.item() / (n - 1))
    assert result["ppl"] == pytest.approx(expected_ppl, rel=1e-5)
    assert result["adjusted_ppl"] == pytest.approx(math.exp(total.item() / (len(TEXT.split()) - 1)), rel=1e-5)


def test_sliding_windows_cover_the_text(model, tokenizer):
    n = len(tokenizer.encode(TEXT))
    result = evaluate_perplexity(model, tokenizer, TEXT, max_length=12, stride=4, batch_size=3)
    assert result["num_windows"] > 3
    assert result["num_predicted"] == n - 1
    assert math.isfinite(result["ppl"]) and result["ppl"] > 1


def test_scores_do_not_depend_on_batching(model, tokenizer, capsys):
    windows = perplexity_windows(tokenizer.encode(TEXT), tokenizer, max_length=12, stride=5)
    one = score_samples(model, windows, batch_size=1)
    assert capsys.readouterr().err == ""  # no progress bar unless asked
    many = score_samples(model, windows, batch_size=4, progress="windows")
    assert f"windows:   0%|          | 0/{len(windows)} " in capsys.readouterr().err  # a bar over the windows
    assert [s.num_tokens for s in one] == [s.num_tokens for s in many]
    np.testing.assert_allclose([s.loss for s in one], [s.loss for s in many], rtol=1e-5)


def test_word_adjusted_perplexity_formula():
    ppl, adjusted = perplexities(total_loss=6.0, num_tokens=4, num_words=3)
    assert ppl == pytest.approx(math.exp(2.0))
    assert adjusted == pytest.approx(math.exp(3.0))


class ForcedModel(GLMModel):
    """A tiny GLM whose argmax at block position k is ``forced[k - 1]`` (the real network still runs)."""

    def __init__(self, config: GLMConfig, forced: list[int]):
        super().__init__(config)
        self.forced = torch.tensor(forced)

    def forward(self, input_ids, position_ids, sep=None, attention_mask=None, kv_cache=None, *,
                output_mask=None, return_hidden=False):
        logits = super().forward(input_ids, position_ids, sep, attention_mask, kv_cache)
        block = (position_ids[:, 1] - 1).clamp(0, len(self.forced) - 1)
        logits = logits + 100.0 * F.one_hot(self.forced[block], logits.shape[-1])
        return logits[output_mask] if output_mask is not None else logits


@pytest.mark.parametrize("unidirectional", [False, True])
def test_lambada_accuracy_on_a_forced_model(tokenizer, unidirectional):
    passage = "The famous painter crosses the narrow bridge wonderfully"
    context, answer = lambada_tokens(tokenizer, passage)
    assert len(answer) >= 2  # so that a wrong last token alone makes the passage wrong
    predicted = [*context[1:], *answer] if unidirectional else answer
    config = GLMConfig.from_name("tiny", vocab_size=len(tokenizer), max_sequence_length=64)
    right = ForcedModel(config, predicted)
    wrong = ForcedModel(config, [*predicted[:-1], predicted[-1] + 1])
    kwargs = dict(unidirectional=unidirectional)
    assert evaluate_lambada(right, tokenizer, [passage], **kwargs)["accuracy"] == 1.0
    assert evaluate_lambada(wrong, tokenizer, [passage], **kwargs)["accuracy"] == 0.0
    other = "A quiet student reads the ancient story"
    mixed = evaluate_lambada(right, tokenizer, [passage, other, passage], batch_size=2, **kwargs)
    assert mixed["correct"] == 2 and mixed["total"] == 3

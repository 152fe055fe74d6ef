"""Shared-context candidate scoring: the packed layout (each Part A once, every candidate's Part B
after it) gives the scores, losses and gradients of the row-per-candidate layout, on real encodings
of COPA, WSC and ReCoRD with single- and multi-token candidates, filler candidates and a Part A that
truncation cut differently for one long candidate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datamodules.cloze_collate import cloze_collate
from glm_lightning.attention_mask import candidate_attention_mask
from glm_lightning.cloze import encode_example
from glm_lightning.model import GLMConfig
from glm_lightning.modules.cloze import GLMClozeModule

COPA = [
    {"idx": 0, "premise": "The market was quiet in the morning.", "choice1": "The farmer slept.",
     "choice2": "A famous painter repairs the ancient castle bridge.", "question": "cause", "label": 1},
    {"idx": 1, "premise": "The river crosses the valley.", "choice1": "The village has a harbor.",
     "choice2": "Quiet.", "question": "effect", "label": 0},
]
WSC = [
    {"idx": 0, "text": "The teacher asked the student because she was curious.", "span1_text": "The teacher",
     "span1_index": 0, "span2_text": "she", "span2_index": 6, "label": True,
     "candidates": ["the student", "a curious careful painter from the museum", "river"]},
    {"idx": 1, "text": "The doctor visits the farmer when he is sick.", "span1_text": "the farmer",
     "span1_index": 3, "span2_text": "he", "span2_index": 5, "label": False, "candidates": ["The doctor"]},
]
_PASSAGE = ("- The famous painter visits Zurich. The museum opens a festival of music in the "
            "ancient castle while the farmer crosses the narrow bridge to the market.")
RECORD = [
    {"idx": (0, 0), "passage": _PASSAGE, "query": "The @placeholder painter writes a letter.",
     "entities": ["Zurich", "painter", "famous", "the ancient castle of the strange quiet valley", "river"],
     "label": ["famous"]},
    {"idx": (0, 1), "passage": _PASSAGE, "query": "A festival in @placeholder.",
     "entities": ["Zurich", "castle"], "label": ["castle"]},
]
CASES = {"COPA": (COPA, 0, 0.0), "WSC": (WSC, 2, 1.0), "ReCoRD": (RECORD, 0, 0.0)}


def tiny_config(vocab_size: int) -> GLMConfig:
    return GLMConfig.from_name("tiny", vocab_size=vocab_size, embedding_dropout_prob=0.0,
                               attention_dropout_prob=0.0, output_dropout_prob=0.0)


def encoded(task: str, tokenizer, max_seq_length: int = 96) -> list[dict]:
    examples, pattern_id, _ = CASES[task]
    return [{**encode_example(task, ex, tokenizer, pattern_id=pattern_id, max_seq_length=max_seq_length),
             "idx": i} for i, ex in enumerate(examples)]


def test_pack_candidates_lays_out_each_part_a_once(tokenizer):
    rows = encoded("COPA", tokenizer)
    per_row, packed = cloze_collate(rows), cloze_collate(rows, shared_context=True)
    assert len(packed["input_ids"]) == 2  # one packed row per example
    for b, example in enumerate(rows):
        sep = int(example["sep"][0])
        assert packed["sep"][b] == sep
        assert packed["input_ids"][b, :sep].tolist() == example["input_ids"][0, :sep].tolist()
        offset = sep
        for c in range(len(example["input_ids"])):
            n = int(example["logit_mask"][c].sum())
            span = slice(offset, offset + n)
            assert packed["input_ids"][b, span].tolist() == example["input_ids"][c, sep:sep + n].tolist()
            assert packed["target_ids"][b, span].tolist() == example["target_ids"][c, sep:sep + n].tolist()
            positions = example["position_ids"][c, :, sep:sep + n]
            assert packed["position_ids"][b, :, span].tolist() == positions.tolist()
            assert packed["candidate_index"][b, span].tolist() == [b * 2 + c] * n
            offset += n
        assert (packed["candidate_index"][b, :sep] == -1).all()
        assert (packed["candidate_index"][b, offset:] == -1).all()
    assert packed["input_ids"].numel() < per_row["input_ids"].numel()
    torch.testing.assert_close(packed["candidate_mask"], per_row["candidate_mask"])
    torch.testing.assert_close(packed["label"], per_row["label"])


def test_candidate_mask_sees_part_a_and_its_own_earlier_tokens_only():
    sep = torch.tensor([2])
    candidate = torch.tensor([[-1, -1, 0, 0, 1, 1, -1]])
    mask = candidate_attention_mask(sep, candidate)[0, 0].int().tolist()
    assert mask == [
        [1, 1, 0, 0, 0, 0, 0],  # Part A: bidirectional over Part A
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],  # candidate 0: Part A + itself, causally
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0],  # candidate 1 never sees candidate 0
        [1, 1, 0, 0, 1, 1, 0],
        [1, 1, 0, 0, 0, 0, 0],  # padding: Part A only
    ]


def test_truncation_that_differs_per_candidate_gives_separate_contexts(tokenizer):
    rows = encoded("ReCoRD", tokenizer, max_seq_length=40)
    contexts = [len(set(r["sep"].tolist())) for r in rows]  # longer answers cut the passage further
    assert contexts[0] > 1
    packed = cloze_collate(rows, shared_context=True)
    assert len(packed["input_ids"]) == sum(contexts)
    assert sorted(packed["sep"].tolist()) == sorted(s for r in rows for s in set(r["sep"].tolist()))


def _scores_loss_grads(module: GLMClozeModule, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
    module.zero_grad()
    scores = module(batch)
    loss = module.loss(scores, batch["label"])
    loss.backward()
    return scores.detach(), loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize(("task", "max_seq_length"),
                         [("COPA", 96), ("WSC", 96), ("ReCoRD", 96), ("ReCoRD", 40)])
def test_shared_context_equals_row_per_candidate(tokenizer, task, max_seq_length):
    _, _, length_penalty = CASES[task]
    torch.manual_seed(0)
    module = GLMClozeModule(tiny_config(len(tokenizer)), task=task, loss_func="mix" if task == "WSC" else
                            "cross_entropy", length_penalty=length_penalty).eval()
    rows = encoded(task, tokenizer, max_seq_length)
    if task != "COPA":  # filler candidates in the batch (COPA always has two)
        assert len({len(r["input_ids"]) for r in rows}) > 1
    lengths = {int(n) for r in rows for n in r["logit_mask"].sum(1)}
    assert min(lengths) == 2 and max(lengths) > 3  # single- and multi-token answers (+ [eop])
    per_row, packed = cloze_collate(rows), cloze_collate(rows, shared_context=True)
    assert packed["input_ids"].numel() < per_row["input_ids"].numel()
    scores, loss, grads = _scores_loss_grads(module, per_row)
    shared_scores, shared_loss, shared_grads = _scores_loss_grads(module, packed)
    real = per_row["candidate_mask"]
    torch.testing.assert_close(shared_scores[real], scores[real], rtol=0, atol=1e-5)
    assert (shared_scores[~real] < -9000).all()
    torch.testing.assert_close(shared_loss, loss, rtol=0, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(shared_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_shared_context_trains_like_row_per_candidate(tokenizer):
    """Three SGD steps on each layout from the same weights end at the same weights (SGD, since
    Adam's normalisation turns float noise in near-zero gradients into full-size steps)."""
    rows = encoded("COPA", tokenizer)
    weights = {}
    for shared in (False, True):
        torch.manual_seed(0)
        module = GLMClozeModule(tiny_config(len(tokenizer)), task="COPA")
        initial = {n: p.detach().clone() for n, p in module.named_parameters()}
        optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
        batch = cloze_collate(rows, shared_context=shared)
        for _ in range(3):
            optimizer.zero_grad()
            module.loss(module(batch), batch["label"]).backward()
            optimizer.step()
        weights[shared] = {n: p.detach().clone() for n, p in module.named_parameters()}
    assert max(float((weights[True][n] - initial[n]).abs().max()) for n in initial) > 1e-3
    for name, value in weights[False].items():
        np.testing.assert_allclose(weights[True][name].numpy(), value.numpy(), rtol=1e-4, atol=1e-5,
                                   err_msg=name)

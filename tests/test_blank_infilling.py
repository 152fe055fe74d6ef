"""Blank-infilling corruption: golden layouts, ablation switches, sampling properties, collator."""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from layouts import row_layout

from glm_lightning import blank_infilling as bi
from glm_lightning.blank_infilling import (
    BlankInfillingCollator,
    FoundEOSInTarget,
    SyntheticCommandIds,
    build_block_sample,
    build_masked_lm_sample,
    build_suffix_generation_sample,
)


@dataclass(frozen=True)
class ToyTokenizer(SyntheticCommandIds):
    """Hand-sized ids for golden layouts: the synthetic command ids (eos = pad = 0, as the BERT
    vocabulary), words 10..39, '.' = 8 and '?' = 9 end sentences, sentinels [MASK{i}] = 38 + 2i,
    <|startofpiece{i}|> = 39 + 2i."""

    pad_id: int = 0
    dblock_id: int = 7
    num_sentinels: int = 8

    def sentinel_mask_id(self, i: int) -> int:
        return self.mask_id if i == 0 else self._sentinel(40, i)

    def sentinel_sop_id(self, i: int) -> int:
        return self.sop_id if i == 0 else self._sentinel(41, i)

    def _sentinel(self, base: int, i: int) -> int:
        if not 0 < i <= self.num_sentinels:
            raise IndexError(i)
        return base + 2 * (i - 1)

    def sentence_end_table(self) -> np.ndarray:
        table = np.zeros(len(self), dtype=bool)
        table[[8, 9]] = True
        return table

    def __len__(self) -> int:
        return 64


TOK = ToyTokenizer()
CLS, EOS, M, SM, GM, S, E = TOK.cls_id, TOK.eos_id, TOK.mask_id, TOK.smask_id, TOK.gmask_id, 5, 6
DOT, QM = 8, 9


class ScriptedRandom:
    """Stands in for `random.Random` with scripted draws, so collator outputs can be hand-computed.

    `shuffle` applies the next permutation (new[i] = old[perm[i]]) and, like `random.shuffle`, draws
    nothing for lists shorter than 2.
    """

    def __init__(self, randoms=(), randints=(), randranges=(), permutations=(), choices=()):
        self.randoms, self.randints, self.randranges = list(randoms), list(randints), list(randranges)
        self.permutations, self.choices_ = list(permutations), list(choices)

    def random(self) -> float:
        return self.randoms.pop(0)

    def randint(self, a: int, b: int) -> int:
        value = self.randints.pop(0)
        assert a <= value <= b, (a, value, b)
        return value

    def randrange(self, stop: int) -> int:
        value = self.randranges.pop(0)
        assert 0 <= value < stop, (value, stop)
        return value

    def shuffle(self, x: list) -> None:
        if len(x) > 1:
            perm = self.permutations.pop(0)
            x[:] = [x[i] for i in perm]

    def choices(self, population, weights=None, *, cum_weights=None, k=1):
        return [self.choices_.pop(0)]

    def exhausted(self) -> bool:
        return not (self.randoms or self.randints or self.randranges or self.permutations or self.choices_)


def as_lists(sample: dict) -> dict:
    return {
        key: (value.tolist() if hasattr(value, "tolist") else value)
        for key, value in sample.items()
        if key != "objective"
    }


def expected(tokens, targets, dim1, dim2, loss, sep) -> dict:
    return {
        "input_ids": tokens,
        "target_ids": targets,
        "loss_mask": loss,
        "position_ids": [dim1, dim2],
        "sep": sep,
    }


# The worked example of paper §2.1.1 (Figure 2): x = [CLS] x1 .. x6 eos with x_i = 10 + i.
X = [CLS, 11, 12, 13, 14, 15, 16, EOS]
SPANS = [(3, 4), (5, 7)]  # {x3}, {x5 x6}
ORDER = [1, 0]  # Part B: (x5 x6) then (x3)
WORKED = expected(
    tokens=[CLS, 11, 12, M, 14, M, EOS, S, 15, 16, S, 13],
    targets=[CLS, 11, 12, M, 14, M, EOS, 15, 16, E, 13, E],
    dim1=[0, 1, 2, 3, 4, 5, 6, 5, 5, 5, 3, 3],
    dim2=[0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 1, 2],
    loss=[0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1],
    sep=7,
)


# ------------------------------------------------------------------------------------------
# Golden layouts
# ------------------------------------------------------------------------------------------


def test_worked_example_of_the_spec():
    sample = build_block_sample(np.array(X), SPANS, tokenizer=TOK, order=ORDER)
    assert as_lists(sample) == WORKED
    for key in ("input_ids", "target_ids", "loss_mask", "position_ids"):
        assert sample[key].dtype == np.int64
    assert isinstance(sample["sep"], int)


def test_span_order_in_the_argument_does_not_change_part_a():
    # the same spans listed the other way round, with the same Part-B order
    sample = build_block_sample(X, [(5, 7), (3, 4)], tokenizer=TOK, order=[0, 1])
    assert as_lists(sample) == WORKED


def test_span_covering_eos_raises():
    with pytest.raises(FoundEOSInTarget, match="Found EOS in target"):
        build_block_sample(X, [(5, 8)], tokenizer=TOK)
    # the official code raises RuntimeError; it is also a ValueError (bad input)
    with pytest.raises(RuntimeError):
        build_block_sample(X, [(6, 8)], tokenizer=TOK)
    with pytest.raises(ValueError):
        build_block_sample(X, [(7, 8)], tokenizer=TOK)


@pytest.mark.parametrize(
    "spans, order",
    [([(2, 5), (4, 6)], None), ([(3, 3)], None), ([(6, 9)], None), ([(1, 2), (3, 4)], [0, 0])],
)
def test_invalid_spans_or_order_raise(spans, order):
    with pytest.raises(ValueError):
        build_block_sample(X, spans, tokenizer=TOK, order=order)


def test_no_spans_is_all_part_a():
    sample = build_block_sample(X, [], tokenizer=TOK)
    assert as_lists(sample) == expected(X, X, list(range(8)), [0] * 8, [0] * 8, 8)


# A sample with three sentences: "10 11 ." "12 13 14 ?" "15 ." then eos.
SENTENCE_X = [CLS, 10, 11, DOT, 12, 13, 14, QM, 15, DOT, EOS]


def test_split_sentences_golden():
    table = TOK.sentence_end_table()
    assert bi.split_sentences(np.array(SENTENCE_X), table, eos_id=EOS, cls_id=CLS) == [
        (1, 4),
        (4, 8),
        (8, 10),
    ]
    # eos restarts the sentence (the following [CLS] stays inside the next sentence, as in the
    # official code); a truncated tail is a sentence; no leading [CLS] -> start at 0
    packed = np.array([CLS, 10, 11, DOT, EOS, CLS, 12, 13, QM, 14, 15])
    assert bi.split_sentences(packed, table, eos_id=EOS, cls_id=CLS) == [(1, 4), (5, 9), (9, 11)]
    assert bi.split_sentences(np.array([10, DOT, DOT, 11]), table, eos_id=EOS, cls_id=CLS) == [
        (0, 2),
        (2, 3),
        (3, 4),
    ]
    assert bi.split_sentences(np.array([CLS, EOS]), table, eos_id=EOS, cls_id=CLS) == []


def test_sentence_layout_golden():
    # adjacent sentences (4, 8) and (8, 10) masked: two consecutive [sMASK]; Part B (8, 10) first
    sample = build_block_sample(
        SENTENCE_X, [(8, 10), (4, 8)], tokenizer=TOK, task="sentence", task_masks=True
    )
    assert as_lists(sample) == expected(
        tokens=[CLS, 10, 11, DOT, SM, SM, EOS] + [S, 15, DOT] + [S, 12, 13, 14, QM],
        targets=[CLS, 10, 11, DOT, SM, SM, EOS] + [15, DOT, E] + [12, 13, 14, QM, E],
        dim1=[0, 1, 2, 3, 4, 5, 6] + [5, 5, 5] + [4, 4, 4, 4, 4],
        dim2=[0] * 7 + [1, 2, 3] + [1, 2, 3, 4, 5],
        loss=[0] * 7 + [1] * 8,
        sep=7,
    )


def test_sentence_objective_through_the_collator():
    collator = BlankInfillingCollator(
        TOK, span_prob=0.0, sentence_prob=1.0, sentence_ratio=0.5, task_masks=True
    )
    # draws: split, single-span, objective; sentence shuffle [2, 1, 0] -> (8,10), (4,8), (1,4):
    # budget int(0.5 * 11) = 5 is crossed by (4, 8); Part-B shuffle keeps that order
    rng = ScriptedRandom(randoms=[0.9, 0.5, 0.5], permutations=[[2, 1, 0], [0, 1]])
    batch = collator.collate([np.array(SENTENCE_X)], rng)
    assert rng.exhausted()
    assert batch["objective"] == "sentence"
    golden = build_block_sample(
        SENTENCE_X, [(8, 10), (4, 8)], tokenizer=TOK, task="sentence", task_masks=True
    )
    for key in ("input_ids", "target_ids", "loss_mask", "position_ids"):
        assert batch[key][0].tolist() == golden[key].tolist()
    assert batch["sep"].tolist() == [7]


DOC_A = [CLS, 10, 11, 12, 13, 14, 15, EOS]  # one document, n = 8
DOC_B = [CLS, 10, 11, EOS, CLS, 12, 13, 14, 15, 16, EOS]  # two documents, n = 11
DOC_B_LOSS = [0, 1, 1, 1, 0, 0, 0, 1, 1, 1, 1]  # a prompt (12 13) in the second document


def test_document_suffix_golden():
    sample = build_suffix_generation_sample(DOC_A, 5, tokenizer=TOK, task_masks=True)
    assert as_lists(sample) == expected(
        tokens=[CLS, 10, 11, GM, S, 12, 13, 14, 15],
        targets=[CLS, 10, 11, GM, 12, 13, 14, 15, EOS],
        dim1=[0, 1, 2, 3, 3, 3, 3, 3, 3],
        dim2=[0, 0, 0, 0, 1, 2, 3, 4, 5],
        loss=[0, 0, 0, 0, 1, 1, 1, 1, 1],
        sep=4,
    )


def test_document_objective_suffix_case_through_the_collator():
    collator = BlankInfillingCollator(TOK, span_prob=0.0, document_prob=1.0, task_masks=True)
    # G from [int(0.5 * 8), 11 - 2] = 5; DOC_A: g = 5, infill draw 0.2 < 0.5 -> suffix;
    # DOC_B has two documents -> suffix without a draw, g = 5, division = 6
    rng = ScriptedRandom(randoms=[0.9, 0.5, 0.5, 0.2], randints=[5])
    batch = collator.collate([np.array(DOC_A), {"tokens": DOC_B, "loss_mask": DOC_B_LOSS}], rng)
    assert rng.exhausted()
    assert batch["objective"] == "document"
    pad = [0, 0, 0]
    assert batch["input_ids"].tolist() == [
        [CLS, 10, 11, GM, S, 12, 13, 14, 15] + pad,
        [CLS, 10, 11, EOS, CLS, 12, GM, S, 13, 14, 15, 16],
    ]
    assert batch["target_ids"].tolist() == [
        [CLS, 10, 11, GM, 12, 13, 14, 15, EOS] + pad,
        [CLS, 10, 11, EOS, CLS, 12, GM, 13, 14, 15, 16, EOS],
    ]
    assert batch["loss_mask"].tolist() == [
        [0, 0, 0, 0, 1, 1, 1, 1, 1] + pad,
        [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1],
    ]
    assert batch["position_ids"].tolist() == [
        [[0, 1, 2, 3, 3, 3, 3, 3, 3] + pad, [0, 0, 0, 0, 1, 2, 3, 4, 5] + pad],
        [[0, 1, 2, 3, 4, 5, 6, 6, 6, 6, 6, 6], [0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5]],
    ]
    assert batch["sep"].tolist() == [4, 7]


def test_document_objective_inner_span_case_through_the_collator():
    collator = BlankInfillingCollator(TOK, span_prob=0.0, document_prob=1.0, task_masks=True)
    # G from [4, 6] = 5; infill draw 0.7 -> one long span; the document is tokens 1..6 (6 tokens),
    # free = 1, placement drawn from [0, 1] = 1 -> span (2, 7)
    rng = ScriptedRandom(randoms=[0.9, 0.5, 0.5, 0.7], randints=[5], randranges=[1])
    batch = collator.collate([DOC_A], rng)
    assert rng.exhausted()
    golden = expected(
        tokens=[CLS, 10, GM, EOS, S, 11, 12, 13, 14, 15],
        targets=[CLS, 10, GM, EOS, 11, 12, 13, 14, 15, E],
        dim1=[0, 1, 2, 3, 2, 2, 2, 2, 2, 2],
        dim2=[0, 0, 0, 0, 1, 2, 3, 4, 5, 6],
        loss=[0, 0, 0, 0, 1, 1, 1, 1, 1, 1],
        sep=4,  # n - g + 1
    )
    assert (
        as_lists(build_block_sample(DOC_A, [(2, 7)], tokenizer=TOK, task="generation", task_masks=True))
        == golden
    )
    got = as_lists(batch)
    assert got == {key: [value] for key, value in golden.items()}


# Two documents: 20 words then 7 words; n = 31.
DOC_C = [CLS, *range(10, 30), EOS, CLS, *range(30, 37), EOS]


def test_span_objective_through_the_collator():
    collator = BlankInfillingCollator(TOK)
    # budget int(0.15 * 31) = 4: lengths 1, 3. Both shuffles swap -> [1, 3]. Documents sorted by
    # length: (31, 0), (23, 7), (1, 20). The 7-token document takes length 1 (<= int(1.05)); the
    # longest takes 3. Placements: 3 of [0, 6] -> (26, 27); 5 of [0, 17] -> (6, 9). Part B: swapped.
    rng = ScriptedRandom(
        randoms=[0.9, 0.5, 0.5], choices=[1, 3], permutations=[[1, 0], [1, 0], [1, 0]], randranges=[3, 5]
    )
    batch = collator.collate([DOC_C], rng)
    assert rng.exhausted()
    assert batch["objective"] == "span"
    part_a = DOC_C[:6] + [M] + DOC_C[9:26] + [M] + DOC_C[27:]
    assert len(part_a) == 29  # n - 4 + 2
    golden = expected(
        tokens=part_a + [S, 15, 16, 17] + [S, 33],
        targets=part_a + [15, 16, 17, E] + [33, E],
        dim1=list(range(29)) + [6] * 4 + [24] * 2,
        dim2=[0] * 29 + [1, 2, 3, 4] + [1, 2],
        loss=[0] * 29 + [1] * 6,
        sep=29,
    )
    assert as_lists(batch) == {key: [value] for key, value in golden.items()}


def test_pad_batch_right_pads_every_field_with_zeros():
    short = build_block_sample(X, [(3, 4)], tokenizer=TOK)  # 10 tokens
    long = build_block_sample(X, SPANS, tokenizer=TOK, order=ORDER)  # 12 tokens
    batch = bi.pad_batch([short, long])
    assert batch["sep"].tolist() == [short["sep"], long["sep"]]
    for key, shape in (("input_ids", (2, 12)), ("loss_mask", (2, 12)), ("position_ids", (2, 2, 12))):
        assert batch[key].shape == shape and batch[key].dtype == np.int64
    for key in bi._FIELDS:
        assert batch[key][1].tolist() == long[key].tolist()
        assert batch[key][0, ..., :10].tolist() == short[key].tolist()
        assert not batch[key][0, ..., 10:].any()


def test_masked_lm_golden():
    sample = build_masked_lm_sample(X, SPANS, tokenizer=TOK)
    assert as_lists(sample) == expected(
        tokens=[CLS, 11, 12, M, 14, M, M, EOS],
        targets=X,
        dim1=list(range(8)),
        dim2=[0] * 8,
        loss=[0, 0, 0, 1, 0, 1, 1, 0],
        sep=8,
    )


def test_masked_lm_objective_through_the_collator():
    collator = BlankInfillingCollator(TOK, masked_lm=True)
    rng = ScriptedRandom(
        randoms=[0.9, 0.5, 0.5], choices=[1, 3], permutations=[[1, 0], [1, 0]], randranges=[3, 5]
    )
    batch = collator.collate([DOC_C], rng)
    assert rng.exhausted()  # no Part-B shuffle
    assert batch["objective"] == "masked_lm"
    golden = build_masked_lm_sample(DOC_C, [(26, 27), (6, 9)], tokenizer=TOK)
    assert as_lists(batch) == {key: [value] for key, value in as_lists(golden).items()}
    assert batch["input_ids"][0, 6:9].tolist() == [M, M, M]
    assert batch["loss_mask"][0].sum() == 4


# ------------------------------------------------------------------------------------------
# Ablation switches on the layout
# ------------------------------------------------------------------------------------------


def test_no_block_positions_only_changes_dim2():
    sample = build_block_sample(X, SPANS, tokenizer=TOK, order=ORDER, block_positions=False)
    got = as_lists(sample)
    assert got["position_ids"][1] == [0] * 7 + [1] * 5
    got["position_ids"][1] = WORKED["position_ids"][1]
    assert got == WORKED


def test_no_block_positions_in_the_suffix_case():
    sample = build_suffix_generation_sample(DOC_A, 5, tokenizer=TOK, block_positions=False)
    default = build_suffix_generation_sample(DOC_A, 5, tokenizer=TOK)
    assert sample["position_ids"][1].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1]
    assert np.array_equal(sample["position_ids"][0], default["position_ids"][0])
    assert np.array_equal(sample["input_ids"], default["input_ids"])


def test_sentinels_change_only_masks_sops_and_part_b_dim1():
    sample = build_block_sample(
        X, SPANS, tokenizer=TOK, order=ORDER, sentinel_tokens=True, max_seq_length=512
    )
    # Part-B index 0 is (x5 x6): [MASK] / <|startofpiece|>; index 1 is (x3): [MASK1] = 40, sop1 = 41
    assert as_lists(sample) == expected(
        tokens=[CLS, 11, 12, 40, 14, M, EOS, S, 15, 16, 41, 13],
        targets=[CLS, 11, 12, 40, 14, M, EOS, 15, 16, E, 13, E],
        dim1=[0, 1, 2, 3, 4, 5, 6] + [512] * 5,
        dim2=WORKED["position_ids"][1],
        loss=WORKED["loss_mask"],
        sep=7,
    )
    with pytest.raises(ValueError, match="max_seq_length"):
        build_block_sample(X, SPANS, tokenizer=TOK, sentinel_tokens=True)
    with pytest.raises(ValueError, match="sentinels"):
        build_block_sample(
            X, SPANS, tokenizer=ToyTokenizer(num_sentinels=0), sentinel_tokens=True, max_seq_length=8
        )


def test_sentinels_keep_task_masks_outside_the_token_objective():
    # as in the official code, only the token-level task gets [MASK{i}]; the start tokens are numbered
    sample = build_block_sample(
        SENTENCE_X, [(8, 10), (4, 8)], tokenizer=TOK, task="sentence", sentinel_tokens=True, max_seq_length=99
    )
    assert sample["input_ids"][:7].tolist() == [CLS, 10, 11, DOT, M, M, EOS]
    assert sample["input_ids"][[7, 10]].tolist() == [S, 41]


def test_task_masks():
    for task, mask in (("bert", M), ("sentence", SM), ("generation", GM)):
        with_masks = build_block_sample(X, SPANS, tokenizer=TOK, order=ORDER, task=task, task_masks=True)
        assert with_masks["input_ids"][[3, 5]].tolist() == [mask, mask]
        without = build_block_sample(X, SPANS, tokenizer=TOK, order=ORDER, task=task)
        assert as_lists(without) == WORKED
    assert build_suffix_generation_sample(DOC_A, 5, tokenizer=TOK)["input_ids"][3] == M


# ------------------------------------------------------------------------------------------
# A loop-by-loop reference of the layout (official `make_block_data`) against the vectorised one
# ------------------------------------------------------------------------------------------


def reference_block_sample(x, spans, order, *, task, task_masks, block_positions, sentinel, max_seq_length):
    n = len(x)
    keep = [1] * n
    for start, end in spans:
        for i in range(start + 1, end):
            keep[i] = 0
    dim1 = [p - 1 for p in itertools.accumulate(keep)]
    b_tokens, b_targets, b_dim1, b_dim2 = [], [], [], []
    for k, index in enumerate(order):
        start, end = spans[index]
        b_tokens += [TOK.sentinel_sop_id(k) if sentinel else TOK.sop_id] + x[start:end]
        b_targets += x[start:end] + [TOK.eop_id]
        b_dim1 += [max_seq_length if sentinel else dim1[start]] * (end - start + 1)
        b_dim2 += list(range(1, end - start + 2)) if block_positions else [1] * (end - start + 1)
    a_tokens, a_dim1, last = [], [], 0
    for index in sorted(range(len(spans)), key=lambda i: spans[i][0]):
        start, end = spans[index]
        if task == "sentence" and task_masks:
            mask = TOK.smask_id
        elif task == "generation" and task_masks:
            mask = TOK.gmask_id
        elif task == "bert" and sentinel:
            mask = TOK.sentinel_mask_id(list(order).index(index))
        else:
            mask = TOK.mask_id
        a_tokens += x[last:start] + [mask]
        a_dim1 += dim1[last:start] + [dim1[start]]
        last = end
    a_tokens += x[last:]
    a_dim1 += dim1[last:]
    sep = len(a_tokens)
    return expected(
        a_tokens + b_tokens,
        a_tokens + b_targets,
        a_dim1 + b_dim1,
        [0] * sep + b_dim2,
        [0] * sep + [1] * len(b_tokens),
        sep,
    )


@st.composite
def tokens_spans_order(draw):
    n = draw(st.integers(1, 40))
    x = draw(st.lists(st.integers(10, 39), min_size=n, max_size=n))
    cuts = sorted(draw(st.sets(st.integers(0, n), max_size=12)))
    pairs = [(a, b) for a, b in itertools.pairwise(cuts) if a < b]
    spans = [p for p in pairs if draw(st.booleans())][:8]  # adjacent spans allowed
    spans = draw(st.permutations(spans))
    order = draw(st.permutations(list(range(len(spans)))))
    return x, spans, order


@settings(max_examples=150, deadline=None)
@given(
    tokens_spans_order(),
    st.sampled_from(bi.TASKS),
    st.booleans(),
    st.booleans(),
    st.booleans(),
)
def test_layout_matches_the_loop_reference(case, task, task_masks, block_positions, sentinel):
    x, spans, order = case
    kwargs = dict(task=task, task_masks=task_masks, block_positions=block_positions)
    got = build_block_sample(
        x, spans, tokenizer=TOK, order=order, sentinel_tokens=sentinel, max_seq_length=77, **kwargs
    )
    ref = reference_block_sample(x, spans, order, sentinel=sentinel, max_seq_length=77, **kwargs)
    assert as_lists(got) == ref
    assert len(got["input_ids"]) == len(x) + 2 * len(spans)
    assert got["sep"] == len(x) - sum(e - s for s, e in spans) + len(spans)


def reference_split_sentences(tokens):
    """The official sentence scan, token by token."""
    table = TOK.sentence_end_table()
    sentences, last = [], 1 if tokens and tokens[0] == CLS else 0
    for i, token in enumerate(tokens):
        if table[token] and token != EOS:
            if last < i + 1:
                sentences.append((last, i + 1))
            last = i + 1
        elif token == EOS:
            last = i + 1
    if last < len(tokens):
        sentences.append((last, len(tokens)))
    return sentences


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([CLS, EOS, DOT, QM, 10, 11, 12]), max_size=30))
def test_split_sentences_matches_the_token_scan(tokens):
    got = bi.split_sentences(
        np.array(tokens, dtype=np.int64), TOK.sentence_end_table(), eos_id=EOS, cls_id=CLS
    )
    assert got == reference_split_sentences(tokens)


# ------------------------------------------------------------------------------------------
# Span sampling
# ------------------------------------------------------------------------------------------


def test_span_length_weights_are_poisson():
    weights = bi.span_length_weights(3.0, 40)
    assert len(weights) == 39
    assert weights[0] == pytest.approx(3 * np.exp(-3))
    assert weights[2] == pytest.approx(27 / 6 * np.exp(-3))
    rng = random.Random(0)
    draws = [bi.sample_span_lengths(rng, 1, weights, mask_ratio=1.0)[0] for _ in range(20000)]
    assert 1 <= min(draws) and max(draws) <= 39
    # the mean of Poisson(3) conditioned on k >= 1
    assert np.mean(draws) == pytest.approx(3 / (1 - np.exp(-3)), abs=0.05)


def test_split_documents_golden():
    assert bi.split_documents(np.array(DOC_C), eos_id=EOS, cls_id=CLS) == [(31, 0), (23, 7), (1, 20)]
    # truncated sample: the last token of the trailing document is excluded as well; of two equally
    # long documents the first one comes last (it is the "longest")
    truncated = np.array([CLS, 10, 11, EOS, CLS, 12, 13, 14])
    assert bi.split_documents(truncated, eos_id=EOS, cls_id=CLS) == [(5, 2), (1, 2)]


def test_assign_spans_to_documents_golden():
    documents = [(31, 0), (23, 7), (1, 20)]
    assert bi.assign_spans_to_documents(documents, [1, 3]) == [(23, 7, [1]), (1, 20, [3])]
    # a shorter document takes lengths while they fit int(0.15 * 9) = 1 and stops at the first that
    # does not; the longest takes what fits with separators (4 + 3 + 1 <= 12, then 7 + 5 + 2 > 12),
    # and the rest is left out
    documents = [(30, 9), (0, 12)]
    assert bi.assign_spans_to_documents(documents, [1, 4, 3, 5]) == [(30, 9, [1]), (0, 12, [4, 3])]
    assert bi.assign_spans_to_documents(documents, [2, 1, 4]) == [(0, 12, [2, 1, 4])]


def test_place_spans_golden():
    # a 10-token document at offset 5, lengths 2, 1, 3: 4 free tokens, gaps drawn from [0, 4 - 3 + 1]
    rng = ScriptedRandom(randranges=[2, 0, 1])
    assert bi.place_spans([2, 1, 3], 10, rng, offset=5) == [(5, 7), (9, 10), (12, 15)]
    rng = ScriptedRandom(randranges=[2, 2, 2])
    assert bi.place_spans([2, 1, 3], 10, rng, offset=5) == [(7, 9), (10, 11), (12, 15)]


@st.composite
def packed_samples(draw, min_doc=0, max_doc=50):
    documents = draw(st.lists(st.integers(min_doc, max_doc), min_size=1, max_size=4))
    tokens = []
    for length in documents:
        tokens += [CLS] + draw(st.lists(st.integers(10, 39), min_size=length, max_size=length)) + [EOS]
    if len(tokens) > 3 and draw(st.booleans()):
        tokens = tokens[: draw(st.integers(3, len(tokens)))]  # truncated last document
    return np.array(tokens, dtype=np.int64)


def inside_documents(tokens: np.ndarray) -> np.ndarray:
    """Positions a span may cover: no [CLS], no eos, not the last token of a truncated sample."""
    allowed = (tokens != CLS) & (tokens != EOS)
    if tokens[-1] != EOS:
        allowed[-1] = False
    return allowed


@settings(max_examples=200, deadline=None)
@given(packed_samples(), st.integers(0, 2**31))
def test_sampled_spans_properties(tokens, seed):
    rng = random.Random(seed)
    weights = bi.span_length_weights()
    lengths = bi.sample_span_lengths(rng, len(tokens), weights)
    assert sum(lengths) >= int(0.15 * len(tokens))
    assert sum(lengths[:-1]) < max(1, int(0.15 * len(tokens)))  # drawn until the budget is reached
    spans = bi.sample_spans_in_documents(tokens, lengths, rng, eos_id=EOS, cls_id=CLS)
    allowed = inside_documents(tokens)
    ordered = sorted(spans)
    for start, end in ordered:
        assert allowed[start:end].all()
    for (_, end), (start, _) in itertools.pairwise(ordered):
        assert start >= end + 1  # at least one unmasked token between spans
    placed = sorted(e - s for s, e in spans)
    remaining = sorted(lengths)
    for length in placed:  # the placed lengths are drawn lengths
        remaining.remove(length)
    if not remaining:
        sample = build_block_sample(tokens, spans, tokenizer=TOK)
        assert sample["sep"] == len(tokens) - sum(lengths) + len(lengths)


def test_placement_follows_sorted_independent_draws():
    # 2 spans of length 1 in a 5-token document: 3 free tokens, gaps drawn from {0, 1, 2} and
    # sorted. Every separated configuration is reachable; as in the official code a configuration
    # from two equal draws (spans one token apart) has probability 1/9, the others 2/9.
    counts: dict = {}
    rng = random.Random(1)
    draws = 9000
    for _ in range(draws):
        spans = tuple(bi.place_spans([1, 1], 5, rng))
        counts[spans] = counts.get(spans, 0) + 1
    assert set(counts) == {((a, a + 1), (b, b + 1)) for a in range(5) for b in range(a + 2, 5)}
    for ((a, _), (b, _)), count in counts.items():
        p = 1 / 9 if b - a == 2 else 2 / 9
        assert abs(count / draws - p) < 4 * np.sqrt(p * (1 - p) / draws)


# ------------------------------------------------------------------------------------------
# Collator properties
# ------------------------------------------------------------------------------------------


def unpack_row(batch: dict, b: int):
    """Part A, Part-B segments [(dim1, inputs, targets, dim2)] and the real length of row b."""
    sep = int(batch["sep"][b])
    inputs, targets = batch["input_ids"][b].tolist(), batch["target_ids"][b].tolist()
    dim1, dim2 = batch["position_ids"][b].tolist()
    loss = batch["loss_mask"][b].tolist()
    length = sep + sum(loss[sep:]) if batch["objective"] in ("span", "sentence") else None
    segments = []
    i = sep
    while length is not None and i < length:
        j = i + 1
        while j < length and dim2[j] != 1:
            j += 1
        segments.append((dim1[i], inputs[i:j], targets[i:j], dim2[i:j]))
        i = j
    return inputs[:sep], segments, length


def reconstruct(part_a, segments, mask_ids=(M, SM)):
    """Undo the corruption: every mask of Part A replaced by its span from Part B."""
    spans = {position: targets[:-1] for position, _, targets, _ in segments}
    out = []
    for position, token in enumerate(part_a):
        out += spans.pop(position) if token in mask_ids and position in spans else [token]
    assert not spans
    return out


def original_spans(segments):
    """(start, end) in the original sample of every Part-B segment, in text order."""
    spans, shift = [], 0
    for position, _, targets, _ in sorted(segments):
        start = position + shift
        spans.append((start, start + len(targets) - 1))
        shift += len(targets) - 2
    return spans


def realistic_sample(rng: random.Random, with_punctuation: bool = False) -> np.ndarray:
    words = list(range(10, 40)) + ([DOT, QM] * 3 if with_punctuation else [])
    tokens: list[int] = []
    while len(tokens) < 60:
        tokens += [CLS] + [rng.choice(words) for _ in range(rng.randint(5, 80))] + [EOS]
    return np.array(tokens[: rng.randint(60, len(tokens))])


def check_block_row(batch, b, original, mask_ids=(M,)):
    part_a, segments, length = unpack_row(batch, b)
    n = len(original)
    assert length == n + 2 * len(segments)
    assert reconstruct(part_a, segments, mask_ids) == original.tolist()
    assert batch["position_ids"][b, 0, :length].max() < n
    assert batch["position_ids"][b, 0, : len(part_a)].tolist() == list(range(len(part_a)))
    for position, inputs, targets, dim2 in segments:
        assert inputs[0] == S and targets[-1] == E and inputs[1:] == targets[:-1]
        assert dim2 == list(range(1, len(inputs) + 1))
        assert part_a[position] in mask_ids
        assert EOS not in targets
        if mask_ids == (M,):  # a sentence may start with the [CLS] of a later document
            assert CLS not in targets
    # zero padding after the real length, in every field
    assert not batch["input_ids"][b, length:].any()
    assert not batch["target_ids"][b, length:].any()
    assert not batch["loss_mask"][b, length:].any()
    assert not batch["position_ids"][b, :, length:].any()
    assert batch["loss_mask"][b, : len(part_a)].sum() == 0
    return part_a, segments


def test_span_objective_properties_over_many_seeds():
    rng = random.Random(0)
    collator = BlankInfillingCollator(TOK, seed=3)
    for _ in range(150):
        samples = [realistic_sample(rng) for _ in range(3)]
        batch = collator(samples)
        assert batch["objective"] == "span"
        assert batch["input_ids"].dtype == torch.long and batch["position_ids"].shape[1] == 2
        assert len(batch["sep"]) == 3  # samples of this size always hold their spans
        for b, original in enumerate(samples):
            _, segments = check_block_row(batch, b, original)
            masked = sum(len(targets) - 1 for _, _, targets, _ in segments)
            assert masked >= int(0.15 * len(original))
            spans = original_spans(segments)
            allowed = inside_documents(original)
            assert all(allowed[start:end].all() for start, end in spans)
            # at least one unmasked token between spans
            assert all(end < start for (_, end), (start, _) in itertools.pairwise(spans))


def test_sentence_objective_properties():
    rng = random.Random(1)
    collator = BlankInfillingCollator(TOK, span_prob=0.0, sentence_prob=1.0, task_masks=True, seed=5)
    table = TOK.sentence_end_table()
    for _ in range(60):
        samples = [realistic_sample(rng, with_punctuation=True) for _ in range(2)]
        batch = collator(samples)
        assert len(batch["sep"]) == 2  # never dropped
        for b, original in enumerate(samples):
            part_a, segments = check_block_row(batch, b, original, mask_ids=(SM,))
            sentences = bi.split_sentences(original, table, eos_id=EOS, cls_id=CLS)
            assert set(original_spans(segments)) <= set(sentences)
            covered = sum(len(t) - 1 for _, _, t, _ in segments)
            assert covered >= int(0.15 * len(original))
            for _, _, targets, _ in segments:
                text = targets[:-1]
                assert table[text[-1]] or text[-1] == original[-1]  # ends a sentence or the sample
                assert not table[text[:-1]].any()
            assert len(segments) <= len(sentences)


def test_document_objective_properties():
    rng = random.Random(2)
    collator = BlankInfillingCollator(TOK, span_prob=0.0, document_prob=1.0, seed=7)
    cases = set()
    for _ in range(80):
        samples = [realistic_sample(rng) for _ in range(3)]
        batch = collator(samples)
        assert batch["objective"] == "document"
        sizes = [len(s) for s in samples]
        generated = [n - int(batch["sep"][b]) + 1 for b, n in enumerate(sizes)]
        # one generation length per micro-batch, clipped to n - 2
        g = max(generated)
        assert int(0.5 * min(sizes)) <= g <= max(sizes) - 2
        assert generated == [min(g, n - 2) for n in sizes]
        for b, original in enumerate(samples):
            n, sep = len(original), int(batch["sep"][b])
            inputs, targets = batch["input_ids"][b].tolist(), batch["target_ids"][b].tolist()
            dim1, dim2 = batch["position_ids"][b].tolist()
            length = sep + max(dim2[sep:])  # Part-B dim 2 counts 1, 2, ... up to the real length
            assert inputs[sep] == S and len(set(dim1[sep:length])) == 1
            assert not any(inputs[length:]) and not any(dim2[length:])
            if length == n + 1:  # suffix: [gMASK] last in Part A, generation ends with the last token
                cases.add("suffix")
                assert inputs[sep - 1] == M and dim1[sep] == sep - 1
                assert targets[sep:length] == original[sep - 1 :].tolist()
                assert inputs[: sep - 1] == original[: sep - 1].tolist()
            else:  # one long span inside the only document, ending with [eop]
                cases.add("inner")
                assert length == n + 2 and EOS not in original[:-1].tolist()
                part_a, segments, _ = unpack_row(batch | {"objective": "span"}, b)
                assert len(segments) == 1 and targets[length - 1] == E
                assert reconstruct(part_a, segments) == original.tolist()
    assert cases == {"suffix", "inner"}


def test_objective_frequencies_match_the_probabilities():
    collator = BlankInfillingCollator(TOK, span_prob=0.5, sentence_prob=0.3, document_prob=0.2, seed=11)
    sample = np.array([CLS, *range(10, 30), DOT, *range(10, 20), EOS])
    counts = {"span": 0, "sentence": 0, "document": 0}
    calls = 1500
    for _ in range(calls):
        counts[collator([sample])["objective"]] += 1
    for objective, p in (("span", 0.5), ("sentence", 0.3), ("document", 0.2)):
        sigma = np.sqrt(p * (1 - p) / calls)
        assert abs(counts[objective] / calls - p) < 4 * sigma, counts


def test_unplaceable_samples_are_dropped():
    tiny = np.array([CLS, 10, EOS] * 5)  # every document holds one token: 2 masked tokens never fit
    normal = np.array([CLS, *range(10, 40), EOS])
    collator = BlankInfillingCollator(TOK)
    for _ in range(20):
        batch = collator([tiny, normal, tiny])
        assert len(batch["sep"]) == 1
        assert batch["input_ids"].shape[0] == 1
    with pytest.raises(ValueError, match="too short"):
        collator([tiny])


# ------------------------------------------------------------------------------------------
# Ablation switches through the collator
# ------------------------------------------------------------------------------------------


def collate_all(collator, batches):
    return [collator(batch) for batch in batches]


SINGLE_BATCHES = [[realistic_sample(random.Random(i))] for i in range(40)]


def test_no_shuffle_only_reorders_part_b():
    shuffled = collate_all(BlankInfillingCollator(TOK, seed=1), SINGLE_BATCHES)
    in_order = collate_all(BlankInfillingCollator(TOK, seed=1, shuffle_spans=False), SINGLE_BATCHES)
    reordered = 0
    for a, b in zip(shuffled, in_order, strict=True):
        sep = int(a["sep"][0])
        assert int(b["sep"][0]) == sep
        assert torch.equal(a["input_ids"][0, :sep], b["input_ids"][0, :sep])
        _, segs_a, _ = unpack_row(a, 0)
        _, segs_b, _ = unpack_row(b, 0)
        assert sorted(segs_a) == segs_b  # text order = sorted by mask position
        reordered += segs_a != segs_b
        assert torch.equal(a["loss_mask"], b["loss_mask"])
    assert reordered > 10


@pytest.mark.parametrize("probs", [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)])
def test_no_block_positions_only_changes_dim2_through_the_collator(probs):
    kwargs = dict(zip(("span_prob", "sentence_prob", "document_prob"), probs, strict=True))
    rng = random.Random(4)
    batches = [[realistic_sample(rng, True) for _ in range(3)] for _ in range(15)]
    default = collate_all(BlankInfillingCollator(TOK, seed=2, **kwargs), batches)
    ablated = collate_all(BlankInfillingCollator(TOK, seed=2, block_positions=False, **kwargs), batches)
    for a, b in zip(default, ablated, strict=True):
        for key in ("input_ids", "target_ids", "loss_mask", "sep"):
            assert torch.equal(a[key], b[key])
        assert torch.equal(a["position_ids"][:, 0], b["position_ids"][:, 0])
        dim2 = a["position_ids"][:, 1]
        assert torch.equal(b["position_ids"][:, 1], (dim2 > 0).long())


def test_sentinels_only_change_mask_and_sop_ids_and_part_b_dim1_through_the_collator():
    default = collate_all(BlankInfillingCollator(TOK, seed=3), SINGLE_BATCHES)
    tokenizer = ToyTokenizer(num_sentinels=12)
    sentinel = collate_all(
        BlankInfillingCollator(tokenizer, seed=3, sentinel_tokens=True, max_seq_length=500), SINGLE_BATCHES
    )
    for a, b in zip(default, sentinel, strict=True):
        sep = int(a["sep"][0])
        length = sep + int(a["loss_mask"][0].sum())
        for key in ("sep", "loss_mask"):
            assert torch.equal(a[key], b[key])
        assert torch.equal(a["position_ids"][0, 1], b["position_ids"][0, 1])
        assert torch.equal(a["position_ids"][0, 0, :sep], b["position_ids"][0, 0, :sep])
        assert (b["position_ids"][0, 0, sep:length] == 500).all()
        # the k-th Part-B span starts with <|startofpiece{k}|> and its mask in Part A is [MASK{k}]
        starts = sep + torch.nonzero(a["position_ids"][0, 1, sep:length] == 1).flatten()
        mask_positions = a["position_ids"][0, 0, starts]
        expected_inputs = a["input_ids"][0].clone()
        for k, (start, position) in enumerate(zip(starts, mask_positions, strict=True)):
            expected_inputs[start] = tokenizer.sentinel_sop_id(k)
            expected_inputs[position] = tokenizer.sentinel_mask_id(k)
        assert torch.equal(b["input_ids"][0], expected_inputs)
        # Part-A targets repeat the Part-A inputs (their loss is masked out); Part-B targets unchanged
        expected_targets = torch.cat((expected_inputs[:sep], a["target_ids"][0, sep:]))
        assert torch.equal(b["target_ids"][0], expected_targets)


def test_masked_lm_places_the_same_spans():
    default = collate_all(BlankInfillingCollator(TOK, seed=4), SINGLE_BATCHES)
    mlm = collate_all(BlankInfillingCollator(TOK, seed=4, masked_lm=True), SINGLE_BATCHES)
    for a, b, (original,) in zip(default, mlm, SINGLE_BATCHES, strict=True):
        n = len(original)
        assert b["objective"] == "masked_lm"
        assert b["sep"].tolist() == [n] and b["input_ids"].shape[1] == n
        assert b["target_ids"][0].tolist() == original.tolist()
        assert b["position_ids"][0].tolist() == [list(range(n)), [0] * n]
        masked = (b["input_ids"][0] == M).numpy()
        assert b["loss_mask"][0].numpy().tolist() == masked.astype(int).tolist()
        # the same spans as the block layout of the same seed
        part_a, segments, _ = unpack_row(a, 0)
        assert int(masked.sum()) == sum(len(t) - 1 for _, _, t, _ in segments)
        assert reconstruct(part_a, segments) == original.tolist()


def test_task_masks_through_the_collator():
    rng = random.Random(6)
    batches = [[realistic_sample(rng, True) for _ in range(2)] for _ in range(30)]
    collator = BlankInfillingCollator(
        TOK, span_prob=0.4, sentence_prob=0.3, document_prob=0.3, task_masks=True, seed=8
    )
    seen = set()
    for batch in collate_all(collator, batches):
        seen.add(batch["objective"])
        part_a_ids = set(batch["input_ids"][0, : int(batch["sep"][0])].tolist())
        expected_mask = {"span": M, "sentence": SM, "document": GM}[batch["objective"]]
        assert expected_mask in part_a_ids
        assert not ({M, SM, GM} - {expected_mask}) & part_a_ids
    assert seen == {"span", "sentence", "document"}


def test_sentinel_collator_needs_sentinels_and_max_seq_length():
    with pytest.raises(ValueError, match="sentinel"):
        BlankInfillingCollator(ToyTokenizer(num_sentinels=0), sentinel_tokens=True, max_seq_length=100)
    with pytest.raises(ValueError, match="max_seq_length"):
        BlankInfillingCollator(TOK, sentinel_tokens=True)
    collator = BlankInfillingCollator(ToyTokenizer(num_sentinels=1), sentinel_tokens=True, max_seq_length=500)
    with pytest.raises(ValueError, match="sentinels"):
        collator([np.array([CLS, *range(10, 40), *range(10, 40), EOS])])


class WordTokenizer(ToyTokenizer):
    """ToyTokenizer with words: ids 10..24 begin a word, 25..39 continue the word before them;
    '.', '?' and command tokens are words of their own and the token after one begins a word."""

    def word_starts(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        alone = (ids < 10) | (ids >= 40)
        starts = (ids < 25) | alone
        starts[1:] |= alone[:-1]
        starts[0] = True
        return starts


def test_whole_word_spans_cover_whole_words():
    tok = WordTokenizer()
    rng = random.Random(4)
    collator = BlankInfillingCollator(tok, whole_word_spans=True, seed=2)
    for _ in range(100):
        samples = [realistic_sample(rng, with_punctuation=True) for _ in range(3)]
        batch = collator(samples)
        assert batch["objective"] == "span" and len(batch["sep"]) == 3
        for b, original in enumerate(samples):
            _, segments = check_block_row(batch, b, original)
            starts = tok.word_starts(original)
            spans = original_spans(segments)
            assert all(starts[start] and (end == len(original) or starts[end]) for start, end in spans)
            assert all(inside_documents(original)[start:end].all() for start, end in spans)
            # lengths and the masking budget count words, not tokens
            masked_words = sum(int(starts[start:end].sum()) for start, end in spans)
            assert masked_words >= int(0.15 * starts.sum())
            assert all(end < start for (_, end), (start, _) in itertools.pairwise(spans))


def test_whole_word_spans_of_single_token_words_are_the_token_spans():
    """With every token a word, the word view is the token view: the same draws, the same batch."""
    samples = [np.array([CLS, *range(10, 25), EOS, CLS, *range(10, 20), DOT])]
    for seed in range(20):
        by_word = BlankInfillingCollator(WordTokenizer(), whole_word_spans=True, seed=seed)(samples)
        by_token = BlankInfillingCollator(TOK, seed=seed)(samples)
        assert all(torch.equal(by_word[key], by_token[key]) for key in ("input_ids", "position_ids", "sep"))


def test_whole_word_spans_need_a_tokenizer_that_knows_words():
    with pytest.raises(ValueError, match="word_starts"):
        BlankInfillingCollator(TOK, whole_word_spans=True)


def test_probabilities_must_sum_to_one():
    with pytest.raises(ValueError, match="must be 1"):
        BlankInfillingCollator(TOK, span_prob=0.5)


# ------------------------------------------------------------------------------------------
# Determinism
# ------------------------------------------------------------------------------------------


BATCHES = [[realistic_sample(random.Random(100 + i)) for _ in range(2)] for i in range(6)]


def run(collator, batches=BATCHES):
    return [as_lists(batch) | {"objective": batch["objective"]} for batch in collate_all(collator, batches)]


def mixed(**kwargs):
    return BlankInfillingCollator(TOK, span_prob=0.4, sentence_prob=0.3, document_prob=0.3, **kwargs)


def test_equal_seed_epoch_call_rank_give_equal_batches():
    assert run(mixed(seed=1)) == run(mixed(seed=1))
    first, second = mixed(seed=1), mixed(seed=1)
    first.set_epoch(3)
    second.set_epoch(3)
    assert run(first) == run(second)


def test_seed_epoch_rank_and_call_change_the_batches():
    base = run(mixed(seed=1))
    assert run(mixed(seed=2)) != base
    assert run(mixed(seed=1, rank=1)) != base
    epoch = mixed(seed=1)
    epoch.set_epoch(1)
    assert run(epoch) != base
    # every call draws anew: the same batch twice gives different corruptions
    collator = mixed(seed=1)
    again = run(collator, [BATCHES[0]] * 2)
    assert again[0] != again[1]


def test_worker_changes_the_batches(monkeypatch):
    single = mixed(seed=1)
    outputs = [as_lists(single(batch)) for batch in BATCHES]
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: SimpleNamespace(id=1, num_workers=2))
    worker = mixed(seed=1)
    # worker 1 of 2 handles the batches 1, 3, 5 of the epoch: the calls 1, 3, 5 of a single process
    assert [as_lists(worker(batch)) for batch in BATCHES[:3]] != outputs[:3]
    worker = mixed(seed=1)
    assert [as_lists(worker(BATCHES[i])) for i in (1, 3, 5)] == [outputs[i] for i in (1, 3, 5)]


def test_state_dict_resumes_the_stream():
    collator = mixed(seed=5)
    collator.set_epoch(2)
    reference = run(collator)
    resumed_from = mixed(seed=5)
    resumed_from.set_epoch(2)
    run(resumed_from, BATCHES[:4])
    state = resumed_from.state_dict()
    assert state == {"epoch": 2, "calls": 4}
    fresh = mixed(seed=5)
    fresh.load_state_dict(state)
    assert run(fresh, BATCHES[4:]) == reference[4:]


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        return self.samples[index]


def test_dataloader_results_do_not_depend_on_the_number_of_workers():
    samples = [s for batch in BATCHES for s in batch]
    results = []
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(
            ListDataset(samples), batch_size=2, num_workers=workers, collate_fn=mixed(seed=9)
        )
        results.append([as_lists(batch) for batch in loader])
    assert results[0] == results[1]


def test_single_span_micro_batches():
    collator = BlankInfillingCollator(TOK, single_span_prob=1.0, sentence_prob=0.5, span_prob=0.5, seed=1)
    for batch in collate_all(collator, SINGLE_BATCHES[:10]):
        assert batch["objective"] == "span"
        _, segments, _ = unpack_row(batch, 0)
        assert len(segments) == 1


# ------------------------------------------------------------------------------------------
# With the real tokenizer
# ------------------------------------------------------------------------------------------


def pack_corpus(tokenizer, text: str, length: int = 96) -> list[np.ndarray]:
    """Packed samples `[CLS] doc eos ...` of about `length` tokens from the paragraphs of `text`."""
    documents = [tokenizer.encode(p) for p in text.split("\n\n") if p.strip()]
    samples, current = [], []
    for doc in documents:
        current += [tokenizer.cls_id, *doc, tokenizer.eos_id]
        if len(current) >= length:
            samples.append(np.array(current[:length]))
            current = []
    return samples


def test_collator_with_the_real_tokenizer(tokenizer, corpus_file):
    samples = pack_corpus(tokenizer, corpus_file.read_text(encoding="utf-8"))
    assert len(samples) >= 8
    collator = BlankInfillingCollator(
        tokenizer, span_prob=0.4, sentence_prob=0.3, document_prob=0.3, task_masks=True, seed=0
    )
    table = tokenizer.sentence_end_table()
    seen = set()
    for i in range(0, 48, 4):
        batch_samples = [samples[(i + j) % len(samples)] for j in range(4)]
        batch = collator(batch_samples)
        objective = batch["objective"]
        seen.add(objective)
        assert batch["input_ids"].max() < len(tokenizer)
        assert batch["position_ids"][:, 0].max() < 96
        if objective == "document":
            continue
        mask_id = tokenizer.mask_id if objective == "span" else tokenizer.smask_id
        for b, original in enumerate(batch_samples):
            part_a, segments, _ = unpack_row(batch, b)
            assert reconstruct(part_a, segments, (mask_id,)) == original.tolist()
            for _, inputs, targets, _ in segments:
                assert inputs[0] == tokenizer.sop_id and targets[-1] == tokenizer.eop_id
                assert tokenizer.eos_id not in targets
                if objective == "span":
                    assert tokenizer.cls_id not in targets
                else:  # a whole sentence, or the truncated tail of the sample
                    assert table[targets[-2]] or targets[:-1] == original[-(len(targets) - 1) :].tolist()
    assert seen == {"span", "sentence", "document"}


def test_sentinels_with_the_real_tokenizer(tokenizer, sentencepiece_model, corpus_file):
    from glm_lightning.tokenizer import GLMTokenizer

    samples = pack_corpus(tokenizer, corpus_file.read_text(encoding="utf-8"))[:4]
    with pytest.raises(ValueError, match="sentinel"):
        BlankInfillingCollator(tokenizer, sentinel_tokens=True, max_seq_length=96)
    with_sentinels = GLMTokenizer.from_sentencepiece(sentencepiece_model, num_sentinels=20)
    batch = BlankInfillingCollator(with_sentinels, sentinel_tokens=True, max_seq_length=96)(samples)
    sep = int(batch["sep"][0])
    part_b = batch["position_ids"][0, :, sep:]
    starts = batch["input_ids"][0, sep:][(part_b[1] == 1)].tolist()
    assert starts == [with_sentinels.sentinel_sop_id(k) for k in range(len(starts))]
    assert (part_b[0][batch["loss_mask"][0, sep:] == 1] == 96).all()


# ------------------------------------------------------------------------------------------
# Collator invariants over random packings (hypothesis)
# ------------------------------------------------------------------------------------------


OBJECTIVE_KWARGS = {
    "span": {},
    "sentence": {"span_prob": 0.0, "sentence_prob": 1.0},
    "document": {"span_prob": 0.0, "document_prob": 1.0},
}


@st.composite
def packed_micro_batches(draw, max_doc: int = 160) -> list[np.ndarray]:
    """1-3 packed samples, each 1-5 random documents `[CLS] doc eos` (words 10..39 with some '.'
    and '?'), truncated at a random point half of the time."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    vocabulary = np.array([*range(10, 40), DOT, QM])
    weights = np.r_[np.full(30, 0.9 / 30), 0.05, 0.05]
    samples = []
    for _ in range(draw(st.integers(1, 3))):
        tokens: list[int] = []
        for length in draw(st.lists(st.integers(0, max_doc), min_size=1, max_size=5)):
            tokens += [CLS, *rng.choice(vocabulary, size=length, p=weights).tolist(), EOS]
        if len(tokens) < 3:  # the collator needs 3 tokens: a second empty document
            tokens += [CLS, EOS]
        if draw(st.booleans()):
            tokens = tokens[: draw(st.integers(3, len(tokens)))]
        samples.append(np.array(tokens, dtype=np.int64))
    return samples


def longest_document(tokens: np.ndarray) -> int:
    """Tokens of the longest document a span may use: [CLS] and eos excluded, and the last token
    of a sample that does not end with eos (official `blocklm_utils.py`)."""
    runs, run = [], 0
    for allowed in inside_documents(tokens):
        run = run + 1 if allowed else 0
        runs.append(run)
    return max(runs, default=0)


def segment_content(targets: list[int]) -> list[int]:
    """The original tokens a Part-B segment stands for: its targets without the final [eop] (the
    document-level suffix case has no [eop])."""
    return targets[:-1] if targets[-1] == E else targets


def token_origins(
    part_a: list[int], segments, mask_id: int
) -> tuple[list[tuple[int, int]], dict[int, tuple[int, int]]]:
    """(original index, token) of every Part-A token that is not a mask and of every Part-B target
    that is not [eop], and the original (start, end) of each segment keyed by its mask position:
    a span of m tokens shifts everything after its mask by m - 1."""
    content = {position: segment_content(targets) for position, _, targets, _ in segments}
    origins, spans, shift = [], {}, 0
    for position, token in enumerate(part_a):
        if token == mask_id and position in content:
            span = content[position]
            spans[position] = (position + shift, position + shift + len(span))
            origins += [(position + shift + i, t) for i, t in enumerate(span)]
            shift += len(span) - 1
        else:
            origins.append((position + shift, token))
    return origins, spans


def check_layout_row(batch: dict, b: int, original: np.ndarray, mask_id: int) -> list[tuple[int, int]]:
    """Layout invariants shared by the three objectives; returns the (start, end) spans of the
    original sample that went to Part B, in text order."""
    part_a, segments, length = row_layout(batch, b)
    n, sep = len(original), len(part_a)
    dim1, dim2 = batch["position_ids"][b].tolist()
    loss = batch["loss_mask"][b].tolist()
    # every original token appears exactly once: unmasked in Part A or as a Part-B target
    origins, spans = token_origins(part_a, segments, mask_id)
    assert sorted(index for index, _ in origins) == list(range(n))
    assert all(original[index] == token for index, token in origins)
    # Part A: dim 1 counts 0 .. sep - 1, dim 2 is 0, no loss; exactly one mask per Part-B segment
    assert dim1[:sep] == list(range(sep)) and not any(dim2[:sep]) and not any(loss[:sep])
    mask_positions = [position for position, token in enumerate(part_a) if token == mask_id]
    assert sorted(position for position, *_ in segments) == mask_positions
    # Part B: [sop] + span -> span (+ [eop]); dim 1 the mask position, dim 2 = 1 .. len + 1
    i = sep
    for position, inputs, targets, block in segments:
        start, end = spans[position]
        assert inputs[0] == S and inputs[1:] == targets[:-1]
        assert segment_content(targets) == original[start:end].tolist()
        assert block == list(range(1, len(inputs) + 1))
        assert dim1[i : i + len(inputs)] == [position] * len(inputs)
        i += len(inputs)
    # zero padding after the real length, in every field
    assert not any(batch["input_ids"][b, length:].tolist()) and not any(loss[length:])
    assert not any(batch["target_ids"][b, length:].tolist()) and not any(dim1[length:] + dim2[length:])
    return sorted(spans.values())


def collate_with_seed(objective: str, samples: list[np.ndarray], seed: int) -> dict:
    collator = BlankInfillingCollator(TOK, seed=seed, task_masks=True, **OBJECTIVE_KWARGS[objective])
    return collator(samples)


def rows_to_samples(batch: dict, samples: list[np.ndarray], mask_id: int) -> list[int]:
    """Index of the sample each row was built from: rows keep the sample order and a dropped
    sample leaves no row, so each row rebuilds one of the samples after the previous row's."""
    matched, j = [], 0
    for b in range(len(batch["sep"])):
        part_a, segments, _ = row_layout(batch, b)
        rebuilt = [token for _, token in sorted(token_origins(part_a, segments, mask_id)[0])]
        while j < len(samples) and samples[j].tolist() != rebuilt:
            j += 1
        assert j < len(samples), f"row {b} rebuilds none of the remaining samples"
        matched.append(j)
        j += 1
    return matched


def assert_same_batch(first: dict, second: dict) -> None:
    assert first.keys() == second.keys() and first["objective"] == second["objective"]
    for key in (*bi._FIELDS, "sep"):
        assert torch.equal(first[key], second[key]), key


@settings(max_examples=80, deadline=None)
@given(packed_micro_batches(), st.integers(0, 2**32 - 1))
def test_span_objective_invariants_over_random_packings(samples, seed):
    budgets = [int(0.15 * len(tokens)) for tokens in samples]
    # Lengths drawn until they reach the budget b sum to at most b + 38 over at most b spans, so a
    # document of 2b + 37 tokens holds them all with their separators: such a sample always fits.
    always_fits = {i for i, tokens in enumerate(samples) if longest_document(tokens) >= 2 * budgets[i] + 37}
    try:
        batch = collate_with_seed("span", samples, seed)
    except ValueError as error:
        assert "too short" in str(error) and not always_fits
        return
    assert batch["objective"] == "span"
    rows = rows_to_samples(batch, samples, M)
    assert always_fits <= set(rows)
    for b, i in enumerate(rows):
        original, budget = samples[i], budgets[i]
        spans = check_layout_row(batch, b, original, M)
        lengths = [end - start for start, end in spans]
        assert int(batch["loss_mask"][b].sum()) == sum(length + 1 for length in lengths)
        assert all(1 <= length <= 39 for length in lengths)
        allowed = inside_documents(original)
        assert all(allowed[start:end].all() for start, end in spans)
        # spans never touch: at least one unmasked token between consecutive spans
        assert all(end < start for (_, end), (start, _) in itertools.pairwise(spans))
        # drawn until the masked count reaches int(0.15 n): reached, and not before the last draw
        assert sum(lengths) >= budget
        assert sum(lengths) - max(lengths) < budget if lengths else budget == 0
    assert_same_batch(batch, collate_with_seed("span", samples, seed))


@settings(max_examples=60, deadline=None)
@given(packed_micro_batches(), st.integers(0, 2**32 - 1))
def test_sentence_objective_invariants_over_random_packings(samples, seed):
    batch = collate_with_seed("sentence", samples, seed)
    assert batch["objective"] == "sentence"
    assert len(batch["sep"]) == len(samples)  # never dropped
    for b, original in enumerate(samples):
        spans = check_layout_row(batch, b, original, SM)
        lengths = [end - start for start, end in spans]
        assert int(batch["loss_mask"][b].sum()) == sum(length + 1 for length in lengths)
        sentences = reference_split_sentences(original.tolist())
        assert set(spans) <= set(sentences)
        # shuffled sentences taken until they cover int(0.15 n), the crossing one included
        budget, covered = int(0.15 * len(original)), sum(lengths)
        assert bool(spans) == bool(sentences)
        if covered < budget:
            assert spans == sentences
        elif len(spans) > 1:
            assert covered - max(lengths) < budget
    assert_same_batch(batch, collate_with_seed("sentence", samples, seed))


@settings(max_examples=60, deadline=None)
@given(packed_micro_batches(), st.integers(0, 2**32 - 1))
def test_document_objective_invariants_over_random_packings(samples, seed):
    batch = collate_with_seed("document", samples, seed)
    assert batch["objective"] == "document"
    assert len(batch["sep"]) == len(samples)  # never dropped
    sizes = [len(tokens) for tokens in samples]
    generated = [n - int(batch["sep"][b]) + 1 for b, n in enumerate(sizes)]
    # one length G per micro-batch, uniform over [int(0.5 * shortest), longest - 2], clipped to n - 2
    low = max(1, int(0.5 * min(sizes)))
    assert low <= max(generated) <= max(low, max(sizes) - 2)
    assert generated == [min(max(generated), n - 2) for n in sizes]
    for b, original in enumerate(samples):
        ((start, end),) = check_layout_row(batch, b, original, GM)
        assert end - start == generated[b]
        sep = int(batch["sep"][b])
        _, ((_, _, targets, _),), length = row_layout(batch, b)
        part_b_loss = batch["loss_mask"][b, sep:length].tolist()
        if targets[-1] == E:  # one long span inside the only document
            assert EOS not in original[:-1].tolist()
            assert inside_documents(original)[start:end].all()
            assert part_b_loss == [1] * (end - start + 1)
        else:  # suffix generation (forced when the sample has several documents): no [eop]
            assert end == len(original)
            assert part_b_loss == (original[start:] != CLS).astype(int).tolist()
    assert_same_batch(batch, collate_with_seed("document", samples, seed))


# ------------------------------------------------------------------------------------------
# Span statistics against the exact stopping-rule expectation
# ------------------------------------------------------------------------------------------


def expected_span_count(budget: int, weights: list[float]) -> float:
    """Exact E[K] for K = the number of lengths drawn (i.i.d. from `weights`) until their sum
    reaches `budget`.

    K counts the partial sums S_0 = 0, S_1, ... that are still below the budget (one more draw is
    made from each), so E[K] = sum_{s < budget} u(s), where u(s) = P(some partial sum equals s)
    follows the renewal recursion u(0) = 1, u(s) = sum_l p_l u(s - l).
    """
    p = np.asarray(weights) / np.sum(weights)
    u = np.zeros(max(budget, 1))
    u[0] = 1.0
    for s in range(1, budget):
        lengths = np.arange(1, min(s, len(p)) + 1)
        u[s] = float(np.dot(p[lengths - 1], u[s - lengths]))
    return float(u[:budget].sum())


def test_expected_span_count_by_brute_force():
    # two lengths {1, 2} with equal weights, budget 3: enumerate every draw sequence
    # 1,1,1 (1/8: K=3) 1,1,2 (1/8: 3) 1,2 (1/4: 2) 2,1 (1/4: 2) 2,2 (1/4: 2) -> E[K] = 9/4
    assert expected_span_count(3, [1.0, 1.0]) == pytest.approx(9 / 4)
    assert expected_span_count(0, [1.0, 1.0]) == 0.0
    assert expected_span_count(1, [0.3, 0.7]) == pytest.approx(1.0)


def test_span_statistics_match_the_truncated_poisson_stopping_rule():
    """Mean span length and spans per sample over 1,200 packed 512-token samples.

    Compared exactly: the lengths are i.i.d. truncated Poisson(3) over 1..39 (probabilities p_l)
    drawn until their sum reaches b = int(0.15 * 512) = 76. The mean number of spans per sample
    converges to E[K] (renewal recursion above) and the pooled mean span length (all masked tokens
    / all spans) to mu = sum_l l p_l by Wald's identity E[S_K] = mu E[K]; the pooled ratio has an
    O(1/N) bias only, and the standard errors at N = 1,200 are about 0.3 % of each value.
    Placement would bias both only through dropped samples (a sample whose spans do not fit); every
    sample here has a document of at least 2b + 37 tokens, which always holds all spans, so
    nothing is dropped and the placement does not enter the comparison.
    """
    from datamodules.corpus import TokenizedCorpus
    from datamodules.pretrain import PackedSampleDataset

    rng = np.random.default_rng(0)
    # Words only and windows of long documents taken where they fall (the official
    # non-sentence-start switch), so no cut moves to a sentence boundary: a sample has 512 tokens
    # unless its last document would start within two tokens of the end (it then ends earlier).
    documents = [rng.integers(10, 40, size=rng.integers(200, 800)) for _ in range(300)]
    corpus = TokenizedCorpus.from_documents(documents)
    dataset = PackedSampleDataset(corpus, TOK, 512, num_samples=1300, non_sentence_start=1.0)
    samples = [tokens for tokens in map(dataset.__getitem__, range(len(dataset))) if len(tokens) == 512]
    samples = samples[:1200]
    assert len(samples) == 1200
    budget = int(0.15 * 512)
    assert all(longest_document(tokens) >= 2 * budget + 37 for tokens in samples)
    # realistic shapes: windows of one long document and packings of two or three documents
    documents_per_sample = [np.count_nonzero(tokens == CLS) for tokens in samples]
    assert 0.2 < np.mean(np.greater(documents_per_sample, 1)) < 0.8

    collator = BlankInfillingCollator(TOK, seed=0)
    spans = masked = 0
    for i in range(0, len(samples), 16):
        batch = collator(samples[i : i + 16])
        assert len(batch["sep"]) == 16  # nothing dropped
        for b in range(16):
            part_b = batch["position_ids"][b, 1, int(batch["sep"][b]) :]
            k = int((part_b == 1).sum())
            spans += k
            masked += int((part_b > 0).sum()) - k  # Part B holds len + 1 slots per span

    # Poisson(3) weights 3^l / l! of the lengths 1..39, normalised
    weights = [3.0**length / math.factorial(length) for length in range(1, 40)]
    mean_length = sum(length * w for length, w in enumerate(weights, start=1)) / sum(weights)
    assert masked / spans == pytest.approx(mean_length, rel=0.03)
    assert spans / len(samples) == pytest.approx(expected_span_count(budget, weights), rel=0.03)

"""Decoding on the KV cache and multi-blank infilling (official `generate_samples.py`)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from glm_lightning.generation import (
    apply_min_length,
    apply_no_repeat_ngram,
    apply_top_k,
    apply_top_p,
    banned_ngram_tokens,
    fill_blanks,
    generate,
    infilling_context,
)
from glm_lightning.model import GLMConfig, GLMModel

VOCAB, SOP, EOP, EOS = 300, 290, 291, 292


@pytest.fixture(scope="module")
def model() -> GLMModel:
    torch.manual_seed(0)
    return GLMModel(GLMConfig.from_name("tiny", vocab_size=VOCAB)).double().eval()


def context_inputs(contexts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded Part A rows with positions 0..n-1 (padding at position 0, block 0)."""
    length = max(map(len, contexts))
    ids = torch.zeros(len(contexts), length, dtype=torch.long)
    positions = torch.zeros(len(contexts), 2, length, dtype=torch.long)
    for b, c in enumerate(contexts):
        ids[b, :len(c)] = torch.tensor(c)
        positions[b, 0, :len(c)] = torch.arange(len(c))
    return ids, positions, torch.tensor([len(c) for c in contexts])


def part_b_logits(model: GLMModel, context: list[int], blocks: list[tuple[int, list[int]]]) -> torch.Tensor:
    """One full forward over ``context + [sop] fill_1 + [sop] fill_2 ...`` laid out as Part B in
    pretraining: block i at (its mask position, 1, 2, ...), sep = len(context)."""
    ids, dim1, dim2 = list(context), list(range(len(context))), [0] * len(context)
    for mask_position, tokens in blocks:
        ids += tokens
        dim1 += [mask_position] * len(tokens)
        dim2 += list(range(1, len(tokens) + 1))
    position_ids = torch.tensor([[dim1, dim2]])
    return model(torch.tensor([ids]), position_ids, torch.tensor([len(context)]))[0]


def start_block(mask_position: int, prefix: list[int]) -> tuple[int, list[int]]:
    return mask_position, [SOP, *prefix]


# ----------------------------------------------------------------------------------------------
# Greedy on the cache = argmax of full forwards
# ----------------------------------------------------------------------------------------------

def test_greedy_with_cache_equals_argmax_of_full_forwards(model: GLMModel) -> None:
    g = torch.Generator().manual_seed(3)
    context = torch.randint(0, 280, (11,), generator=g).tolist()
    for mask_position in (0, 4, 10):
        expected: list[int] = []
        for _ in range(8):
            logits = part_b_logits(model, context, [start_block(mask_position, expected)])
            token = int(logits[-1].argmax())
            if token in (EOP, EOS):
                break
            expected.append(token)
        ids, positions, sep = context_inputs([context])
        got = generate(model, ids, positions, sep, torch.tensor([mask_position]), sop_id=SOP,
                       eop_id=EOP, eos_id=EOS, max_new_tokens=8)
        assert got == [expected]
        assert len(expected) == 8


def test_beam_search_with_one_beam_equals_greedy(model: GLMModel) -> None:
    ids, positions, sep = context_inputs([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17], [1, 2, 3]])
    masks = torch.tensor([2, 7, 0])
    for options in ({}, {"min_length": 3, "no_repeat_ngram_size": 2}):
        common = dict(sop_id=SOP, eop_id=EOP, eos_id=EOS, max_new_tokens=10, **options)
        greedy = generate(model, ids, positions, sep, masks, strategy="greedy", **common)
        beam = generate(model, ids, positions, sep, masks, strategy="beam", num_beams=1, **common)
        assert beam == greedy


def test_batched_decoding_equals_decoding_each_sample_alone(model: GLMModel) -> None:
    g = torch.Generator().manual_seed(5)
    contexts = [torch.randint(0, 280, (n,), generator=g).tolist() for n in (5, 12, 9)]
    masks = [1, 11, 4]
    strategies = [
        dict(strategy="greedy"),
        dict(strategy="greedy", min_length=4, no_repeat_ngram_size=2),
        dict(strategy="beam", num_beams=3, length_penalty=0.7, no_repeat_ngram_size=3),
        dict(strategy="sample", top_k=1),
    ]
    for options in strategies:
        common = dict(sop_id=SOP, eop_id=EOP, eos_id=EOS, max_new_tokens=7, **options)
        batched = generate(model, *context_inputs(contexts), torch.tensor(masks), **common)
        alone = [generate(model, *context_inputs([c]), torch.tensor([m]), **common)[0]
                 for c, m in zip(contexts, masks, strict=True)]
        assert batched == alone, options


# ----------------------------------------------------------------------------------------------
# Search logic on hand-set next-token distributions
# ----------------------------------------------------------------------------------------------

FLOOR = -1e4  # log-probability of every token a table row does not list
SOP_T, EOP_T, EOS_T = 100, 101, 102


class TableModel(GLMModel):
    """A GLM whose next-token log-probabilities depend only on the last input token, read from a
    table; the cache still advances, so the decoding loop runs exactly as with a real model."""

    def __init__(self, rows: dict[int, dict[int, float]]):
        super().__init__(GLMConfig(num_layers=1, hidden_size=8, num_attention_heads=2, vocab_size=128,
                                   max_sequence_length=64))
        self.table = torch.full((128, 128), FLOOR)
        self.table[:, EOP_T] = 0.0  # unlisted rows end at once
        for prev, nexts in rows.items():
            self.table[prev] = FLOOR
            for token, p in nexts.items():
                self.table[prev, token] = math.log(p)
        self.eval()

    def forward(self, input_ids, position_ids, *args, **kwargs):  # noqa: ANN001, ANN201
        super().forward(input_ids, position_ids, *args, **kwargs)
        return self.table[input_ids]



def table_generate(rows: dict[int, dict[int, float]], batch: int = 1, **options) -> list[list[int]]:
    ids, positions, sep = context_inputs([[1, 2, 3]] * batch)
    return generate(TableModel(rows), ids, positions, sep, torch.tensor([1] * batch), sop_id=SOP_T,
                    eop_id=EOP_T, eos_id=EOS_T, **options)


def exhaustive_best(rows: dict[int, dict[int, float]], max_new_tokens: int,
                    length_penalty: float) -> list[int]:
    """The best sequence by sum log p / length ** length_penalty, over the sequences that end
    with [eop] (its log p included) and those cut at ``max_new_tokens``."""
    scored = []
    frontier = [([], 0.0, SOP_T)]
    while frontier:
        tokens, logp, last = frontier.pop()
        for token, p in rows.get(last, {EOP_T: 1.0}).items():
            if token == EOP_T:
                scored.append(((logp + math.log(p)) / max(len(tokens), 1) ** length_penalty, tokens))
            elif len(tokens) + 1 < max_new_tokens:
                frontier.append((tokens + [token], logp + math.log(p), token))
            else:
                scored.append(((logp + math.log(p)) / max_new_tokens ** length_penalty, tokens + [token]))
    return max(scored)[1]


GREEDY_TRAP = {
    SOP_T: {1: 0.6, 2: 0.4},
    1: {3: 0.4, 4: 0.35, 5: 0.25},
    2: {6: 0.9, 7: 0.1},
}


def test_beam_search_finds_the_best_sequence_where_greedy_does_not() -> None:
    assert table_generate(GREEDY_TRAP, strategy="greedy") == [[1, 3]]  # p = 0.24
    assert table_generate(GREEDY_TRAP, strategy="beam", num_beams=2) == [[2, 6]]  # p = 0.36
    assert exhaustive_best(GREEDY_TRAP, 8, 1.0) == [2, 6]


LENGTHS = {  # [1]: 0.33, [1, 3]: 0.22, [2, 8]: 0.18, [2, 4, 5]: 0.162, [2, 4, 9]: 0.108
    SOP_T: {1: 0.55, 2: 0.45},
    1: {EOP_T: 0.6, 3: 0.4},
    2: {4: 0.6, 8: 0.4},
    4: {5: 0.6, 9: 0.4},
}


@pytest.mark.parametrize(("length_penalty", "expected"), [(0.0, [1]), (1.0, [2, 4, 5]), (2.0, [2, 4, 5])])
def test_length_penalty_changes_the_winner(length_penalty: float, expected: list[int]) -> None:
    got = table_generate(LENGTHS, strategy="beam", num_beams=3, length_penalty=length_penalty)
    assert got == [expected]
    assert exhaustive_best(LENGTHS, 8, length_penalty) == expected


def test_beam_search_matches_exhaustive_search_on_a_random_sparse_chain() -> None:
    rng = torch.Generator().manual_seed(0)
    rows = {}
    for prev in [SOP_T, *range(1, 9)]:
        successors = torch.randperm(8, generator=rng)[:3].add(1).tolist() + [EOP_T]
        weights = torch.rand(4, generator=rng) + 0.05
        rows[prev] = dict(zip(successors, (weights / weights.sum()).tolist(), strict=True))
    for length_penalty in (0.0, 1.0):
        got = table_generate(rows, batch=2, strategy="beam", num_beams=40, max_new_tokens=4,
                             length_penalty=length_penalty)
        expected = exhaustive_best(rows, 4, length_penalty)
        assert got == [expected, expected]


EARLY_END = {SOP_T: {1: 0.3, EOP_T: 0.7}, 1: {EOP_T: 0.8, 2: 0.2}, 2: {EOP_T: 0.9, 3: 0.1},
             3: {EOP_T: 0.9, 4: 0.1}}


def test_min_length_blocks_the_end_token() -> None:
    assert table_generate(EARLY_END, strategy="greedy") == [[]]
    assert table_generate(EARLY_END, strategy="greedy", min_length=3) == [[1, 2, 3]]
    assert table_generate(EARLY_END, strategy="beam", num_beams=3, min_length=3) == [[1, 2, 3]]
    sampled = table_generate(EARLY_END, batch=20, strategy="sample", min_length=2,
                             generator=torch.Generator().manual_seed(0))
    assert all(len(s) >= 2 for s in sampled)


LOOP = {SOP_T: {1: 1.0}, 1: {2: 0.7, 3: 0.2, EOP_T: 0.1}, 2: {1: 0.7, 3: 0.2, EOP_T: 0.1},
        3: {1: 0.5, 2: 0.4, EOP_T: 0.1}}


def repeats_ngram(tokens: list[int], n: int) -> bool:
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) != len(set(grams))


def test_no_repeat_ngram_is_enforced() -> None:
    assert table_generate(LOOP, strategy="greedy", max_new_tokens=8) == [[1, 2, 1, 2, 1, 2, 1, 2]]
    assert table_generate(LOOP, strategy="greedy", no_repeat_ngram_size=2) == [[1, 2, 1, 3, 1]]
    for strategy, extra in (("beam", {"num_beams": 3}), ("sample", {"generator": torch.Generator()})):
        for n in (2, 3):
            out = table_generate(LOOP, batch=4, strategy=strategy, no_repeat_ngram_size=n,
                                 max_new_tokens=12, **extra)
            assert not any(repeats_ngram(s, n) for s in out)


def test_sampling_follows_the_filtered_distribution() -> None:
    rows = {SOP_T: {1: 0.6, 2: 0.3, 3: 0.1}}
    gen = torch.Generator().manual_seed(0)
    first = [s[0] for s in table_generate(rows, batch=400, strategy="sample", generator=gen)]
    assert abs(first.count(1) / 400 - 0.6) < 0.08 and first.count(3) > 0
    for options in ({"top_k": 1}, {"top_p": 0.5}, {"temperature": 0.01}):
        out = table_generate(rows, batch=50, strategy="sample", generator=gen, **options)
        assert out == [[1]] * 50, options
    out = table_generate(rows, batch=200, strategy="sample", generator=gen, top_k=2)
    assert {s[0] for s in out} == {1, 2}
    seeded = [table_generate(rows, batch=30, strategy="sample", generator=torch.Generator().manual_seed(7))
              for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_logits_processors() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    assert apply_min_length(logits, 1, 2, [3])[0, 3] == -math.inf
    assert torch.equal(apply_min_length(logits, 2, 2, [3]), logits)
    assert banned_ngram_tokens([1, 2, 3, 1, 2], 3) == [3]
    assert banned_ngram_tokens([1, 2, 1], 2) == [2]
    assert banned_ngram_tokens([1, 2], 3) == []
    assert apply_no_repeat_ngram(logits, [[1, 2, 1]], 2)[0].tolist() == [0.0, 1.0, -math.inf, 3.0]
    assert torch.isinf(apply_top_k(logits, 2)).tolist() == [[True, True, False, False]]
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4]]).log()
    assert torch.isinf(apply_top_p(probs, 0.6)).tolist() == [[True, True, False, False]]
    assert torch.isinf(apply_top_p(probs, 0.05)).tolist() == [[True, True, True, False]]


# ----------------------------------------------------------------------------------------------
# Multi-blank infilling
# ----------------------------------------------------------------------------------------------

class RecordingModel(GLMModel):
    """Records (cached length, inputs, logits) of every forward (a forward that returns hidden
    states, as the context's does, is recorded with their logits); optionally forces the tokens of
    chosen blanks (keyed by mask position) by overriding the last row's logits."""

    def __init__(self, config: GLMConfig, eop_id: int):
        super().__init__(config)
        self.eop_id = eop_id
        self.calls: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.forced: dict[int, list[int]] = {}

    def forward(self, input_ids, position_ids, sep=None, attention_mask=None, kv_cache=None, **kw):  # noqa: ANN001, ANN201
        past = kv_cache.length if kv_cache is not None else 0
        logits = super().forward(input_ids, position_ids, sep, attention_mask, kv_cache, **kw)
        if kv_cache is None:
            return logits
        if kw.get("return_hidden"):
            hidden = logits
            self.calls.append((past, input_ids.clone(), position_ids.clone(),
                               F.linear(hidden, self.word_embeddings.weight).float()))
            return hidden
        self.calls.append((past, input_ids.clone(), position_ids.clone(), logits.clone()))
        mask_position, block = position_ids[0, :, -1].tolist()
        if block > 0 and mask_position in self.forced:
            fill = self.forced[mask_position]
            token = fill[block - 1] if block - 1 < len(fill) else self.eop_id
            logits[:, -1] = -1e4
            logits[:, -1, token] = 0.0
        return logits


@pytest.fixture(scope="module")
def lm(tokenizer) -> RecordingModel:  # noqa: ANN001
    torch.manual_seed(1)
    config = GLMConfig.from_name("tiny", vocab_size=len(tokenizer))
    return RecordingModel(config, tokenizer.eop_id).double().eval()


TEXT = "The bright [MASK] predicts the [sMASK] and the river [MASK] quickly."


def check_layout(lm: RecordingModel, context: list[int], masks: list[int], fills: list[list[int]],
                 sop_id: int, *, beams: bool = False) -> None:
    """Every cached forward (rows of batch 1, or the identical rows of a blank's first step) equals
    the same slots of one full forward over the Part-B layout ``[sop] fill_1 [sop] fill_2 ...``."""
    blocks = [(m, [sop_id, *f]) for m, f in zip(masks, fills, strict=True)]
    full = part_b_logits(lm, context, blocks)
    full_ids = context + [t for _, b in blocks for t in b]
    covered = set()
    for past, ids, positions, logits in lm.calls:
        n = ids.shape[1]
        if ids.shape[0] > 1 and positions[0, 1, 0] != 1:
            continue  # beam steps after a blank's [sop]: the rows hold different hypotheses
        assert ids[0].tolist() == full_ids[past:past + n]
        torch.testing.assert_close(logits[0], full[past:past + n], rtol=1e-9, atol=1e-9)
        covered.update(range(past, past + n))
    # Only the last blank's final token may be left unfed (nothing is decoded after it); with beams
    # the last blank is checked up to its [sop].
    needed = len(full_ids) - len(fills[-1]) if beams else len(full_ids) - 1
    assert set(range(needed)) <= covered <= set(range(len(full_ids)))


def test_fill_blanks_uses_part_b_positions_and_later_blanks_see_earlier_fills(lm, tokenizer) -> None:  # noqa: ANN001
    context, masks = infilling_context(tokenizer, TEXT)
    assert len(masks) == 3 and context[0] == tokenizer.cls_id and context[-1] == tokenizer.eos_id
    lm.calls.clear()
    fills = fill_blanks(lm, tokenizer, TEXT, max_new_tokens=5, return_ids=True)
    assert [len(f) for f in fills] == [5, 5, 5]
    check_layout(lm, context, masks, fills, tokenizer.sop_id)
    # Greedy: each generated token is the argmax of the full layout at the slot before it.
    blocks = [(m, [tokenizer.sop_id, *f]) for m, f in zip(masks, fills, strict=True)]
    full = part_b_logits(lm, context, blocks)
    slot = len(context)
    for fill in fills:
        assert full[slot:slot + len(fill)].argmax(-1).tolist() == fill
        slot += len(fill) + 1

    def second_blank_logits(first_fill: list[int]) -> list[torch.Tensor]:
        lm.calls.clear()
        lm.forced = {masks[0]: first_fill}
        try:
            fills = fill_blanks(lm, tokenizer, TEXT, max_new_tokens=4, return_ids=True)
        finally:
            lm.forced = {}
        assert fills[0] == first_fill
        check_layout(lm, context, masks, fills, tokenizer.sop_id)
        start = len(context) + len(first_fill) + 1  # the second blank's [sop]
        return [logits[0, -1] for past, ids, _, logits in lm.calls if past + ids.shape[1] - 1 >= start][:4]

    a, b = second_blank_logits([7, 8]), second_blank_logits([9])
    assert not torch.allclose(a[-1], b[-1])
    assert not torch.allclose(a[0], b[0])


def test_fill_blanks_beam_search_keeps_the_chosen_fill_in_the_cache(lm, tokenizer) -> None:  # noqa: ANN001
    context, masks = infilling_context(tokenizer, TEXT)
    lm.calls.clear()
    fills = fill_blanks(lm, tokenizer, TEXT, strategy="beam", num_beams=3, max_new_tokens=4,
                        return_ids=True)
    check_layout(lm, context, masks, fills, tokenizer.sop_id, beams=True)


def test_fill_blanks_text_and_contexts(lm, tokenizer) -> None:  # noqa: ANN001
    fills = fill_blanks(lm, tokenizer, TEXT, max_new_tokens=3, return_ids=True)
    text = fill_blanks(lm, tokenizer, TEXT, max_new_tokens=3)
    pieces = iter(fills)
    expected = [t for t in tokenizer.encode(TEXT) for t in
                (next(pieces) if t in (tokenizer.mask_id, tokenizer.smask_id) else [t])]
    assert text == tokenizer.decode(expected)
    assert "[MASK]" not in text and "[sMASK]" not in text

    no_mask, masks = infilling_context(tokenizer, "The river")
    assert no_mask[-1] == tokenizer.gmask_id and masks == [len(no_mask) - 1]
    ends_with_gmask, _ = infilling_context(tokenizer, "The river [gMASK]")
    assert ends_with_gmask == no_mask
    completed = fill_blanks(lm, tokenizer, "The river", max_new_tokens=3)
    assert completed.startswith(tokenizer.decode(no_mask[1:-1]))
    lm.train()
    fill_blanks(lm, tokenizer, "The river", max_new_tokens=2)
    assert lm.training
    lm.eval()


def test_decoding_options_reach_fill_blanks(lm, tokenizer) -> None:  # noqa: ANN001
    fills = fill_blanks(lm, tokenizer, TEXT, max_new_tokens=12, no_repeat_ngram_size=1, return_ids=True)
    assert all(len(set(f)) == len(f) == 12 for f in fills)
    lm.forced = {m: [] for m in infilling_context(tokenizer, TEXT)[1]}  # [eop] first everywhere
    try:
        assert fill_blanks(lm, tokenizer, TEXT, return_ids=True) == [[], [], []]
        fills = fill_blanks(lm, tokenizer, TEXT, min_length=2, max_new_tokens=4, return_ids=True)
    finally:
        lm.forced = {}
    assert all(len(f) >= 2 for f in fills)

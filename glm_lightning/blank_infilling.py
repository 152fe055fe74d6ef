"""Autoregressive blank infilling: GLM's corruption of packed samples (paper §2.1; `blocklm_utils.py`).

From a packed sample `x` (documents, each `[CLS] doc eos`) some spans are sampled; each span is
replaced by one mask token (Part A) and the spans are appended, in a shuffled order, as Part B, each
as `[sop] span` with targets `span [eop]`. Every token carries two positions: dim 1 is its position in
the corrupted text (a Part-B token gets its span's mask position), dim 2 its position inside its span
(0 in Part A, 1.. in Part B). `sep` is the length of Part A, which attends bidirectionally; Part B is
causal.

Three objectives vary the number and length of the spans: token level ("span", short Poisson
spans, 15 % of the tokens), sentence level (whole sentences, 15 %) and document level (one long span,
50-100 % of the text). The module follows the official `ConstructBlockStrategy`, including the order
of its random draws; the few places where it must differ (inputs on which the official code
crashes) say so. The layout functions are pure, the sampling helpers take an explicit
`random.Random`, and `BlankInfillingCollator` ties them together with one objective per
micro-batch.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.utils.data

Span = tuple[int, int]

# Layout tasks of `build_block_sample`; the official names "gap_sentence" and "gpt" are aliases.
TASKS = ("bert", "sentence", "generation")
_TASK_ALIASES = {"gap_sentence": "sentence", "gpt": "generation"}

OBJECTIVES = ("span", "sentence", "document", "masked_lm")

# The four fields of a built sample / batch besides `sep`.
_FIELDS = ("input_ids", "target_ids", "loss_mask", "position_ids")


class BlankInfillingTokenizer(Protocol):
    """What the corruption needs from a tokenizer (`glm_lightning.tokenizer.GLMTokenizer`)."""

    cls_id: int
    mask_id: int
    smask_id: int
    gmask_id: int
    sop_id: int
    eop_id: int
    eos_id: int

    def sentinel_mask_id(self, i: int) -> int: ...

    def sentinel_sop_id(self, i: int) -> int: ...

    def sentence_end_table(self) -> np.ndarray: ...


@dataclass(frozen=True)
class SyntheticCommandIds:
    """Command-token ids for token streams made without a tokenizer (benchmarks, golden tests):
    the token-level corruption needs only these; ids from 10 up are free for words."""

    eos_id: int = 0
    cls_id: int = 1
    mask_id: int = 2
    smask_id: int = 3
    gmask_id: int = 4
    sop_id: int = 5
    eop_id: int = 6


class FoundEOSInTarget(ValueError, RuntimeError):
    """A span covers the end-of-document token (the official code raises RuntimeError here)."""


# ---------------------------------------------------------------------------------------------
# Span sampling (token level)
# ---------------------------------------------------------------------------------------------


def span_length_weights(poisson_lambda: float = 3.0, max_span_length: int = 40) -> list[float]:
    """Poisson(lambda) pmf of the span lengths 1 .. max_span_length - 1 (unnormalised weights)."""
    lam = poisson_lambda
    return [math.exp(k * math.log(lam) - math.lgamma(k + 1) - lam) for k in range(1, max_span_length)]


def sample_span_lengths(
    rng: random.Random, num_tokens: int, weights: Sequence[float], *, mask_ratio: float = 0.15
) -> list[int]:
    """Draw Poisson span lengths until they cover at least int(mask_ratio * num_tokens) tokens.

    `num_tokens` counts the [CLS] and eos tokens of the packed sample, as the official code does;
    the last draw may overshoot the budget.
    """
    population = range(1, len(weights) + 1)
    cum_weights = list(itertools.accumulate(weights))
    budget = int(mask_ratio * num_tokens)
    lengths: list[int] = []
    total = 0
    while total < budget:
        length = rng.choices(population, cum_weights=cum_weights)[0]
        lengths.append(length)
        total += length
    return lengths


def split_documents(tokens: np.ndarray, *, eos_id: int, cls_id: int) -> list[tuple[int, int]]:
    """(offset, length) of the documents of a packed sample, shortest first.

    Documents are cut at eos and never include [CLS] or eos; when the sample does not end with eos
    (it was truncated), the last token of the trailing document is excluded too. The list is built
    from the last document to the first and stably sorted by length, so among equally long
    documents the earliest one counts as the longest (as in the official code).
    """
    n = len(tokens)
    boundaries = [-1, *np.flatnonzero(tokens == eos_id).tolist()]
    documents = []
    last = n
    for index in reversed(boundaries):
        start = index
        if start + 1 < n and tokens[start + 1] == cls_id:
            start += 1
        length = last - start - 1
        if last == n and length > 0:
            length -= 1
        documents.append((start + 1, length))
        last = index
    documents.sort(key=lambda doc: doc[1])
    return documents


def assign_spans_to_documents(
    documents: Sequence[tuple[int, int]], span_lengths: Sequence[int], *, mask_ratio: float = 0.15
) -> list[tuple[int, int, list[int]]]:
    """Greedy share of the span lengths among documents sorted shortest first.

    A shorter document takes lengths (in list order) while their sum stays <= int(mask_ratio *
    doc_len); the longest document takes the remaining lengths that fit with one unmasked separator
    between consecutive spans. Returns (offset, doc_len, lengths) for every document that got spans;
    lengths that fit nowhere are left out (the caller drops such a sample).
    """
    assigned = []
    next_length = 0
    for i, (offset, doc_len) in enumerate(documents):
        is_longest = i == len(documents) - 1
        limit = doc_len if is_longest else int(doc_len * mask_ratio)
        taken: list[int] = []
        for length in span_lengths[next_length:]:
            # the longest document must also hold one separator between consecutive spans
            separators = len(taken) if is_longest else 0
            if sum(taken) + length + separators > limit:
                break
            taken.append(length)
        if taken:
            assigned.append((offset, doc_len, taken))
            next_length += len(taken)
    return assigned


def place_spans(
    span_lengths: Sequence[int], doc_length: int, rng: random.Random, offset: int = 0
) -> list[Span]:
    """Random placement of spans (in the given order) in a document of `doc_length` tokens.

    With G free tokens and k spans, k independent draws from [0, G - k + 1], sorted, put span i at
    offset + place_i + sum_{j<i}(len_j + 1): spans keep their order and are separated by at least
    one unmasked token. Every such configuration is reachable (not with equal probability: sorted
    independent draws, as in the official code).
    """
    free = doc_length - sum(span_lengths)
    high = free - len(span_lengths) + 1
    places = sorted(rng.randrange(high + 1) for _ in span_lengths)
    spans = []
    for place, length in zip(places, span_lengths, strict=True):
        spans.append((offset + place, offset + place + length))
        offset += length + 1
    return spans


def sample_spans_in_documents(
    tokens: np.ndarray,
    span_lengths: Sequence[int],
    rng: random.Random,
    *,
    eos_id: int,
    cls_id: int,
    mask_ratio: float = 0.15,
) -> list[Span]:
    """Spans of the given lengths (shuffled) placed inside the documents of a packed sample.

    Fewer spans than lengths are returned when they do not all fit. Spans come in document order
    (shortest document first), left to right inside each document.
    """
    lengths = list(span_lengths)
    rng.shuffle(lengths)
    documents = split_documents(tokens, eos_id=eos_id, cls_id=cls_id)
    spans: list[Span] = []
    for offset, doc_len, doc_lengths in assign_spans_to_documents(documents, lengths, mask_ratio=mask_ratio):
        spans += place_spans(doc_lengths, doc_len, rng, offset)
    return spans


# ---------------------------------------------------------------------------------------------
# Sentence level
# ---------------------------------------------------------------------------------------------


def split_sentences(tokens: np.ndarray, sentence_end: np.ndarray, *, eos_id: int, cls_id: int) -> list[Span]:
    """Sentences of a packed sample as (start, end) spans, in text order.

    A sentence ends at (and includes) a token containing a sentence-end character; eos starts a new
    sentence after it (so eos is never inside one); a leading [CLS] is skipped and a trailing
    fragment is a sentence. `sentence_end` is the tokenizer's bool table over the vocabulary.
    """
    tokens = np.asarray(tokens)
    n = len(tokens)
    first = 1 if n and tokens[0] == cls_id else 0
    is_eos = tokens == eos_id
    is_end = sentence_end[tokens] & ~is_eos
    cuts = np.flatnonzero(is_end | is_eos)
    starts = np.maximum(first, np.concatenate(([first], cuts[:-1] + 1)))
    ends = cuts + 1
    keep = is_end[cuts] & (starts < ends)
    sentences = list(zip(starts[keep].tolist(), ends[keep].tolist(), strict=True))
    tail = cuts[-1] + 1 if len(cuts) else first
    if tail < n:
        sentences.append((int(tail), n))
    return sentences


def select_gap_sentences(
    sentences: Sequence[Span], num_tokens: int, rng: random.Random, *, ratio: float = 0.15
) -> list[Span]:
    """Shuffled sentences taken until they cover >= int(ratio * num_tokens) tokens (the crossing
    sentence included)."""
    shuffled = list(sentences)
    rng.shuffle(shuffled)
    budget = int(ratio * num_tokens)
    selected: list[Span] = []
    covered = 0
    for start, end in shuffled:
        selected.append((start, end))
        covered += end - start
        if covered >= budget:
            break
    return selected


# ---------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------


def _as_tokens(tokens: Any) -> np.ndarray:
    array = np.asarray(tokens, dtype=np.int64)
    if array.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {array.shape}")
    return array


def default_loss_mask(tokens: np.ndarray, cls_id: int) -> np.ndarray:
    """Loss mask of a packed sample without one: 0 on [CLS], 1 elsewhere (as the data pipeline)."""
    return (np.asarray(tokens) != cls_id).astype(np.int64)


def _check_spans(spans: Sequence[Span], num_tokens: int) -> np.ndarray:
    array = np.asarray(list(spans), dtype=np.int64).reshape(-1, 2)
    starts, ends = array[:, 0], array[:, 1]
    if np.any(starts < 0) or np.any(ends > num_tokens) or np.any(starts >= ends):
        raise ValueError(f"spans must satisfy 0 <= start < end <= {num_tokens}: {list(spans)}")
    by_start = np.argsort(starts, kind="stable")
    if np.any(ends[by_start][:-1] > starts[by_start][1:]):
        raise ValueError(f"spans overlap: {list(spans)}")
    return array


def _check_order(order: Sequence[int] | None, num_spans: int) -> np.ndarray:
    if order is None:
        return np.arange(num_spans)
    array = np.asarray(list(order), dtype=np.int64)
    if sorted(array.tolist()) != list(range(num_spans)):
        raise ValueError(f"order must be a permutation of range({num_spans}), got {list(order)}")
    return array


def _sentinel_ids(tokenizer: BlankInfillingTokenizer, count: int) -> tuple[np.ndarray, np.ndarray]:
    """[MASK{i}] and <|startofpiece{i}|> ids for i < count (i = 0 is [MASK] / [sop])."""
    try:
        masks = [tokenizer.sentinel_mask_id(i) for i in range(count)]
        sops = [tokenizer.sentinel_sop_id(i) for i in range(count)]
    except (IndexError, KeyError, ValueError) as error:
        raise ValueError(
            f"sentinel tokens need {count - 1} sentinels in the tokenizer "
            "(GLMTokenizer.from_sentencepiece(path, num_sentinels=K))"
        ) from error
    return np.asarray(masks, dtype=np.int64), np.asarray(sops, dtype=np.int64)


def _task_mask_id(tokenizer: BlankInfillingTokenizer, task: str, task_masks: bool) -> int:
    if task_masks and task == "sentence":
        return tokenizer.smask_id
    if task_masks and task == "generation":
        return tokenizer.gmask_id
    return tokenizer.mask_id


def span_interiors(num_tokens: int, spans: Sequence[Span] | np.ndarray) -> np.ndarray:
    """Bool [num_tokens]: True on the tokens of a span after its first (they vanish from Part A)."""
    spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    delta = np.zeros(num_tokens + 1, dtype=np.int64)
    np.add.at(delta, spans[:, 0] + 1, 1)
    np.add.at(delta, spans[:, 1], -1)
    return np.cumsum(delta[:num_tokens]) > 0


def corrupted_positions(num_tokens: int, spans: Sequence[Span] | np.ndarray) -> np.ndarray:
    """Dim-1 position of every original token in the corrupted text (Part A).

    Each span collapses to its mask token, so unmasked tokens count 0, 1, 2, ... and every token of
    a span gets the position of the span's mask.
    """
    return np.cumsum(~span_interiors(num_tokens, spans)) - 1


def build_block_sample(
    tokens: Sequence[int] | np.ndarray,
    spans: Sequence[Span],
    *,
    tokenizer: BlankInfillingTokenizer,
    order: Sequence[int] | None = None,
    task: str = "bert",
    task_masks: bool = False,
    block_positions: bool = True,
    sentinel_tokens: bool = False,
    max_seq_length: int | None = None,
) -> dict[str, Any]:
    """Blank-infilling layout of one sample (official `blocklm_utils.py::make_block_data`).

    `spans` are half-open (start, end) pairs into `tokens`, non-overlapping; `order` is the Part-B
    order as indices into `spans` (None: as given). Part A is the text with one mask per span
    ([MASK]; [sMASK] for task "sentence" and [gMASK] for "generation" when `task_masks`); Part B
    holds, per span in `order`, inputs `[sop] span` and targets `span [eop]`, dim-1 position = the
    span's mask position, dim-2 position = 1 .. len + 1 (all 1 without `block_positions`). Loss is on
    Part B only. Sentinel ablation: the k-th Part-B span starts with <|startofpiece{k}|> and sits at
    dim-1 position `max_seq_length`; in task "bert" its mask is [MASK{k}].

    Returns int64 numpy arrays `input_ids [L]`, `target_ids [L]`, `loss_mask [L]`,
    `position_ids [2, L]` (L = len(tokens) + 2 * len(spans)) and the int `sep` (Part-A length).
    """
    task = _TASK_ALIASES.get(task, task)
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if sentinel_tokens and max_seq_length is None:
        raise ValueError("sentinel_tokens needs max_seq_length (the Part-B dim-1 position)")
    tokens = _as_tokens(tokens)
    n = len(tokens)
    span_array = _check_spans(spans, n)
    k = len(span_array)
    order = _check_order(order, k)
    dim1 = corrupted_positions(n, span_array)

    # Part B: span j of `order` occupies m_j + 1 slots; `step` is the slot index inside its span.
    starts, ends = span_array[order, 0], span_array[order, 1]
    lengths = ends - starts
    span_of_slot = np.repeat(np.arange(k), lengths + 1)
    first_slot = np.cumsum(lengths + 1) - (lengths + 1)
    step = np.arange(len(span_of_slot)) - first_slot[span_of_slot]
    source = starts[span_of_slot] + step  # index into `tokens` of the slot's target
    is_sop = step == 0
    is_eop = step == lengths[span_of_slot]
    span_tokens = tokens[np.minimum(source, n - 1)]
    if np.any(span_tokens[~is_eop] == tokenizer.eos_id):
        raise FoundEOSInTarget(f"Found EOS in target: a span of {span_array.tolist()} covers eos")

    if sentinel_tokens:
        sentinel_masks, sop_ids = _sentinel_ids(tokenizer, k)
    else:
        sop_ids = np.full(k, tokenizer.sop_id, dtype=np.int64)
    part_b_inputs = np.where(is_sop, sop_ids[span_of_slot], tokens[np.maximum(source - 1, 0)])
    part_b_targets = np.where(is_eop, tokenizer.eop_id, span_tokens)
    if sentinel_tokens:
        part_b_dim1 = np.full(len(step), max_seq_length, dtype=np.int64)
    else:
        part_b_dim1 = dim1[starts][span_of_slot]
    part_b_dim2 = step + 1 if block_positions else np.ones(len(step), dtype=np.int64)

    # Part A: every token outside the spans plus one mask token in place of each span's first.
    if sentinel_tokens and task == "bert":
        mask_ids = np.empty(k, dtype=np.int64)
        mask_ids[order] = sentinel_masks  # the k-th Part-B span gets [MASK{k}]
    else:
        mask_ids = np.full(k, _task_mask_id(tokenizer, task, task_masks), dtype=np.int64)
    corrupted = tokens.copy()
    corrupted[span_array[:, 0]] = mask_ids
    keep = ~span_interiors(n, span_array)
    part_a = corrupted[keep]
    sep = len(part_a)

    input_ids = np.concatenate((part_a, part_b_inputs)).astype(np.int64)
    target_ids = np.concatenate((part_a, part_b_targets)).astype(np.int64)
    loss_mask = np.concatenate((np.zeros(sep, np.int64), np.ones(len(step), np.int64)))
    position_ids = np.stack(
        (
            np.concatenate((dim1[keep], part_b_dim1)),
            np.concatenate((np.zeros(sep, np.int64), part_b_dim2)),
        )
    ).astype(np.int64)
    return {
        "input_ids": input_ids,
        "target_ids": target_ids,
        "loss_mask": loss_mask,
        "position_ids": position_ids,
        "sep": sep,
    }


def build_masked_lm_sample(
    tokens: Sequence[int] | np.ndarray,
    spans: Sequence[Span],
    *,
    tokenizer: BlankInfillingTokenizer,
    loss_mask: Sequence[int] | np.ndarray | None = None,
) -> dict[str, Any]:
    """BERT-style masked-LM baseline: every span token replaced in place by [MASK], no Part B.

    The whole sequence is bidirectional (sep = n), positions are the plain token positions (dim 2
    all 0) and the loss covers the masked tokens (times the sample's own loss mask).
    """
    tokens = _as_tokens(tokens)
    n = len(tokens)
    span_array = _check_spans(spans, n)
    if loss_mask is None:
        loss_mask = default_loss_mask(tokens, tokenizer.cls_id)
    masked = span_interiors(n, span_array)
    masked[span_array[:, 0]] = True
    return {
        "input_ids": np.where(masked, tokenizer.mask_id, tokens).astype(np.int64),
        "target_ids": tokens.copy(),
        "loss_mask": (np.asarray(loss_mask, dtype=np.int64) * masked).astype(np.int64),
        "position_ids": np.stack((np.arange(n), np.zeros(n, dtype=np.int64))).astype(np.int64),
        "sep": n,
    }


def build_suffix_generation_sample(
    tokens: Sequence[int] | np.ndarray,
    generation_length: int,
    *,
    tokenizer: BlankInfillingTokenizer,
    loss_mask: Sequence[int] | np.ndarray | None = None,
    task_masks: bool = False,
    block_positions: bool = True,
) -> dict[str, Any]:
    """Document level, suffix case: generate the last `generation_length` tokens after a mask.

    Inputs `x[:d] [gMASK] [sop] x[d:n-1]`, targets `x[:d] [gMASK] x[d:n]` with d = n - g: the
    generated part ends with the sample's last token (normally eos) and has no [eop]. Loss follows
    the sample's loss mask on the generated part. Dim 1 is 0..d on the prefix and mask, then d;
    dim 2 is 0 on the prefix and mask, then 1, 2, ... (all 1 without `block_positions`).
    """
    tokens = _as_tokens(tokens)
    n = len(tokens)
    g = int(generation_length)
    if not 1 <= g <= n - 1:
        raise ValueError(f"generation_length must be in [1, {n - 1}], got {g}")
    if loss_mask is None:
        loss_mask = default_loss_mask(tokens, tokenizer.cls_id)
    division = n - g
    mask_id = _task_mask_id(tokenizer, "generation", task_masks)
    prefix = tokens[:division]
    input_ids = np.concatenate((prefix, [mask_id, tokenizer.sop_id], tokens[division:-1]))
    target_ids = np.concatenate((prefix, [mask_id], tokens[division:]))
    part_a_zeros = np.zeros(division + 1, dtype=np.int64)
    loss = np.concatenate((part_a_zeros, np.asarray(loss_mask, dtype=np.int64)[division:]))
    dim1 = np.arange(n + 1)
    dim1[division + 1 :] = division
    dim2 = np.concatenate((part_a_zeros, np.arange(1, g + 1) if block_positions else np.ones(g, np.int64)))
    return {
        "input_ids": input_ids.astype(np.int64),
        "target_ids": target_ids.astype(np.int64),
        "loss_mask": loss,
        "position_ids": np.stack((dim1, dim2)).astype(np.int64),
        "sep": division + 1,
    }


def pad_batch(samples: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Right-pad every field with zeros (token 0, target 0, loss 0, positions 0) to the longest."""
    length = max(len(sample["input_ids"]) for sample in samples)
    batch = {}
    for field in _FIELDS:
        # one zero array filled row by row (np.pad per row was a fifth of the collator's time)
        leading = np.shape(samples[0][field])[:-1]
        out = np.zeros((len(samples), *leading, length), dtype=np.int64)
        for row, sample in zip(out, samples, strict=True):
            value = np.asarray(sample[field], dtype=np.int64)
            row[..., : value.shape[-1]] = value
        batch[field] = out
    batch["sep"] = np.asarray([sample["sep"] for sample in samples], dtype=np.int64)
    return batch


# ---------------------------------------------------------------------------------------------
# Collator
# ---------------------------------------------------------------------------------------------


class BlankInfillingCollator:
    """Turns packed samples into a GLM pretraining micro-batch (`ConstructBlockStrategy`).

    Each call draws one objective for the whole micro-batch: "span" (token level) with probability
    `span_prob` ("masked_lm" instead when `masked_lm`), "sentence" with `sentence_prob`, "document"
    with `document_prob`. Samples whose spans cannot all be placed are dropped, so the batch may
    shrink; if every sample of a token-level micro-batch is dropped, the span sampling is redrawn
    from the same random stream (up to `max_redraws` times, then ValueError).

    Randomness: one `random.Random` per call, seeded from (seed, epoch, batch index, rank). The batch
    index is `calls * num_workers + worker_id` (plus the restored offset), which is the index of the
    batch in the epoch under the DataLoader's round-robin worker assignment, so results do not
    depend on timing or on the number of workers. `set_epoch` starts an epoch; `state_dict` /
    `load_state_dict` save and restore (epoch, calls) in the process that runs the collator.

    Ablations: `shuffle_spans=False` puts Part B in text order; `block_positions=False` sets every
    Part-B dim-2 position to 1; `sentinel_tokens` gives each Part-B span its own mask / start token
    (needs a tokenizer with sentinels and `max_seq_length`); `masked_lm` is the BERT baseline;
    `task_masks` uses [sMASK] / [gMASK] for the sentence / document objectives.

    `whole_word_spans` (not in the paper, off by default): token-level spans start and end at word
    boundaries (`GLMTokenizer.word_starts`), their lengths and `mask_ratio` counting words, so a
    blank is never the tail of a word. With a small subword vocabulary a span that starts mid-word
    ("year|s", "to|gether") teaches the model to read a blank as the end of the previous word.

    Differences from the official code, all on inputs where it crashes or is undefined: the redraw
    of an emptied micro-batch (above); `masked_lm` applies to the token level only; without block
    positions the suffix case gets dim 2 = 0 on prefix and mask, 1 on the generated tokens (the
    official arrays have mismatched lengths there); the document generation length is at least 1;
    the masked-LM positions are [2, L] like every other layout (dim 2 all 0). Sample splitting
    (`short_seq_prob`), `block_mask_prob` and `context_mask_ratio` are not implemented; their
    random draw is kept so the stream order matches.
    """

    def __init__(
        self,
        tokenizer: BlankInfillingTokenizer,
        *,
        span_prob: float = 1.0,
        sentence_prob: float = 0.0,
        document_prob: float = 0.0,
        mask_ratio: float = 0.15,
        sentence_ratio: float = 0.15,
        poisson_lambda: float = 3.0,
        max_span_length: int = 40,
        shuffle_spans: bool = True,
        block_positions: bool = True,
        sentinel_tokens: bool = False,
        masked_lm: bool = False,
        task_masks: bool = False,
        whole_word_spans: bool = False,
        seed: int = 0,
        gpt_infill_prob: float = 0.5,
        gpt_min_ratio: float = 0.5,
        single_span_prob: float = 0.0,
        rank: int = 0,
        max_seq_length: int | None = None,
        max_redraws: int = 10,
    ) -> None:
        probs = (span_prob, sentence_prob, document_prob)
        if min(probs) < 0 or abs(sum(probs) - 1.0) > 1e-6:
            raise ValueError(f"span_prob + sentence_prob + document_prob must be 1 (each >= 0), got {probs}")
        if max_span_length < 2:
            raise ValueError(f"max_span_length must be >= 2, got {max_span_length}")
        if sentinel_tokens:
            if max_seq_length is None:
                raise ValueError("sentinel_tokens=True needs max_seq_length (Part-B dim-1 position)")
            try:
                tokenizer.sentinel_mask_id(1)
                tokenizer.sentinel_sop_id(1)
            except (IndexError, KeyError, ValueError) as error:
                raise ValueError(
                    "sentinel_tokens=True needs a tokenizer with sentinel tokens "
                    "(GLMTokenizer.from_sentencepiece(path, num_sentinels=K))"
                ) from error
        self.tokenizer = tokenizer
        self.span_prob = span_prob
        self.sentence_prob = sentence_prob
        self.document_prob = document_prob
        self.mask_ratio = mask_ratio
        self.sentence_ratio = sentence_ratio
        self.span_weights = span_length_weights(poisson_lambda, max_span_length)
        self.shuffle_spans = shuffle_spans
        self.block_positions = block_positions
        self.sentinel_tokens = sentinel_tokens
        self.masked_lm = masked_lm
        self.task_masks = task_masks
        self.seed = seed
        self.gpt_infill_prob = gpt_infill_prob
        self.gpt_min_ratio = gpt_min_ratio
        self.single_span_prob = single_span_prob
        self.rank = rank
        self.max_seq_length = max_seq_length
        self.max_redraws = max_redraws
        self.epoch = 0
        self._first_call = 0  # batch index restored by load_state_dict
        self._calls = 0  # calls made by this process since then
        self._sentence_end: np.ndarray | None = None
        self.whole_word_spans = whole_word_spans
        if whole_word_spans and not callable(getattr(tokenizer, "word_starts", None)):
            raise ValueError("whole_word_spans=True needs a tokenizer with word_starts() (GLMTokenizer)")

    # -- state -----------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch`: the batch index restarts at 0."""
        self.epoch = int(epoch)
        self._first_call = 0
        self._calls = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "calls": self._first_call + self._calls}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self._first_call = int(state["calls"])
        self._calls = 0

    def _next_rng(self) -> random.Random:
        info = torch.utils.data.get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        batch_index = self._first_call + self._calls * num_workers + worker_id
        self._calls += 1
        return self.rng_for(self.seed, self.epoch, batch_index, self.rank)

    @staticmethod
    def rng_for(seed: int, epoch: int, batch_index: int, rank: int) -> random.Random:
        """The generator of one micro-batch, independent across all four coordinates."""
        state = np.random.SeedSequence([seed, epoch, batch_index, rank]).generate_state(4)
        return random.Random(int.from_bytes(state.tobytes(), "little"))

    # -- building --------------------------------------------------------------------------

    def __call__(self, samples: Sequence[Any]) -> dict[str, Any]:
        """Micro-batch of packed samples: 1-D token arrays starting with [CLS] (documents each
        `[CLS] doc eos`), or dicts with "tokens" and an optional "loss_mask" (default: 0 on [CLS]).

        Returns long tensors `input_ids [B, L]`, `target_ids [B, L]` (already aligned: the label
        of position t), `loss_mask [B, L]`, `position_ids [B, 2, L]`, `sep [B]`, right-padded with
        zeros, and the `objective` string.
        """
        return self.collate(samples, self._next_rng())

    def collate(self, samples: Sequence[Any], rng: random.Random) -> dict[str, Any]:
        """Build the micro-batch with an explicit generator (the random draws follow the official
        order: sample-splitting draw, single-span draw, objective draw, then per sample)."""
        parsed = [self._parse_sample(sample) for sample in samples]
        if not parsed:
            raise ValueError("empty micro-batch")
        rng.random()  # the official sample-splitting draw (`short_seq_prob`, not implemented)
        rand = rng.random()
        single_span = rand < self.single_span_prob
        rand = 0.0 if single_span else rng.random()
        if rand < self.span_prob:
            objective = "masked_lm" if self.masked_lm else "span"
            built = self._span_batch(parsed, rng, single_span)
        elif rand < self.span_prob + self.sentence_prob:
            objective = "sentence"
            built = [self._sentence_sample(tokens, rng) for tokens, _ in parsed]
        else:
            objective = "document"
            built = self._document_batch(parsed, rng)
        batch: dict[str, Any] = {key: torch.from_numpy(value) for key, value in pad_batch(built).items()}
        batch["objective"] = objective
        return batch

    def _parse_sample(self, sample: Any) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(sample, Mapping):
            tokens = _as_tokens(sample["tokens"] if "tokens" in sample else sample["text"])
            loss_mask = sample.get("loss_mask")
        else:
            tokens, loss_mask = _as_tokens(sample), None
        if loss_mask is None:
            loss_mask = default_loss_mask(tokens, self.tokenizer.cls_id)
        loss_mask = np.asarray(loss_mask, dtype=np.int64)
        if len(tokens) < 3 or tokens[0] != self.tokenizer.cls_id:
            raise ValueError("a packed sample starts with [CLS] and has at least 3 tokens")
        if loss_mask.shape != tokens.shape:
            raise ValueError(f"loss_mask shape {loss_mask.shape} != tokens shape {tokens.shape}")
        return tokens, loss_mask

    def _part_b_order(self, spans: Sequence[Span], rng: random.Random) -> list[int]:
        order = list(range(len(spans)))
        if self.shuffle_spans:
            rng.shuffle(order)
        else:
            order.sort(key=lambda i: spans[i][0])
        return order

    def _block_sample(
        self, tokens: np.ndarray, spans: list[Span], rng: random.Random, task: str
    ) -> dict[str, Any]:
        return build_block_sample(
            tokens,
            spans,
            tokenizer=self.tokenizer,
            order=self._part_b_order(spans, rng),
            task=task,
            task_masks=self.task_masks,
            block_positions=self.block_positions,
            sentinel_tokens=self.sentinel_tokens,
            max_seq_length=self.max_seq_length,
        )

    def _blank_sample(
        self,
        tokens: np.ndarray,
        loss_mask: np.ndarray,
        lengths: list[int],
        rng: random.Random,
        task: str,
        words: np.ndarray | None = None,
    ) -> dict[str, Any] | None:
        """Place spans of the given lengths and lay them out; None if they do not all fit.

        With `words` (the first token of each word, then len(tokens)), lengths count words: spans
        are placed over the words' first tokens and widened to whole words.
        """
        rng.shuffle(lengths)
        units = tokens if words is None else tokens[words[:-1]]
        spans = sample_spans_in_documents(
            units,
            lengths,
            rng,
            eos_id=self.tokenizer.eos_id,
            cls_id=self.tokenizer.cls_id,
            mask_ratio=self.mask_ratio,
        )
        if len(spans) < len(lengths):
            return None
        if words is not None:
            spans = [(int(words[start]), int(words[end])) for start, end in spans]
        if self.masked_lm and task == "bert":
            return build_masked_lm_sample(tokens, spans, tokenizer=self.tokenizer, loss_mask=loss_mask)
        sample = self._block_sample(tokens, spans, rng, task)
        assert sample["sep"] == len(tokens) - sum(end - start for start, end in spans) + len(spans)
        return sample

    def _word_starts(self, tokens: np.ndarray) -> np.ndarray | None:
        """Index of each word's first token, then len(tokens); None unless `whole_word_spans`."""
        if not self.whole_word_spans:
            return None
        return np.append(np.flatnonzero(self.tokenizer.word_starts(tokens)), len(tokens))

    def _span_batch(
        self, parsed: list[tuple[np.ndarray, np.ndarray]], rng: random.Random, single_span: bool
    ) -> list[dict[str, Any]]:
        words = [self._word_starts(tokens) for tokens, _ in parsed]
        for _ in range(self.max_redraws + 1):
            built = []
            for (tokens, loss_mask), sample_words in zip(parsed, words, strict=True):
                if single_span:
                    lengths = [rng.choices(range(1, len(self.span_weights) + 1), self.span_weights)[0]]
                else:
                    num_units = len(tokens) if sample_words is None else len(sample_words) - 1
                    lengths = sample_span_lengths(
                        rng, num_units, self.span_weights, mask_ratio=self.mask_ratio
                    )
                sample = self._blank_sample(tokens, loss_mask, lengths, rng, "bert", sample_words)
                if sample is not None:
                    built.append(sample)
            if built:
                return built
        raise ValueError(
            f"no sample of the micro-batch could hold its spans after {self.max_redraws} redraws "
            f"(sample lengths {[len(tokens) for tokens, _ in parsed]}); samples are too short"
        )

    def _sentence_sample(self, tokens: np.ndarray, rng: random.Random) -> dict[str, Any]:
        if self._sentence_end is None:
            self._sentence_end = np.asarray(self.tokenizer.sentence_end_table(), dtype=bool)
        sentences = split_sentences(
            tokens, self._sentence_end, eos_id=self.tokenizer.eos_id, cls_id=self.tokenizer.cls_id
        )
        spans = select_gap_sentences(sentences, len(tokens), rng, ratio=self.sentence_ratio)
        return self._block_sample(tokens, spans, rng, "sentence")

    def _document_batch(
        self, parsed: list[tuple[np.ndarray, np.ndarray]], rng: random.Random
    ) -> list[dict[str, Any]]:
        sizes = [len(tokens) for tokens, _ in parsed]
        # One generation length per micro-batch, uniform over [min_ratio * shortest, longest - 2].
        low = max(1, int(self.gpt_min_ratio * min(sizes)))
        generation_length = rng.randint(low, max(low, max(sizes) - 2))
        built = []
        for tokens, loss_mask in parsed:
            n = len(tokens)
            g = min(generation_length, n - 2)
            eos_positions = np.flatnonzero(tokens == self.tokenizer.eos_id)
            multiple_documents = len(eos_positions) > 0 and eos_positions[0] != n - 1
            if multiple_documents or rng.random() < self.gpt_infill_prob:
                sample = build_suffix_generation_sample(
                    tokens,
                    g,
                    tokenizer=self.tokenizer,
                    loss_mask=loss_mask,
                    task_masks=self.task_masks,
                    block_positions=self.block_positions,
                )
            else:
                sample = self._blank_sample(tokens, loss_mask, [g], rng, "generation")
                if sample is None:
                    continue
            built.append(sample)
        if not built:
            raise ValueError(f"no sample could hold a generation span (sizes {sizes})")
        return built

"""Model inputs of one SuperGLUE example, laid out as the official cloze finetuning builds them
(official `tasks/data_utils.py::build_input_from_ids`).

Cloze mode: `[CLS] A B eos` is Part A (bidirectional, `sep` = its length), followed by Part B:
one `[sop]` for single-token verbalizers, or `[sop] a_1 .. a_m` per answer candidate with targets
`a_1 .. a_m [eop]`. Part-B tokens take the [MASK] position as dim-1 position and 1, 2, .. as
dim-2 position. Classifier mode (ablation baseline): `[CLS] A [SEP] B eos`, all bidirectional.
Rows are right-padded with the pad (= eos) id; padding has position 0 and no loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from glm_lightning.cloze import preprocess
from glm_lightning.cloze.patterns import MASK, MULTI_TOKEN_TASKS, PatternPart, Shortenable, get_pattern
from glm_lightning.tokenizer import GLMTokenizer

__all__ = ["encode_example", "verbalizer_ids"]


@dataclass
class _Piece:
    """One tokenized pattern part."""

    ids: list[int]
    shortenable: bool = False
    is_mask: bool = False


def _tokenize_parts(
    parts: tuple[PatternPart, ...], fields: dict[str, str], tok: GLMTokenizer
) -> list[_Piece]:
    pieces = []
    for part in parts:
        if part is MASK:
            pieces.append(_Piece([tok.mask_id], is_mask=True))
        elif isinstance(part, Shortenable):
            pieces.append(_Piece(tok.encode(part.text.format(**fields)), shortenable=True))
        else:
            pieces.append(_Piece(tok.encode(part.format(**fields))))
    return pieces


def _length(pieces: list[_Piece], only_shortenable: bool = False) -> int:
    return sum(len(p.ids) for p in pieces if p.shortenable or not only_shortenable)


def _truncate(a: list[_Piece], b: list[_Piece], reserved: int, max_length: int) -> None:
    """Cut tokens one at a time from the end of the last shortenable part of whichever segment
    has more shortenable tokens (B on ties) until A + B + `reserved` fits."""
    excess = _length(a) + _length(b) + reserved - max_length
    for _ in range(max(excess, 0)):
        side = a if _length(a, True) > _length(b, True) else b
        candidates = [p for p in side if p.shortenable and p.ids]
        if not candidates:
            raise ValueError(
                f"example does not fit max_seq_length={max_length}: "
                f"{excess} tokens too long and nothing left to shorten"
            )
        candidates[-1].ids.pop()


def _flatten(pieces: list[_Piece]) -> list[int]:
    return [i for p in pieces for i in p.ids]


def _mask_offset(pieces: list[_Piece]) -> int:
    """Offset of the pattern's [MASK] within the concatenated parts."""
    offset = 0
    for p in pieces:
        if p.is_mask:
            return offset
        offset += len(p.ids)
    raise ValueError("pattern has no MASK part")


def _row(ids: list[int], pos1: list[int], pos2: list[int], target: list[int], loss: list[int],
         pad_id: int, length: int) -> tuple[list[int], ...]:
    if len(ids) > length:
        raise ValueError(f"sequence of {len(ids)} tokens does not fit max_seq_length={length}")
    pad = length - len(ids)
    return (ids + [pad_id] * pad, pos1 + [0] * pad, pos2 + [0] * pad, target + [0] * pad, loss + [0] * pad)


def _cloze_row(a: list[_Piece], b: list[_Piece], answer: list[int] | None, tok: GLMTokenizer,
               max_seq_length: int) -> tuple[tuple[list[int], ...], int]:
    """One padded row and its `sep`; `answer` (with [eop]) is None for a single-token [sop]."""
    context = [tok.cls_id, *_flatten(a), *_flatten(b), tok.eos_id]
    sep = len(context)
    mask_position = 1 + _mask_offset(a + b)
    piece = [tok.sop_id] + (answer[:-1] if answer else [])
    targets = answer if answer else [0]
    ids = context + piece
    pos1 = list(range(sep)) + [mask_position] * len(piece)
    pos2 = [0] * sep + list(range(1, len(piece) + 1))
    target = [0] * sep + targets
    loss = [0] * sep + [1] * len(piece)
    return _row(ids, pos1, pos2, target, loss, tok.pad_id, max_seq_length), sep


def verbalizer_ids(task: str, pattern_id: int, tokenizer: GLMTokenizer) -> list[int]:
    """Token id of each verbalizer in label order; each must be one ordinary (non-command) token,
    since the single-token head reads one logit per label."""
    pattern = get_pattern(task, pattern_id)
    if pattern.verbalizers is None:
        raise ValueError(f"{task} is a multi-token task and has no verbalizers")
    command_ids = set(tokenizer.command_tokens.values())
    ids = []
    for word in pattern.verbalizers:
        encoded = tokenizer.encode(word)
        if len(encoded) != 1 or encoded[0] in command_ids:
            raise ValueError(
                f"verbalizer {word!r} of {task} pattern {pattern_id} must encode to exactly one "
                f"ordinary token, got {encoded}"
            )
        ids.append(encoded[0])
    return ids


def _stack(rows: list[tuple[list[int], ...]], seps: list[int], label: int) -> dict:
    ids, pos1, pos2, target, loss = (np.array(col, dtype=np.int64) for col in zip(*rows, strict=True))
    return {
        "input_ids": ids,
        "position_ids": np.stack([pos1, pos2], axis=1),
        "sep": np.array(seps, dtype=np.int64),
        "target_ids": target,
        "logit_mask": loss,
        "label": int(label),
    }


def encode_example(
    task: str,
    example: dict,
    tokenizer: GLMTokenizer,
    *,
    pattern_id: int,
    max_seq_length: int,
    mode: Literal["cloze", "classifier"] = "cloze",
    wsc_mode: Literal["candidates", "generative"] = "candidates",
) -> dict:
    """Model inputs of one `read_split` example of `task`.

    Returns numpy int64 arrays `input_ids [C,L]`, `position_ids [C,2,L]`, `sep [C]`,
    `target_ids [C,L]`, `logit_mask [C,L]`, an int `label`, and `verbalizer_ids [K]` for
    single-token tasks in cloze mode. C = 1 for single-token tasks, the number of answer
    candidates for COPA, WSC and ReCoRD; L = `max_seq_length`. `label` is the class index
    (single-token tasks) or the index of the correct candidate (see `preprocess.candidate_label`).
    `mode="classifier"` gives the non-cloze baseline (`pattern_id` unused).

    WSC has two layouts. `wsc_mode="candidates"`: one row per candidate (span1_text, then the
    negatives of a `candidates` field), label 0. `wsc_mode="generative"`: the official LM-style
    sample (`WscPVP.encode` with `--loss-func cross_entropy`, used when the data has no negatives):
    one row whose Part B generates span1_text and [eop], label 1 if the example is True, else 0.
    """
    if mode == "classifier":
        return _encode_classifier(task, example, tokenizer, max_seq_length)
    if mode != "cloze":
        raise ValueError(f"mode must be 'cloze' or 'classifier', not {mode!r}")
    pattern = get_pattern(task, pattern_id)
    fields = preprocess.cloze_fields(task, example)
    a = _tokenize_parts(pattern.a, fields, tokenizer)
    b = _tokenize_parts(pattern.b, fields, tokenizer)
    if sum(p.is_mask for p in a + b) != 1:
        raise ValueError(f"{task} pattern {pattern_id} must hold exactly one MASK part")

    if task not in MULTI_TOKEN_TASKS:
        verbalizers = verbalizer_ids(task, pattern_id, tokenizer)
        _truncate(a, b, reserved=3, max_length=max_seq_length)  # [CLS], eos, [sop]
        row, sep = _cloze_row(a, b, None, tokenizer, max_seq_length)
        out = _stack([row], [sep], preprocess.class_index(task, example))
        out["verbalizer_ids"] = np.array(verbalizers, dtype=np.int64)
        return out

    if wsc_mode not in ("candidates", "generative"):
        raise ValueError(f"wsc_mode must be 'candidates' or 'generative', not {wsc_mode!r}")
    generative = task == "WSC" and wsc_mode == "generative"
    candidates = [example["span1_text"]] if generative else preprocess.answer_candidates(task, example)
    if not candidates:
        raise ValueError(f"{task} example {example.get('idx')!r} has no answer candidates")
    rows, seps = [], []
    for candidate in candidates:
        answer = tokenizer.encode(" " + candidate) + [tokenizer.eop_id]
        row_a = [_Piece(list(p.ids), p.shortenable, p.is_mask) for p in a]
        row_b = [_Piece(list(p.ids), p.shortenable, p.is_mask) for p in b]
        _truncate(row_a, row_b, reserved=2 + len(answer), max_length=max_seq_length)  # [CLS], eos
        row, sep = _cloze_row(row_a, row_b, answer, tokenizer, max_seq_length)
        rows.append(row)
        seps.append(sep)
    label = preprocess.class_index(task, example) if generative else \
        preprocess.candidate_label(task, example, candidates)
    return _stack(rows, seps, label)


def _encode_classifier(task: str, example: dict, tok: GLMTokenizer, max_seq_length: int) -> dict:
    """`[CLS] A [SEP] B eos`, fully bidirectional; the longer segment is cut first to fit."""
    rows, seps = [], []
    for text_a, text_b in preprocess.classifier_inputs(task, example):
        a, b = tok.encode(text_a), tok.encode(text_b)
        while len(a) + len(b) + 3 > max_seq_length:
            if not a and not b:
                raise ValueError(f"max_seq_length={max_seq_length} is too short for the classifier layout")
            (a if len(a) > len(b) else b).pop()
        ids = [tok.cls_id, *a, tok.sep_id, *b, tok.eos_id]
        n = len(ids)
        rows.append(_row(ids, list(range(n)), [0] * n, [0] * n, [0] * n, tok.pad_id, max_seq_length))
        seps.append(n)
    return _stack(rows, seps, preprocess.classifier_label(task, example))

"""Collation of cloze-encoded SuperGLUE examples into batches (official `tasks/data_utils.py::my_collate`).

Every example (``glm_lightning.cloze.encode_example``) holds ``C`` candidate rows of one length
``L``. Multi-token tasks have a varying number of candidates, so, as the official ``my_collate``,
short examples are filled up by repeating their candidate 0 and the filler rows are flagged in
``candidate_mask``; the scorer gives them a score that can never win.

``pack_candidates`` turns such a batch into the shared-context layout: the candidates of one example
repeat the same Part A (passage, question, [MASK]), so each distinct Part A is laid out once and
followed by the Part B of every candidate that shares it. The model then runs Part A once per
example instead of once per candidate (the official ``GLMForMultiTokenClozeFast`` idea), with the
same scores (``glm_lightning.attention_mask.candidate_attention_mask``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

# Per-candidate arrays: leading axis C, then the sequence axis (position_ids: [C, 2, L]).
ROW_KEYS = ("input_ids", "position_ids", "target_ids", "logit_mask")


def _pad_candidates(rows: np.ndarray, count: int) -> np.ndarray:
    """``rows`` with its first row repeated until it has ``count`` rows."""
    missing = count - len(rows)
    return rows if missing == 0 else np.concatenate([rows, np.repeat(rows[:1], missing, axis=0)])


def _pad_length(rows: np.ndarray, length: int) -> np.ndarray:
    """Right-pad the last axis with zeros; right padding lies in the causal part, unseen by real tokens."""
    missing = length - rows.shape[-1]
    return rows if missing == 0 else np.pad(rows, [(0, 0)] * (rows.ndim - 1) + [(0, missing)])


def cloze_collate(examples: Sequence[dict], *, shared_context: bool = False) -> dict:
    """Stack encoded examples into a batch (``shared_context``: then packed by ``pack_candidates``).

    Returns torch tensors ``input_ids, target_ids, logit_mask [B, C, L]``, ``position_ids
    [B, C, 2, L]`` (L: the longest row of the batch without its padding), ``sep [B, C]``,
    ``candidate_mask [B, C]`` (False for filler candidates), ``label [B]`` (when every example
    carries an integer one), ``verbalizer_ids [K]`` (single-token tasks; the same for the whole
    task) and ``idx [B]`` or ``[B, K]`` (example ids). Any other key (candidate strings, gold
    answers, non-integer labels or ids) is passed through as a list.
    """
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    num_candidates = max(len(ex["input_ids"]) for ex in examples)
    length = max(ex["input_ids"].shape[-1] for ex in examples)
    batch: dict = {}
    for key in ROW_KEYS:
        if key in examples[0]:
            batch[key] = torch.from_numpy(np.stack([
                _pad_length(_pad_candidates(np.asarray(ex[key]), num_candidates), length) for ex in examples
            ])).long()
    # Rows are padded to max_seq_length when encoded; cut the columns that are padding in every row.
    # Every real token after the first has a dim-1 position >= 1 ([CLS] is 0; Part-B tokens carry
    # their [MASK]'s position), and padding sits at the end, after all tokens a real one attends to.
    real = batch["position_ids"][..., 0, :].reshape(-1, length).any(0).nonzero()
    used = 1 + (int(real.max()) if len(real) else 0)
    for key in ROW_KEYS:
        if key in batch:
            batch[key] = batch[key][..., :used].contiguous()
    batch["sep"] = torch.from_numpy(np.stack([
        _pad_candidates(np.asarray(ex["sep"]).reshape(-1), num_candidates) for ex in examples
    ])).long()
    batch["candidate_mask"] = torch.arange(num_candidates)[None, :] < torch.tensor(
        [len(ex["input_ids"]) for ex in examples])[:, None]
    labels = [ex.get("label") for ex in examples]
    if all(isinstance(label, (int, np.integer)) for label in labels):
        batch["label"] = torch.tensor([int(label) for label in labels], dtype=torch.long)
    if examples[0].get("verbalizer_ids") is not None:
        batch["verbalizer_ids"] = torch.as_tensor(np.asarray(examples[0]["verbalizer_ids"]), dtype=torch.long)
    if "idx" in examples[0]:
        try:
            batch["idx"] = torch.tensor([ex["idx"] for ex in examples], dtype=torch.long)
        except (TypeError, ValueError):  # non-integer ids stay a list
            pass
    for key in examples[0]:
        if key not in batch:
            batch[key] = [ex[key] for ex in examples]
    return pack_candidates(batch) if shared_context else batch


def pack_candidates(batch: dict) -> dict:
    """The shared-context layout of a multi-token ``cloze_collate`` batch.

    Every real candidate row is cut into its Part A (``[:sep]``) and its Part B (the ``logit_mask``
    positions: ``[sop] a_1 .. a_m``, targets ``a_1 .. [eop]``). Candidates of one example with the
    same Part A (all of them, unless truncation cut it differently for a long answer) share one
    packed row: ``Part A | Part B of candidate c1 | Part B of c2 | ...``, positions unchanged.
    Returns ``input_ids, target_ids, logit_mask, candidate_index [N, L]``, ``position_ids [N, 2, L]``
    and ``sep [N]`` for the N packed rows (``candidate_index`` = ``b * C + c`` on the tokens of
    candidate c of example b, -1 elsewhere); every other key of ``batch`` is kept.
    """
    ids, pos, target, loss = (batch[key].numpy() for key in ROW_KEYS)
    sep, real = batch["sep"].numpy(), batch["candidate_mask"].numpy()
    num_candidates = ids.shape[1]
    rows: list[list[np.ndarray]] = []  # per packed row: input_ids, positions, targets, loss, candidate
    seps: list[int] = []
    for b in range(ids.shape[0]):
        by_context: dict[bytes, list[np.ndarray]] = {}
        for c in np.flatnonzero(real[b]):
            a, n = int(sep[b, c]), int(loss[b, c].sum())
            context = ids[b, c, :a].tobytes() + pos[b, c, :, :a].tobytes()
            if context not in by_context:
                by_context[context] = [ids[b, c, :a], pos[b, c, :, :a], np.zeros(a, np.int64),
                                       np.zeros(a, np.int64), np.full(a, -1, np.int64)]
                rows.append(by_context[context])
                seps.append(a)
            row, part_b = by_context[context], slice(a, a + n)
            for i, piece in enumerate((ids[b, c, part_b], pos[b, c, :, part_b], target[b, c, part_b],
                                       loss[b, c, part_b], np.full(n, b * num_candidates + c))):
                row[i] = np.concatenate([row[i], piece], axis=-1)
    length = max(len(row[0]) for row in rows)
    columns = [np.stack([_pad_length(row[i], length) for row in rows]) for i in range(4)]
    candidate = np.stack([np.pad(row[4], (0, length - len(row[4])), constant_values=-1) for row in rows])
    packed = {key: value for key, value in batch.items() if key not in (*ROW_KEYS, "sep")}
    for key, value in zip(ROW_KEYS, columns, strict=True):
        packed[key] = torch.from_numpy(value).long()
    packed["candidate_index"] = torch.from_numpy(candidate).long()
    packed["sep"] = torch.tensor(seps, dtype=torch.long)
    return packed

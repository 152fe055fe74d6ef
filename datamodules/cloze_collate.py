"""Collation of cloze-encoded SuperGLUE examples into batches (GLM_SPEC §7.1, §7.2).

Every example (``glm_lightning.cloze.encode_example``) holds ``C`` candidate rows of one length
``L``. Multi-token tasks have a varying number of candidates, so, as the official ``my_collate``,
short examples are filled up by repeating their candidate 0 and the filler rows are flagged in
``candidate_mask``; the scorer gives them a score that can never win.
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


def cloze_collate(examples: Sequence[dict]) -> dict:
    """Stack encoded examples into a batch.

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
    return batch

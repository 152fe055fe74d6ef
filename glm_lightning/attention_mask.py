"""The GLM attention pattern: bidirectional Part A, causal Part B (paper §2.1.1, Figure 2).

A batch carries one integer per sample, ``sep`` (the length of Part A). Query ``i`` may attend to
key ``j`` iff ``j < sep`` (all of Part A) or ``j <= i`` (causal). Rows in Part A therefore see all
of Part A and never Part B; rows in Part B see Part A and the Part-B tokens before them; right
padding lies in the causal region, so real tokens never see it.

The mask is boolean ``[B, 1, Lq, Lk]`` (True = may attend) and is consumed by
``torch.nn.functional.scaled_dot_product_attention``; no score tensor is built in Python.
"""

from __future__ import annotations

import torch
from torch import Tensor


def glm_attention_mask(
    sep: Tensor | None,
    query_length: int,
    key_length: int | None = None,
    *,
    device: torch.device | str | None = None,
) -> Tensor:
    """Boolean ``[B, 1, Lq, Lk]`` mask from per-sample Part-A lengths.

    ``key_length`` exceeds ``query_length`` during incremental decoding: the queries are then the
    last ``query_length`` positions of the ``key_length`` tokens (the earlier ones are cached).
    ``sep=None`` means no Part A (plain causal attention); the batch axis is then 1.
    """
    key_length = query_length if key_length is None else key_length
    if key_length < query_length:
        raise ValueError(f"key_length ({key_length}) < query_length ({query_length})")
    if sep is not None:
        device = sep.device
    past = key_length - query_length
    query_pos = torch.arange(past, key_length, device=device)[:, None]  # absolute positions
    key_pos = torch.arange(key_length, device=device)[None, :]
    causal = key_pos <= query_pos  # [Lq, Lk]
    if sep is None:
        return causal[None, None]
    part_a = key_pos[None] < sep.reshape(-1, 1, 1)  # [B, 1, Lk]
    return (causal[None] | part_a)[:, None]



def candidate_attention_mask(sep: Tensor, candidate_index: Tensor) -> Tensor:
    """Boolean ``[N, 1, L, L]`` mask of rows that hold one Part A followed by the Part B of several
    answer candidates (the shared-context cloze layout).

    ``candidate_index [N, L]`` names the candidate each Part-B token belongs to (-1 on Part A and
    padding). Part A attends to itself bidirectionally, as in the row-per-candidate layout; each
    candidate's tokens attend to Part A and causally to that candidate's earlier tokens only, so a
    candidate's logits equal those of its own row. Padding queries see Part A (no empty rows).
    """
    length = candidate_index.shape[1]
    pos = torch.arange(length, device=candidate_index.device)
    part_a = pos[None, None, :] < sep.reshape(-1, 1, 1)  # [N, 1, Lk]
    same = (candidate_index[:, :, None] == candidate_index[:, None, :]) & (candidate_index[:, None, :] >= 0)
    causal = pos[:, None] >= pos[None, :]  # [Lq, Lk]
    return (part_a | (same & causal[None]))[:, None]

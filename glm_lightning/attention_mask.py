"""The GLM attention pattern: bidirectional Part A, causal Part B (paper §2.1.1, Figure 2).

A batch carries one integer per sample, ``sep`` (the length of Part A). Query ``i`` may attend to
key ``j`` iff ``j < sep`` (all of Part A) or ``j <= i`` (causal). Rows in Part A therefore see all
of Part A and never Part B; rows in Part B see Part A and the Part-B tokens before them; right
padding lies in the causal region, so real tokens never see it.

For ``scaled_dot_product_attention`` the mask is boolean ``[B, 1, Lq, Lk]`` (True = may attend).
For FlexAttention it is a ``BlockMask``: the same rule as a ``mask_mod`` over the batch's ``sep``
and real lengths, from which ``create_block_mask`` keeps only the 128 x 128 blocks that hold an
allowed pair, so blocks of padding (and Part A's queries against Part B) are never computed. Both
are built once per forward pass and shared by every layer.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask


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


def real_lengths(position_ids: Tensor) -> Tensor:
    """Tokens before the right padding of each row of ``position_ids [B, 2, L]``.

    Every collator pads with dim-1 position 0 (``position_ids[:, 0]``), which among real tokens only
    the first one ([CLS]) has: Part A counts up from it and Part-B tokens carry the position of
    their [MASK] (the rule ``datamodules.cloze_collate`` also cuts padding columns by). The length
    is therefore one past the last non-zero dim-1 position.
    """
    index = torch.arange(1, position_ids.shape[-1] + 1, device=position_ids.device)
    return (index * (position_ids[:, 0] > 0)).amax(dim=1).clamp(min=1)


def glm_block_mask(sep: Tensor | None, lengths: Tensor | None, query_length: int,
                   key_length: int | None = None) -> BlockMask:
    """The FlexAttention ``BlockMask`` of ``glm_attention_mask`` for one batch.

    ``lengths [B]`` (None: no padding) limits queries and keys to the real tokens, so padding
    blocks are skipped; padding queries attend to nothing and get a zero output, which no loss or
    logit reads. As in ``glm_attention_mask`` the queries are the last ``query_length`` of the
    ``key_length`` tokens, and ``sep=None`` is plain causal attention.
    """
    key_length = query_length if key_length is None else key_length
    past = key_length - query_length
    batch = len(sep) if sep is not None else len(lengths) if lengths is not None else 1

    def mask_mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        allowed = kv <= q + past
        if sep is not None:
            allowed = allowed | (kv < sep[b])
        if lengths is not None:
            allowed = allowed & (q + past < lengths[b]) & (kv < lengths[b])
        return allowed

    device = next((t.device for t in (sep, lengths) if t is not None), None)
    return create_block_mask(mask_mod, batch, None, query_length, key_length, device=device)


def dense_block_mask(mask: Tensor, batch: int) -> BlockMask:
    """A ``BlockMask`` from an explicit boolean mask ``[B or 1, 1, Lq, Lk]`` (shared-context
    candidates, decoding over a padded cache): the same pairs, with all-False blocks skipped."""
    query_length, key_length = mask.shape[-2:]
    mask = mask.expand(batch, 1, query_length, key_length)

    def mask_mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return mask[b, 0, q, kv]

    return create_block_mask(mask_mod, batch, None, query_length, key_length, device=mask.device)

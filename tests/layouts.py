"""Reading a collated blank-infilling batch back into its parts, for layout assertions."""

from __future__ import annotations

import itertools

Segment = tuple[int, list[int], list[int], list[int]]  # (dim 1, inputs, targets, dim 2)


def row_layout(batch: dict, b: int) -> tuple[list[int], list[Segment], int]:
    """Part A, the Part-B segments and the real length of row b, read from the positions alone:
    Part B is every slot after `sep` with dim 2 > 0, and a segment starts at each dim 2 == 1
    (valid for every objective, unlike the loss mask)."""
    sep = int(batch["sep"][b])
    inputs, targets = batch["input_ids"][b].tolist(), batch["target_ids"][b].tolist()
    dim1, dim2 = batch["position_ids"][b].tolist()
    length = sep + sum(1 for d in dim2[sep:] if d > 0)
    starts = [i for i in range(sep, length) if dim2[i] == 1] + [length]
    segments = [(dim1[i], inputs[i:j], targets[i:j], dim2[i:j]) for i, j in itertools.pairwise(starts)]
    return inputs[:sep], segments, length

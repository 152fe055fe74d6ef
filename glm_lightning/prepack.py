"""Weights reordered once for oneDNN: the linear layers of the CPU decoding step.

A decoding step multiplies a few rows (one per sample or beam) by every weight matrix of the
model. On CPU, ``F.linear`` runs MKL's GEMV/GEMM on the weight as stored, which at such row
counts is far from what the machine can do; oneDNN's linear on a weight reordered once into its
blocked layout (``torch.ops.mkldnn._reorder_linear_weight``, told the number of rows to expect)
runs the same product several times faster (benchmarks/RESULTS.md, "Decoding on prepacked
weights"). The result equals ``F.linear`` to float32 rounding, not bit for bit.

Each weight keeps one reordered copy, for the last row count asked, and reorders again when that
count or the weight changes (its storage or its version counter: an optimizer step, a
``load_state_dict``). The copies take about as much memory as the weights.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from glm_lightning.model import GLMModel, Linear

# weight -> (rows, storage pointer, version, reordered weight)
_PACKED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def supported(model: nn.Module) -> bool:
    """Whether this torch has oneDNN's linear and the model is float32 on CPU."""
    weight = next(model.parameters())
    return (weight.device.type == "cpu" and weight.dtype == torch.float32
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def packed_weight(weight: Tensor, rows: int) -> Tensor:
    """``weight [out, in]`` reordered for inputs of about ``rows`` rows, cached while valid."""
    key = (rows, weight.data_ptr(), weight._version)
    cached = _PACKED.get(weight)
    if cached is None or cached[:3] != key:
        cached = (*key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows))
        _PACKED[weight] = cached
    return cached[3]


def attach(model: GLMModel, rows: int) -> None:
    """Run every linear layer of ``model`` and its output head on weights reordered for ``rows``
    rows until :func:`detach`."""
    for module in model.modules():
        if isinstance(module, Linear):
            module.packed = packed_weight(module.weight, rows)
    model.head_packed = packed_weight(model.word_embeddings.weight, rows)


def detach(model: GLMModel) -> None:
    """Back to ``F.linear`` everywhere (the reordered copies stay cached)."""
    for module in model.modules():
        if isinstance(module, Linear):
            module.packed = None
    model.head_packed = None

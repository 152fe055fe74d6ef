"""The CPU decoding step on weights reordered for oneDNN (glm_lightning.prepack), and a context
that is run without the output head."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import profile
from torch.utils._python_dispatch import TorchDispatchMode

from glm_lightning import prepack
from glm_lightning.generation import generate
from glm_lightning.model import GLMConfig, GLMModel, Linear

pytestmark = pytest.mark.skipif(not prepack.supported(torch.nn.Linear(1, 1)),
                                reason="this torch build has no oneDNN (mkldnn) linear on CPU")
SOP, EOP = 4, 5


def tiny_glm() -> GLMModel:
    torch.manual_seed(0)
    return GLMModel(GLMConfig.from_name("tiny", vocab_size=300, initializer_range=0.1)).eval()


def step_inputs(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(rows)
    ids = torch.randint(0, 300, (rows, 3), generator=g)
    return ids, torch.stack([torch.arange(3), torch.arange(3)])[None].expand(rows, 2, 3)


def onednn_calls(run: object) -> int:
    """How many oneDNN linear calls ``run()`` makes (read from the profiler's operator events)."""
    with profile() as prof:
        run()
    return sum(e.count for e in prof.key_averages() if e.key == "mkldnn::_linear_pointwise")


def test_reordered_weights_give_the_logits_of_f_linear_at_any_row_count() -> None:
    model = tiny_glm()
    linears = 4 * model.config.num_layers + 1  # QKV, dense, two MLP matrices per layer; the head
    with torch.no_grad():
        for rows in (1, 3, 8):
            ids, positions = step_inputs(rows)
            expected = model(ids, positions)
            prepack.attach(model, rows)
            assert onednn_calls(lambda ids=ids, positions=positions: model(ids, positions)) == linears
            got = model(ids, positions)
            other_rows = model(*step_inputs(2))  # a row count it was not reordered for still works
            prepack.detach(model)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(other_rows, model(*step_inputs(2)), rtol=1e-5, atol=1e-5)
    assert onednn_calls(lambda: model(ids, positions)) == 0  # detached: F.linear again


def test_reordered_copies_follow_the_weights_and_the_row_count() -> None:
    model = tiny_glm()
    qkv: Linear = model.transformer.layers[0].attention.query_key_value
    first = prepack.packed_weight(qkv.weight, 4)
    assert prepack.packed_weight(qkv.weight, 4) is first  # cached
    assert prepack.packed_weight(qkv.weight, 2) is not first  # another row count: reordered again
    again = prepack.packed_weight(qkv.weight, 2)
    ids, positions = step_inputs(2)
    model.train()
    model(ids, positions).sum().backward()
    model.eval()
    torch.optim.SGD(model.parameters(), lr=0.5).step()  # in place: the version counter moves
    assert prepack.packed_weight(qkv.weight, 2) is not again
    with torch.no_grad():
        expected = model(ids, positions)
        prepack.attach(model, 2)
        got = model(ids, positions)
        prepack.detach(model)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


class OutputHeadShapes(TorchDispatchMode):
    """Records the shape of every operator output whose last dimension is the vocabulary."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.shapes = vocab, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.dim() >= 2 and out.shape[-1] == self.vocab:
            self.shapes.append(tuple(out.shape))
        return out


@pytest.mark.parametrize("strategy, rows", [("greedy", 3), ("beam", 3 * 2)])
def test_generate_runs_the_steps_on_reordered_weights_and_the_context_without_the_head(
        strategy: str, rows: int) -> None:
    model = tiny_glm()
    ids = torch.randint(10, 280, (3, 7), generator=torch.Generator().manual_seed(1))
    positions = torch.stack([torch.arange(7), torch.zeros(7, dtype=torch.long)])[None].expand(3, 2, 7)
    inputs = dict(input_ids=ids, position_ids=positions, sep=torch.full((3,), 7),
                  mask_positions=torch.full((3,), 6), sop_id=SOP, eop_id=EOP, max_new_tokens=5,
                  min_length=5, strategy=strategy, num_beams=2)
    linears = 4 * model.config.num_layers + 1
    assert onednn_calls(lambda: generate(model, **inputs)) == 5 * linears  # five steps, nothing else
    assert model.head_packed is None
    assert all(m.packed is None for m in model.modules() if isinstance(m, Linear))
    vocab = model.config.vocab_size
    with OutputHeadShapes(vocab) as heads:
        generate(model, **inputs)
    # The head's matmul ran once a step on the step's rows; never on the 7 context tokens.
    assert [shape for shape in heads.shapes if len(shape) == 3] == [(rows, 1, vocab)] * 5
    assert max(shape[0] * shape[1] if len(shape) == 3 else shape[0] for shape in heads.shapes) == rows

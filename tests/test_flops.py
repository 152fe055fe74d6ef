"""Analytic training FLOPs against PyTorch's own FLOP counter on a tiny GLM."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from glm_lightning.flops import matmul_parameters, training_flops_per_batch, training_flops_per_token
from glm_lightning.model import GLMConfig, GLMModel

B, L = 2, 24


@pytest.fixture(scope="module")
def config() -> GLMConfig:
    # FFN width other than 4H so that a wrong FFN term cannot hide behind the default.
    return GLMConfig.from_name("tiny", vocab_size=300, intermediate_size=96)


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 300, (B, L), generator=g)
    positions = torch.stack([torch.arange(L), torch.zeros(L, dtype=torch.long)]).expand(B, 2, L)
    return ids, positions, torch.tensor([20, 17])


def counted_flops(model: GLMModel, *, backward: bool) -> int:
    """FLOPs seen by ``FlopCounterMode`` (matmuls only, like the analytic count).

    The math SDPA backend is forced: the counter does not know the fused CPU attention kernel and
    would see no attention FLOPs at all; the math backend runs the same two ``bmm`` per layer.
    """
    ids, positions, sep = batch()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        logits = model(ids, positions, sep)
        if backward:
            logits.sum().backward()
    return counter.get_total_flops()


def test_three_forwards_equal_the_formula(config):
    model = GLMModel(config).eval()
    assert 3 * counted_flops(model, backward=False) == pytest.approx(
        training_flops_per_batch(config, B, L), rel=1e-9)


def test_forward_plus_backward_equals_the_formula(config):
    # Train mode (dropout on): the backward of every matmul is two matmuls of the same size. The
    # word embeddings require grad, so even the first layer's input gradient is computed.
    torch.manual_seed(0)
    model = GLMModel(config).train()
    assert counted_flops(model, backward=True) == pytest.approx(training_flops_per_batch(config, B, L),
                                                                 rel=1e-9)


def test_closed_form_at_glm_base():
    config = GLMConfig.from_name("glm-base")
    H, layers, V = 768, 12, 30592
    assert matmul_parameters(config) == layers * 12 * H * H + V * H
    per_token = training_flops_per_token(config, 512)
    assert per_token == 6 * (layers * 12 * H * H + V * H) + 12 * layers * H * 512
    assert training_flops_per_batch(config, 8, 512) == 8 * 512 * per_token
    # About 6 x the 110M parameters minus position tables, biases and LayerNorms, plus attention.
    assert 6.8e8 < per_token < 7.2e8


def test_output_projection_at_selected_positions_equals_the_formula(config):
    ids, positions, sep = batch()
    selected = torch.arange(L)[None] >= sep[:, None]  # Part B: 4 + 7 positions
    torch.manual_seed(0)
    model = GLMModel(config).train()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(ids, positions, sep, output_mask=selected).sum().backward()
    expected = training_flops_per_batch(config, B, L, output_tokens=11)
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-9)
    assert training_flops_per_batch(config, B, L) - expected == 6 * 384 * 64 * (B * L - 11)

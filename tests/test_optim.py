"""AdamW parameter groups and the AnnealingLR schedule (official `learning_rates.py`)."""

import math

import pytest
import torch

from glm_lightning.model import GLMConfig, GLMModel
from glm_lightning.optim import annealing_factor, annealing_lr, parameter_groups

SCHEDULE = dict(decay_iters=1000, warmup=0.1, decay_ratio=0.05)


@pytest.mark.parametrize("step,expected", [(0, 0.0), (50, 0.5), (100, 1.0)])
def test_linear_warmup_from_zero(step, expected):
    for style in ("cosine", "linear", "constant"):
        assert annealing_factor(step, style=style, **SCHEDULE) == pytest.approx(expected)


def test_cosine_decay_to_ratio_then_constant():
    f = lambda t: annealing_factor(t, style="cosine", **SCHEDULE)  # noqa: E731
    assert f(550) == pytest.approx(0.05 + 0.95 * 0.5)  # half way through the decay
    assert f(325) == pytest.approx(0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert f(1000) == pytest.approx(0.05)
    assert f(5000) == pytest.approx(0.05)


def test_linear_decay_and_constant_style():
    f = lambda t: annealing_factor(t, style="linear", **SCHEDULE)  # noqa: E731
    assert f(550) == pytest.approx(1 - 0.95 * 0.5)
    assert f(1000) == pytest.approx(0.05) and f(3000) == pytest.approx(0.05)
    assert annealing_factor(900, style="constant", **SCHEDULE) == 1.0
    assert annealing_factor(7, style="cosine", decay_iters=10, warmup=0.0, decay_ratio=0.1) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.7)))
    with pytest.raises(ValueError, match="cosine"):
        annealing_factor(1, style="cosin", **SCHEDULE)


def test_scheduler_sets_the_optimizer_lr_per_step():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=2e-4)
    sched = annealing_lr(opt, style="cosine", **SCHEDULE)
    lrs = []
    for _ in range(101):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[50] == pytest.approx(1e-4) and lrs[100] == pytest.approx(2e-4)


def test_no_weight_decay_on_biases_and_layernorm():
    model = GLMModel(GLMConfig.from_name("tiny"))
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decay_names = {names[id(p)] for p in decay["params"]}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decay_names | no_decay_names == set(names.values()) and not decay_names & no_decay_names
    assert all(n.endswith("bias") or "layernorm" in n for n in no_decay_names)
    assert {"word_embeddings.weight", "transformer.position_embeddings.weight",
            "transformer.block_position_embeddings.weight",
            "transformer.layers.0.attention.query_key_value.weight"} <= decay_names
    assert "transformer.final_layernorm.weight" in no_decay_names
    assert "transformer.layers.1.mlp.dense_4h_to_h.bias" in no_decay_names

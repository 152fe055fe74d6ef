"""``GLMConfig.compile``: the compiled layers compute the eager losses and gradients, and batches
of varying size and length reuse one graph (dynamic shapes) instead of compiling one each."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from glm_lightning.blank_infilling import BlankInfillingCollator
from glm_lightning.model import GLMConfig
from glm_lightning.modules.pretrain import GLMPretrainModule


def batch_of(tokenizer, lengths: list[int], seed: int) -> dict:
    rng = np.random.default_rng(seed)
    words = "the river city market long road bright morning quiet garden".split()
    samples = [np.array([tokenizer.cls_id, *tokenizer.encode(" ".join(rng.choice(words, size=n))),
                         tokenizer.eos_id]) for n in lengths]
    return BlankInfillingCollator(tokenizer, seed=seed)(samples)


def loss_and_grads(module: GLMPretrainModule, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    module.zero_grad()
    loss = module.loss(batch)[0]
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in module.named_parameters()}


@pytest.mark.slow
def test_compiled_layers_equal_eager_and_recompile_only_per_mode(tokenizer):
    config = dict(vocab_size=len(tokenizer), num_layers=2, embedding_dropout_prob=0.0,
                  attention_dropout_prob=0.0, output_dropout_prob=0.0, attention="sdpa")
    torch.manual_seed(0)
    eager = GLMPretrainModule(GLMConfig.from_name("tiny", **config)).train()
    compiled = GLMPretrainModule(GLMConfig.from_name("tiny", **config, compile=True)).train()
    compiled.load_state_dict(eager.state_dict())
    assert list(compiled.state_dict()) == list(eager.state_dict())  # the official keys, no wrapper prefix
    torch._dynamo.reset()
    counters.clear()

    # Training batches of four sizes and lengths: one graph (forward and backward) for all.
    batches = [batch_of(tokenizer, lengths, seed) for seed, lengths in
               enumerate(([40, 33, 12, 25], [18, 9, 30], [55, 50], [7, 22, 14, 31, 26]))]
    assert len({tuple(b["input_ids"].shape) for b in batches}) == 4
    for batch in batches:
        loss, grads = loss_and_grads(eager, batch)
        compiled_loss, compiled_grads = loss_and_grads(compiled, batch)
        # fp32; inductor fuses the element-wise ops and may reorder reductions, which moves the
        # result by a few ulps per op: ~1e-6 relative after two layers and a mean over tokens.
        torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=0)
        for name, grad in grads.items():
            torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert counters["stats"]["unique_graphs"] == 1

    # Evaluation (no dropout graph, no backward) adds one graph, again for every shape.
    compiled.eval()
    with torch.no_grad():
        for batch in batches:
            compiled.loss(batch)
    assert counters["stats"]["unique_graphs"] == 2

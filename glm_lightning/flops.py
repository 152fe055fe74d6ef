"""Analytic model FLOPs of a GLM training step, for model-FLOPs utilisation (MFU).

The accounting is the standard one of PaLM (Chowdhery et al. 2022, appendix B) and Megatron-LM
(Narayanan et al. 2021): only matrix multiplications are counted, a multiply-add is two FLOPs, and
the backward pass costs twice the forward pass. Element-wise work (LayerNorm, GeLU, softmax,
dropout, residual adds, biases, the optimiser) and embedding look-ups are not counted, and no
activation recomputation is counted (it is hardware work, not model work). Attention scores are
counted over the full ``seq x seq`` square, with no discount for masked (causal) entries, as in
PaLM's accounting; that is also what the math SDPA kernel computes.
"""

from __future__ import annotations

from glm_lightning.model import GLMConfig


def matmul_parameters(config: GLMConfig) -> int:
    """Weights that take part in a matrix multiplication once per token.

    Per layer: the fused QKV ``3H x H``, the attention output ``H x H`` and the two FFN matrices
    ``2 H F``; plus the output projection ``V x H`` (tied to the word embeddings, but still a
    matmul). Biases, LayerNorms and the position tables are excluded: they are not matmuls.
    """
    H, F = config.hidden_size, config.intermediate_size
    per_layer = 4 * H * H + 2 * H * F
    return config.num_layers * per_layer + config.vocab_size * H


def training_flops_per_token(config: GLMConfig, seq_length: int) -> float:
    """Model FLOPs of forward + backward per token of a ``seq_length`` sequence.

    ``6 * N + 12 * num_layers * hidden_size * seq_length`` where ``N = matmul_parameters(config)``
    (``2 N`` forward, ``4 N`` backward) and the second term is the attention score ``Q K^T`` and
    value ``P V`` matmuls (``2 * 2 * seq * hidden`` FLOPs per token and layer forward, times 3).
    """
    return 6.0 * matmul_parameters(config) + 12.0 * config.num_layers * config.hidden_size * seq_length


def training_flops_per_batch(config: GLMConfig, batch_size: int, seq_length: int,
                             output_tokens: int | None = None) -> float:
    """Model FLOPs of one training step on ``batch_size`` sequences of ``seq_length`` tokens.

    ``output_tokens`` is the number of positions the output projection runs at, when it is not
    every position (``GLMModel.forward(..., output_mask=...)``: pretraining and seq2seq compute the
    logits of Part B only); each position left out saves its ``6 * vocab_size * hidden_size``.
    """
    tokens = batch_size * seq_length
    flops = tokens * training_flops_per_token(config, seq_length)
    if output_tokens is not None:
        flops -= 6.0 * config.vocab_size * config.hidden_size * (tokens - output_tokens)
    return flops

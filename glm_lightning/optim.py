"""Optimiser parameter groups and the official AnnealingLR schedule (official `learning_rates.py`)."""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

DECAY_STYLES = ("cosine", "linear", "constant")


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: no decay for biases and LayerNorm parameters, decay for the rest
    (embeddings and position tables included), as ``glm_get_params_for_weight_decay_optimization``."""
    no_decay_ids = {
        id(p)
        for module in model.modules()
        for name, p in module.named_parameters(recurse=False)
        if isinstance(module, nn.LayerNorm) or name == "bias"
    }
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if id(p) not in no_decay_ids], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) in no_decay_ids], "weight_decay": 0.0},
    ]


def annealing_factor(step: int, *, decay_iters: int, warmup: float, style: str, decay_ratio: float) -> float:
    """Learning-rate multiplier at optimiser step ``step``.

    Linear warmup from 0 over ``warmup * decay_iters`` steps, then cosine or linear decay to
    ``decay_ratio`` of the peak at ``decay_iters``, constant afterwards.
    """
    if style not in DECAY_STYLES:
        raise ValueError(f"lr_decay_style must be one of {DECAY_STYLES}, got {style!r}")
    warmup_iters = warmup * decay_iters
    if step <= warmup_iters and warmup_iters > 0:
        return step / warmup_iters
    if style == "constant":
        return 1.0
    progress = min((step - warmup_iters) / max(decay_iters - warmup_iters, 1), 1.0)
    if style == "cosine":
        return decay_ratio + (1 - decay_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0 - (1.0 - decay_ratio) * progress


def annealing_lr(optimizer: torch.optim.Optimizer, *, decay_iters: int, warmup: float, style: str,
                 decay_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule as a ``LambdaLR`` to be stepped once per optimiser step."""
    factor = partial(annealing_factor, decay_iters=decay_iters, warmup=warmup, style=style,
                     decay_ratio=decay_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def adamw_with_annealing(module: nn.Module, hparams, decay_iters: int | None) -> dict:
    """AdamW over ``parameter_groups`` and the AnnealingLR schedule stepped every optimiser step,
    in the form Lightning's ``configure_optimizers`` returns. ``hparams`` carries lr, weight_decay,
    betas, eps, warmup, lr_decay_style and lr_decay_ratio; ``decay_iters`` is the schedule length."""
    if decay_iters is None or decay_iters <= 0:
        raise ValueError("the learning-rate schedule needs a positive number of steps "
                         "(lr_decay_iters or the Trainer's max_steps)")
    optimizer = torch.optim.AdamW(parameter_groups(module, hparams.weight_decay), lr=hparams.lr,
                                  betas=tuple(hparams.betas), eps=hparams.eps)
    scheduler = annealing_lr(optimizer, decay_iters=decay_iters, warmup=hparams.warmup,
                             style=hparams.lr_decay_style, decay_ratio=hparams.lr_decay_ratio)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

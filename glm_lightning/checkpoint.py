"""Initialising a GLMModel from a checkpoint file (``model.init_from``).

Single files in three layouts are understood, since they all carry the official key names:
our Lightning checkpoints (``state_dict`` with ``model.``-prefixed keys), official GLM
Megatron/DeepSpeed files (``mp_rank_00_model_states.pt``, weights under ``module``), and plain
state dicts such as Hugging Face GLM ``pytorch_model.bin`` (keys optionally prefixed ``glm.`` or
``model.``; head weights that are not part of the GLM backbone are ignored with a warning).
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch
from torch import Tensor

from glm_lightning.model import GLMModel

log = logging.getLogger(__name__)

PREFIXES = ("model.", "glm.")


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The GLM backbone weights stored in ``path``, under the official key names."""
    path = Path(path)
    if not path.is_file():
        kind = "a folder" if path.is_dir() else "missing"
        raise FileNotFoundError(f"model.init_from must be a checkpoint file; {path} is {kind}")
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # Official DeepSpeed files also pickle their training arguments; only the tensors are used.
        stored = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(stored, dict) and isinstance(stored.get("state_dict"), dict):
        stored = stored["state_dict"]  # a Lightning checkpoint
    elif isinstance(stored, dict) and isinstance(stored.get("module"), dict):
        stored = stored["module"]  # an official Megatron/DeepSpeed checkpoint
    if not isinstance(stored, dict) or not any(isinstance(v, Tensor) for v in stored.values()):
        raise ValueError(f"{path} holds no state dict of tensors")
    return {strip_prefix(k): v for k, v in stored.items() if isinstance(v, Tensor)}


def strip_prefix(key: str) -> str:
    for prefix in PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def init_weights(model: GLMModel, path: str | Path) -> None:
    """Copy the weights of ``path`` into ``model``; every backbone weight must be present with the
    model's shape, so a wrong size or vocabulary fails here instead of training a mix."""
    weights = read_state_dict(path)
    expected = model.state_dict()
    ignored = sorted(set(weights) - set(expected))
    if ignored:
        log.warning("%s: ignoring %d weights that are not part of the GLM backbone: %s",
                    path, len(ignored), ", ".join(ignored[:8]) + (" ..." if len(ignored) > 8 else ""))
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ValueError(f"{path} lacks GLM weights {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
                         "is the configured model larger than the checkpoint?")
    for key, tensor in expected.items():
        if weights[key].shape != tensor.shape:
            raise ValueError(
                f"{path}: {key} has shape {list(weights[key].shape)} but the model needs "
                f"{list(tensor.shape)}; set the model size (model.name and overrides) and the "
                "tokenizer the checkpoint was trained with"
            )
    model.load_state_dict({key: weights[key] for key in expected})

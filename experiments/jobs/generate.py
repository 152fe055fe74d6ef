"""Generation job: fill the blanks of each prompt with a trained GLM (official `generate_samples.py`)."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from experiments.jobs.pretrain import build_tokenizer, check_accelerator
from experiments.tokenizer_identity import check_tokenizer
from glm_lightning.checkpoint import build_glm, read_checkpoint
from glm_lightning.config import ConfigError
from glm_lightning.generation import fill_blanks
from glm_lightning.hf_folder import has_tokenizer, read_tokenizer
from glm_lightning.model import GLMModel
from glm_lightning.tokenizer import GLMTokenizer

RUN_TOKENIZER = "tokenizer.model"  # where a pretraining run keeps its sentencepiece model


def require_checkpoint(cfg: DictConfig) -> str:
    """``model.init_from``, which these jobs cannot do without."""
    if not cfg.model.init_from:
        raise ConfigError("'model.init_from' is not set; name the checkpoint to use, "
                          "e.g. model.init_from=outputs/quickstart/<run>/checkpoints/last.ckpt")
    return cfg.model.init_from


def resolve_tokenizer(cfg: DictConfig) -> GLMTokenizer:
    """The configured tokenizer; without ``tokenizer.path``, the tokenizer files of a Hugging Face
    folder (ours or a released one), or the sentencepiece model that a pretraining run saved beside
    its checkpoints (``<run>/tokenizer.model``)."""
    if cfg.tokenizer.path or cfg.tokenizer.kind != "sentencepiece":
        return build_tokenizer(cfg, [])
    checkpoint = Path(require_checkpoint(cfg))
    if has_tokenizer(checkpoint):
        try:
            return read_tokenizer(checkpoint)
        except (OSError, ValueError) as error:
            raise ConfigError(f"model.init_from: the tokenizer of {checkpoint}: {error}") from None
    candidate = checkpoint.resolve().parent.parent / RUN_TOKENIZER
    if checkpoint.parent.name != "checkpoints" or not candidate.is_file():
        raise ConfigError(f"'tokenizer.path' is not set and there is no {RUN_TOKENIZER} of a run beside "
                          f"{checkpoint} (expected <run>/checkpoints/*.ckpt) nor tokenizer files in it; "
                          "set tokenizer.path=...")
    return GLMTokenizer.from_sentencepiece(str(candidate))


def pick_device(cfg: DictConfig) -> torch.device:
    """A GPU when the trainer settings allow one and there is one, else the CPU."""
    check_accelerator(cfg)
    wants_gpu = cfg.trainer.accelerator in ("auto", "gpu", "cuda")
    return torch.device("cuda" if wants_gpu and torch.cuda.is_available() else "cpu")


def load_model(cfg: DictConfig, tokenizer: GLMTokenizer) -> GLMModel:
    """The checkpoint at ``model.init_from`` (its own sizes), checked against the tokenizer."""
    path = require_checkpoint(cfg)
    try:
        stored = read_checkpoint(path)
    except ValueError as error:  # readable file, but not a GLM checkpoint we understand
        raise ConfigError(f"model.init_from: {error}") from error
    check_tokenizer(cfg, tokenizer, "model.init_from", path, stored.tokenizer)
    try:
        model = build_glm(stored, path, num_attention_heads=cfg.model.num_attention_heads)
    except ValueError as error:  # weights a GLM of the inferred config cannot take
        raise ConfigError(f"model.init_from: {error}") from error
    if len(tokenizer) > model.config.vocab_size:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} ids but the checkpoint's vocabulary only "
                          f"{model.config.vocab_size}; set the tokenizer the model was trained with")
    # the attention backend and compilation are how this run computes, not what was trained
    model.config.attention, model.config.compile = cfg.model.attention, cfg.model.compile
    return model.to(pick_device(cfg)).eval()


def decoding_options(cfg: DictConfig) -> dict:
    """Keyword arguments of ``fill_blanks`` from the ``generation`` section."""
    g = cfg.generation
    options = dict(strategy=g.strategy, max_new_tokens=g.max_new_tokens, min_length=g.min_length,
                   no_repeat_ngram_size=g.no_repeat_ngram_size, compile=g.compile)
    if g.strategy == "beam":
        options.update(num_beams=g.num_beams, length_penalty=g.length_penalty)
    if g.strategy == "sample":
        options.update(temperature=g.temperature, top_k=g.top_k, top_p=g.top_p,
                       generator=torch.Generator().manual_seed(cfg.seed))
    return options


def run(cfg: DictConfig) -> list[str]:
    """Print (and return) each prompt with its blanks filled, in order."""
    require_checkpoint(cfg)
    if not cfg.prompts:
        raise ConfigError("'prompts' is empty; give the texts to fill, e.g. "
                          "'prompts=[\"The capital of France is [MASK].\"]'")
    tokenizer = resolve_tokenizer(cfg)
    model = load_model(cfg, tokenizer)
    options = decoding_options(cfg)
    print(f"filled texts ({cfg.generation.strategy}, max_new_tokens={cfg.generation.max_new_tokens}):",
          flush=True)
    filled = []
    positions = model.config.max_sequence_length
    for number, prompt in enumerate(cfg.prompts, start=1):
        length = len(tokenizer.encode(prompt)) + 2  # with [CLS] and the [eos] generation appends
        if length + cfg.generation.max_new_tokens > positions:
            raise ConfigError(f"prompts[{number - 1}]: {length} tokens plus generation.max_new_tokens="
                              f"{cfg.generation.max_new_tokens} exceed the model's {positions} positions "
                              "(model.max_sequence_length); shorten the prompt or lower max_new_tokens")
        text = fill_blanks(model, tokenizer, prompt, **options)
        filled.append(text)
        print(readable(number, prompt, text), flush=True)
    return filled


def readable(number: int, prompt: str, text: str) -> str:
    """A prompt and its filled text as printed: the text's own line breaks kept, indented."""
    body = "\n".join("    " + line for line in text.splitlines() or [""])
    return f"[{number}] {prompt}\n{body}"

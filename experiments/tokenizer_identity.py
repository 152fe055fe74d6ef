"""The tokenizer a run trains with, recorded in its checkpoints and compared whenever a job loads
one of ours (``model.init_from``, resume): a model reads token ids as its tokenizer assigned them,
so another tokenizer with the same padded vocabulary size would load silently and mean nonsense.
Official and Hugging Face checkpoints record no tokenizer and are not checked."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from glm_lightning.checkpoint import TokenizerRecord
from glm_lightning.config import ConfigError
from glm_lightning.tokenizer import GLMTokenizer


def tokenizer_record(cfg: DictConfig, tokenizer: GLMTokenizer) -> TokenizerRecord:
    """The run's tokenizer as checkpoints record it: its vocabulary fingerprint and how it was
    configured (kind and file, or what a trained sentencepiece model was trained on)."""
    kind, backend_path = cfg.tokenizer.kind, getattr(tokenizer.backend, "path", None)
    trained_dir = (Path(cfg.data.cache_dir) / "tokenizers").resolve()  # where build_tokenizer trains
    if cfg.tokenizer.path:
        source = f"tokenizer.kind={kind} tokenizer.path={cfg.tokenizer.path}"
    elif backend_path and Path(backend_path).parent.resolve() == trained_dir:
        corpus = "data.dir" if cfg.data.dir else "data.train_files"
        source = f"sentencepiece trained on {corpus} (tokenizer.vocab_size={cfg.tokenizer.vocab_size})"
    else:  # a run's own tokenizer.model, found beside its checkpoint
        source = f"tokenizer.kind={kind} tokenizer.path={backend_path}"
    return TokenizerRecord(tokenizer.vocabulary_fingerprint(), source)


def check_tokenizer(cfg: DictConfig, tokenizer: GLMTokenizer, key: str, checkpoint: str | Path,
                    recorded: TokenizerRecord | None) -> None:
    """Raise a one-line ConfigError when ``checkpoint`` (named by config ``key``) records a tokenizer
    other than this run's; a checkpoint without a record passes."""
    if recorded is None:
        return
    ours = tokenizer_record(cfg, tokenizer)
    if recorded.fingerprint != ours.fingerprint:
        raise ConfigError(
            f"{key}: {checkpoint} was trained with the tokenizer {recorded.source} (vocabulary "
            f"{recorded.fingerprint[:12]}), but this run uses {ours.source} (vocabulary "
            f"{ours.fingerprint[:12]}); set tokenizer.path and tokenizer.kind to the tokenizer the "
            "checkpoint was trained with"
        )

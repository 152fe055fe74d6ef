"""Shared test fixtures."""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from glm_lightning.checkpoint import save_ours
from glm_lightning.model import GLMConfig, GLMModel
from glm_lightning.tokenizer import GLMTokenizer, train_sentencepiece


@pytest.fixture(autouse=True)
def environment_restored() -> Iterator[None]:
    """Each test leaves os.environ as it found it. Lightning writes rank variables (LOCAL_RANK,
    NODE_RANK, ...) into it when a test runs a distributed strategy in this process; a later test's
    `python -m experiments.run trainer.devices=2` would inherit them, take itself for a launched
    rank and wait forever for a rank 1 it never starts."""
    saved = dict(os.environ)
    yield
    if dict(os.environ) != saved:
        os.environ.clear()
        os.environ.update(saved)

# Small word lists for a deterministic synthetic English corpus. Enough distinct words that a
# ~500-piece sentencepiece model can be trained on it in well under a second.
_NOUNS = """model text language span token mask sentence document attention position layer river
mountain city village teacher student question answer story history science music garden window
kitchen bridge market forest ocean island morning evening winter summer library museum doctor
engineer painter farmer letter journey machine computer network signal picture country harbor
castle valley desert planet station festival""".split()
_VERBS = """learns predicts fills generates reads writes travels builds carries remembers forgets
discovers explains describes watches follows answers opens closes crosses visits paints repairs
measures collects""".split()
_ADJECTIVES = """bright dark small large ancient modern wonderful terrible careful curious happy quiet
loud green blue yellow narrow famous simple strange gentle heavy""".split()
_ADVERBS = "quickly slowly never always sometimes often carefully quietly suddenly".split()
_OTHER = "the a an of to in on with for from by at and but because although while".split()
_ACCENTED = "café naïve résumé façade jalapeño Zürich".split()
_CHINESE = [
    "我们今天学习语言模型。",
    "你明天去图书馆吗？",
    "天气真好！",
    "他说：好的；我们走吧。",
    "故事还没有结束……",
]


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(_OTHER), rng.choice(_ADJECTIVES), rng.choice(_NOUNS), rng.choice(_VERBS)]
    for _ in range(rng.randint(1, 8)):
        pool = rng.choice((_NOUNS, _VERBS, _ADJECTIVES, _ADVERBS, _OTHER, _OTHER))
        words.append(rng.choice(pool))
    if rng.random() < 0.05:
        words.insert(rng.randrange(len(words)), rng.choice(_ACCENTED))
    text = " ".join(words)
    return text[0].upper() + text[1:] + rng.choice(".....??!;:")


def make_corpus_text(num_paragraphs: int = 120, seed: int = 0) -> str:
    """Deterministic English text (a little Chinese) with sentence punctuation and newlines."""
    rng = random.Random(seed)
    paragraphs = []
    for _ in range(num_paragraphs):
        sentences = [_sentence(rng) for _ in range(rng.randint(1, 5))]
        if rng.random() < 0.2:
            sentences.append(rng.choice(_CHINESE))
        paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs) + "\n"


@pytest.fixture(scope="session")
def make_text() -> Callable[..., str]:
    """`make_corpus_text(num_paragraphs, seed)`: more text like the training corpus."""
    return make_corpus_text


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic text file (a few hundred sentences)."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(make_corpus_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def sentencepiece_model(corpus_file: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Path of a 500-piece sentencepiece model trained on `corpus_file`."""
    prefix = tmp_path_factory.mktemp("spm") / "tiny"
    return train_sentencepiece([str(corpus_file)], 500, str(prefix), character_coverage=1.0)


@pytest.fixture(scope="session")
def tokenizer(sentencepiece_model: str) -> GLMTokenizer:
    """A tiny GLM tokenizer (sentencepiece backend, official Chinese command-token layout)."""
    return GLMTokenizer.from_sentencepiece(sentencepiece_model)


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: GLMTokenizer,
            sentencepiece_model: str) -> Path:
    """A pretraining run's layout, read by the jobs that take ``model.init_from`` (tests only read
    it): <run>/checkpoints/last.ckpt of an untrained tiny GLM beside <run>/tokenizer.model."""
    run = tmp_path_factory.mktemp("pretrain_run")
    shutil.copyfile(sentencepiece_model, run / "tokenizer.model")
    torch.manual_seed(0)
    model = GLMModel(GLMConfig.from_name("tiny", vocab_size=len(tokenizer), max_sequence_length=64))
    save_ours(model, run / "checkpoints" / "last.ckpt")
    return run

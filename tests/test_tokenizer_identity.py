"""Checkpoints record the tokenizer they were trained with; loading one of ours with another
tokenizer (``model.init_from``, resume) is refused in one line, official and Hugging Face ones pass."""

import shutil
from pathlib import Path

import pytest
import torch

from experiments.config import load_config
from experiments.jobs.generate import load_model
from experiments.jobs.pretrain import build_module, build_tokenizer, run
from experiments.jobs.superglue import load_backbone
from glm_lightning.checkpoint import convert, read_checkpoint
from glm_lightning.config import ConfigError
from glm_lightning.tokenizer import GLMTokenizer, train_sentencepiece
from tests.conftest import make_corpus_text


@pytest.fixture(scope="module")
def other_model(tmp_path_factory) -> str:
    """Tokenizer B: 500 pieces like the session's tokenizer A, trained on other text (same padded size)."""
    text = tmp_path_factory.mktemp("other") / "text.txt"
    text.write_text(make_corpus_text(seed=7), encoding="utf-8")
    return train_sentencepiece([str(text)], 500, str(text.parent / "other"), character_coverage=1.0)


def pretrain_config(tmp_path: Path, spm: str, corpus: Path, *overrides: str):
    return load_config("quickstart", [
        f"output_dir={tmp_path / 'outputs'}", f"data.cache_dir={tmp_path / 'cache'}", "run_name=r1",
        f"tokenizer.path={spm}", f"data.train_files=[{corpus}]", f"data.val_files=[{corpus}]",
        "logging.enabled=false",
        "model.num_layers=1", "model.hidden_size=32", "model.num_attention_heads=2", "data.batch_size=2",
        "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1", *overrides,
    ])


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, sentencepiece_model, corpus_file) -> Path:
    """last.ckpt of a two-step pretraining run with tokenizer A."""
    tmp = tmp_path_factory.mktemp("pretrained")
    return run(pretrain_config(tmp, sentencepiece_model, corpus_file)) / "checkpoints" / "last.ckpt"


def finetune_config(exp: str, checkpoint: Path, spm: str, *overrides: str):
    return load_config(exp, [f"model.init_from={checkpoint}", f"tokenizer.path={spm}",
                             "model.num_layers=1", "model.hidden_size=32", "model.num_attention_heads=2",
                             *overrides])


def test_the_vocabulary_fingerprint_leaves_out_the_sentinels(sentencepiece_model, other_model):
    plain = GLMTokenizer.from_sentencepiece(sentencepiece_model)
    sentinels = GLMTokenizer.from_sentencepiece(sentencepiece_model, num_sentinels=4)
    other = GLMTokenizer.from_sentencepiece(other_model)
    assert len(plain) == len(other) == 512
    assert plain.vocabulary_fingerprint() == sentinels.vocabulary_fingerprint()
    assert plain.fingerprint() != sentinels.fingerprint()  # corpus caches still tell them apart
    assert plain.vocabulary_fingerprint() != other.vocabulary_fingerprint()
    gmask_moved = GLMTokenizer.from_sentencepiece(sentencepiece_model, fix_command_token=False)
    assert plain.vocabulary_fingerprint() != gmask_moved.vocabulary_fingerprint()


def test_checkpoints_record_the_tokenizer(pretrained, tokenizer):
    stored = torch.load(pretrained, map_location="cpu", weights_only=False, mmap=True)
    assert stored["tokenizer_fingerprint"] == tokenizer.vocabulary_fingerprint()
    assert stored["tokenizer_source"].startswith("tokenizer.kind=sentencepiece tokenizer.path=")
    assert read_checkpoint(pretrained).tokenizer.fingerprint == tokenizer.vocabulary_fingerprint()


def test_init_from_with_another_tokenizer_is_refused_in_one_line(pretrained, sentencepiece_model, other_model,
                                                                 tokenizer):
    other = GLMTokenizer.from_sentencepiece(other_model)
    cfg = finetune_config("quickstart", pretrained, other_model)
    with pytest.raises(ConfigError) as refused:
        build_module(cfg, other)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"model.init_from: {pretrained} was trained with")
    assert f"tokenizer.path={sentencepiece_model}" in message and f"tokenizer.path={other_model}" in message
    for fingerprint in (tokenizer.vocabulary_fingerprint(), other.vocabulary_fingerprint()):
        assert fingerprint[:12] in message
    assert "set tokenizer.path and tokenizer.kind" in message
    for exp in ("generate", "superglue"):  # the jobs that take their sizes from the checkpoint
        with pytest.raises(ConfigError, match=f"^model.init_from: {pretrained} was trained with"):
            cfg = finetune_config(exp, pretrained, other_model)
            (load_model if exp == "generate" else load_backbone)(cfg, build_tokenizer(cfg, []))


def test_init_from_with_the_same_tokenizer_loads(pretrained, sentencepiece_model, tokenizer):
    module = build_module(finetune_config("quickstart", pretrained, sentencepiece_model), tokenizer)
    assert module.init_from == str(pretrained)
    model = load_model(finetune_config("generate", pretrained, sentencepiece_model), tokenizer)
    stored = torch.load(pretrained, map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(model.word_embeddings.weight, stored["model.word_embeddings.weight"])


def test_a_sentinel_ablation_checkpoint_finetunes_without_sentinels(tmp_path, sentencepiece_model,
                                                                    corpus_file, tokenizer):
    run_dir = run(pretrain_config(tmp_path, sentencepiece_model, corpus_file, "data.sentinel_tokens=true"))
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    cfg = finetune_config("superglue", checkpoint, sentencepiece_model)
    config = load_backbone(cfg, build_tokenizer(cfg, []))
    assert config.vocab_size == 640 > len(tokenizer)  # 21 sentinel pairs after the 510 ids
    model = load_model(finetune_config("generate", checkpoint, sentencepiece_model), tokenizer)
    assert model.config.vocab_size == 640


@pytest.mark.parametrize("layout", ["official", "hf"])
def test_official_and_hugging_face_checkpoints_record_no_tokenizer_and_load(tmp_path, pretrained, other_model,
                                                                            layout):
    convert(pretrained, tmp_path / layout, layout)
    assert read_checkpoint(tmp_path / layout).tokenizer is None
    cfg = finetune_config("generate", tmp_path / layout, other_model)
    model = load_model(cfg, GLMTokenizer.from_sentencepiece(other_model))
    stored = torch.load(pretrained, map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(model.word_embeddings.weight, stored["model.word_embeddings.weight"])


def test_converting_ours_to_ours_keeps_the_record(tmp_path, pretrained, tokenizer):
    convert(pretrained, tmp_path / "ours.ckpt", "ours")
    assert read_checkpoint(tmp_path / "ours.ckpt").tokenizer == read_checkpoint(pretrained).tokenizer


def test_resume_with_another_tokenizer_is_refused(tmp_path, sentencepiece_model, other_model, corpus_file):
    spm = tmp_path / "tokenizer.model"  # the same configured path, its file replaced between the runs
    shutil.copy(sentencepiece_model, spm)
    run_dir = run(pretrain_config(tmp_path, str(spm), corpus_file))
    shutil.copy(other_model, spm)
    with pytest.raises(ConfigError, match=rf"^resume: {run_dir}/checkpoints/\S+\.ckpt was trained with the "
                                          r"tokenizer .* \(vocabulary [0-9a-f]{12}\), but this run uses"):
        run(pretrain_config(tmp_path, str(spm), corpus_file, "resume=auto", "trainer.max_steps=4"))

"""Hugging Face folders laid out as the released GLM: auto_map, tokenizer files, and reading them back."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from test_tokenizer_official import write_bert_vocab, write_gpt2_files, write_roberta_files

from glm_lightning.checkpoint import export_hf, load_glm, main, save_ours
from glm_lightning.hf_folder import AUTO_CLASSES, read_tokenizer
from glm_lightning.model import GLMConfig, GLMModel
from glm_lightning.tokenizer import GLMTokenizer

RELEASED_CLASSES = {  # the four classes every released THUDM/glm-* config.json maps
    "AutoConfig": "configuration_glm.GLMConfig",
    "AutoModel": "modeling_glm.GLMModel",
    "AutoModelForSeq2SeqLM": "modeling_glm.GLMForConditionalGeneration",
    "AutoModelForMultipleChoice": "modeling_glm.GLMForMultipleChoice",
}


def tiny_model(vocab_size: int) -> GLMModel:
    torch.manual_seed(0)
    return GLMModel(GLMConfig.from_name("tiny", vocab_size=vocab_size, max_sequence_length=32)).eval()


def test_sentencepiece_export_loads_back_and_says_what_the_release_cannot_express(tokenizer, tmp_path,
                                                                                  caplog):
    model = tiny_model(len(tokenizer))
    with caplog.at_level(logging.WARNING, logger="glm_lightning.checkpoint"):
        export_hf(model, tmp_path / "hf", tokenizer=tokenizer)
    folder = tmp_path / "hf"
    config = json.loads((folder / "config.json").read_text())
    assert AUTO_CLASSES == RELEASED_CLASSES
    assert config["auto_map"] == {k: f"THUDM/glm-large-chinese--{v}" for k, v in RELEASED_CLASSES.items()}
    assert config["model_type"] == "glm" and config["architectures"] == ["GLMModel"]
    assert config["torch_dtype"] == "float32"
    assert sorted(p.name for p in folder.iterdir()) == [
        "added_tokens.json", "cog-pretrain.model", "config.json", "pytorch_model.bin",
        "tokenizer_config.json"]
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "GLMChineseTokenizer"
    assert tokenizer_config["auto_map"]["AutoTokenizer"] == [
        "THUDM/glm-large-chinese--tokenization_glm.GLMChineseTokenizer", None]
    assert tokenizer_config["mask_token"] == "[MASK]" and tokenizer_config["eos_token"] == "<|endoftext|>"
    assert tokenizer_config["additional_special_tokens"] == ["<|startofpiece|>", "<|endofpiece|>", "[gMASK]",
                                                             "[sMASK]"]
    added = json.loads((folder / "added_tokens.json").read_text())
    assert added["[gMASK]"] == tokenizer.gmask_id and added["<|startofpiece|>"] == tokenizer.sop_id
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 1 and "no released tokenizer class reads our sentencepiece vocabulary" in notes[0]
    assert "\n" not in notes[0]

    back = read_tokenizer(folder)
    assert back.vocabulary_fingerprint() == tokenizer.vocabulary_fingerprint()
    loaded = load_glm(folder)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize("kind", ["wordpiece", "gpt2", "roberta"])
def test_official_vocabularies_export_as_their_released_tokenizer(kind, tmp_path, caplog):
    if kind == "wordpiece":
        tok = GLMTokenizer.from_wordpiece(str(write_bert_vocab(tmp_path / "vocab.txt")))
        files, cls = ["vocab.txt"], "GLMBertTokenizer"
    else:
        write = write_gpt2_files if kind == "gpt2" else write_roberta_files
        tok = GLMTokenizer.from_bpe(*map(str, write(tmp_path / kind)), kind=kind)
        files = ["merges.txt", "vocab.json"]
        cls = "GLMGPT2Tokenizer" if kind == "gpt2" else "GLMRobertaTokenizer"
    folder = tmp_path / "hf"
    with caplog.at_level(logging.WARNING, logger="glm_lightning.checkpoint"):
        export_hf(tiny_model(len(tok)), folder, tokenizer=tok, remote_code="someone/glm-copy")
    assert not caplog.records  # nothing the released classes cannot express
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {k: f"someone/glm-copy--{v}" for k, v in RELEASED_CLASSES.items()}
    assert all((folder / name).is_file() for name in files)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == cls
    assert tokenizer_config["auto_map"]["AutoTokenizer"][0] == f"someone/glm-copy--tokenization_glm.{cls}"
    back = read_tokenizer(folder)
    assert back.vocabulary_fingerprint() == tok.vocabulary_fingerprint()
    assert back.encode(" the story [MASK] ends") == tok.encode(" the story [MASK] ends")


def test_convert_to_hf_writes_the_tokenizer_of_the_run(tokenizer, sentencepiece_model, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copyfile(sentencepiece_model, run.mkdir() or run / "tokenizer.model")
    save_ours(tiny_model(len(tokenizer)), run / "checkpoints" / "last.ckpt")
    assert main(["convert", str(run / "checkpoints" / "last.ckpt"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert (tmp_path / "hf" / "cog-pretrain.model").read_bytes() == Path(sentencepiece_model).read_bytes()
    assert read_tokenizer(tmp_path / "hf").vocabulary_fingerprint() == tokenizer.vocabulary_fingerprint()
    # a folder converts again with its tokenizer, and a user-named remote-code repository
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "hf2"), "--to", "hf",
                 "--remote-code", "me/glm"]) == 0
    config = json.loads((tmp_path / "hf2" / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "me/glm--modeling_glm.GLMModel"
    assert (tmp_path / "hf2" / "cog-pretrain.model").is_file()


STAND_IN_CONFIG = '''from transformers import PretrainedConfig


class GLMConfig(PretrainedConfig):
    model_type = "glm"

    def __init__(self, num_layers=24, hidden_size=1024, **kwargs):
        self.num_layers, self.hidden_size = num_layers, hidden_size
        super().__init__(**kwargs)
'''


def test_transformers_takes_the_config_class_from_the_named_repository(tokenizer, tmp_path, monkeypatch):
    """AutoConfig with trust_remote_code follows the export's auto_map to the THUDM repository (here an
    offline hub cache holding a stand-in configuration_glm.py); without it, transformers reads
    model_type "glm" as its built-in GLM-4 config, which is why the auto_map is needed."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    transformers = pytest.importorskip("transformers")
    from transformers import dynamic_module_utils

    export_hf(tiny_model(len(tokenizer)), tmp_path / "hf", tokenizer=tokenizer)
    repo = tmp_path / "hub" / "models--THUDM--glm-large-chinese"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "configuration_glm.py").write_text(STAND_IN_CONFIG)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr("sys.path", list(__import__("sys").path))
    config = transformers.AutoConfig.from_pretrained(tmp_path / "hf", trust_remote_code=True,
                                                     cache_dir=tmp_path / "hub")
    assert type(config).__module__.startswith("transformers_modules.THUDM.glm_hyphen_large_hyphen_chinese.")
    assert (config.num_layers, config.hidden_size) == (2, 64)
    builtin = transformers.AutoConfig.from_pretrained(tmp_path / "hf", trust_remote_code=False)
    assert type(builtin).__module__ == "transformers.models.glm.configuration_glm"

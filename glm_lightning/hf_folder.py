"""Hugging Face folders laid out as the released GLM repositories (THUDM/glm-large, glm-roberta-large,
glm-10b, glm-large-chinese, ... on the hub), so that ``transformers`` loads them with the released
remote code (``trust_remote_code=True``).

A released folder holds, beside the weights and ``config.json``:

* in ``config.json`` an ``auto_map`` naming the remote-code classes (``configuration_glm.GLMConfig``,
  ``modeling_glm.GLMModel``, ``modeling_glm.GLMForConditionalGeneration``,
  ``modeling_glm.GLMForMultipleChoice``); an export points each at the THUDM repository of its
  vocabulary (``THUDM/glm-large--modeling_glm.GLMModel``: transformers fetches the code from there)
  or at a repository the user names;
* the vocabulary files the released tokenizer class reads (``tokenization_glm.py``): ``vocab.txt``
  (``GLMBertTokenizer``), ``vocab.json`` and ``merges.txt`` (``GLMGPT2Tokenizer``,
  ``GLMRobertaTokenizer``) or ``cog-pretrain.model`` (``GLMChineseTokenizer``, sentencepiece);
* ``tokenizer_config.json`` naming that class, its special tokens and its own ``auto_map``, and
  ``added_tokens.json`` with the ids of the command tokens that are not vocabulary pieces.

``read_tokenizer`` reads such a folder back as a ``GLMTokenizer`` (ours or a released one).
"""

from __future__ import annotations

import json
from pathlib import Path

from glm_lightning.tokenizer import BPEBackend, GLMTokenizer, SentencePieceBackend, WordPieceBackend

# The remote code that loads an export, by vocabulary: the THUDM repository released with it.
REMOTE_CODE_REPOS = {
    "wordpiece": "THUDM/glm-large",
    "roberta": "THUDM/glm-roberta-large",
    "gpt2": "THUDM/glm-10b",
    "sentencepiece": "THUDM/glm-large-chinese",
}
AUTO_CLASSES = {
    "AutoConfig": "configuration_glm.GLMConfig",
    "AutoModel": "modeling_glm.GLMModel",
    "AutoModelForSeq2SeqLM": "modeling_glm.GLMForConditionalGeneration",
    "AutoModelForMultipleChoice": "modeling_glm.GLMForMultipleChoice",
}
TOKENIZER_CLASSES = {
    "wordpiece": "GLMBertTokenizer",
    "roberta": "GLMRobertaTokenizer",
    "gpt2": "GLMGPT2Tokenizer",
    "sentencepiece": "GLMChineseTokenizer",
}
KIND_OF_CLASS = {name: kind for kind, name in TOKENIZER_CLASSES.items()}
SENTENCEPIECE_FILE = "cog-pretrain.model"  # the file name GLMChineseTokenizer reads
TOKENIZER_CONFIG = "tokenizer_config.json"
ADDED_TOKENS = "added_tokens.json"
# Special-token fields of the released tokenizer configs, by our command-token names.
SPECIAL_FIELDS = {"eos": "eos_token", "pad": "pad_token", "cls": "cls_token", "mask": "mask_token",
                  "unk": "unk_token", "sep": "sep_token"}
ADDITIONAL = ("sop", "eop", "gmask", "smask")  # additional_special_tokens, in the released order


def tokenizer_kind(tokenizer: GLMTokenizer) -> str:
    """``wordpiece``, ``gpt2``, ``roberta`` or ``sentencepiece``: which vocabulary ``tokenizer`` reads."""
    backend = tokenizer.backend
    if isinstance(backend, WordPieceBackend):
        return "wordpiece"
    if isinstance(backend, BPEBackend):
        return "roberta" if tokenizer.id_to_token(tokenizer.cls_id) == "<s>" else "gpt2"
    if isinstance(backend, SentencePieceBackend):
        return "sentencepiece"
    raise ValueError(f"no released GLM tokenizer class reads a {type(backend).__name__} vocabulary")


def auto_map(repo: str) -> dict[str, str]:
    """The ``auto_map`` of ``config.json``: each released class, taken from ``repo``."""
    return {auto: f"{repo}--{target}" for auto, target in AUTO_CLASSES.items()}


def write_tokenizer(tokenizer: GLMTokenizer, folder: str | Path, *, repo: str | None = None) -> str | None:
    """Write the vocabulary files, ``tokenizer_config.json`` and ``added_tokens.json`` of
    ``tokenizer`` into ``folder`` as the released repositories hold them. Returns one line on what
    the released classes cannot express (None when they express all of it)."""
    folder = Path(folder)
    kind = tokenizer_kind(tokenizer)
    repo = repo or REMOTE_CODE_REPOS[kind]
    backend = tokenizer.backend
    if isinstance(backend, WordPieceBackend):
        (folder / "vocab.txt").write_text(backend._vocab_text, encoding="utf-8")
    elif isinstance(backend, BPEBackend):
        (folder / "vocab.json").write_text(backend._vocab_json, encoding="utf-8")
        (folder / "merges.txt").write_text(backend._merges_text, encoding="utf-8")
    else:
        (folder / SENTENCEPIECE_FILE).write_bytes(backend._proto)
    by_name = {t.name: t for t in tokenizer.command_token_list}
    config: dict = {field: by_name[name].text for name, field in SPECIAL_FIELDS.items() if name in by_name}
    config["additional_special_tokens"] = [by_name[name].text for name in ADDITIONAL if name in by_name]
    config.update(add_prefix_space=False, tokenizer_class=TOKENIZER_CLASSES[kind], use_fast=False,
                  auto_map={"AutoTokenizer": [f"{repo}--tokenization_glm.{TOKENIZER_CLASSES[kind]}", None]})
    if isinstance(backend, WordPieceBackend):
        config["do_lower_case"] = backend.lower_case
    (folder / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    # command tokens beyond the vocabulary, at our ids (the released tokenizers read this file)
    added = {t.text: t.id for t in tokenizer.command_token_list if t.id >= backend.num_pieces}
    (folder / ADDED_TOKENS).write_text(json.dumps(dict(sorted(added.items(), key=lambda kv: kv[1])),
                                                  indent=2) + "\n", encoding="utf-8")
    if kind == "sentencepiece":
        return (f"note: {folder}: no released tokenizer class reads our sentencepiece vocabulary; "
                f"GLMChineseTokenizer is named and reads it as {SENTENCEPIECE_FILE} with the command-token "
                f"ids of {ADDED_TOKENS}, but only the Chinese vocabulary was released with it")
    return None


def has_tokenizer(folder: str | Path) -> bool:
    """Whether ``folder`` holds a released-style tokenizer (``tokenizer_config.json`` naming a GLM class,
    or one of the vocabulary files)."""
    folder = Path(folder)
    return folder.is_dir() and any((folder / name).is_file() for name in
                                   (TOKENIZER_CONFIG, "vocab.txt", "vocab.json", SENTENCEPIECE_FILE))


def read_tokenizer(folder: str | Path) -> GLMTokenizer:
    """The ``GLMTokenizer`` of a folder written by ``write_tokenizer`` or released by THUDM: the class
    in ``tokenizer_config.json`` says which vocabulary, the files beside it hold it."""
    folder = Path(folder)
    config_path = folder / TOKENIZER_CONFIG
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    name = config.get("tokenizer_class")
    if name is not None and name not in KIND_OF_CLASS:
        raise ValueError(f"{config_path}: tokenizer_class {name!r} is not a GLM tokenizer "
                         f"({', '.join(KIND_OF_CLASS)})")
    kind = KIND_OF_CLASS.get(name) if name else None
    if kind is None:  # no config: the files say which
        kind = ("wordpiece" if (folder / "vocab.txt").is_file()
                else "gpt2" if (folder / "vocab.json").is_file() else "sentencepiece")
    if kind == "wordpiece":
        return GLMTokenizer.from_wordpiece(str(_file(folder, "vocab.txt")),
                                           lower_case=config.get("do_lower_case", True))
    if kind in ("gpt2", "roberta"):
        return GLMTokenizer.from_bpe(str(_file(folder, "vocab.json")), str(_file(folder, "merges.txt")),
                                     kind=kind)
    return GLMTokenizer.from_sentencepiece(str(_file(folder, SENTENCEPIECE_FILE)))


def _file(folder: Path, name: str) -> Path:
    if not (folder / name).is_file():
        raise FileNotFoundError(f"{folder}: no {name}, which its tokenizer needs")
    return folder / name


def load_tokenizer(path: str | Path, *, kind: str | None = None) -> GLMTokenizer:
    """A tokenizer from a folder (``read_tokenizer``) or one vocabulary file: a sentencepiece
    ``.model``, a BERT ``vocab.txt``, or a ``vocab.json`` with ``merges.txt`` beside it (``kind``
    ``gpt2``, the default, or ``roberta``)."""
    path = Path(path)
    if path.is_dir():
        return read_tokenizer(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {path} does not exist")
    if path.suffix == ".txt":
        return GLMTokenizer.from_wordpiece(str(path))
    if path.suffix == ".json":
        return GLMTokenizer.from_bpe(str(path), str(_file(path.parent, "merges.txt")), kind=kind or "gpt2")
    return GLMTokenizer.from_sentencepiece(str(path))

"""exp=prepare_data: one command tokenizes the corpus into the cache that training then reuses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sentencepiece import sentencepiece_model_pb2

from datamodules.corpus import tokenize_corpus
from experiments.config import load_config
from experiments.jobs.pretrain import build_tokenizer, training_files
from experiments.run import main
from glm_lightning.tokenizer import GLMTokenizer


def write_corpus(folder: Path, make_text: Any) -> list[str]:
    folder.mkdir(parents=True)
    jsonl = folder / "a.jsonl"
    jsonl.write_text("".join(json.dumps({"text": make_text(4, seed=k)}) + "\n" for k in range(60)))
    text = folder / "b.txt"
    text.write_text("\f".join(make_text(4, seed=100 + k) for k in range(30)))
    return [str(jsonl), str(text)]


def test_prepare_data_fills_the_cache_training_reuses(tmp_path: Path, make_text: Any, capsys: Any) -> None:
    files = write_corpus(tmp_path / "data", make_text)
    overrides = [f"data.train_files=[{','.join(files)}]", f"data.cache_dir={tmp_path / 'cache'}",
                 f"output_dir={tmp_path / 'out'}", "tokenizer.vocab_size=600"]
    assert main(["exp=prepare_data", *overrides]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("prepared 2 files (2 tokenized, ") and "90 documents" in last
    assert " MB/s; cache " in last and last.endswith(str(tmp_path / "cache"))

    assert main(["exp=prepare_data", *overrides]) == 0
    assert "all from cache" in capsys.readouterr().out.strip().splitlines()[-1]

    # the pretraining job with the same settings builds the same tokenizer and finds every shard
    cfg = load_config("pretrain", overrides)
    tokenizer = build_tokenizer(cfg, training_files(cfg))
    corpus = tokenize_corpus(training_files(cfg), tokenizer, cfg.data.cache_dir, progress=False)
    assert corpus.report.files_tokenized == 0 and corpus.num_documents == 90


def test_a_tokenizer_trained_on_jsonl_has_no_json_pieces(tmp_path: Path, make_text: Any) -> None:
    files = write_corpus(tmp_path / "data", make_text)
    cfg = load_config("pretrain", [f"data.train_files=[{files[0]}]", f"data.cache_dir={tmp_path / 'cache'}",
                                   "tokenizer.vocab_size=600"])
    tokenizer: GLMTokenizer = build_tokenizer(cfg, training_files(cfg))
    pieces = [tokenizer.backend.id_to_piece(i) for i in range(tokenizer.backend.num_pieces)]
    assert len(pieces) > 400
    assert not [p for p in pieces if set(p) & set('{}"\\')]  # the text itself has none of these


def test_tokenizer_model_type_selects_the_sentencepiece_algorithm(tmp_path: Path, make_text: Any) -> None:
    files = write_corpus(tmp_path / "data", make_text)
    types = {}
    for model_type in ("unigram", "bpe"):
        cfg = load_config("pretrain", [f"data.train_files=[{files[1]}]", f"data.cache_dir={tmp_path / 'c'}",
                                       "tokenizer.vocab_size=500", f"tokenizer.model_type={model_type}"])
        tokenizer: GLMTokenizer = build_tokenizer(cfg, training_files(cfg))
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(Path(tokenizer.backend.path).read_bytes())
        types[model_type] = (proto.trainer_spec.model_type, tokenizer.backend.path)
    assert types["unigram"][0] == sentencepiece_model_pb2.TrainerSpec.UNIGRAM
    assert types["bpe"][0] == sentencepiece_model_pb2.TrainerSpec.BPE
    assert types["unigram"][1] != types["bpe"][1]  # cached apart

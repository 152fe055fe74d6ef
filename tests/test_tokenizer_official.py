"""Tests for the official GLM vocabularies: BERT WordPiece, GPT-2 and RoBERTa BPE, Chinese sentencepiece.

Each layout is checked on small vocabulary files written here, shaped like the real ones, and on the
real files in ../shared/data/vocab when they are present.
"""

from __future__ import annotations

import itertools
import json
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from glm_lightning.tokenizer import GLMTokenizer

VOCAB_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "vocab"

# Words the small vocabularies know, in BERT (lower-case) and GPT-2 ("Ġ" = leading space) form.
_WORDS = ["the", "model", "fills", "blank", "hello", "world", "story", "ends", "a"]
_BERT_EXTRA = [".", ",", "!", "?", "un", "##aff", "##able", "##s", *"abcdefghijklmnopqrstuvwxyz"]

BERT_LAYOUT = {
    "pad": 0, "eos": 0, "cls": 101, "mask": 103, "sep": 102, "unk": 100,
    "sop": 30522, "eop": 30523, "gmask": 30524, "smask": 30525, "dblock": 30526,
}  # fmt: skip
GPT2_LAYOUT = {
    "pad": 50256, "eos": 50256, "cls": 50259, "mask": 50260, "sep": 50261, "unk": 50262,
    "sop": 50257, "eop": 50258, "gmask": 50263, "smask": 50264, "dblock": 50265,
}  # fmt: skip
ROBERTA_LAYOUT = {
    "pad": 2, "eos": 2, "cls": 0, "mask": 50264, "sep": 2, "unk": 3,
    "sop": 50265, "eop": 50266, "gmask": 50267, "smask": 50268, "dblock": 50269,
}  # fmt: skip
LAYOUTS = {"bert": BERT_LAYOUT, "gpt2": GPT2_LAYOUT, "roberta": ROBERTA_LAYOUT}
PADDED = {"bert": 30592, "gpt2": 50304, "roberta": 50304}
NUM_PIECES = {"bert": 30522, "gpt2": 50257, "roberta": 50265}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte."""
    ranges = (("!", "~"), ("¡", "¬"), ("®", "ÿ"))
    printable = [b for first, last in ranges for b in range(ord(first), ord(last) + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def write_bert_vocab(path: Path, words: list[str] = _WORDS) -> Path:
    """30522 lines: [PAD] = 0, [unused*], [UNK] = 100, [CLS] = 101, [SEP] = 102, [MASK] = 103, words."""
    lines = ["[PAD]", *[f"[unused{i}]" for i in range(99)], "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    lines += [w for w in [*words, *_BERT_EXTRA] if w not in lines]
    lines += [f"[unused{i}]" for i in range(99, 99 + 30522 - len(lines))]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _gpt2_pieces(words: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """All 256 byte characters, then each word (with and without "Ġ") built by left-to-right merges."""
    pieces = list(_bytes_to_unicode().values())
    merges: list[tuple[str, str]] = []
    for word in words:
        for form in (word, "Ġ" + word):
            for k in range(1, len(form)):
                if form[: k + 1] not in pieces:
                    merges.append((form[:k], form[k]))
                    pieces.append(form[: k + 1])
    return pieces, merges


def write_gpt2_files(folder: Path, words: list[str] = _WORDS) -> tuple[Path, Path]:
    """GPT-2 shaped: 50257 entries, <|endoftext|> = 50256, filler pieces no merge can produce."""
    pieces, merges = _gpt2_pieces(words)
    pieces += [f"filler{i}" for i in range(50256 - len(pieces))] + ["<|endoftext|>"]
    return _write_bpe(folder, {p: i for i, p in enumerate(pieces)}, merges)


def write_roberta_files(folder: Path) -> tuple[Path, Path]:
    """RoBERTa shaped: <s> <pad> </s> <unk>, GPT-2's 50257 pieces, madeupwords, <mask> = 50264."""
    pieces, merges = _gpt2_pieces(_WORDS)
    pieces += [f"filler{i}" for i in range(50256 - len(pieces))] + ["<|endoftext|>"]
    pieces = ["<s>", "<pad>", "</s>", "<unk>", *pieces, *[f"madeupword000{i}" for i in range(3)], "<mask>"]
    return _write_bpe(folder, {p: i for i, p in enumerate(pieces)}, merges)


def _write_bpe(folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    vocab_json, merges_txt = folder / "vocab.json", folder / "merges.txt"
    vocab_json.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_txt.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return vocab_json, merges_txt


def _real(*parts: str) -> Path:
    path = VOCAB_DIR.joinpath(*parts)
    if not path.is_file():
        pytest.skip(f"real vocabulary file not present: {path}")
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("vocab")
    write_bert_vocab(folder / "vocab.txt")
    write_gpt2_files(folder / "gpt2")
    write_roberta_files(folder / "roberta")
    return folder


def _load(kind: str, source: str, tiny_dir: Path) -> GLMTokenizer:
    if kind == "bert":
        vocab = tiny_dir / "vocab.txt" if source == "tiny" else _real("bert-base-uncased", "vocab.txt")
        return GLMTokenizer.from_wordpiece(str(vocab))
    folder = tiny_dir / kind if source == "tiny" else _real(kind, "vocab.json").parent
    return GLMTokenizer.from_bpe(str(folder / "vocab.json"), str(folder / "merges.txt"), kind=kind)


_cache: dict[tuple[str, str], GLMTokenizer] = {}


def _cached(kind: str, source: str, tiny_dir: Path) -> GLMTokenizer:
    """Each real vocabulary is read once per test session."""
    if (kind, source) not in _cache:
        _cache[kind, source] = _load(kind, source, tiny_dir)
    return _cache[kind, source]


SOURCES = ["tiny", pytest.param("real", marks=pytest.mark.data)]


@pytest.fixture(params=["bert", "gpt2", "roberta"])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=SOURCES)
def source(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def tok(kind: str, source: str, tiny_dir: Path) -> GLMTokenizer:
    """The tokenizer of one official layout over the small or the real vocabulary (built once)."""
    return _cached(kind, source, tiny_dir)


def test_command_token_ids_follow_the_official_layout(tok: GLMTokenizer, kind: str) -> None:
    ids = {name: getattr(tok, f"{name}_id") for name in LAYOUTS[kind]}
    assert ids == LAYOUTS[kind]
    assert tok.backend.num_pieces == NUM_PIECES[kind]
    assert len(tok) == PADDED[kind]


def test_command_strings_in_text_map_to_their_ids(tok: GLMTokenizer, kind: str) -> None:
    for text, i in tok.command_tokens.items():
        assert tok.encode(text) == [i], text
        assert tok.token_to_id(text) == i
        ids = tok.encode(f"the model {text} fills")
        assert ids.count(i) == 1
        assert tok.encode(tok.decode(ids)) == ids
    expected = {
        "bert": {"[PAD]": 0, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, "[UNK]": 100},
        "gpt2": {"<|endoftext|>": 50256, "[MASK]": 50260, "[gMASK]": 50263, "[dBLOCK]": 50265},
        "roberta": {
            "</s>": 2,
            "<|endoftext|>": 2,
            "[SEP]": 2,
            "<s>": 0,
            "[CLS]": 0,
            "<mask>": 50264,
            "[MASK]": 50264,
            "<unk>": 3,
            "[UNK]": 3,
        },
    }[kind]
    for text, i in expected.items():
        assert tok.command_tokens[text] == i
    for text in ("<|startofpiece|>", "<|endofpiece|>", "[gMASK]", "[sMASK]", "[dBLOCK]"):
        assert text in tok.command_tokens


def test_special_ids_decode_without_error(tok: GLMTokenizer) -> None:
    # every id above the vocabulary (command tokens, unused and padding rows) decodes to a string
    for i in [*tok.command_tokens.values(), *range(tok.backend.num_pieces, len(tok))]:
        assert isinstance(tok.decode([i]), str) and tok.id_to_token(i)
    with pytest.raises(IndexError):
        tok.decode([len(tok)])


def test_round_trip_of_vocabulary_words(tok: GLMTokenizer, kind: str) -> None:
    text = " ".join(_WORDS)
    ids = tok.encode(text)
    assert tok.unk_id not in ids
    assert tok.decode(ids) == text
    framed = f"[CLS] {text} [SEP]" if kind != "roberta" else f"<s>{text}</s>"
    assert tok.decode(tok.encode(framed)) == framed


@pytest.mark.parametrize("kind", ["gpt2", "roberta"])
def test_byte_level_bpe_round_trips_any_text(tok: GLMTokenizer, kind: str) -> None:
    for text in ("", "  Hello world\n\n\tthe end ", "café naïve 我们今天 🎉 e\u0301", "no\x00nul \x7f"):
        assert tok.decode(tok.encode(text)) == text


def test_word_starts_cut_text_into_words_and_punctuation(tok: GLMTokenizer, kind: str) -> None:
    text = "the model fills, the blank ends. hello world!" + (" unaffable story" if kind == "bert" else "")
    ids = tok.encode(text)
    starts = np.append(np.flatnonzero(tok.word_starts(np.array(ids))), len(ids))
    words = [tok.decode(ids[a:b]).strip() for a, b in itertools.pairwise(starts)]
    assert words == re.findall(r"\w+|[^\w\s]", text)


def test_mask_tokens_swallow_whitespace_on_their_left(tok: GLMTokenizer, kind: str) -> None:
    masks = ["[MASK]", "[sMASK]", "[gMASK]"] + (["<mask>"] if kind == "roberta" else [])
    for mask in masks:
        mask_id = tok.command_tokens[mask]
        expected = tok.encode("the model") + [mask_id] + tok.encode(" ends")
        assert tok.encode(f"the model {mask} ends") == expected
    if kind != "bert":  # other command tokens keep it
        assert tok.encode("the model [SEP]") == tok.encode("the model ") + [tok.sep_id]


def test_pickles_for_dataloader_workers(tok: GLMTokenizer) -> None:
    text = "the model [MASK] fills the blank. hello world<|endofpiece|>"
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(text) == tok.encode(text)
    assert clone.decode(tok.encode(text)) == tok.decode(tok.encode(text))
    assert clone.command_tokens == tok.command_tokens and len(clone) == len(tok)
    assert clone.fingerprint() == tok.fingerprint()


def test_fingerprints_differ_between_layouts(tiny_dir: Path) -> None:
    fingerprints = {(kind, "tiny"): _load(kind, "tiny", tiny_dir).fingerprint() for kind in LAYOUTS}
    assert len(set(fingerprints.values())) == 3
    cased = GLMTokenizer.from_wordpiece(str(tiny_dir / "vocab.txt"), lower_case=False)
    assert cased.backend.fingerprint() != _load("bert", "tiny", tiny_dir).backend.fingerprint()
    assert _load("gpt2", "tiny", tiny_dir).fingerprint() == fingerprints[("gpt2", "tiny")]  # stable


def test_fingerprint_follows_vocabulary_content(tmp_path: Path) -> None:
    a = GLMTokenizer.from_wordpiece(str(write_bert_vocab(tmp_path / "a.txt")))
    b = GLMTokenizer.from_wordpiece(str(write_bert_vocab(tmp_path / "b.txt", [*_WORDS, "garden"])))
    assert a.fingerprint() != b.fingerprint()
    g1 = GLMTokenizer.from_bpe(*map(str, write_gpt2_files(tmp_path / "g1")))
    g2 = GLMTokenizer.from_bpe(*map(str, write_gpt2_files(tmp_path / "g2", [*_WORDS, "garden"])))
    assert g1.fingerprint() != g2.fingerprint()
    assert len(g2.encode(" garden")) < len(g1.encode(" garden"))  # the new merges are used


def test_pickle_carries_the_vocabulary(tmp_path: Path) -> None:
    vocab = write_bert_vocab(tmp_path / "vocab.txt")
    bert = GLMTokenizer.from_wordpiece(str(vocab))
    vocab.unlink()
    assert pickle.loads(pickle.dumps(bert)).encode("hello world") == bert.encode("hello world")
    folder = tmp_path / "gpt2"
    gpt2 = GLMTokenizer.from_bpe(*map(str, write_gpt2_files(folder)))
    shutil.rmtree(folder)
    assert pickle.loads(pickle.dumps(gpt2)).encode(" hello world") == gpt2.encode(" hello world")


def test_wordpiece_lower_cases_and_strips_accents(tiny_dir: Path) -> None:
    t = _load("bert", "tiny", tiny_dir)
    assert t.encode("HELLO World") == t.encode("hello world")
    assert t.encode("Héllo wörld") == t.encode("hello world")
    assert t.encode("[MASK]") == [103]  # command strings are matched before lower-casing
    assert t.encode("[mask]") != [103]
    assert t.decode(t.encode("Unaffable story!")) == "unaffable story !"  # "##" pieces glued
    cased = GLMTokenizer.from_wordpiece(str(tiny_dir / "vocab.txt"), lower_case=False)
    assert cased.encode("Hello") == [cased.unk_id]
    assert cased.encode("hello") == t.encode("hello")


def test_wordpiece_end_of_document_is_pad(tiny_dir: Path) -> None:
    t = _load("bert", "tiny", tiny_dir)
    assert t.encode("the end[PAD]") == t.encode("the end") + [0]
    assert t.eos_id == t.pad_id == 0 and t.decode([0]) == "[PAD]"


def test_sentence_end_table_over_wordpiece(tiny_dir: Path) -> None:
    t = _load("bert", "tiny", tiny_dir)
    table = t.sentence_end_table()
    assert table[t.token_to_id(".")] and table[t.token_to_id("!")]
    assert not table[t.token_to_id("hello")] and not table[t.backend.num_pieces :].any()


def test_sentinels_follow_the_layout(tiny_dir: Path) -> None:
    folder = tiny_dir / "gpt2"
    t = GLMTokenizer.from_bpe(str(folder / "vocab.json"), str(folder / "merges.txt"), num_sentinels=2)
    assert [t.sentinel_mask_id(1), t.sentinel_sop_id(1), t.sentinel_mask_id(2)] == [50266, 50267, 50268]
    b = GLMTokenizer.from_wordpiece(str(tiny_dir / "vocab.txt"), num_sentinels=1)
    assert (b.sentinel_mask_id(1), b.sentinel_sop_id(1)) == (30527, 30528)


def test_errors(tmp_path: Path, tiny_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        GLMTokenizer.from_wordpiece(str(tmp_path / "missing.txt"))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        GLMTokenizer.from_bpe(str(tmp_path / "missing.json"), str(tiny_dir / "gpt2" / "merges.txt"))
    folder = tiny_dir / "gpt2"
    with pytest.raises(ValueError, match="kind"):
        GLMTokenizer.from_bpe(str(folder / "vocab.json"), str(folder / "merges.txt"), kind="bert")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="</s>"):  # GPT-2 files have no RoBERTa entries
        GLMTokenizer.from_bpe(str(folder / "vocab.json"), str(folder / "merges.txt"), kind="roberta")


@pytest.mark.data
def test_real_known_encodings(tiny_dir: Path) -> None:
    bert = _cached("bert", "real", tiny_dir)
    assert bert.encode("Hello, World!") == [7592, 1010, 2088, 999]
    assert bert.decode(bert.encode("[CLS] Hello, World! [SEP]")) == "[CLS] hello , world ! [SEP]"
    assert bert.encode("unaffable") == [14477, 20961, 3468]  # una ##ffa ##ble
    gpt2 = _cached("gpt2", "real", tiny_dir)
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode("Hello world<|endoftext|>") == [15496, 995, 50256]
    roberta = _cached("roberta", "real", tiny_dir)
    assert roberta.encode("<s>Hello world</s>") == [0, 31414, 232, 2]
    assert roberta.decode([0, 31414, 232, 2]) == "<s>Hello world</s>"


@pytest.mark.data
def test_real_chinese_sentencepiece_layout() -> None:
    model = str(_real("glm-chinese", "cog-pretrain.model"))
    for fix, gmask in ((False, 50007), (True, 50009)):
        t = GLMTokenizer.from_sentencepiece(model, fix_command_token=fix)
        ids = (t.eos_id, t.pad_id, t.sep_id, t.cls_id, t.mask_id, t.unk_id)
        assert ids == (50000, 50000, 50001, 50002, 50003, 50004)
        assert (t.sop_id, t.eop_id, t.smask_id, t.gmask_id) == (50006, 50007, 50008, gmask)
        assert len(t) == 50048
        text = "我们今天学习语言模型。[MASK]天气真好！"
        assert t.encode(text).count(50003) == 1
        assert t.decode(t.encode("天气真好")) == "天气真好"


def test_corpus_pieces_and_batches_encode_like_the_whole_text(tok: GLMTokenizer, tmp_path: Path,
                                                               make_text: Any) -> None:
    """A long document read in pieces (cut before a single space or after a newline) and encoded in
    a batch gives the ids of the whole document, for every official vocabulary."""
    from datamodules.corpus_reader import iter_pieces

    text = make_text(40, seed=9) + "  indented  line\n\nend [MASK] x\n[gMASK]\n"
    path = tmp_path / "doc.txt"
    path.write_text(text, encoding="utf-8")
    pieces = [piece for piece, _ in iter_pieces(path, piece_chars=60)]
    assert len(pieces) > 20 and "".join(pieces) == text.strip()
    assert [i for piece in pieces for i in tok.encode(piece)] == tok.encode(text.strip())
    texts = [*pieces, "with [MASK] and [gMASK]", ""]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]

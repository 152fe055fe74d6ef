"""Tests for glm_lightning.tokenizer: round trips, command tokens, id layout, training."""

from __future__ import annotations

import itertools
import pickle
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glm_lightning.tokenizer import GLMTokenizer, sentencepiece_settings, train_sentencepiece

ROUND_TRIP_TEXTS = [
    "",
    "The model fills the blank.",
    "Is it done? Yes! Almost; nearly: done.",
    "first line\nsecond line\n\nthird after a blank line\n",
    "  leading spaces and trailing spaces   ",
    "\n\nstarts with newlines",
    "tabs\tand\r\nwindows line ends\x0bvertical",
    "double  spaces   triple    quadruple",
    "café naïve Zürich façade ﬁ ligature ½ Ａ full width",
    "我们今天学习语言模型。你明天去图书馆吗？天气真好！",
    "emoji 🎉🚀 and combining e\u0301 and zero\u200bwidth",
    "the sentencepiece space symbol \u2581 itself, \u2581\u2581 twice",
    "brackets [like this] and <|angle|> and [MASK without closing",
    "\x00 nul and \x7f delete",
]


def test_round_trip(tokenizer: GLMTokenizer) -> None:
    for text in ROUND_TRIP_TEXTS:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_round_trip_never_uses_unk(tokenizer: GLMTokenizer) -> None:
    # byte fallback: no text needs the sentencepiece <unk> piece or [UNK]
    unk_piece = tokenizer.token_to_id("<unk>")
    for text in ROUND_TRIP_TEXTS:
        ids = tokenizer.encode(text)
        assert unk_piece not in ids and tokenizer.unk_id not in ids


def test_round_trip_of_corpus(tokenizer: GLMTokenizer, make_text: Callable[..., str]) -> None:
    text = make_text(num_paragraphs=30, seed=123)
    ids = tokenizer.encode(text)
    assert len(ids) < len(text) / 2  # the learned pieces compress the text
    assert tokenizer.decode(ids) == text


_no_command_strings = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60).filter(
    lambda s: not any(c in s for c in ("[", "<|"))
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_no_command_strings)
def test_round_trip_property(tokenizer: GLMTokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text)) == text


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.text(alphabet="ab .\n", max_size=8), min_size=2, max_size=5))
def test_encoding_is_split_at_command_tokens(tokenizer: GLMTokenizer, parts: list[str]) -> None:
    # text between command tokens is encoded on its own
    text = "[SEP]".join(parts)
    expected: list[int] = []
    for k, part in enumerate(parts):
        if k:
            expected.append(tokenizer.sep_id)
        expected.extend(tokenizer.encode(part))
    assert tokenizer.encode(text) == expected
    assert tokenizer.decode(expected) == text


def test_command_strings_map_to_their_ids(tokenizer: GLMTokenizer) -> None:
    assert len(tokenizer.command_tokens) == 10
    for text, i in tokenizer.command_tokens.items():
        assert tokenizer.encode(text) == [i]
        assert tokenizer.decode([i]) == text
        assert tokenizer.token_to_id(text) == i
        assert tokenizer.id_to_token(i) == text
        ids = tokenizer.encode(f"the model{text}fills it")
        assert ids.count(i) == 1
        assert tokenizer.decode(ids) == f"the model{text}fills it"


def test_adjacent_command_tokens(tokenizer: GLMTokenizer) -> None:
    t = tokenizer
    text = "[CLS]a story[MASK]<|endoftext|><|startofpiece|> b<|endofpiece|>[sMASK][gMASK][dBLOCK]"
    ids = t.encode(text)
    assert ids[0] == t.cls_id
    assert [i for i in ids if i >= t.backend.num_pieces] == [
        t.cls_id,
        t.mask_id,
        t.eos_id,
        t.sop_id,
        t.eop_id,
        t.smask_id,
        t.gmask_id,
        t.dblock_id,
    ]
    assert t.decode(ids) == text


def test_mask_tokens_swallow_whitespace_on_their_left(tokenizer: GLMTokenizer) -> None:
    t = tokenizer
    for mask in ("[MASK]", "[sMASK]", "[gMASK]"):
        plain = t.encode(f"a story{mask} ends")
        for space in (" ", "   ", " \n\t", "\n\n"):
            assert t.encode(f"a story{space}{mask} ends") == plain
            assert t.encode(f"{space}{mask}") == [t.command_tokens[mask]]
        assert t.decode(plain) == f"a story{mask} ends"  # whitespace on the right is kept
    # other command tokens keep the whitespace on their left
    assert t.encode("a story [SEP]") == t.encode("a story ") + [t.sep_id]
    assert t.decode(t.encode("a story <|endoftext|>")) == "a story <|endoftext|>"


def test_long_whitespace_runs_are_fast(tokenizer: GLMTokenizer) -> None:
    text = "x" + " " * 200_000 + "y"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_id_layout_with_fix(sentencepiece_model: str) -> None:
    t = GLMTokenizer.from_sentencepiece(sentencepiece_model)
    n = t.backend.num_pieces
    assert n == 500
    assert (t.eos_id, t.pad_id, t.sep_id, t.cls_id, t.mask_id, t.unk_id) == (n, n, n + 1, n + 2, n + 3, n + 4)
    assert (t.sop_id, t.eop_id, t.smask_id, t.gmask_id, t.dblock_id) == (n + 6, n + 7, n + 8, n + 9, n + 10)
    assert t.num_tokens == n + 11
    assert t.command_tokens == {
        "<|endoftext|>": n,
        "[SEP]": n + 1,
        "[CLS]": n + 2,
        "[MASK]": n + 3,
        "[UNK]": n + 4,
        "<|startofpiece|>": n + 6,
        "<|endofpiece|>": n + 7,
        "[sMASK]": n + 8,
        "[gMASK]": n + 9,
        "[dBLOCK]": n + 10,
    }


def test_id_layout_without_fix_reproduces_the_gmask_eop_collision(sentencepiece_model: str) -> None:
    t = GLMTokenizer.from_sentencepiece(sentencepiece_model, fix_command_token=False)
    n = t.backend.num_pieces
    assert t.gmask_id == t.eop_id == n + 7
    assert t.smask_id == n + 8
    assert t.dblock_id == n + 9
    assert t.num_tokens == n + 10
    assert t.encode("[gMASK]") == [n + 7]
    assert t.decode([n + 7]) == "<|endofpiece|>"


def test_id_layout_with_sentinels(sentencepiece_model: str) -> None:
    t = GLMTokenizer.from_sentencepiece(sentencepiece_model, num_sentinels=3)
    n = t.backend.num_pieces
    assert t.num_sentinels == 3
    assert t.sentinel_mask_id(0) == t.mask_id and t.sentinel_sop_id(0) == t.sop_id
    assert [t.sentinel_mask_id(i) for i in (1, 2, 3)] == [n + 11, n + 13, n + 15]
    assert [t.sentinel_sop_id(i) for i in (1, 2, 3)] == [n + 12, n + 14, n + 16]
    assert t.num_tokens == n + 17
    assert t.encode("a[MASK2]b<|startofpiece2|>") == [*t.encode("a"), n + 13, *t.encode("b"), n + 14]
    assert t.decode([n + 15, n + 16]) == "[MASK3]<|startofpiece3|>"
    with pytest.raises(IndexError):
        t.sentinel_mask_id(4)
    with pytest.raises(IndexError):
        GLMTokenizer.from_sentencepiece(sentencepiece_model).sentinel_sop_id(1)


@pytest.mark.parametrize("num_sentinels", [0, 1, 60])
def test_padded_length(sentencepiece_model: str, num_sentinels: int) -> None:
    t = GLMTokenizer.from_sentencepiece(sentencepiece_model, num_sentinels=num_sentinels)
    assert len(t) % 128 == 0
    assert t.num_tokens <= len(t) < t.num_tokens + 128
    assert max(t.command_tokens.values()) == t.num_tokens - 1 < len(t)


def test_unused_and_padding_ids_decode_to_placeholders(tokenizer: GLMTokenizer) -> None:
    t = tokenizer
    n = t.backend.num_pieces
    assert t.decode([n + 5]) == f"<|unused{n + 5}|>"
    assert t.decode([len(t) - 1]) == f"<|unused{len(t) - 1}|>"
    assert t.decode(t.encode("a.") + [len(t) - 1]) == f"a.<|unused{len(t) - 1}|>"
    with pytest.raises(IndexError, match=str(len(t))):
        t.decode([len(t)])
    with pytest.raises(IndexError):
        t.decode([-1])


def test_decode_accepts_arrays(tokenizer: GLMTokenizer) -> None:
    text = "A story [MASK] ends.\n"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(np.array(ids, dtype=np.int64)) == tokenizer.decode(ids)


def test_id_to_token_and_token_to_id(tokenizer: GLMTokenizer) -> None:
    t = tokenizer
    for i in range(t.backend.num_pieces):
        assert t.token_to_id(t.id_to_token(i)) == i
    assert t.token_to_id("\n") == t.encode("\n")[0]
    with pytest.raises(KeyError):
        t.token_to_id("no such piece")


def test_sentence_end_table(tokenizer: GLMTokenizer) -> None:
    t = tokenizer
    table = t.sentence_end_table()
    assert table.dtype == np.bool_ and table.shape == (len(t),)
    assert t.sentence_end_table() is table  # cached
    for i in range(t.backend.num_pieces):
        decoded = t.decode([i])
        assert table[i] == any(c in decoded for c in ".?!;:\n。？！；…"), (i, decoded)
    assert not table[t.backend.num_pieces :].any()  # command tokens and padding
    for piece in (".", "?", "!", ";", ":", "\n", "。", "？", "！", "；", "…"):
        assert table[t.token_to_id(piece)], piece
    ids = t.encode("No end here")
    assert not table[ids].any()


def words_of(t: GLMTokenizer, ids: list[int]) -> list[str]:
    """The decoded words `word_starts` cuts `ids` into."""
    starts = np.append(np.flatnonzero(t.word_starts(np.array(ids))), len(ids))
    return [t.decode(ids[a:b]).strip() for a, b in itertools.pairwise(starts)]


def test_word_starts_cut_text_into_words_and_punctuation(tokenizer: GLMTokenizer) -> None:
    text = "The bright riverbank crosses quickly. A strange (castle); the year's market! Naïve café"
    ids = [tokenizer.cls_id, *tokenizer.encode(text), tokenizer.eos_id]
    assert len(ids) > len(text.split()) + 6  # some words are several pieces
    assert words_of(tokenizer, ids) == ["[CLS]", *re.findall(r"'?\w+|[^\w\s]", text), "<|endoftext|>"]


def test_pickle_round_trip(sentencepiece_model: str, tmp_path: Path, make_text: Callable[..., str]) -> None:
    model = tmp_path / "copy.model"
    shutil.copy(sentencepiece_model, model)
    t = GLMTokenizer.from_sentencepiece(str(model), num_sentinels=2)
    text = make_text(num_paragraphs=5, seed=7) + " [MASK] [MASK1] 我们\u2581"
    t.sentence_end_table()
    clone = pickle.loads(pickle.dumps(t))
    model.unlink()  # the pickle carries the model itself
    again = pickle.loads(pickle.dumps(t))
    for other in (clone, again):
        assert other.encode(text) == t.encode(text)
        assert other.decode(t.encode(text)) == t.decode(t.encode(text))
        assert len(other) == len(t) and other.command_tokens == t.command_tokens
        np.testing.assert_array_equal(other.sentence_end_table(), t.sentence_end_table())


def test_training_is_deterministic(corpus_file: Path, tmp_path: Path, make_text: Callable[..., str]) -> None:
    first = GLMTokenizer.from_sentencepiece(
        train_sentencepiece([str(corpus_file)], 450, str(tmp_path / "one"))
    )
    second = GLMTokenizer.from_sentencepiece(
        train_sentencepiece([str(corpus_file)], 450, str(tmp_path / "two" / "m"))
    )
    n = first.backend.num_pieces
    assert n == second.backend.num_pieces == 450
    assert [first.id_to_token(i) for i in range(n)] == [second.id_to_token(i) for i in range(n)]
    text = make_text(num_paragraphs=20, seed=5)
    assert first.encode(text) == second.encode(text)


_TRAIN_IN_A_FRESH_PROCESS = """
import sys
from glm_lightning.tokenizer import train_sentencepiece
train_sentencepiece([sys.argv[1]], 450, sys.argv[2], input_sentence_size=101, shuffle_input_sentence=True)
"""


def test_training_from_scratch_gives_byte_identical_model_files(corpus_file: Path, tmp_path: Path) -> None:
    """Two trainings in fresh processes (fresh random state), written to different places, sampling
    101 of the corpus's 120 sentences: the model files are equal byte for byte, so a cache rebuilt
    from nothing holds the vocabulary (and the checkpoint fingerprint) it held before."""
    models = []
    for prefix in (tmp_path / "one" / "sp", tmp_path / "two" / "sp-1234.tmp"):
        subprocess.run([sys.executable, "-c", _TRAIN_IN_A_FRESH_PROCESS, str(corpus_file), str(prefix)],
                       check=True, cwd=Path(__file__).parents[1])
        models.append(Path(f"{prefix}.model").read_bytes())
    assert models[0] == models[1]
    assert not list(tmp_path.rglob("*.vocab"))  # one file per model
    # the sample of sentences is drawn with `seed`: another seed learns another model
    other = train_sentencepiece([str(corpus_file)], 450, str(tmp_path / "seed1"), seed=1,
                                input_sentence_size=101, shuffle_input_sentence=True)
    assert Path(other).read_bytes() != models[0]


def test_settings_name_every_trainer_option() -> None:
    """The settings are the tokenizer cache key: any option that changes the model changes them."""
    base = sentencepiece_settings(700, hard_vocab_limit=False)
    assert base["num_threads"] == 16 and base["seed"] == 0 and base["sentencepiece"]
    assert base["user_defined_symbols"] == ["\n"] and "model_prefix" not in base
    for changed in (sentencepiece_settings(701, hard_vocab_limit=False), sentencepiece_settings(700),
                    sentencepiece_settings(700, hard_vocab_limit=False, model_type="bpe"),
                    sentencepiece_settings(700, hard_vocab_limit=False, seed=1),
                    sentencepiece_settings(700, hard_vocab_limit=False, num_threads=1)):
        assert changed != base
    assert sentencepiece_settings(700, hard_vocab_limit=False, model_prefix="elsewhere") == base


def test_command_strings_are_never_learned(tmp_path: Path, make_text: Callable[..., str]) -> None:
    corpus = tmp_path / "commands.txt"
    lines = [
        f"{make_text(1, seed=k).strip()} [MASK] [gMASK] [sMASK] <|endoftext|> [CLS] [SEP] "
        f"<|startofpiece|> <|endofpiece|> [MASK1] [dBLOCK] [UNK]"
        for k in range(150)
    ]
    corpus.write_text("\n".join(lines), encoding="utf-8")
    t = GLMTokenizer.from_sentencepiece(train_sentencepiece([str(corpus)], 500, str(tmp_path / "m")))
    pieces = [t.id_to_token(i) for i in range(t.backend.num_pieces)]
    for word in ("MASK", "CLS", "SEP", "UNK", "dBLOCK", "endoftext", "piece", "<|", "|>"):
        assert not any(word in p for p in pieces), word
    assert t.encode(lines[0]).count(t.mask_id) == 1


def test_newline_is_one_piece(tokenizer: GLMTokenizer) -> None:
    assert tokenizer.encode("\n\n") == [tokenizer.token_to_id("\n")] * 2


def test_missing_model_file(tmp_path: Path) -> None:
    path = str(tmp_path / "missing.model")
    with pytest.raises(FileNotFoundError, match="missing.model"):
        GLMTokenizer.from_sentencepiece(path)


def test_training_errors_name_the_file(corpus_file: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nothing.txt"
    with pytest.raises(ValueError, match="nothing.txt"):
        train_sentencepiece([str(corpus_file), str(missing)], 400, str(tmp_path / "m"))
    empty = tmp_path / "blank.txt"
    empty.write_text(" \n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="blank.txt"):
        train_sentencepiece([str(empty)], 400, str(tmp_path / "m"))
    with pytest.raises(ValueError):
        train_sentencepiece([], 400, str(tmp_path / "m"))


def test_fingerprint_identifies_model_and_layout(sentencepiece_model: str, tmp_path: Path,
                                                 make_text: Callable[..., str]) -> None:
    a = GLMTokenizer.from_sentencepiece(sentencepiece_model)
    assert a.fingerprint() == GLMTokenizer.from_sentencepiece(sentencepiece_model).fingerprint()
    with_sentinels = GLMTokenizer.from_sentencepiece(sentencepiece_model, num_sentinels=2)
    assert a.fingerprint() != with_sentinels.fingerprint()
    assert a.fingerprint() != GLMTokenizer.from_sentencepiece(
        sentencepiece_model, fix_command_token=False).fingerprint()
    other_text = tmp_path / "other.txt"
    other_text.write_text(make_text(num_paragraphs=60, seed=7))
    other = train_sentencepiece([str(other_text)], 450, str(tmp_path / "other"))
    assert GLMTokenizer.from_sentencepiece(other).fingerprint() != a.fingerprint()

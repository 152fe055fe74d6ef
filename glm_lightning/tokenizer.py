"""GLM tokenizer: GLM's command tokens laid over a subword backend.

GLM adds command tokens ([MASK], [sMASK], [gMASK], <|startofpiece|>, ...) to an ordinary subword
vocabulary at fixed ids (official `data_utils/tokenization.py`). `GLMTokenizer` owns the command
tokens, the literal string splitting and the padded vocabulary size; a small backend
(`TokenizerBackend`) only turns plain text into piece ids and back. `SentencePieceBackend` is the
backend used for models trained with `train_sentencepiece` and for the official Chinese
sentencepiece model; `WordPieceBackend` (BERT uncased) and `BPEBackend` (GPT-2, RoBERTa) read the
official English vocabularies.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import random
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import sentencepiece as spm
from tokenizers import Tokenizer
from tokenizers import decoders as tk_decoders
from tokenizers import models as tk_models
from tokenizers import normalizers as tk_normalizers
from tokenizers import pre_tokenizers as tk_pre_tokenizers

from glm_lightning.atomic import atomic_write

# Characters that end a sentence; the data pipeline cuts sentences after tokens containing them.
SENTENCE_END_CHARS = frozenset(".?!;:\n。？！；…")

# Every literal command-token string GLM uses (sentinels carry a number). Removed from training
# text so that sentencepiece can never learn them, or parts of them, as pieces.
_COMMAND_STRING_RE = re.compile(
    r"\[(?:MASK|sMASK|gMASK|CLS|SEP|UNK|PAD|dBLOCK)\d*\]"
    r"|<\|(?:endoftext|startofpiece|endofpiece)\d*\|>"
)

# Code names of the sentinel command tokens [MASK{i}] and <|startofpiece{i}|> (sentinel ablation).
_SENTINEL_NAME_RE = re.compile(r"(?:mask|sop)\d+")

# sentencepiece shows a space as U+2581 inside pieces, so a literal U+2581 in the text would
# decode as a space; it is encoded through its UTF-8 byte pieces instead.
_SPACE_SYMBOL = "\u2581"

# Piece prefixes that mark a preceding space or newline: sentencepiece, byte-level BPE (GPT-2, RoBERTa).
_WORD_MARKERS = (_SPACE_SYMBOL, "\u0120", "\u010a")
# A piece of only these begins a word that goes on ("'s"), as a bare space piece does.
_APOSTROPHES = frozenset("'\u2019")


@dataclass(frozen=True)
class CommandToken:
    """A GLM command token: code name, literal string in raw text, id, whitespace behaviour."""

    name: str
    text: str
    id: int
    lstrip: bool = False  # swallow the whitespace on the left of the literal string


class TokenizerBackend(Protocol):
    """Plain text <-> piece ids of a subword vocabulary, knowing nothing of command tokens."""

    @property
    def num_pieces(self) -> int: ...

    def encode_text(self, text: str) -> list[int]: ...

    def encode_texts(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode_ids(self, ids: Sequence[int]) -> str: ...

    def id_to_piece(self, i: int) -> str: ...

    def piece_to_id(self, piece: str) -> int | None: ...

    def fingerprint(self) -> str: ...


class SentencePieceBackend:
    """Sentencepiece backend; pickles as the serialized model so DataLoader workers can rebuild it."""

    def __init__(self, model_proto: bytes, path: str | None = None) -> None:
        self.path = path
        self._proto = model_proto
        self._load()

    @classmethod
    def from_file(cls, path: str) -> SentencePieceBackend:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"sentencepiece model file not found: {path}")
        return cls(file.read_bytes(), path=str(path))

    def _load(self) -> None:
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        except RuntimeError:  # sentencepiece cannot parse it: a text vocabulary, or another file
            raise ValueError(f"{self.path or 'the given bytes'} is not a sentencepiece model") from None
        space_bytes = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in _SPACE_SYMBOL.encode()]
        has_bytes = all(self._sp.is_byte(i) for i in space_bytes)
        self._space_symbol_ids = space_bytes if has_bytes else None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "proto": self._proto}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = state["path"]
        self._proto = state["proto"]
        self._load()

    @property
    def num_pieces(self) -> int:
        return self._sp.get_piece_size()

    def encode_text(self, text: str) -> list[int]:
        if self._space_symbol_ids is None or _SPACE_SYMBOL not in text:
            return self._sp.encode(text)
        ids: list[int] = []
        for k, part in enumerate(text.split(_SPACE_SYMBOL)):
            if k:
                ids.extend(self._space_symbol_ids)
            ids.extend(self._sp.encode(part))
        return ids

    def encode_texts(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode_text` of each text, in one sentencepiece batch call (one thread)."""
        if self._space_symbol_ids is None or not any(_SPACE_SYMBOL in t for t in texts):
            return self._sp.encode(list(texts), num_threads=1)
        return [self.encode_text(t) for t in texts]

    def decode_ids(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(ids))

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(i)

    def piece_to_id(self, piece: str) -> int | None:
        i = self._sp.piece_to_id(piece)
        return i if self._sp.id_to_piece(i) == piece else None

    def fingerprint(self) -> str:
        return hashlib.sha256(self._proto).hexdigest()


class _TokenizersBackend(ABC):
    """A backend over a `tokenizers.Tokenizer` that subclasses build in `_load` from the text of
    their vocabulary files. Pickles as that text (not the Rust object), so DataLoader workers
    rebuild it and a pickled tokenizer outlives its files."""

    _tok: Tokenizer
    _num_pieces: int

    @abstractmethod
    def _load(self) -> None:
        """Build ``self._tok`` and ``self._num_pieces`` from the stored vocabulary text."""

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_tok", "_num_pieces")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._load()

    @property
    def num_pieces(self) -> int:
        return self._num_pieces

    def encode_text(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_texts(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode_ids(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def id_to_piece(self, i: int) -> str:
        piece = self._tok.id_to_token(i)
        if piece is None:
            raise IndexError(f"piece id {i} outside the vocabulary")
        return piece

    def piece_to_id(self, piece: str) -> int | None:
        return self._tok.token_to_id(piece)


class WordPieceBackend(_TokenizersBackend):
    """BERT WordPiece backend (lower-casing and accent stripping as BERT uncased).

    Pickles as the vocabulary text so DataLoader workers can rebuild it. Decoded pieces are joined
    with spaces and "##" continuations glued to the previous piece, as the official GLM decoder does.
    """

    decode_separator = " "

    def __init__(self, vocab_text: str, *, lower_case: bool = True, path: str | None = None) -> None:
        self.path = path
        self.lower_case = lower_case
        self._vocab_text = vocab_text
        self._load()

    @classmethod
    def from_file(cls, path: str, *, lower_case: bool = True) -> WordPieceBackend:
        return cls(_read_text(path, "WordPiece vocabulary"), lower_case=lower_case, path=str(path))

    def _load(self) -> None:
        # one piece a line; split on "\n" only, since pieces may hold other line-break characters
        vocab: dict[str, int] = {}
        for i, line in enumerate(self._vocab_text.removesuffix("\n").split("\n")):
            vocab.setdefault(line, i)
        if "[UNK]" not in vocab:
            raise ValueError("WordPiece vocabulary has no [UNK] token")
        tok = Tokenizer(tk_models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
        tok.normalizer = tk_normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=self.lower_case
        )
        tok.pre_tokenizer = tk_pre_tokenizers.BertPreTokenizer()
        tok.decoder = tk_decoders.WordPiece(prefix="##", cleanup=False)
        self._tok = tok
        self._num_pieces = max(vocab.values()) + 1

    def fingerprint(self) -> str:
        options = f"wordpiece|lower_case={self.lower_case}|"
        return hashlib.sha256(options.encode() + self._vocab_text.encode()).hexdigest()


class BPEBackend(_TokenizersBackend):
    """GPT-2 byte-level BPE backend (also RoBERTa, which reuses GPT-2's merges).

    No prefix space is added, and no special tokens: command-token strings never reach the backend.
    Pickles as the vocabulary and merges text so DataLoader workers can rebuild it.
    """

    decode_separator = ""

    def __init__(self, vocab_json: str, merges_text: str, *, paths: tuple[str, str] | None = None) -> None:
        self.paths = paths
        self._vocab_json = vocab_json
        self._merges_text = merges_text
        self._load()

    @classmethod
    def from_files(cls, vocab_json: str, merges_txt: str) -> BPEBackend:
        return cls(
            _read_text(vocab_json, "BPE vocabulary"),
            _read_text(merges_txt, "BPE merges"),
            paths=(str(vocab_json), str(merges_txt)),
        )

    def _load(self) -> None:
        vocab: dict[str, int] = json.loads(self._vocab_json)
        merges: list[tuple[str, str]] = []
        for line in self._merges_text.split("\n"):
            if line.startswith("#version") or not line.strip():
                continue
            left, right = line.split(" ")
            merges.append((left, right))
        tok = Tokenizer(tk_models.BPE(vocab, merges))
        tok.pre_tokenizer = tk_pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = tk_decoders.ByteLevel()
        self._tok = tok
        self._num_pieces = max(vocab.values()) + 1

    def fingerprint(self) -> str:
        h = hashlib.sha256(b"bpe|byte_level|add_prefix_space=False|")
        for text in (self._vocab_json, self._merges_text):
            data = text.encode()
            h.update(len(data).to_bytes(8, "little") + data)
        return h.hexdigest()


def _read_text(path: str, what: str) -> str:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    return file.read_text(encoding="utf-8")


def sentencepiece_command_tokens(
    num_pieces: int, *, fix_command_token: bool = True, num_sentinels: int = 0
) -> list[CommandToken]:
    """The official Chinese sentencepiece layout (official `data_utils/tokenization.py`) for N = num_pieces.

    Without `fix_command_token`, [gMASK] shares its id with <|endofpiece|> as in GLM-10B-Chinese.
    N + 5 is unused, as in the official tokenizer.
    """
    n = num_pieces
    tokens = [
        CommandToken("pad", "<|endoftext|>", n),
        CommandToken("eos", "<|endoftext|>", n),
        CommandToken("sep", "[SEP]", n + 1),
        CommandToken("cls", "[CLS]", n + 2),
        CommandToken("mask", "[MASK]", n + 3, lstrip=True),
        CommandToken("unk", "[UNK]", n + 4),
        CommandToken("sop", "<|startofpiece|>", n + 6),
        CommandToken("eop", "<|endofpiece|>", n + 7),
        CommandToken("smask", "[sMASK]", n + 8, lstrip=True),
        CommandToken("gmask", "[gMASK]", n + 9 if fix_command_token else n + 7, lstrip=True),
    ]
    tokens.append(CommandToken("dblock", "[dBLOCK]", _next_free_id(tokens)))
    return tokens + sentinel_command_tokens(_next_free_id(tokens), num_sentinels)


def wordpiece_command_tokens(backend: TokenizerBackend, *, num_sentinels: int = 0) -> list[CommandToken]:
    """The official BERT layout (official `data_utils/tokenization.py`): the end of a document is [PAD] = 0.

    [PAD], [CLS], [MASK], [SEP] and [UNK] are the vocabulary's own entries; sop, eop, [gMASK],
    [sMASK] and [dBLOCK] follow the N pieces. No token swallows whitespace (BERT drops it anyway).
    """
    n = backend.num_pieces
    pad = _vocab_id(backend, "[PAD]")
    tokens = [
        CommandToken("pad", "[PAD]", pad),
        CommandToken("eos", "[PAD]", pad),
        CommandToken("cls", "[CLS]", _vocab_id(backend, "[CLS]")),
        CommandToken("mask", "[MASK]", _vocab_id(backend, "[MASK]")),
        CommandToken("sep", "[SEP]", _vocab_id(backend, "[SEP]")),
        CommandToken("unk", "[UNK]", _vocab_id(backend, "[UNK]")),
        CommandToken("sop", "<|startofpiece|>", n),
        CommandToken("eop", "<|endofpiece|>", n + 1),
        CommandToken("gmask", "[gMASK]", n + 2),
        CommandToken("smask", "[sMASK]", n + 3),
        CommandToken("dblock", "[dBLOCK]", n + 4),
    ]
    return tokens + sentinel_command_tokens(_next_free_id(tokens), num_sentinels)


def gpt2_command_tokens(backend: TokenizerBackend, *, num_sentinels: int = 0) -> list[CommandToken]:
    """The official GPT-2 layout (GLM-2B/10B): <|endoftext|> from the vocabulary, the rest after N."""
    n = backend.num_pieces
    eos = _vocab_id(backend, "<|endoftext|>")
    tokens = [
        CommandToken("pad", "<|endoftext|>", eos),
        CommandToken("eos", "<|endoftext|>", eos),
        CommandToken("sop", "<|startofpiece|>", n),
        CommandToken("eop", "<|endofpiece|>", n + 1),
        CommandToken("cls", "[CLS]", n + 2),
        CommandToken("mask", "[MASK]", n + 3, lstrip=True),
        CommandToken("sep", "[SEP]", n + 4),
        CommandToken("unk", "[UNK]", n + 5),
        CommandToken("gmask", "[gMASK]", n + 6, lstrip=True),
        CommandToken("smask", "[sMASK]", n + 7, lstrip=True),
        CommandToken("dblock", "[dBLOCK]", n + 8),
    ]
    return tokens + sentinel_command_tokens(_next_free_id(tokens), num_sentinels)


def roberta_command_tokens(backend: TokenizerBackend, *, num_sentinels: int = 0) -> list[CommandToken]:
    """The official RoBERTa layout: pad = eos = sep = </s> (not <pad>), cls = <s>, mask = <mask>.

    RoBERTa's own strings come first, so ids decode as the RoBERTa vocabulary shows them; GLM's
    strings (<|endoftext|>, [SEP], [CLS], [MASK], [UNK]) map to the same ids, as in the official
    tokenizer. sop, eop, [gMASK], [sMASK] and [dBLOCK] follow the N pieces.
    """
    n = backend.num_pieces
    eos = _vocab_id(backend, "</s>")
    cls_id = _vocab_id(backend, "<s>")
    mask = _vocab_id(backend, "<mask>")
    unk = _vocab_id(backend, "<unk>")
    tokens = [
        CommandToken("pad", "</s>", eos),
        CommandToken("eos", "</s>", eos),
        CommandToken("sep", "</s>", eos),
        CommandToken("cls", "<s>", cls_id),
        CommandToken("mask", "<mask>", mask, lstrip=True),
        CommandToken("unk", "<unk>", unk),
        CommandToken("eos", "<|endoftext|>", eos),
        CommandToken("sep", "[SEP]", eos),
        CommandToken("cls", "[CLS]", cls_id),
        CommandToken("mask", "[MASK]", mask, lstrip=True),
        CommandToken("unk", "[UNK]", unk),
        CommandToken("sop", "<|startofpiece|>", n),
        CommandToken("eop", "<|endofpiece|>", n + 1),
        CommandToken("gmask", "[gMASK]", n + 2, lstrip=True),
        CommandToken("smask", "[sMASK]", n + 3, lstrip=True),
        CommandToken("dblock", "[dBLOCK]", n + 4),
    ]
    return tokens + sentinel_command_tokens(_next_free_id(tokens), num_sentinels)


def _vocab_id(backend: TokenizerBackend, piece: str) -> int:
    i = backend.piece_to_id(piece)
    if i is None:
        raise ValueError(f"vocabulary has no {piece} entry")
    return i


def sentinel_command_tokens(first_id: int, num_sentinels: int) -> list[CommandToken]:
    """[MASK{i}] and <|startofpiece{i}|> for i = 1..num_sentinels, interleaved from `first_id`."""
    tokens = []
    for i in range(1, num_sentinels + 1):
        base = first_id + 2 * (i - 1)
        tokens.append(CommandToken(f"mask{i}", f"[MASK{i}]", base))
        tokens.append(CommandToken(f"sop{i}", f"<|startofpiece{i}|>", base + 1))
    return tokens


def _next_free_id(tokens: Iterable[CommandToken]) -> int:
    return max(t.id for t in tokens) + 1


class GLMTokenizer:
    """GLM command tokens over a subword backend.

    Raw text is first split on the literal command-token strings, which map straight to their ids;
    only the text between them goes through the backend. `len(tok)` is the vocabulary size padded
    to a multiple of 128, the size of the model's embedding matrix.
    """

    _REQUIRED = ("pad", "eos", "sep", "cls", "mask", "unk", "sop", "eop", "smask", "gmask")

    def __init__(
        self,
        backend: TokenizerBackend,
        command_tokens: Sequence[CommandToken],
        *,
        pad_to_multiple_of: int = 128,
    ) -> None:
        by_name = {t.name: t for t in command_tokens}
        missing = [name for name in self._REQUIRED if name not in by_name]
        if missing:
            raise ValueError(f"command tokens missing: {missing}")
        if by_name["pad"].id != by_name["eos"].id:
            raise ValueError("GLM uses the same id for pad and eos")
        self.backend = backend
        self.command_token_list = list(command_tokens)
        self.pad_id = by_name["pad"].id
        self.eos_id = by_name["eos"].id
        self.sep_id = by_name["sep"].id
        self.cls_id = by_name["cls"].id
        self.mask_id = by_name["mask"].id
        self.unk_id = by_name["unk"].id
        self.sop_id = by_name["sop"].id
        self.eop_id = by_name["eop"].id
        self.smask_id = by_name["smask"].id
        self.gmask_id = by_name["gmask"].id
        self.dblock_id = by_name["dblock"].id if "dblock" in by_name else None
        self.num_sentinels = sum(1 for name in by_name if re.fullmatch(r"mask\d+", name))
        self._by_name = by_name

        # literal string -> id; id -> literal string (the first token registered wins on a shared
        # id, e.g. <|endofpiece|> over [gMASK] in the GLM-10B-Chinese layout)
        self.command_tokens: dict[str, int] = {}
        self._id_to_command: dict[int, str] = {}
        for t in command_tokens:
            self.command_tokens.setdefault(t.text, t.id)
            self._id_to_command.setdefault(t.id, t.text)

        self.num_tokens = max(backend.num_pieces, _next_free_id(command_tokens))
        self._padded_size = -(-self.num_tokens // pad_to_multiple_of) * pad_to_multiple_of
        self._split_re = _command_split_regex(command_tokens)
        # a text without any of these characters holds no command-token string
        self._command_initials = sorted({t.text[0] for t in command_tokens})
        self._command_literals = sorted({t.text for t in command_tokens})
        self._sentence_end: np.ndarray | None = None
        self._word_tables: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    @classmethod
    def from_sentencepiece(
        cls, model_path: str, *, fix_command_token: bool = True, num_sentinels: int = 0
    ) -> GLMTokenizer:
        """Tokenizer over a sentencepiece model with the official Chinese command-token ids."""
        backend = SentencePieceBackend.from_file(model_path)
        tokens = sentencepiece_command_tokens(
            backend.num_pieces, fix_command_token=fix_command_token, num_sentinels=num_sentinels
        )
        return cls(backend, tokens)

    @classmethod
    def from_wordpiece(
        cls, vocab_txt: str, lower_case: bool = True, *, num_sentinels: int = 0
    ) -> GLMTokenizer:
        """Tokenizer over a BERT vocab.txt (GLM-Base/Large) with the official BERT layout."""
        backend = WordPieceBackend.from_file(vocab_txt, lower_case=lower_case)
        return cls(backend, wordpiece_command_tokens(backend, num_sentinels=num_sentinels))

    @classmethod
    def from_bpe(
        cls,
        vocab_json: str,
        merges_txt: str,
        kind: Literal["gpt2", "roberta"] = "gpt2",
        *,
        num_sentinels: int = 0,
    ) -> GLMTokenizer:
        """Tokenizer over GPT-2 style byte-level BPE files with the official GPT-2 (GLM-2B/10B) or
        RoBERTa (GLM-RoBERTa) layout."""
        layouts = {"gpt2": gpt2_command_tokens, "roberta": roberta_command_tokens}
        if kind not in layouts:
            raise ValueError(f"kind must be 'gpt2' or 'roberta', not {kind!r}")
        backend = BPEBackend.from_files(vocab_json, merges_txt)
        return cls(backend, layouts[kind](backend, num_sentinels=num_sentinels))

    def __len__(self) -> int:
        return self._padded_size

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(backend={type(self.backend).__name__}, "
            f"num_tokens={self.num_tokens}, padded={len(self)})"
        )

    def fingerprint(self) -> str:
        """Stable hash of the backend model and the command-token layout: equal fingerprints
        encode every text identically (caches of tokenized corpora are keyed by it)."""
        layout = ";".join(f"{t.name}={t.id}:{t.text}" for t in self.command_token_list)
        return hashlib.sha256(f"{self.backend.fingerprint()}|{layout}".encode()).hexdigest()

    def vocabulary_fingerprint(self) -> str:
        """Stable hash of the backend model and the command-token layout without the sentinel tokens:
        equal values mean a model trained with one tokenizer reads the other's ids as it learned
        them (checkpoints record it). The sentinels are left out because the sentinel-token ablation
        pretrains with them and finetunes without; they only add ids after every other token."""
        layout = ";".join(f"{t.name}={t.id}:{t.text}" for t in self.command_token_list
                          if not _SENTINEL_NAME_RE.fullmatch(t.name))
        return hashlib.sha256(f"{self.backend.fingerprint()}|{layout}".encode()).hexdigest()

    def encode(self, text: str) -> list[int]:
        """Token ids of raw text; command-token strings inside it map to their ids."""
        ids: list[int] = []
        start = 0
        for match in self._split_re.finditer(text):
            if match.start() > start:
                ids.extend(self.backend.encode_text(text[start : match.start()]))
            ids.append(self.command_tokens[match.group().lstrip()])
            start = match.end()
        if start < len(text):
            ids.extend(self.backend.encode_text(text[start:]))
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of each text; texts without command-token strings go to the backend in one
        batch call, which is what makes tokenizing a corpus fast."""
        plain = [i for i, t in enumerate(texts) if not self._holds_command(t)]
        if len(plain) == len(texts):
            return self.backend.encode_texts(texts)
        out: list[list[int]] = [[] for _ in texts]
        for i, ids in zip(plain, self.backend.encode_texts([texts[i] for i in plain]), strict=True):
            out[i] = ids
        plain_set = set(plain)
        for i, text in enumerate(texts):
            if i not in plain_set:
                out[i] = self.encode(text)
        return out

    def _holds_command(self, text: str) -> bool:
        """Whether `text` contains a command-token string (substring scans, much faster than the
        splitting regex, which only runs on the texts that do)."""
        return any(c in text for c in self._command_initials) and any(
            literal in text for literal in self._command_literals
        )

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids; command tokens appear as their literal strings."""
        parts: list[str] = []
        run: list[int] = []
        num_pieces = self.backend.num_pieces
        for i in map(int, ids):
            if i not in self._id_to_command and 0 <= i < num_pieces:
                run.append(i)
                continue
            if run:
                parts.append(self.backend.decode_ids(run))
                run = []
            parts.append(self.id_to_token(i))
        if run:
            parts.append(self.backend.decode_ids(run))
        return getattr(self.backend, "decode_separator", "").join(parts)

    def id_to_token(self, i: int) -> str:
        """Command-token string, backend piece, or `<|unused{i}|>` for an unused or padding id."""
        if i in self._id_to_command:
            return self._id_to_command[i]
        if 0 <= i < self.backend.num_pieces:
            return self.backend.id_to_piece(i)
        if 0 <= i < len(self):
            return f"<|unused{i}|>"
        raise IndexError(f"token id {i} outside the vocabulary [0, {len(self)})")

    def token_to_id(self, token: str) -> int:
        """Id of a command-token string or a backend piece."""
        if token in self.command_tokens:
            return self.command_tokens[token]
        i = self.backend.piece_to_id(token)
        if i is None:
            raise KeyError(f"unknown token: {token!r}")
        return i

    def sentinel_mask_id(self, i: int) -> int:
        """Id of the i-th sentinel mask [MASK{i}]; i = 0 is [MASK] itself."""
        return self.mask_id if i == 0 else self._sentinel(f"mask{i}", i)

    def sentinel_sop_id(self, i: int) -> int:
        """Id of the i-th sentinel start token <|startofpiece{i}|>; i = 0 is <|startofpiece|>."""
        return self.sop_id if i == 0 else self._sentinel(f"sop{i}", i)

    def _sentinel(self, name: str, i: int) -> int:
        if name not in self._by_name:
            raise IndexError(f"sentinel {i} not in 0..{self.num_sentinels}")
        return self._by_name[name].id

    def sentence_end_table(self) -> np.ndarray:
        """Bool [len(self)]: True for pieces whose text contains a sentence-ending character."""
        if self._sentence_end is None:
            table = np.zeros(len(self), dtype=bool)
            for i in range(self.backend.num_pieces):
                if i not in self._id_to_command:
                    piece = self.backend.decode_ids([i])
                    table[i] = not SENTENCE_END_CHARS.isdisjoint(piece)
            table.flags.writeable = False
            self._sentence_end = table
        return self._sentence_end

    def word_starts(self, ids: np.ndarray) -> np.ndarray:
        """Bool mask over `ids`: True where a word begins (whole-word spans).

        A word is a piece that follows whitespace (sentencepiece ``▁``, byte-level BPE ``Ġ``/``Ċ``,
        any WordPiece piece but a ``##`` continuation) with the continuation pieces after it.
        Punctuation pieces and command tokens are words of their own and the piece after one
        begins a word, so "Vesk." and "(Vesk" are two words each and a document's first word
        starts after [CLS]; a bare space piece or an apostrophe joins the piece after it ("'s").
        """
        if self._word_tables is None:
            begins = np.ones(len(self), dtype=bool)
            breaks_after = np.ones(len(self), dtype=bool)
            bare_space = np.zeros(len(self), dtype=bool)
            wordpiece = isinstance(self.backend, WordPieceBackend)
            for i in range(self.backend.num_pieces):
                if i not in self._id_to_command:
                    try:
                        piece, text = self.backend.id_to_piece(i), self.backend.decode_ids([i]).strip()
                    except IndexError:  # an id the vocabulary file leaves out stays a word of its own
                        continue
                    punctuation = not any(ch.isalnum() for ch in text)  # byte pieces: their text
                    if wordpiece:
                        begins[i] = punctuation or not piece.startswith("##")
                    else:
                        begins[i] = punctuation or piece.startswith(_WORD_MARKERS)
                    breaks_after[i] = punctuation and not set(text) <= _APOSTROPHES
                    bare_space[i] = not text
            self._word_tables = begins, breaks_after, bare_space
        begins, breaks_after, bare_space = self._word_tables
        ids = np.asarray(ids)
        starts = begins[ids]
        starts[1:] = (starts[1:] | breaks_after[ids[:-1]]) & ~bare_space[ids[:-1]]
        if len(starts):
            starts[0] = True
        return starts


def _command_split_regex(command_tokens: Iterable[CommandToken]) -> re.Pattern[str]:
    """One alternation over all literal strings, longest first; lstrip tokens take leading space.

    The lookbehind starts the whitespace match only at the beginning of a whitespace run, which
    keeps long runs of spaces linear.
    """
    tokens = {t.text: t.lstrip for t in command_tokens}
    alternatives = [
        (r"(?<!\s)\s*" if lstrip else "") + re.escape(text)
        for text, lstrip in sorted(tokens.items(), key=lambda kv: -len(kv[0]))
    ]
    return re.compile("|".join(alternatives))


def _training_sentences(files: Sequence[str],
                        documents: Callable[[str], Iterable[str]] | None) -> Iterator[str]:
    """The lines of every file, or of every document `documents(file)` extracts from it."""
    for name in files:
        if documents is None:
            with open(name, encoding="utf-8") as f:
                lines: Iterable[str] = (line.rstrip("\n") for line in f)
                yield from _clean_lines(lines)
        else:
            for document in documents(name):
                yield from _clean_lines(document.split("\n"))


def _clean_lines(lines: Iterable[str]) -> Iterator[str]:
    for line in lines:
        line = _COMMAND_STRING_RE.sub("", line)
        if line:
            yield line


def _sample_sentences(sentences: Iterable[str], size: int, *, shuffle: bool, seed: int) -> Iterable[str]:
    """At most `size` of `sentences` (all when `size` <= 0): a uniform sample drawn with `seed`
    (reservoir sampling, `size` sentences in memory), or the first `size` without `shuffle`.

    sentencepiece can sample itself (``input_sentence_size``), but its sample differs from one
    process to the next even after ``set_random_generator_seed`` (sentencepiece 0.2.3, measured),
    so a tokenizer retrained into an empty cache would learn other pieces.
    """
    if size <= 0:
        return sentences
    if not shuffle:
        return itertools.islice(sentences, size)
    rng = random.Random(seed)
    reservoir: list[str] = []
    for i, sentence in enumerate(sentences):
        if i < size:
            reservoir.append(sentence)
        else:
            j = rng.randrange(i + 1)
            if j < size:
                reservoir[j] = sentence
    return reservoir


def _has_text(path: Path) -> bool:
    with path.open(encoding="utf-8") as f:
        return any(line.strip() for line in f)


# The trainer's settings that make text round-trip exactly through `GLMTokenizer` (see
# `train_sentencepiece`). The thread count is fixed, not the machine's: the unigram trainer sums the
# expectations of its threads in thread order, so another count learns other pieces.
_SENTENCEPIECE_SETTINGS: dict[str, Any] = {
    "model_type": "unigram",
    "normalization_rule_name": "identity",
    "remove_extra_whitespaces": False,
    "add_dummy_prefix": False,
    "allow_whitespace_only_pieces": True,
    "byte_fallback": True,
    "bos_id": -1,
    "eos_id": -1,
    "num_threads": 16,
    "seed": 0,
    "minloglevel": 2,
}


def sentencepiece_settings(vocab_size: int, **options: Any) -> dict[str, Any]:
    """Every trainer setting `train_sentencepiece` would use for `options`, with the sentencepiece
    version: the same settings on the same text give the same model bytes, so this (with the text)
    is a cache key for a trained model."""
    settings = {**_SENTENCEPIECE_SETTINGS, **options, "vocab_size": vocab_size}
    symbols = list(settings.get("user_defined_symbols", []))
    settings["user_defined_symbols"] = ["\n", *[s for s in symbols if s != "\n"]]
    settings.pop("input", None)
    settings.pop("model_prefix", None)
    return {**settings, "sentencepiece": spm.__version__}


def train_sentencepiece(
    files: list[str],
    vocab_size: int,
    model_prefix: str,
    *,
    documents: Callable[[str], Iterable[str]] | None = None,
    **options: Any,
) -> str:
    """Train a sentencepiece model on text files and return the path of the `.model` file.

    The defaults make text round-trip exactly through `GLMTokenizer`: identity normalization,
    whitespace kept as is, newline as its own piece, byte fallback for unseen characters.
    Command-token strings in the files are dropped so they are never learned as pieces. Training
    is deterministic: the same files and options give a byte-identical model file wherever it is
    written (the sample of sentences is drawn with ``seed``, the thread count is fixed, and the
    file holds no path). Each line of a file is a training sentence;
    with `documents` (file name -> document texts, e.g. `datamodules.corpus_reader.iter_documents`)
    the lines of the documents it extracts are, so jsonl syntax never reaches the vocabulary.
    `options` go to sentencepiece's trainer; ``input_sentence_size`` (with
    ``shuffle_input_sentence``) bounds the sentences held in memory on a large corpus.
    """
    if not files:
        raise ValueError("train_sentencepiece needs at least one text file")
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise ValueError(f"training file not found: {name}")
        has_text = _has_text(path) if documents is None else any(d.strip() for d in documents(name))
        if not has_text:
            raise ValueError(f"training file is empty: {name}")

    settings = sentencepiece_settings(vocab_size, **options)
    del settings["sentencepiece"]
    seed = int(settings.pop("seed"))
    spm.set_random_generator_seed(seed)  # for any other random choice the trainer makes
    sentences = _sample_sentences(_training_sentences(files, documents),
                                  int(settings.pop("input_sentence_size", 0)),
                                  shuffle=bool(settings.pop("shuffle_input_sentence", True)), seed=seed)
    model = io.BytesIO()
    # trained into memory: given a model_prefix, sentencepiece would store that path in the model
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, **settings)
    model_path = f"{model_prefix}.model"
    atomic_write(model_path, lambda f: f.write(model.getvalue()))
    return model_path

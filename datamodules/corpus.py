"""Raw text corpora -> documents -> token ids, tokenized once and cached as memory-mapped shards.

Inputs are files, glob patterns or directories (searched recursively for ``.txt``, ``.text``,
``.raw`` and ``.jsonl`` files, hidden entries skipped); every list is sorted so the document order
is deterministic.

Document rules (kept simple on purpose):

* ``.jsonl`` files hold one document per line, the string in the line's ``"text"`` field; blank
  lines are skipped.
* Any other file is plain text and is one document, except that it is split at form feeds
  (``\\f``), and then either at every match of ``document_separator`` (a regular expression, e.g.
  ``r"\\n\\s*\\n"`` for documents separated by blank lines) when one is given, or else before
  every top-level WikiText heading line (``" = Title = "``), which makes each WikiText article a
  document.
* CRLF and lone CR line ends become LF, surrounding whitespace is stripped and empty documents are
  dropped.

Cache: each input file becomes one shard in ``cache_dir``, made of the flat token array (``uint16``
when ``len(tokenizer) < 65536``, else ``uint32``), an ``int64`` array of document offsets and a json
description written last, whose presence marks a complete shard. Every file is written to a
temporary name and renamed, so concurrent processes (DDP ranks) never read half a shard. The shard
name is the sha256 of the file's content hash, the tokenizer fingerprint, the document rule and the
format version: a renamed file reuses its shard, a changed file or tokenizer is tokenized again.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from datamodules.jsonl import jsonl_records

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
TEXT_SUFFIXES = frozenset({".txt", ".text", ".raw"})
JSONL_SUFFIXES = frozenset({".jsonl"})

# A top-level WikiText heading line: " = Title = " (section headings are " = = Title = = ").
_WIKITEXT_HEADING = re.compile(r"^ = [^=\n][^\n]* = *$", re.MULTILINE)

# Text whose encoding identifies a tokenizer that has no fingerprint() of its own.
_PROBE_TEXT = (
    "The city of Arlen lies on the river Vesk. Is it far? No! Two rivers; three bridges: done.\n"
    "  Numbers 0123456789, symbols ()[]{}<>#@%&*+-=/\\|~^`'\" and café, Zürich, naïve.\n"
    "我们今天学习语言模型。\ttab [MASK] [gMASK] <|endoftext|>"
)

StrPath = str | os.PathLike[str]


class CorpusError(ValueError):
    """A corpus input cannot be read as documents; the message names the file (and line)."""


# ----------------------------------------------------------------------------------------------
# Inputs and documents


def resolve_inputs(inputs: StrPath | Sequence[StrPath]) -> list[Path]:
    """Expand files, globs and directories into a deterministic list of files (duplicates dropped)."""
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not items:
        raise CorpusError("no corpus inputs given")
    files: list[Path] = []
    for item in items:
        name = os.fspath(item)
        if any(c in name for c in "*?["):
            matches = sorted(glob.glob(name, recursive=True))
            found = [f for m in matches for f in (_walk(Path(m)) if Path(m).is_dir() else [Path(m)])]
            if not found:
                raise FileNotFoundError(f"corpus glob matched no files: {name!r}")
        elif Path(name).is_dir():
            found = _walk(Path(name))
            if not found:
                suffixes = ", ".join(sorted(TEXT_SUFFIXES | JSONL_SUFFIXES))
                raise FileNotFoundError(f"corpus directory has no {suffixes} files: {name}")
        elif Path(name).is_file():
            found = [Path(name)]
        else:
            raise FileNotFoundError(f"corpus input not found: {name}")
        files.extend(found)
    unique: dict[Path, Path] = {}
    for f in files:
        unique.setdefault(f.resolve(), f)
    return list(unique.values())


def _walk(root: Path) -> list[Path]:
    suffixes = TEXT_SUFFIXES | JSONL_SUFFIXES
    found = [
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix.lower() in suffixes
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _is_jsonl(path: Path) -> bool:
    return path.suffix.lower() in JSONL_SUFFIXES


def read_documents(path: StrPath, *, document_separator: str | None = None) -> list[str]:
    """The documents of one file, following the rules in the module docstring."""
    path = Path(path)
    text = _decode(path, path.read_bytes()).replace("\r\n", "\n")
    if _is_jsonl(path):
        raw = _jsonl_documents(path, text)
    else:
        raw = _text_documents(text, document_separator)
    documents = [d for d in (doc.replace("\r\n", "\n").replace("\r", "\n").strip() for doc in raw) if d]
    if not documents:
        raise CorpusError(f"{path}: no documents (the file holds only whitespace or empty texts)")
    return documents


def _decode(path: Path, data: bytes) -> str:
    if not data:
        raise CorpusError(f"{path}: file is empty")
    nul = data.find(b"\x00")
    if nul >= 0:
        raise CorpusError(f"{path}: looks like a binary file (NUL byte at byte offset {nul})")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: not valid UTF-8 at byte offset {e.start} ({e.reason})") from None
    return text.removeprefix("\ufeff")


def _jsonl_documents(path: Path, text: str) -> list[str]:
    documents = []
    for line_no, record in jsonl_records(path, text.split("\n"), CorpusError):
        where = f"{path}:{line_no}"
        if not isinstance(record, dict):
            raise CorpusError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if "text" not in record:
            raise CorpusError(f'{where}: missing "text" field')
        if not isinstance(record["text"], str):
            raise CorpusError(f'{where}: "text" must be a string, got {type(record["text"]).__name__}')
        documents.append(record["text"])
    return documents


def _text_documents(text: str, document_separator: str | None) -> list[str]:
    pieces = text.replace("\r", "\n").split("\f")
    if document_separator is not None:
        separator = re.compile(document_separator)
        return [doc for piece in pieces for doc in separator.split(piece)]
    return [doc for piece in pieces for doc in _split_wikitext(piece)]


def _split_wikitext(text: str) -> list[str]:
    starts = [m.start() for m in _WIKITEXT_HEADING.finditer(text)]
    if not starts:
        return [text]
    bounds = [0, *starts, len(text)]
    return [text[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


# ----------------------------------------------------------------------------------------------
# Tokenized corpus


class _Shard:
    """A flat token array: memory-mapped from the cache, or held in memory (tests, small data)."""

    def __init__(self, path: Path | None, dtype: np.dtype, num_tokens: int, array: np.ndarray | None = None):
        self.path = path
        self.dtype = np.dtype(dtype)
        self.num_tokens = num_tokens
        self._array = array

    @property
    def tokens(self) -> np.ndarray:
        if self._array is None:
            self._array = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
        return self._array

    def __getstate__(self) -> dict[str, Any]:
        # memory-mapped shards travel to worker processes as their path, not their contents
        state = dict(self.__dict__)
        if self.path is not None:
            state["_array"] = None
        return state


class TokenizedCorpus:
    """Documents as token-id arrays, backed by shards; cheap to subset and to pickle."""

    def __init__(self, shards: list[_Shard], shard_ids: np.ndarray, starts: np.ndarray, ends: np.ndarray):
        self._shards = shards
        self._shard_ids = np.asarray(shard_ids, dtype=np.int64)
        self._starts = np.asarray(starts, dtype=np.int64)
        self._ends = np.asarray(ends, dtype=np.int64)
        self.lengths: np.ndarray = self._ends - self._starts
        """Token count of every document (int64)."""

    @classmethod
    def from_documents(cls, documents: Sequence[Sequence[int]]) -> TokenizedCorpus:
        """An in-memory corpus from token-id sequences (no cache)."""
        arrays = [np.asarray(doc, dtype=np.int64) for doc in documents]
        offsets = np.cumsum([0, *(len(a) for a in arrays)], dtype=np.int64)
        tokens = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
        shard = _Shard(None, tokens.dtype, len(tokens), tokens)
        return cls([shard], np.zeros(len(arrays), dtype=np.int64), offsets[:-1], offsets[1:])

    @property
    def num_documents(self) -> int:
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        """Total tokens over all documents."""
        return int(self.lengths.sum())

    def __len__(self) -> int:
        return self.num_documents

    def document(self, i: int) -> np.ndarray:
        """Token ids of document i (a read-only view in the shard's dtype)."""
        shard = self._shards[self._shard_ids[i]]
        return shard.tokens[self._starts[i] : self._ends[i]]

    def subset(self, indices: Sequence[int] | np.ndarray) -> TokenizedCorpus:
        """The documents at `indices`, in that order, sharing the shards."""
        idx = np.asarray(indices, dtype=np.int64)
        return TokenizedCorpus(self._shards, self._shard_ids[idx], self._starts[idx], self._ends[idx])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(documents={self.num_documents}, tokens={self.num_tokens})"


def tokenize_corpus(
    inputs: StrPath | Sequence[StrPath],
    tokenizer: Any,
    cache_dir: StrPath,
    *,
    document_separator: str | None = None,
    progress: bool = True,
) -> TokenizedCorpus:
    """Tokenize every input file once (cached in `cache_dir`) and return the corpus of all of them.

    `tokenizer` is a GLMTokenizer (``encode``, ``len``; ``fingerprint()`` when it has one).
    """
    files = resolve_inputs(inputs)
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    fingerprint = _tokenizer_fingerprint(tokenizer)
    dtype = np.dtype(np.uint16 if len(tokenizer) < 2**16 else np.uint32)

    shards, shard_ids, starts, ends = [], [], [], []
    reused = 0
    for path in files:
        key = _shard_key(_file_sha256(path), fingerprint, dtype, _document_rule(path, document_separator))
        loaded = _load_shard(cache, key)
        if loaded is None:
            documents = read_documents(path, document_separator=document_separator)
            _write_shard(cache, key, documents, tokenizer, dtype, path, progress)
            loaded = _load_shard(cache, key)
            assert loaded is not None, f"shard {key} of {path} was written but cannot be read back"
        else:
            reused += 1
        shard, offsets = loaded
        shard_ids.append(np.full(len(offsets) - 1, len(shards), dtype=np.int64))
        starts.append(offsets[:-1])
        ends.append(offsets[1:])
        shards.append(shard)
    corpus = TokenizedCorpus(shards, np.concatenate(shard_ids), np.concatenate(starts), np.concatenate(ends))
    log.info(
        "corpus: %d files (%d from cache), %d documents, %d tokens",
        len(files),
        reused,
        corpus.num_documents,
        corpus.num_tokens,
    )
    return corpus


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    """The tokenizer's own fingerprint, or a hash of its vocabulary size and a probe encoding."""
    fingerprint = getattr(tokenizer, "fingerprint", None)
    if callable(fingerprint):
        return str(fingerprint())
    h = hashlib.sha256()
    h.update(type(tokenizer).__qualname__.encode())
    h.update(str(len(tokenizer)).encode())
    h.update(np.asarray(tokenizer.encode(_PROBE_TEXT), dtype=np.int64).tobytes())
    for name in ("cls_id", "eos_id", "pad_id", "mask_id", "sop_id", "eop_id", "gmask_id", "smask_id"):
        h.update(f"{name}={getattr(tokenizer, name, None)};".encode())
    return "probe-" + h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _document_rule(path: Path, document_separator: str | None) -> str:
    return "jsonl" if _is_jsonl(path) else f"text;separator={document_separator!r}"


def _shard_key(content_sha: str, fingerprint: str, dtype: np.dtype, rule: str) -> str:
    parts = [
        f"format={FORMAT_VERSION}",
        f"content={content_sha}",
        f"tokenizer={fingerprint}",
        f"dtype={dtype.name}",
        f"rule={rule}",
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _shard_paths(cache: Path, key: str) -> tuple[Path, Path, Path]:
    return cache / f"{key}.tokens", cache / f"{key}.offsets.npy", cache / f"{key}.json"


def _load_shard(cache: Path, key: str) -> tuple[_Shard, np.ndarray] | None:
    tokens_path, offsets_path, meta_path = _shard_paths(cache, key)
    try:
        meta = json.loads(meta_path.read_text())
        dtype = np.dtype(meta["dtype"])
        offsets = np.load(offsets_path)
        complete = (
            meta["format_version"] == FORMAT_VERSION
            and offsets.dtype == np.int64
            and len(offsets) == meta["num_documents"] + 1
            and offsets[-1] == meta["num_tokens"]
            and tokens_path.stat().st_size == meta["num_tokens"] * dtype.itemsize
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not complete:
        return None
    return _Shard(tokens_path, dtype, int(meta["num_tokens"])), offsets


def _write_shard(
    cache: Path,
    key: str,
    documents: list[str],
    tokenizer: Any,
    dtype: np.dtype,
    source: Path,
    progress: bool,
) -> None:
    tokens_path, offsets_path, meta_path = _shard_paths(cache, key)
    vocab_size = len(tokenizer)
    offsets = [0]
    tmp_tokens = _temporary(cache, key)
    try:
        with (
            tmp_tokens.open("wb") as f,
            tqdm(
                total=sum(len(d) for d in documents),
                unit="char",
                unit_scale=True,
                desc=f"tokenizing {source.name}",
                disable=not progress,
                leave=False,
            ) as bar,
        ):
            for doc in documents:
                ids = np.asarray(tokenizer.encode(doc), dtype=np.int64)
                if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
                    raise CorpusError(f"{source}: tokenizer produced ids outside [0, {vocab_size})")
                f.write(ids.astype(dtype).tobytes())
                offsets.append(offsets[-1] + ids.size)
                bar.update(len(doc))
        os.replace(tmp_tokens, tokens_path)
    finally:
        tmp_tokens.unlink(missing_ok=True)
    _atomic_write(cache, key, offsets_path, lambda f: np.save(f, np.asarray(offsets, dtype=np.int64)))
    meta = {
        "format_version": FORMAT_VERSION,
        "dtype": dtype.name,
        "num_documents": len(documents),
        "num_tokens": offsets[-1],
        "source": source.name,
    }
    _atomic_write(cache, key, meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode()))


def _temporary(cache: Path, key: str) -> Path:
    fd, name = tempfile.mkstemp(dir=cache, prefix=f".{key}.", suffix=".tmp")
    os.close(fd)
    return Path(name)


def _atomic_write(cache: Path, key: str, target: Path, write: Any) -> None:
    tmp = _temporary(cache, key)
    try:
        with tmp.open("wb") as f:
            write(f)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)

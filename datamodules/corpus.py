"""Raw text corpora -> documents -> token ids, tokenized once and cached as memory-mapped shards.

Inputs are files, glob patterns or directories (searched recursively for ``.txt``, ``.text``,
``.raw`` and ``.jsonl`` files, also compressed as ``.gz``, ``.bz2``, ``.xz`` or ``.zst``, hidden
entries skipped); every list is sorted so the document order is deterministic. Files are read as
streams in bounded memory (`datamodules.corpus_reader`).

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

Cache: each input file becomes one shard in ``cache_dir``: one or more parts (a flat token array,
``uint16`` when ``len(tokenizer) < 65536``, else ``uint32``, and an ``int64`` array of document
offsets), one per byte range tokenized by a worker process, and a json description written last,
whose presence marks a complete shard. The description holds the blake2b checksum of each part's
token bytes; a shard is verified against it whenever it is loaded (it reads the tokens once, at
several hundred MB/s), and a shard that fails, or has no checksum (an older cache), is tokenized
again with a one-line warning, rather than training on whatever the damaged bytes decode to.
Every file is written to a temporary name and renamed, and a lock file makes exactly one process
prepare each shard (`datamodules.cache_lock`); the others wait. The shard name is the sha256 of the
file's content hash, the tokenizer fingerprint, the document rule and the format version: a renamed
file reuses its shard, a changed file or tokenizer is tokenized again. Content hashes are
remembered by (size, mtime) (`datamodules.content_hash`).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.cache_lock import CacheLock
from datamodules.content_hash import content_hash
from datamodules.corpus_reader import (
    COMPRESSED_SUFFIXES,
    JSONL_SUFFIXES,
    TEXT_SUFFIXES,
    CorpusError,
    is_corpus_file,
    is_jsonl,
    iter_documents,
)
from datamodules.shard_writer import plan_units, tokenize_units
from glm_lightning.atomic import remove_abandoned, temporary_path

__all__ = [
    "CorpusError",
    "PrepareReport",
    "StrPath",
    "TokenizedCorpus",
    "read_documents",
    "resolve_inputs",
    "tokenize_corpus",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 2

# Text whose encoding identifies a tokenizer that has no fingerprint() of its own.
_PROBE_TEXT = (
    "The city of Arlen lies on the river Vesk. Is it far? No! Two rivers; three bridges: done.\n"
    "  Numbers 0123456789, symbols ()[]{}<>#@%&*+-=/\\|~^`'\" and café, Zürich, naïve.\n"
    "我们今天学习语言模型。\ttab [MASK] [gMASK] <|endoftext|>"
)

# A process that is not its node's local rank 0 waits this long for rank 0 to take a shard's lock
# before taking it itself.
LOCAL_RANK_GRACE_SECONDS = 120.0
POLL_SECONDS = 0.5

StrPath = str | os.PathLike[str]


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
                compressed = ", ".join(sorted(COMPRESSED_SUFFIXES))
                raise FileNotFoundError(f"corpus directory has no {suffixes} (or {compressed}) files: {name}")
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
    found = [
        p
        for p in root.rglob("*")
        if p.is_file()
        and is_corpus_file(p)
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def read_documents(path: StrPath, *, document_separator: str | None = None) -> list[str]:
    """The documents of one file, following the rules in the module docstring (all in memory:
    for small files and tests; `tokenize_corpus` streams)."""
    documents = list(iter_documents(path, document_separator=document_separator))
    if not documents:
        raise CorpusError(f"{path}: no documents (the file holds only whitespace or empty texts)")
    return documents


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
        self.report: PrepareReport | None = None
        """What `tokenize_corpus` did to build this corpus (None for others)."""

    @classmethod
    def from_documents(cls, documents: Sequence[Sequence[int]]) -> TokenizedCorpus:
        """An in-memory corpus from token-id sequences (no cache)."""
        arrays = [np.asarray(doc, dtype=np.int64) for doc in documents]
        offsets = np.cumsum([0, *(len(a) for a in arrays)], dtype=np.int64)
        tokens = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
        shard = _Shard(None, tokens.dtype, len(tokens), tokens)
        return cls([shard], np.zeros(len(arrays), dtype=np.int64), offsets[:-1], offsets[1:])

    @classmethod
    def concatenate(cls, corpora: Sequence[TokenizedCorpus]) -> TokenizedCorpus:
        """The documents of every corpus in order, sharing their shards."""
        shards: list[_Shard] = []
        shard_ids = []
        for corpus in corpora:
            shard_ids.append(corpus._shard_ids + len(shards))
            shards.extend(corpus._shards)
        return cls(shards, np.concatenate(shard_ids), np.concatenate([c._starts for c in corpora]),
                   np.concatenate([c._ends for c in corpora]))

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


@dataclass(frozen=True)
class PrepareReport:
    """What one `tokenize_corpus` call did: files, the part of them tokenized now, the time taken."""

    files: int
    files_tokenized: int
    bytes_tokenized: int  # bytes on disk of the files tokenized now (compressed size if compressed)
    seconds: float  # tokenizing time of those files (waiting for another process excluded)
    documents: int
    tokens: int
    cache_dir: str

    @property
    def mb_per_second(self) -> float:
        return self.bytes_tokenized / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        """One line: files, documents, tokens, speed and where the cache is."""
        speed = f"{self.mb_per_second:.1f} MB/s" if self.files_tokenized else "all from cache"
        size = f"{self.bytes_tokenized / 1e6:.1f} MB"
        return (f"{self.files} files ({self.files_tokenized} tokenized, {size}), {self.documents} documents, "
                f"{self.tokens} tokens, {speed}; cache {self.cache_dir}")


def tokenize_corpus(
    inputs: StrPath | Sequence[StrPath],
    tokenizer: Any,
    cache_dir: StrPath,
    *,
    document_separator: str | None = None,
    progress: bool = True,
    num_proc: int = 1,
    rehash: bool = False,
) -> TokenizedCorpus:
    """Tokenize every input file once (cached in `cache_dir`) and return the corpus of all of them.

    `tokenizer` is a GLMTokenizer (``encode_batch`` or ``encode``, ``len``; ``fingerprint()`` when
    it has one); it is pickled to `num_proc` worker processes when there is enough text to share.
    The result is the same for any `num_proc`. `rehash` hashes every file again instead of trusting
    an unchanged (size, mtime). The returned corpus has a `report` (a `PrepareReport`).
    """
    if num_proc < 1:
        raise ValueError(f"num_proc must be at least 1, got {num_proc}")
    files = resolve_inputs(inputs)
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(cache)
    fingerprint = _tokenizer_fingerprint(tokenizer)
    dtype = np.dtype(np.uint16 if len(tokenizer) < 2**16 else np.uint32)
    keys = [
        _shard_key(content_hash(path, cache / "hashes", rehash=rehash), fingerprint, dtype,
                   _document_rule(path, document_separator))
        for path in files
    ]
    loaded: dict[int, tuple[list[_Shard], np.ndarray]] = {}
    for i, key in enumerate(keys):
        shard = _load_shard(cache, key, warn=True)
        if shard is not None:
            loaded[i] = shard
    reused = len(loaded)
    tokenized_bytes, seconds = _prepare_missing(
        files, keys, loaded, _Tokenization(cache, tokenizer, dtype, document_separator, progress, num_proc)
    )

    shards: list[_Shard] = []
    shard_ids, starts, ends = [], [], []
    for i in range(len(files)):
        parts, offsets = loaded[i]
        for part, part_offsets in zip(parts, offsets, strict=True):
            shard_ids.append(np.full(len(part_offsets) - 1, len(shards), dtype=np.int64))
            starts.append(part_offsets[:-1])
            ends.append(part_offsets[1:])
            shards.append(part)
    corpus = TokenizedCorpus(shards, np.concatenate(shard_ids), np.concatenate(starts), np.concatenate(ends))
    corpus.report = PrepareReport(len(files), len(files) - reused, tokenized_bytes, seconds,
                                  corpus.num_documents, corpus.num_tokens, str(cache))
    log.info(
        "corpus: %d files (%d from cache), %d documents, %d tokens",
        len(files),
        reused,
        corpus.num_documents,
        corpus.num_tokens,
    )
    return corpus


def _local_rank() -> int:
    """This process's rank on its node, as launchers (torchrun, Lightning) export it; 0 if unset."""
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


@dataclass(frozen=True)
class _Tokenization:
    """How missing shards are made: where, with which tokenizer and dtype, in how many processes."""

    cache: Path
    tokenizer: Any
    dtype: np.dtype
    document_separator: str | None
    progress: bool
    num_proc: int


def _prepare_missing(
    files: list[Path], keys: list[str], loaded: dict[int, Any], how: _Tokenization
) -> tuple[int, float]:
    """Tokenize the shards nobody has prepared, under their locks; wait for those others hold.

    A process that is not local rank 0 leaves each shard to its node's rank 0 for a while, so with
    node-local caches it is rank 0 that prepares; with a shared cache the lock picks one process.
    Returns (bytes tokenized, seconds spent tokenizing) by this process.
    """
    tokenized_bytes, seconds = 0, 0.0
    waiting_since = time.monotonic()
    announced: set[int] = set()
    defer = _local_rank() > 0
    while len(loaded) < len(files):
        mine: dict[int, CacheLock] = {}
        for i, key in enumerate(keys):
            if i in loaded or i in mine:
                continue
            lock = CacheLock(how.cache / f"{key}.lock")
            patient = defer and time.monotonic() - waiting_since < LOCAL_RANK_GRACE_SECONDS
            if patient and lock.holder() is None:
                continue  # the node's rank 0 has not come to it yet
            if lock.try_acquire():
                shard = _load_shard(how.cache, key)  # finished while we looked?
                if shard is not None:
                    loaded[i] = shard
                    lock.release()
                else:
                    mine[i] = lock
        if mine:
            started = time.perf_counter()
            try:
                _write_shards({i: files[i] for i in mine}, {i: keys[i] for i in mine}, how)
            finally:
                for lock in mine.values():
                    lock.release()
            seconds += time.perf_counter() - started
            tokenized_bytes += sum(files[i].stat().st_size for i in mine)
            for i in mine:
                shard = _load_shard(how.cache, keys[i], verify=False)  # checksummed as it was written
                assert shard is not None, f"shard {keys[i]} of {files[i]} was written but cannot be read back"
                loaded[i] = shard
            continue
        for i, key in enumerate(keys):
            if i in loaded:
                continue
            shard = _load_shard(how.cache, key)
            if shard is not None:
                loaded[i] = shard
            elif i not in announced:
                announced.add(i)
                lock = CacheLock(how.cache / f"{key}.lock")
                who = lock.describe() if lock.holder() is not None else "local rank 0"
                message = f"waiting for {who} to tokenize {files[i]} (lock {lock.path})"
                print(message, file=sys.stderr, flush=True)
        if len(loaded) < len(files):
            time.sleep(POLL_SECONDS)
    return tokenized_bytes, seconds


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


def _document_rule(path: Path, document_separator: str | None) -> str:
    return "jsonl" if is_jsonl(path) else f"text;separator={document_separator!r}"


def _shard_key(content_sha: str, fingerprint: str, dtype: np.dtype, rule: str) -> str:
    parts = [
        f"format={FORMAT_VERSION}",
        f"content={content_sha}",
        f"tokenizer={fingerprint}",
        f"dtype={dtype.name}",
        f"rule={rule}",
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _part_paths(cache: Path, key: str, k: int) -> tuple[Path, Path]:
    return cache / f"{key}.{k}.tokens", cache / f"{key}.{k}.offsets.npy"


def _load_shard(cache: Path, key: str, *, verify: bool = True,
                warn: bool = False) -> tuple[list[_Shard], list[np.ndarray]] | None:
    """The parts of a complete shard and their document offsets, or None: absent, of an older format,
    or damaged (a truncated part, an unreadable index; with ``verify``, token bytes that do not match
    their checksums), which ``warn`` says in one line."""
    description = cache / f"{key}.json"
    if not description.exists():
        return None

    def damaged(what: object, problem: str) -> None:
        if warn:
            print(f"warning: cached shard {what} {problem}; tokenizing it again", file=sys.stderr, flush=True)

    meta: dict = {}
    try:
        meta = json.loads(description.read_text())
        if meta["format_version"] != FORMAT_VERSION:
            return None
        dtype = np.dtype(meta["dtype"])
        parts, offsets = [], []
        for k, part in enumerate(meta["parts"]):
            tokens_path, offsets_path = _part_paths(cache, key, k)
            part_offsets = np.load(offsets_path)
            complete = (
                part_offsets.dtype == np.int64
                and len(part_offsets) == part["num_documents"] + 1
                and part_offsets[-1] == part["num_tokens"]
                and tokens_path.stat().st_size == part["num_tokens"] * dtype.itemsize
            )
            if not complete:
                damaged(f"{tokens_path} of {meta.get('source')}", "is incomplete (shorter or longer than its "
                        "index says)")
                return None
            problem = _checksum_problem(tokens_path, part.get("blake2b")) if verify else None
            if problem:
                damaged(f"{tokens_path} of {meta.get('source')}", problem)
                return None
            parts.append(_Shard(tokens_path, dtype, int(part["num_tokens"])))
            offsets.append(part_offsets)
    except (OSError, ValueError, KeyError, TypeError) as error:
        source = f" of {meta['source']}" if isinstance(meta, dict) and "source" in meta else ""
        damaged(f"{description}{source}", f"has an unreadable index ({type(error).__name__}: {error})")
        return None
    return parts, offsets


def _checksum_problem(tokens_path: Path, expected: str | None) -> str | None:
    """Why the part's token bytes cannot be trusted (no checksum, or another one), or None."""
    if not expected:
        return "has no checksum (written by an older version)"
    with tokens_path.open("rb") as f:
        actual = hashlib.file_digest(f, "blake2b").hexdigest()
    return None if actual == expected else "does not match its checksum (the file was changed or damaged)"


def _write_shards(files: dict[int, Path], keys: dict[int, str], how: _Tokenization) -> None:
    """Tokenize `files` (all units of all of them in one pool) and write their shards."""
    cache, tokenizer, dtype = how.cache, how.tokenizer, how.dtype
    document_separator, progress, num_proc = how.document_separator, how.progress, how.num_proc
    units = {}
    for i, path in files.items():
        units[i] = plan_units(path, document_separator, num_proc,
                              lambda k, key=keys[i]: tuple(_temporary(cache, f"{key}.{k}") for _ in range(2)))
    flat = [unit for i in files for unit in units[i]]
    names = [path.name for path in files.values()]
    description = f"tokenizing {names[0]}" if len(names) == 1 else f"tokenizing {len(names)} files"
    try:
        results = iter(tokenize_units(flat, tokenizer, dtype, num_proc, progress=progress,
                                      description=description))
        for i, path in files.items():
            parts = []
            for k, unit in enumerate(units[i]):
                num_documents, num_tokens, checksum = next(results)
                tokens_path, offsets_path = _part_paths(cache, keys[i], k)
                os.replace(unit.tokens_path, tokens_path)
                os.replace(unit.offsets_path, offsets_path)
                parts.append({"num_documents": num_documents, "num_tokens": num_tokens, "blake2b": checksum})
            if sum(p["num_documents"] for p in parts) == 0:
                raise CorpusError(f"{path}: no documents (the file holds only whitespace or empty texts)")
            meta = {
                "format_version": FORMAT_VERSION,
                "dtype": dtype.name,
                "num_documents": sum(p["num_documents"] for p in parts),
                "num_tokens": sum(p["num_tokens"] for p in parts),
                "source": path.name,
                "parts": parts,
            }
            _atomic_write(cache, keys[i], cache / f"{keys[i]}.json",
                          lambda f, meta=meta: f.write(json.dumps(meta, indent=1).encode()))
    finally:
        for unit in flat:
            unit.tokens_path.unlink(missing_ok=True)
            unit.offsets_path.unlink(missing_ok=True)


def _temporary(cache: Path, key: str) -> Path:
    """A new empty file in ``cache`` whose name holds this process's id and host, so that a later
    run removes it if this process is killed (``glm_lightning.atomic.remove_abandoned``)."""
    path = temporary_path(cache / key)
    path.touch(exist_ok=False)
    return path


def _remove_leftovers(cache: Path) -> None:
    """Remove the shard parts that killed tokenizations left in ``cache``, saying so in one line."""
    removed = remove_abandoned(cache)
    if removed:
        print(f"note: removed {len(removed)} temporary files left in {cache} by killed tokenizations",
              file=sys.stderr, flush=True)


def _atomic_write(cache: Path, key: str, target: Path, write: Any) -> None:
    tmp = _temporary(cache, key)
    try:
        with tmp.open("wb") as f:
            write(f)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)

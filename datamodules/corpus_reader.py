"""Documents of one corpus file, read as a stream in bounded memory.

The document rules are those of `datamodules.corpus`; this module only reads them incrementally:
text files in chunks of complete lines, jsonl files line by line, either of them compressed
(``.gz``, ``.bz2``, ``.xz`` from the standard library, ``.zst`` through ``zstandard``).

A document is handed out as *pieces* ``(text, ends_document)``: joining the pieces of a document
gives exactly the document string. A document longer than `piece_chars` is cut into several
pieces, and only where a cut cannot change the token ids of the subword tokenizers GLM uses: before
a single space between two non-space characters, or after a single newline between two non-space
characters, never in front of ``[`` or ``<`` (where a command token may begin). (A run of
whitespace is never split: GPT-2's pre-tokenizer groups a run differently at the end of a text.) With
sentencepiece splitting at whitespace (and newline its own piece, as `train_sentencepiece` sets it),
GPT-2 byte-level BPE and WordPiece, the ids of the pieces joined equal the ids of the document.

Memory: a text file holds about `piece_chars` characters of a document and a few chunks of text
at a time (a line longer than four chunks is read in parts, so it is never taken for a WikiText
heading, which is one short line); a jsonl file holds one line at a time. With a
`document_separator`, a match is searched in a window that keeps 64 KiB of text beyond it, so a
separator whose match (or look-ahead) spans more than that may split differently from a whole-file
split; form feeds, WikiText headings and jsonl lines are exact.

Byte ranges (for several processes on one uncompressed file): a reader given ``start`` (a line
start) and ``end`` hands out the documents that *begin* in ``[start, end)``, reading on past
``end`` to finish the last one. Text files read with a `document_separator` are not split into
ranges (a separator match may begin anywhere).
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import io
import lzma
import os
import re
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from datamodules.jsonl import jsonl_records

TEXT_SUFFIXES = frozenset({".txt", ".text", ".raw"})
JSONL_SUFFIXES = frozenset({".jsonl"})
COMPRESSED_SUFFIXES = frozenset({".gz", ".bz2", ".xz", ".zst"})

PIECE_CHARS = 1 << 20  # characters of a document tokenized at once
CHUNK_BYTES = 1 << 20  # bytes read at a time from a text file
SEPARATOR_LOOKAHEAD = 1 << 16  # text kept beyond an accepted separator match

# A top-level WikiText heading line (" = Title = "; section headings are " = = Title = = "), which
# begins at a line start or after a form feed and ends before a newline, a form feed or the end.
_WIKITEXT_HEADING = r"(?:^|(?<=[\n\f])) = [^=\n\f][^\n\f]* = *(?=[\n\f]|\Z)"
_BOUNDARY = re.compile(rf"\f|{_WIKITEXT_HEADING}")
# Where a document may be cut without changing token ids (see the module docstring).
_SAFE_CUT = re.compile(r"(?<=\S) (?=[^\s\[<])|(?<=\S\n)(?=[^\s\[<])")

Piece = tuple[str, bool]
Progress = Callable[[int], None]


class CorpusError(ValueError):
    """A corpus input cannot be read as documents; the message names the file (and line)."""


def compression(path: Path) -> str | None:
    """The compression suffix of `path` (".gz", ".bz2", ".xz", ".zst") or None."""
    suffix = path.suffix.lower()
    return suffix if suffix in COMPRESSED_SUFFIXES else None


def content_suffix(path: Path) -> str:
    """The suffix that says what the (decompressed) content is: ".jsonl" for "a.jsonl.zst"."""
    return (path.with_suffix("") if compression(path) else path).suffix.lower()


def is_corpus_file(path: Path) -> bool:
    return content_suffix(path) in TEXT_SUFFIXES | JSONL_SUFFIXES


def is_jsonl(path: Path) -> bool:
    return content_suffix(path) in JSONL_SUFFIXES


def splittable(path: Path, document_separator: str | None) -> bool:
    """Whether the file can be read in byte ranges by several processes."""
    return compression(path) is None and (is_jsonl(path) or document_separator is None)


def line_aligned_ranges(path: Path, count: int) -> list[tuple[int, int]]:
    """About `count` byte ranges covering the file, each starting at a line start."""
    size = path.stat().st_size
    bounds = [0]
    with path.open("rb") as f:
        for k in range(1, count):
            target = max(size * k // count, bounds[-1])
            f.seek(target)
            if target > 0:
                f.seek(target - 1)
                f.readline()  # to the start of the next line
            position = f.tell()
            if bounds[-1] < position < size:
                bounds.append(position)
    bounds.append(size)
    return list(zip(bounds[:-1], bounds[1:], strict=True))


class _Counting(io.RawIOBase):
    """A raw file that reports the bytes read from disk (compressed bytes for compressed files)."""

    def __init__(self, raw: BinaryIO, progress: Progress | None) -> None:
        self._raw = raw
        self._progress = progress

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = self._raw.readinto(buffer)
        if n and self._progress is not None:
            self._progress(n)
        return n or 0

    def close(self) -> None:
        self._raw.close()
        super().close()


# How each compressed format begins (its magic number): a file without it is not of that format.
SIGNATURES = {".gz": b"\x1f\x8b", ".bz2": b"BZh", ".xz": b"\xfd7zXZ\x00", ".zst": b"\x28\xb5\x2f\xfd"}


class _Decompressed(io.RawIOBase):
    """A decompressor's output whose failures (damaged or truncated data; each library raises its
    own kind of error) are one ``CorpusError`` naming the file and the offset reached."""

    def __init__(self, path: Path, stream: BinaryIO, errors: tuple[type[BaseException], ...] = ()) -> None:
        self._path, self._stream, self._offset = path, stream, 0
        self._errors = (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError, *errors)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        try:
            n = self._stream.readinto(buffer)
        except self._errors as error:
            kind = compression(self._path)
            raise CorpusError(f"{self._path}: damaged or truncated {kind} data at byte offset {self._offset} "
                              f"of its decompressed content ({error})") from None
        self._offset += n or 0
        return n or 0

    def close(self) -> None:
        self._stream.close()
        super().close()


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of a .zst file of one or more frames; a file that ends inside a frame
    is an ``EOFError`` (zstandard's own stream reader ends there silently)."""

    def __init__(self, compressed: BinaryIO) -> None:
        import zstandard

        self._new = zstandard.ZstdDecompressor().decompressobj
        self._compressed, self._frame, self._started = compressed, self._new(), False
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while not self._pending:
            data = self._compressed.read(CHUNK_BYTES)
            if not data:
                if self._started:
                    raise EOFError("the file ends inside a zstd frame")
                return 0
            while data:
                self._started = True
                self._pending += self._frame.decompress(data)
                data = b""
                if self._frame.eof:  # a frame ended: what follows it starts the next one
                    data, self._frame, self._started = self._frame.unused_data, self._new(), False
        n = min(len(buffer), len(self._pending))
        buffer[:n], self._pending = self._pending[:n], self._pending[n:]
        return n


def open_binary(path: Path, start: int = 0, progress: Progress | None = None) -> tuple[BinaryIO, BinaryIO]:
    """(the file, its decompressed bytes) from byte `start` (only 0 for compressed files); close
    both (a decompressor does not close a file it was handed)."""
    raw = open(path, "rb", buffering=0)  # noqa: SIM115 - the caller closes it
    if start:
        raw.seek(start)
    kind = compression(path)
    if kind is not None:
        signature = raw.read(len(SIGNATURES[kind]))
        raw.seek(start)
        if signature and signature != SIGNATURES[kind]:
            raw.close()
            raise CorpusError(f"{path}: not {kind} data (its first bytes are not the {kind} signature); "
                              f"a file of another kind named {kind}? Rename it to what it holds")
    counted = io.BufferedReader(_Counting(raw, progress), buffer_size=CHUNK_BYTES)
    if kind is None:
        return counted, counted
    errors: tuple[type[BaseException], ...] = ()
    if kind == ".gz":
        stream = gzip.GzipFile(fileobj=counted, mode="rb")
    elif kind == ".bz2":
        stream = bz2.BZ2File(counted, "rb")
    elif kind == ".xz":
        stream = lzma.LZMAFile(counted, "rb")
    else:
        import zstandard

        stream, errors = _ZstdFrames(counted), (zstandard.ZstdError,)
    decompressed = _Decompressed(path, stream, errors)  # type: ignore[arg-type]
    return counted, io.BufferedReader(decompressed, buffer_size=CHUNK_BYTES)  # type: ignore[return-value]


def iter_pieces(
    path: str | os.PathLike[str],
    *,
    document_separator: str | None = None,
    start: int = 0,
    end: int | None = None,
    progress: Progress | None = None,
    piece_chars: int | None = None,
) -> Iterator[Piece]:
    """The documents of `path` (those beginning in ``[start, end)``) as ``(text, ends_document)``.

    `progress` is called with the number of bytes read from disk as reading goes on;
    `piece_chars` defaults to `PIECE_CHARS`.
    """
    path = Path(path)
    piece_chars = piece_chars or PIECE_CHARS
    file, stream = open_binary(path, start, progress)
    with file, stream:
        if is_jsonl(path):
            yield from _jsonl_pieces(path, stream, start, end, piece_chars)
        else:
            yield from _text_pieces(path, stream, start, end, document_separator, piece_chars)


def iter_documents(path: str | os.PathLike[str], *, document_separator: str | None = None) -> Iterator[str]:
    """Each document of `path` as one string (a whole document in memory at a time)."""
    parts: list[str] = []
    for text, ends in iter_pieces(path, document_separator=document_separator):
        parts.append(text)
        if ends:
            yield "".join(parts)
            parts = []


class _Document:
    """Collects the text of one document and hands it out as stripped pieces."""

    def __init__(self, piece_chars: int) -> None:
        self.piece_chars = piece_chars
        self.parts: list[str] = []
        self.size = 0
        self.started = False  # a piece of this document has been handed out

    def add(self, text: str) -> Iterator[Piece]:
        if not text:
            return
        self.parts.append(text)
        self.size += len(text)
        if self.size > self.piece_chars:
            yield from self._cut()

    def _cut(self) -> Iterator[Piece]:
        text = "".join(self.parts)
        if not self.started:
            text = text.lstrip()
        while len(text) > self.piece_chars:
            cut = _last_safe_cut(text, self.piece_chars)
            if cut is None:
                break
            yield text[:cut], False
            self.started = True
            text = text[cut:]
        self.parts = [text] if text else []
        self.size = len(text)

    def end(self) -> Iterator[Piece]:
        text = "".join(self.parts)
        if not self.started:
            text = text.lstrip()
        text = text.rstrip()
        if text or self.started:
            yield text, True
        self.parts, self.size, self.started = [], 0, False


def _last_safe_cut(text: str, limit: int) -> int | None:
    """The last position <= limit where `text` may be cut (searched backwards from `limit`, then
    forwards beyond it)."""
    position = _cut_before(text, limit + 1)
    if position is not None:
        return position
    match = _SAFE_CUT.search(text, limit)
    return match.start() if match else None


def _cut_before(text: str, stop: int) -> int | None:
    """The last safe cut before `stop`: at a space or just after a newline (see `_SAFE_CUT`)."""
    stop = min(stop, len(text))
    while stop > 0:
        space, newline = text.rfind(" ", 1, stop), text.rfind("\n", 0, stop - 1)
        position = max(space, newline + 1 if newline >= 0 else -1)
        if position <= 0:
            return None
        if _SAFE_CUT.match(text, position):
            return position
        stop = position
    return None


# ----------------------------------------------------------------------------------------------
# jsonl: one document per line


def _jsonl_pieces(path: Path, stream: BinaryIO, start: int, end: int | None,
                  piece_chars: int) -> Iterator[Piece]:
    document = _Document(piece_chars)
    first_line = 1 + _count_lines(path, start) if start else 1
    records = jsonl_records(path, _jsonl_lines(path, stream, start, end), CorpusError, first_line=first_line)
    for number, record in records:
        where = f"{path}:{number}"
        if not isinstance(record, dict):
            raise CorpusError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if "text" not in record:
            raise CorpusError(f'{where}: missing "text" field')
        value = record["text"]
        if not isinstance(value, str):
            raise CorpusError(f'{where}: "text" must be a string, got {type(value).__name__}')
        yield from document.add(value.replace("\r\n", "\n").replace("\r", "\n"))
        yield from document.end()


def _jsonl_lines(path: Path, stream: BinaryIO, start: int, end: int | None) -> Iterator[str]:
    """The lines (without their line end) that begin in [start, end)."""
    position = start
    for raw in stream:
        if end is not None and position >= end:
            return
        text = _decode(path, raw, position)
        if position == 0:
            text = text.removeprefix("\ufeff")
        position += len(raw)
        if text.endswith("\r\n"):
            text = text[:-2]
        yield text.removesuffix("\n")
    if position == 0:
        raise CorpusError(f"{path}: file is empty")


def _count_lines(path: Path, end: int) -> int:
    """Newlines in the first `end` bytes of an uncompressed file (line numbers of range readers)."""
    count = 0
    with path.open("rb") as f:
        while end > 0:
            data = f.read(min(CHUNK_BYTES, end))
            if not data:
                break
            count += data.count(b"\n")
            end -= len(data)
    return count


# ----------------------------------------------------------------------------------------------
# Text files


def _text_blocks(path: Path, stream: BinaryIO, start: int, end: int | None) -> Iterator[tuple[str, bool]]:
    """(text, begins at or after `end`) blocks of decoded text, CRLF and lone CR made LF.

    Blocks end at a line end, except that a line longer than four chunks is passed on in parts; a
    block never spans `end` (a line start), so every boundary in it lies on the same side of it.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    position = start  # file offset of the next byte read
    carry = b""  # bytes of an unfinished line
    cr = ""  # a CR that ended the previous block and may start a CRLF
    while True:
        size = CHUNK_BYTES if end is None or position >= end else min(CHUNK_BYTES, end - position)
        data = stream.read(size)
        if not data and position == 0:
            raise CorpusError(f"{path}: file is empty")
        nul = data.find(b"\x00")
        if nul >= 0:
            raise CorpusError(f"{path}: looks like a binary file (NUL byte at byte offset {position + nul})")
        block_start = position - len(carry)
        position += len(data)
        buffer = carry + data
        cut = buffer.rfind(b"\n") + 1
        if data and cut == 0 and len(buffer) < 4 * CHUNK_BYTES:
            carry = buffer
            continue
        if not data or cut == 0:
            cut = len(buffer)
        block, carry = buffer[:cut], buffer[cut:]
        pending = len(decoder.getstate()[0])
        try:
            text = decoder.decode(block, final=not data)
        except UnicodeDecodeError as e:
            offset = block_start - pending + e.start
            raise CorpusError(f"{path}: not valid UTF-8 at byte offset {offset} ({e.reason})") from None
        if block_start == 0:
            text = text.removeprefix("\ufeff")
        text = cr + text
        cr = ""
        if data and text.endswith("\r"):
            text, cr = text[:-1], "\r"
        if text:
            yield text.replace("\r\n", "\n").replace("\r", "\n"), end is not None and block_start >= end
        if not data:
            return


def _text_pieces(
    path: Path,
    stream: BinaryIO,
    start: int,
    end: int | None,
    document_separator: str | None,
    piece_chars: int,
) -> Iterator[Piece]:
    if document_separator is not None:
        if start or end is not None:
            raise ValueError("text files with a document_separator are read whole, not in byte ranges")
        yield from _separated_pieces(_text_blocks(path, stream, 0, None), re.compile(document_separator),
                                     piece_chars)
        return
    document = _Document(piece_chars)
    active = start == 0  # a range reader starts inside the previous range's document
    at_line_start = True
    for text, past_end in _text_blocks(path, stream, start, end):
        position = 0
        for match in _BOUNDARY.finditer(text):
            form_feed = match.group() == "\f"
            if not form_feed and match.start() == 0 and not at_line_start:
                continue
            if active:
                yield from document.add(text[position : match.start()])
                yield from document.end()
            if past_end:
                return
            active = True
            position = match.end() if form_feed else match.start()
        if active:
            yield from document.add(text[position:])
        at_line_start = text.endswith(("\n", "\f"))
    if active:
        yield from document.end()


def _separated_pieces(blocks: Iterator[tuple[str, bool]], separator: re.Pattern[str],
                      piece_chars: int) -> Iterator[Piece]:
    """Documents split at form feeds, then at every match of `separator` (searched in a window)."""
    document = _Document(piece_chars)
    window = max(piece_chars, 4 * SEPARATOR_LOOKAHEAD)

    def split(text: str) -> Iterator[Piece]:  # `text` ends where a document ends
        for k, part in enumerate(separator.split(text)):
            if k:
                yield from document.end()
            yield from document.add(part)

    buffer = ""
    for block, _ in blocks:
        for k, part in enumerate(block.split("\f")):
            if k:  # a form feed ends the text before it
                yield from split(buffer)
                yield from document.end()
                buffer = ""
            buffer += part
            if len(buffer) <= window:
                continue
            limit = len(buffer) - SEPARATOR_LOOKAHEAD
            last, movable = None, limit
            for match in separator.finditer(buffer):
                if match.end() > limit:
                    movable = min(limit, match.start())
                    break
                last = match
            if last is not None and last.end() > 0:
                yield from split(buffer[: last.end()])
                buffer = buffer[last.end() :]
            else:  # no separator in the window: the document goes on in pieces
                yield from document.add(buffer[:movable])
                buffer = buffer[movable:]
    yield from split(buffer)
    yield from document.end()


def _decode(path: Path, data: bytes, offset: int) -> str:
    nul = data.find(b"\x00")
    if nul >= 0:
        raise CorpusError(f"{path}: looks like a binary file (NUL byte at byte offset {offset + nul})")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: not valid UTF-8 at byte offset {offset + e.start} ({e.reason})") from None

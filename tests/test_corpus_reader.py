"""Tests for datamodules.corpus_reader: streamed documents equal a whole-file split of the same rules,
for plain and compressed files, in pieces and in byte ranges."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import random
import re
from pathlib import Path

import pytest
import zstandard

from datamodules import corpus_reader
from datamodules.corpus_reader import CorpusError, iter_documents, iter_pieces, line_aligned_ranges
from glm_lightning.tokenizer import GLMTokenizer

COMPRESS = {
    "": lambda data: data,
    ".gz": gzip.compress,
    ".bz2": bz2.compress,
    ".xz": lzma.compress,
    ".zst": lambda data: zstandard.ZstdCompressor().compress(data),
}
HEADING = re.compile(r"^ = [^=\n][^\n]* = *$", re.MULTILINE)


def whole_file_documents(data: bytes, jsonl: bool, separator: str | None = None) -> list[str]:
    """The document rules of datamodules.corpus applied to the whole file at once (the reference)."""
    text = data.decode("utf-8").removeprefix("\ufeff").replace("\r\n", "\n")
    if jsonl:
        raw = [json.loads(line)["text"] for line in text.split("\n") if line.strip()]
    else:
        raw = []
        for piece in text.replace("\r", "\n").split("\f"):
            if separator is not None:
                raw.extend(re.split(separator, piece))
                continue
            bounds = [0, *(m.start() for m in HEADING.finditer(piece)), len(piece)]
            raw.extend(piece[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    documents = (d.replace("\r\n", "\n").replace("\r", "\n").strip() for d in raw)
    return [d for d in documents if d]


def pieces_joined(path: Path, ranges: list[tuple[int, int | None]] | None = None, **options) -> list[str]:
    documents, parts = [], []
    for start, end in ranges or [(0, None)]:
        for text, ends in iter_pieces(path, start=start, end=end, **options):
            parts.append(text)
            if ends:
                documents.append("".join(parts))
                parts = []
    assert not parts
    return documents


def random_text(rng: random.Random, n: int) -> str:
    atoms = ["word", "é", "我", " ", " ", "\n", "\n\n", "\r\n", "\r", "\f", " = Title = ", " = = Sec = = ",
             "=", "\t", "[MASK]", "  ", "end."]
    return "".join(rng.choice(atoms) for _ in range(n))


def random_jsonl(rng: random.Random, n: int) -> str:
    lines = [json.dumps({"text": random_text(rng, rng.randint(0, 30))}, ensure_ascii=rng.random() < 0.5)
             if rng.random() > 0.1 else "  " for _ in range(n)]
    return rng.choice(["\n", "\r\n"]).join(lines) + "\n"


@pytest.mark.parametrize("suffix", list(COMPRESS))
def test_streamed_documents_equal_whole_file_documents(tmp_path: Path, suffix: str, monkeypatch) -> None:
    monkeypatch.setattr(corpus_reader, "CHUNK_BYTES", 64)  # many chunks, lines across chunk ends
    rng = random.Random(0)
    for k in range(40):
        for jsonl in (False, True):
            data = (random_jsonl(rng, 20) if jsonl else random_text(rng, 120)).encode()
            if k == 0:
                data = "\ufeff".encode() + data
            expected = whole_file_documents(data, jsonl)
            if not expected:
                continue
            path = tmp_path / f"f{k}.{'jsonl' if jsonl else 'txt'}{suffix}"
            path.write_bytes(COMPRESS[suffix](data))
            assert pieces_joined(path) == expected
            assert pieces_joined(path, piece_chars=8) == expected  # long documents cut in pieces
            assert list(iter_documents(path)) == expected
            if not suffix:
                for count in (2, 3, 7):
                    assert pieces_joined(path, line_aligned_ranges(path, count)) == expected


def test_document_separator_is_searched_in_a_window(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(corpus_reader, "CHUNK_BYTES", 64)
    monkeypatch.setattr(corpus_reader, "SEPARATOR_LOOKAHEAD", 16)
    rng = random.Random(1)
    for k in range(40):
        data = random_text(rng, 200).encode()
        expected = whole_file_documents(data, False, r"\n\s*\n")
        if expected:
            path = tmp_path / f"s{k}.txt"
            path.write_bytes(data)
            assert pieces_joined(path, document_separator=r"\n\s*\n", piece_chars=40) == expected


def test_real_corpus_streams_like_whole_files(monkeypatch) -> None:
    files = sorted(Path(__file__).resolve().parents[2].glob("shared/data/corpus/*/*"))
    if not files:
        pytest.skip("the shared corpus (../shared/data/corpus) is not present")
    for path in files:
        expected = whole_file_documents(path.read_bytes(), False)
        assert pieces_joined(path) == expected
        assert pieces_joined(path, line_aligned_ranges(path, 5)) == expected


def test_pieces_cut_where_token_ids_do_not_change(tokenizer: GLMTokenizer, make_text) -> None:
    text = make_text(60, seed=3) + " [MASK] x\n[gMASK]\n  indented \n\nend"
    pieces, document = [], corpus_reader._Document(piece_chars=50)
    pieces.extend(document.add(text))
    pieces.extend(document.end())
    assert len(pieces) > 20 and [ends for _, ends in pieces] == [False] * (len(pieces) - 1) + [True]
    assert "".join(p for p, _ in pieces) == text.strip()
    ids = [i for p, _ in pieces for i in tokenizer.encode(p)]
    assert ids == tokenizer.encode(text.strip())
    assert all(not p.startswith(("[", "<", "  ")) for p, _ in pieces[1:])


def test_ranges_start_at_lines(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes(b"one\ntwo two\nthree\n" * 10)
    ranges = line_aligned_ranges(path, 4)
    assert ranges[0][0] == 0 and ranges[-1][1] == path.stat().st_size
    assert all(a < b for a, b in ranges)
    assert all(b == c for (_, b), (c, _) in zip(ranges, ranges[1:], strict=False))
    data = path.read_bytes()
    assert all(data[a - 1 : a] == b"\n" for a, _ in ranges[1:])


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt.gz", gzip.compress(b""), "file is empty"),
        ("bad.jsonl.zst", zstandard.ZstdCompressor().compress(b'{"text": "a"}\n{"text": \n'),
         "bad.jsonl.zst:2: invalid JSON"),
        ("binary.txt.xz", lzma.compress(b"ab\ncd\x00"), "NUL byte at byte offset 5"),
        ("latin1.txt.bz2", bz2.compress("Ok. caf\u00e9".encode("latin-1")),
         "not valid UTF-8 at byte offset 7"),
    ],
)
def test_errors_in_compressed_files_name_file_and_place(tmp_path: Path, name: str, content: bytes,
                                                        message: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CorpusError, match=message):
        list(iter_pieces(path))


def test_range_readers_name_the_line_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "ok"}\n' * 60 + "{broken\n" + '{"text": "ok"}\n' * 40)
    start, end = line_aligned_ranges(path, 2)[1]
    assert start < path.read_bytes().index(b"{broken")
    with pytest.raises(CorpusError, match="a.jsonl:61: invalid JSON"):
        list(iter_pieces(path, start=start, end=end))

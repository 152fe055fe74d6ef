"""Tests for datamodules.corpus (documents, errors, cached token shards) and the built-in corpus."""

from __future__ import annotations

import json
import os
import pickle
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from timeouts import HANG_S

from datamodules.builtin_corpus import builtin_documents, write_builtin_corpus
from datamodules.corpus import (
    CorpusError,
    TokenizedCorpus,
    _tokenizer_fingerprint,
    read_documents,
    resolve_inputs,
    tokenize_corpus,
)
from glm_lightning.tokenizer import GLMTokenizer, train_sentencepiece


class CountingTokenizer:
    """Delegates to a tokenizer and counts encode calls (a cache hit makes none)."""

    def __init__(self, inner: GLMTokenizer, size: int | None = None):
        self.inner = inner
        self.size = size
        self.calls = 0

    def encode(self, text: str) -> list[int]:
        self.calls += 1
        return self.inner.encode(text)

    def __len__(self) -> int:
        return self.size or len(self.inner)

    def fingerprint(self) -> str:
        return f"{self.inner.fingerprint()}-{len(self)}"


def decoded(corpus: TokenizedCorpus, tokenizer: GLMTokenizer) -> list[str]:
    return [tokenizer.decode(corpus.document(i)) for i in range(corpus.num_documents)]


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", newline="")
    return path


# -- inputs and documents ------------------------------------------------------------------------


def test_text_jsonl_glob_and_directory_inputs(tmp_path: Path, tokenizer: GLMTokenizer) -> None:
    data = tmp_path / "data"
    write(data / "b.txt", "Second file; one document.\n")
    write(data / "a.txt", "First doc. Two lines:\nyes!\n\f\nSecond doc?\n")
    write(data / "sub" / "c.jsonl", json.dumps({"text": "Json one."}) + "\n\n" + json.dumps({"text": "Two!"}))
    write(data / "notes.md", "not a corpus file")
    write(data / ".hidden" / "d.txt", "hidden")

    files = resolve_inputs(data)
    assert [f.relative_to(data).as_posix() for f in files] == ["a.txt", "b.txt", "sub/c.jsonl"]
    expected = [
        "First doc. Two lines:\nyes!",
        "Second doc?",
        "Second file; one document.",
        "Json one.",
        "Two!",
    ]
    corpus = tokenize_corpus(data, tokenizer, tmp_path / "cache", progress=False)
    assert decoded(corpus, tokenizer) == expected
    assert corpus.num_documents == 5
    assert corpus.num_tokens == int(corpus.lengths.sum()) > 0
    assert corpus.lengths.tolist() == [len(tokenizer.encode(t)) for t in expected]

    by_glob = tokenize_corpus(str(data / "**" / "*.jsonl"), tokenizer, tmp_path / "cache", progress=False)
    assert decoded(by_glob, tokenizer) == ["Json one.", "Two!"]
    # files keep the order given; a file given twice counts once
    mixed = resolve_inputs([data / "b.txt", str(data / "*.txt"), data / "sub" / "c.jsonl"])
    assert [f.name for f in mixed] == ["b.txt", "a.txt", "c.jsonl"]


def test_crlf_bom_and_whitespace_are_normalised(tmp_path: Path) -> None:
    path = write(tmp_path / "crlf.txt", "\ufeff  Line one.\r\nLine two.\rLine three.\r\n\r\n")
    assert read_documents(path) == ["Line one.\nLine two.\nLine three."]
    jsonl = write(tmp_path / "crlf.jsonl", '{"text": "a\\r\\nb"}\r\n{"text": "  "}\r\n{"text": "c"}\r\n')
    assert read_documents(jsonl) == ["a\nb", "c"]


def test_wikitext_articles_and_document_separator(tmp_path: Path) -> None:
    wiki = " \n = First = \n \n Intro text . \n \n = = Section = = \n More . \n = Second = \n Body .\n"
    path = write(tmp_path / "wiki.raw", wiki.replace("\n", "\r\n"))
    docs = read_documents(path)
    assert len(docs) == 2
    assert docs[0].startswith("= First =") and "= = Section = =" in docs[0]
    assert docs[1] == "= Second = \n Body ."

    plain = write(tmp_path / "paragraphs.txt", "One.\n\nTwo.\n  \nThree.\n")
    assert read_documents(plain) == ["One.\n\nTwo.\n  \nThree."]
    assert read_documents(plain, document_separator=r"\n\s*\n") == ["One.", "Two.", "Three."]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", b"", "file is empty"),
        ("blank.txt", b" \n\n\t\n", "no documents"),
        ("binary.txt", b"abc\x00def", "NUL byte at byte offset 3"),
        ("latin1.txt", "Ok. caf\u00e9".encode("latin-1"), "not valid UTF-8 at byte offset 7"),
        ("bad.jsonl", b'{"text": "ok"}\n{"text": "unterminated}\n', "bad.jsonl:2: invalid JSON"),
        ("missing.jsonl", b'{"text": "ok"}\n\n{"body": "x"}\n', 'missing.jsonl:3: missing "text" field'),
        ("number.jsonl", b'{"text": 5}\n', 'number.jsonl:1: "text" must be a string, got int'),
        ("list.jsonl", b"[1, 2]\n", "list.jsonl:1: expected a JSON object, got list"),
    ],
)
def test_unreadable_files_name_the_file(
    tmp_path: Path, tokenizer: GLMTokenizer, name: str, content: bytes, message: str
) -> None:
    path = write(tmp_path / name, content)
    with pytest.raises(CorpusError, match=message) as error:
        tokenize_corpus(path, tokenizer, tmp_path / "cache", progress=False)
    assert str(path) in str(error.value)


def test_missing_inputs_are_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found: .*nope.txt"):
        resolve_inputs(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match=r"glob matched no files: .*\*\.jsonl"):
        resolve_inputs(str(tmp_path / "*.jsonl"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="directory has no .* files: .*empty_dir"):
        resolve_inputs(tmp_path / "empty_dir")
    with pytest.raises(CorpusError, match="no corpus inputs"):
        resolve_inputs([])


# -- cache ---------------------------------------------------------------------------------------


def shard_files(cache: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for p in cache.iterdir() if p.is_file()}  # not the hash memos


def test_cache_is_reused_and_invalidated(tmp_path: Path, tokenizer: GLMTokenizer, corpus_file: Path) -> None:
    data = tmp_path / "data"
    write(data / "a.txt", "Alpha doc. It has two sentences.\f\nBeta doc!")
    write(data / "b.jsonl", '{"text": "Gamma doc?"}\n')
    cache = tmp_path / "cache"

    counting = CountingTokenizer(tokenizer)
    first = tokenize_corpus(data, counting, cache, progress=False)
    assert counting.calls == 3
    files = shard_files(cache)
    assert len(files) == 6 and not any(name.endswith(".tmp") for name in files)

    counting.calls = 0
    again = tokenize_corpus(data, counting, cache, progress=False)
    assert counting.calls == 0  # nothing tokenized again
    assert shard_files(cache) == files  # nothing rewritten
    assert decoded(again, tokenizer) == decoded(first, tokenizer)

    # a renamed file has the same content: its shard is reused
    (data / "b.jsonl").rename(data / "renamed.jsonl")
    tokenize_corpus(data, counting, cache, progress=False)
    assert counting.calls == 0

    # a changed file is tokenized again, the unchanged one is not
    write(data / "a.txt", "Alpha doc, changed.\f\nBeta doc!")
    changed = tokenize_corpus(data, counting, cache, progress=False)
    assert counting.calls == 2
    assert decoded(changed, tokenizer)[0] == "Alpha doc, changed."

    # another tokenizer tokenizes everything again
    other_model = train_sentencepiece(
        [str(corpus_file)], 450, str(tmp_path / "spm" / "other"), character_coverage=1.0
    )
    other = CountingTokenizer(GLMTokenizer.from_sentencepiece(other_model))
    assert other.fingerprint() != counting.fingerprint()
    redone = tokenize_corpus(data, other, cache, progress=False)
    assert other.calls == 3
    assert decoded(redone, other.inner) == decoded(changed, tokenizer)


def test_fallback_fingerprint_tells_tokenizers_apart(tokenizer: GLMTokenizer, tmp_path: Path) -> None:
    class Plain:  # a tokenizer without fingerprint()
        def __init__(self, inner: Any, shift: int = 0):
            self.inner, self.shift, self.cls_id, self.eos_id = inner, shift, inner.cls_id, inner.eos_id

        def encode(self, text: str) -> list[int]:
            return [i + self.shift for i in self.inner.encode(text)]

        def __len__(self) -> int:
            return len(self.inner)

    a, b = _tokenizer_fingerprint(Plain(tokenizer)), _tokenizer_fingerprint(Plain(tokenizer, shift=1))
    assert a == _tokenizer_fingerprint(Plain(tokenizer)) and a != b
    path = write(tmp_path / "a.txt", "Works without fingerprint.")
    corpus = tokenize_corpus(path, Plain(tokenizer), tmp_path / "cache", progress=False)
    assert decoded(corpus, tokenizer) == ["Works without fingerprint."]


@pytest.mark.parametrize(("size", "dtype"), [(None, np.uint16), (70_000, np.uint32)])
def test_shards_are_memory_mapped_with_the_smallest_dtype(
    tmp_path: Path, tokenizer: GLMTokenizer, size: int | None, dtype: type
) -> None:
    path = write(tmp_path / "a.jsonl", '{"text": "Short."}\n{"text": "A longer document here."}\n')
    cache = tmp_path / "cache"
    corpus = tokenize_corpus(path, CountingTokenizer(tokenizer, size), cache, progress=False)
    assert corpus.document(1).dtype == dtype
    assert isinstance(corpus.document(1).base, np.memmap) or isinstance(corpus.document(1), np.memmap)
    (tokens_file,) = cache.glob("*.tokens")
    assert tokens_file.stat().st_size == corpus.num_tokens * np.dtype(dtype).itemsize
    (offsets_file,) = cache.glob("*.offsets.npy")
    offsets = np.load(offsets_file)
    assert offsets.dtype == np.int64 and offsets.tolist() == [0, *np.cumsum(corpus.lengths).tolist()]


def test_corpus_pickles_by_path_and_subsets(tmp_path: Path, tokenizer: GLMTokenizer) -> None:
    text = "\f".join(f"Document number {i}. " * 50 for i in range(4))
    corpus = tokenize_corpus(write(tmp_path / "a.txt", text), tokenizer, tmp_path / "cache", progress=False)
    restored = pickle.loads(pickle.dumps(corpus))
    assert len(pickle.dumps(corpus)) < corpus.num_tokens  # the tokens stay on disk
    assert decoded(restored, tokenizer) == decoded(corpus, tokenizer)
    part = corpus.subset([3, 1])
    assert part.num_documents == 2
    assert decoded(part, tokenizer) == [decoded(corpus, tokenizer)[3], decoded(corpus, tokenizer)[1]]
    assert TokenizedCorpus.from_documents([[1, 2], [3]]).document(1).tolist() == [3]


def test_progress_bar_can_be_shown(tmp_path: Path, tokenizer: GLMTokenizer, capsys: Any) -> None:
    tokenize_corpus(write(tmp_path / "a.txt", "Some text."), tokenizer, tmp_path / "cache", progress=True)
    assert "tokenizing a.txt" in capsys.readouterr().err


# -- built-in corpus -----------------------------------------------------------------------------


def test_builtin_corpus_is_deterministic_and_sized(tmp_path: Path) -> None:
    paths = write_builtin_corpus(tmp_path / "one")
    again = write_builtin_corpus(tmp_path / "two")
    assert [Path(p).read_bytes() for p in paths] == [Path(p).read_bytes() for p in again]
    size = sum(Path(p).stat().st_size for p in paths)
    assert 300_000 <= size <= 600_000
    documents = [doc for p in paths for doc in read_documents(p)]
    assert documents == [d.strip() for d in builtin_documents()]
    assert len(documents) == 400
    text = "".join(documents)
    for end in ".?!;:\n":
        assert text.count(end) > 100
    assert builtin_documents(20, seed=1) != builtin_documents(20, seed=0)
    assert "The city of Arlen lies on the river Vesk." in text


# -- streaming, compression, processes -------------------------------------------------------------


def test_compressed_inputs_give_the_same_ids_and_offsets(tmp_path: Path, tokenizer: GLMTokenizer,
                                                         make_text: Any, monkeypatch: Any) -> None:
    import gzip

    import zstandard

    monkeypatch.setattr("datamodules.corpus_reader.CHUNK_BYTES", 256)
    monkeypatch.setattr("datamodules.corpus_reader.PIECE_CHARS", 100)  # documents tokenized in pieces
    texts = [make_text(6, seed=k) for k in range(12)]
    jsonl = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    plain = "\f".join(texts).encode()
    expected = [tokenizer.encode(t.strip()) for t in texts]
    for name, data in [("a.jsonl", jsonl), ("a.txt", plain)]:
        for suffix, compress in [("", bytes), (".gz", gzip.compress),
                                 (".zst", zstandard.ZstdCompressor().compress)]:
            path = write(tmp_path / "data" / f"{name}{suffix}", compress(data))
            corpus = tokenize_corpus(path, tokenizer, tmp_path / "cache", progress=False)
            assert [corpus.document(i).tolist() for i in range(corpus.num_documents)] == expected
            assert corpus.lengths.tolist() == [len(ids) for ids in expected]
    assert len(resolve_inputs(tmp_path / "data")) == 6  # directories find compressed files too


def corpus_arrays(corpus: TokenizedCorpus) -> tuple[list[list[int]], list[int]]:
    return [corpus.document(i).tolist() for i in range(corpus.num_documents)], corpus.lengths.tolist()


def test_two_processes_equal_one_exactly(tmp_path: Path, tokenizer: GLMTokenizer, make_text: Any,
                                         monkeypatch: Any) -> None:
    import datamodules.shard_writer as shard_writer

    # small thresholds so that a small corpus is shared out in byte ranges
    monkeypatch.setattr(shard_writer, "RANGE_MIN_BYTES", 2000)
    monkeypatch.setattr(shard_writer, "PARALLEL_MIN_BYTES", 0)
    data = tmp_path / "data"
    write(data / "a.jsonl", "".join(json.dumps({"text": make_text(3, seed=k)}) + "\n" for k in range(40)))
    write(data / "b.raw", "".join(f" = Article {k} = \n\n{make_text(3, seed=k)}\n" for k in range(30)))
    write(data / "c.txt", "\f".join(make_text(2, seed=k) for k in range(20)))
    one = tokenize_corpus(data, tokenizer, tmp_path / "one", progress=False, num_proc=1)
    two = tokenize_corpus(data, tokenizer, tmp_path / "two", progress=False, num_proc=2)
    assert len(list((tmp_path / "one").glob("*.tokens"))) == 3
    assert len(list((tmp_path / "two").glob("*.tokens"))) > 6  # each file in several parts
    assert corpus_arrays(two) == corpus_arrays(one)
    assert one.num_documents == 40 + 30 + 20
    # a cache written by two processes is read the same by one
    again = tokenize_corpus(data, tokenizer, tmp_path / "two", progress=False, num_proc=1)
    assert again.report.files_tokenized == 0 and corpus_arrays(again) == corpus_arrays(one)


class SlowCountingTokenizer(CountingTokenizer):
    """Takes its time over the first text, so that processes started together overlap."""

    def encode(self, text: str) -> list[int]:
        if self.calls == 0:
            time.sleep(1.5)
        return super().encode(text)


def _prepare_in_child(path: str, model: str, cache: str, barrier: Any, results: Any) -> None:
    tokenizer = SlowCountingTokenizer(GLMTokenizer.from_sentencepiece(model))
    barrier.wait()
    corpus = tokenize_corpus(path, tokenizer, cache, progress=False)
    results.put((tokenizer.calls, corpus_arrays(corpus)))


@pytest.mark.slow
def test_concurrent_preparers_tokenize_once(tmp_path: Path, sentencepiece_model: str, make_text: Any,
                                            capfd: Any) -> None:
    import multiprocessing

    path = write(tmp_path / "a.txt", "\f".join(make_text(3, seed=k) for k in range(10)))
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(3), context.Queue()
    args = (str(path), sentencepiece_model, str(tmp_path / "cache"), barrier, results)
    processes = [context.Process(target=_prepare_in_child, args=args) for _ in range(3)]
    for p in processes:
        p.start()
    outcomes = [results.get(timeout=HANG_S) for _ in processes]
    for p in processes:
        p.join(timeout=HANG_S)
        assert p.exitcode == 0
    calls = sorted(c for c, _ in outcomes)
    assert calls[:2] == [0, 0] and calls[2] == 10  # one process tokenized, the others waited
    assert outcomes[0][1] == outcomes[1][1] == outcomes[2][1]
    assert capfd.readouterr().err.count("waiting for process") == 2


def test_a_stale_lock_is_broken(tmp_path: Path, tokenizer: GLMTokenizer) -> None:
    import subprocess
    import sys

    path = write(tmp_path / "a.txt", "Alpha.\fBeta.")
    cache = tmp_path / "cache"
    counting = CountingTokenizer(tokenizer)
    tokenize_corpus(path, counting, cache, progress=False)
    (meta,) = cache.glob("*.json")
    key = meta.name.removesuffix(".json")
    for f in cache.glob(f"{key}*"):
        f.unlink()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    import socket

    holder = {"host": socket.gethostname(), "pid": int(dead), "time": 0}
    (cache / f"{key}.lock").write_text(json.dumps(holder))
    counting.calls = 0
    corpus = tokenize_corpus(path, counting, cache, progress=False)
    assert counting.calls == 2 and decoded(corpus, tokenizer) == ["Alpha.", "Beta."]
    assert not (cache / f"{key}.lock").exists()


def test_unchanged_files_are_not_hashed_again(tmp_path: Path, tokenizer: GLMTokenizer,
                                              monkeypatch: Any) -> None:
    import datamodules.content_hash as content_hash

    path = write(tmp_path / "a.txt", "Some text.")
    hashed: list[Path] = []
    original = content_hash.file_sha256
    monkeypatch.setattr(content_hash, "file_sha256", lambda p: hashed.append(p) or original(p))
    for _ in range(2):
        tokenize_corpus(path, tokenizer, tmp_path / "cache", progress=False)
    assert len(hashed) == 1
    tokenize_corpus(path, tokenizer, tmp_path / "cache", progress=False, rehash=True)
    assert len(hashed) == 2
    write(path, "Other text.")  # a new size: hashed again, tokenized again
    counting = CountingTokenizer(tokenizer)
    tokenize_corpus(path, counting, tmp_path / "cache", progress=False)
    assert len(hashed) == 3 and counting.calls == 1


def test_batch_encode_equals_encode(tokenizer: GLMTokenizer, make_text: Any) -> None:
    texts = [make_text(2, seed=k) for k in range(20)]
    texts += ["with [MASK] inside", "a\u2581b", "", "<|endoftext|> x", "  [gMASK] y"]
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(t) for t in texts]


def _prepare_as_local_rank(rank: int, delay: float, path: str, model: str, cache: str, results: Any) -> None:
    os.environ["LOCAL_RANK"] = str(rank)
    time.sleep(delay)
    tokenizer = CountingTokenizer(GLMTokenizer.from_sentencepiece(model))
    corpus = tokenize_corpus(path, tokenizer, cache, progress=False)
    results.put((rank, tokenizer.calls, corpus_arrays(corpus)))


@pytest.mark.slow
def test_local_rank_zero_prepares_for_its_node(tmp_path: Path, sentencepiece_model: str,
                                               make_text: Any) -> None:
    import multiprocessing

    path = write(tmp_path / "a.txt", "\f".join(make_text(3, seed=k) for k in range(10)))
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    # local rank 1 comes first, but leaves the shard to rank 0, which starts a second later
    common = (str(path), sentencepiece_model, str(tmp_path / "cache"), results)
    processes = [context.Process(target=_prepare_as_local_rank, args=(rank, delay, *common))
                 for rank, delay in [(1, 0.0), (0, 1.0)]]
    for p in processes:
        p.start()
    received = [results.get(timeout=HANG_S) for _ in processes]
    outcomes = {rank: (calls, arrays) for rank, calls, arrays in received}
    for p in processes:
        p.join(timeout=HANG_S)
    assert outcomes[0][0] == 10 and outcomes[1][0] == 0
    assert outcomes[0][1] == outcomes[1][1]

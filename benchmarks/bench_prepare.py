"""Corpus preparation at size: `tokenize_corpus` MB/s and peak memory on a generated >= 1 GB jsonl.

From real text (the shared corpus: WikiText-2, Gutenberg novels, Tiny Shakespeare) it writes, into
a temporary folder under /tmp that is deleted at the end, documents of about 3 KB (paragraphs
grouped up to 3,000 characters) repeated to a 1 GB jsonl, a 100 MB jsonl of the same documents and
a `.zst` copy of the 1 GB file. A sentencepiece model (vocabulary 8,000, as `train_sentencepiece`
sets it up) is trained on the shared corpus. Then, each in a fresh process (so that its peak RSS is
its own):

* raw: the sentencepiece model's own batch `encode` (one thread) of the same documents, read from
  the jsonl in batches of 1,000; only the encode calls are timed;
* `tokenize_corpus` of the 1 GB jsonl with num_proc 1 and 2, of the `.zst` copy (one file, so one
  process), and of the 100 MB jsonl, each into an empty cache.

MB/s is bytes of the jsonl file (the same for every row) per second of wall time. Peak RSS is the
process's VmHWM (/proc/self/status; ru_maxrss would carry over the parent's peak across fork and
exec); for num_proc 2 also the largest worker's VmHWM, sampled every 0.1 s while they run.

    python benchmarks/bench_prepare.py [--corpus ../shared/data/corpus] [--size-gb 1.0]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import cpu_model  # noqa: E402  (benchmarks/ is on the path as the script folder)


def documents(corpus: Path) -> list[str]:
    from datamodules.corpus import read_documents, resolve_inputs

    docs = []
    for path in resolve_inputs(corpus):
        for document in read_documents(path):
            current = ""
            for paragraph in re.split(r"\n\s*\n", document):
                current += paragraph + "\n\n"
                if len(current) > 3000:
                    docs.append(current.strip())
                    current = ""
            if current.strip():
                docs.append(current.strip())
    return docs


def write_jsonl(path: Path, docs: list[str], size: int) -> None:
    lines = [json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs]
    written = 0
    with path.open("w", encoding="utf-8") as f:
        while written < size:
            for line in lines:
                f.write(line)
                written += len(line.encode())
                if written >= size:
                    break


def high_water_mb(pid: int | str = "self") -> float:
    """Peak resident memory of a process (VmHWM), in MB; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return 0.0


class ChildrenPeak(threading.Thread):
    """Samples the VmHWM of this process's children until stopped."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        me = os.getpid()
        while not self.stop.wait(0.1):
            try:
                children = Path(f"/proc/{me}/task/{me}/children").read_text().split()
            except OSError:
                children = []
            for pid in children:
                self.peak = max(self.peak, high_water_mb(pid))


def child(args: argparse.Namespace) -> None:
    """One measurement in this process; prints a json line."""
    from glm_lightning.tokenizer import GLMTokenizer

    children = ChildrenPeak()
    children.start()

    tokenizer = GLMTokenizer.from_sentencepiece(args.model)
    size = Path(args.input).stat().st_size
    if args.mode == "raw":
        sp = tokenizer.backend._sp
        seconds, batch, tokens = 0.0, [], 0
        with open(args.input, encoding="utf-8") as f:
            for line in f:
                batch.append(json.loads(line)["text"])
                if len(batch) == 1000:
                    started = time.perf_counter()
                    tokens += sum(map(len, sp.encode(batch, num_threads=1)))
                    seconds += time.perf_counter() - started
                    batch = []
        if batch:
            started = time.perf_counter()
            tokens += sum(map(len, sp.encode(batch, num_threads=1)))
            seconds += time.perf_counter() - started
        documents_count = None
    else:
        from datamodules.corpus import tokenize_corpus

        started = time.perf_counter()
        corpus = tokenize_corpus(args.input, tokenizer, args.cache, progress=False, num_proc=args.num_proc)
        seconds = time.perf_counter() - started
        tokens, documents_count = corpus.num_tokens, corpus.num_documents
    children.stop.set()
    print(json.dumps({"seconds": seconds, "bytes": size, "tokens": tokens, "documents": documents_count,
                      "rss_mb": high_water_mb(), "worker_rss_mb": children.peak}))


def measure(model: Path, mode: str, path: Path, cache: Path | None, num_proc: int = 1) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--model", str(model), "--input", str(path),
               "--num-proc", str(num_proc)]
    if cache is not None:
        shutil.rmtree(cache, ignore_errors=True)
        command += ["--cache", str(cache)]
    out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["mb_s"] = result["bytes"] / 1e6 / result["seconds"]
    if cache is not None:
        shutil.rmtree(cache, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default=str(ROOT.parent / "shared" / "data" / "corpus"))
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--child", choices=["raw", "prepare"])
    parser.add_argument("--model")
    parser.add_argument("--input")
    parser.add_argument("--cache")
    parser.add_argument("--num-proc", type=int, default=1)
    args = parser.parse_args()
    if args.child:
        args.mode = args.child
        child(args)
        return
    corpus = Path(args.corpus)
    if not corpus.is_dir():
        sys.exit(f"corpus folder not found: {corpus} (pass --corpus)")

    import numpy
    import sentencepiece
    import zstandard

    from glm_lightning.tokenizer import train_sentencepiece

    work = Path(tempfile.mkdtemp(prefix="bench_prepare_", dir="/tmp"))
    try:
        started = time.perf_counter()
        model = Path(train_sentencepiece([str(p) for p in sorted(corpus.rglob("*")) if p.is_file()], 8000,
                                         str(work / "spm"), input_sentence_size=2_000_000,
                                         shuffle_input_sentence=True, hard_vocab_limit=False))
        docs = documents(corpus)
        big, small = work / "corpus_1gb.jsonl", work / "corpus_100mb.jsonl"
        write_jsonl(big, docs, int(args.size_gb * 1e9))
        write_jsonl(small, docs, int(args.size_gb * 1e8))
        compressed = work / "corpus_1gb.jsonl.zst"
        with big.open("rb") as src, compressed.open("wb") as dst:
            zstandard.ZstdCompressor(level=3).copy_stream(src, dst)
        setup = time.perf_counter() - started
        print(f"machine: {platform.machine()} {cpu_model()}, nproc {os.cpu_count()}; Python "
              f"{platform.python_version()}, sentencepiece {sentencepiece.__version__}, "
              f"numpy {numpy.__version__}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
        mean = sum(map(len, docs)) / len(docs)
        sizes = ", ".join(f"{p.name} {p.stat().st_size / 1e6:.0f} MB" for p in (big, compressed, small))
        print(f"generated in {setup:.0f} s: {len(docs)} distinct documents of {mean:.0f} characters on "
              f"average; {sizes}")

        cache = work / "cache"
        raw = measure(model, "raw", big, None)
        one = measure(model, "prepare", big, cache, 1)
        two = measure(model, "prepare", big, cache, 2)
        zst = measure(model, "prepare", compressed, cache, 1)
        hundred = measure(model, "prepare", small, cache, 1)
        zst["mb_s"] = big.stat().st_size / 1e6 / zst["seconds"]  # same basis: bytes of the jsonl

        print("\n| run | seconds | MB/s (jsonl bytes) | vs raw | tokens | peak RSS MB (workers) |")
        print("|---|---:|---:|---:|---:|---:|")
        rows = [("raw sentencepiece batch encode, 1 thread (encode calls only)", raw),
                ("tokenize_corpus 1 GB jsonl, num_proc 1", one),
                ("tokenize_corpus 1 GB jsonl, num_proc 2", two),
                ("tokenize_corpus 1 GB jsonl.zst, 1 process", zst),
                ("tokenize_corpus 100 MB jsonl, num_proc 1", hundred)]
        for name, r in rows:
            workers = f" ({r['worker_rss_mb']:.0f})" if r is two else ""
            print(f"| {name} | {r['seconds']:.1f} | {r['mb_s']:.1f} | {r['mb_s'] / raw['mb_s']:.2f}x | "
                  f"{r['tokens']:,} | {r['rss_mb']:.0f}{workers} |")
        same = one["tokens"] == two["tokens"] == zst["tokens"] == raw["tokens"]
        print(f"\nsame token count in every run: {same}")
        ratio_one = one["mb_s"] / raw["mb_s"]
        ratio_two = two["mb_s"] / one["mb_s"]
        peak = max(one["rss_mb"], two["rss_mb"], two["worker_rss_mb"], zst["rss_mb"])
        growth = one["rss_mb"] / hundred["rss_mb"]
        def verdict(ok: bool) -> str:
            return "met" if ok else "NOT met"

        print(f"\nnum_proc 1 / raw tokenizer: {ratio_one:.2f}x (target >= 0.8x): {verdict(ratio_one >= 0.8)}")
        print(f"num_proc 2 / num_proc 1: {ratio_two:.2f}x (target >= 1.7x): {verdict(ratio_two >= 1.7)}")
        print(f"peak RSS {peak:.0f} MB (target < 600 MB): {verdict(peak < 600)}; 1 GB / 100 MB input: "
              f"{growth:.2f}x (target within 20%): {verdict(abs(growth - 1) <= 0.2)}")
        print(f"load average after the runs: {os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

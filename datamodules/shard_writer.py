"""Tokenizing corpus files into shard parts, in one process or in a pool of worker processes.

A *unit* is one file, or one byte range of an uncompressed file (ranges begin at line starts; see
`datamodules.corpus_reader`). Each unit is tokenized on its own into a *part*: a flat token file
and an ``int64`` array of document offsets. The parts of a file, in range order, hold exactly the
documents and token ids of the whole file read by one process, so the cache is the same whatever
the number of processes. Documents are encoded in batches (the tokenizer's ``encode_batch`` when
it has one), which is where most of the speed comes from. The blake2b checksum of each part's
token bytes is computed as they are written, so that a damaged cache can be told apart later.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import multiprocessing
import os
import signal
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from datamodules.corpus_reader import CorpusError, iter_pieces, line_aligned_ranges, splittable

BATCH_CHARS = 1 << 18  # characters of text encoded in one batch call
BATCH_PIECES = 1024
RANGE_MIN_BYTES = 16 << 20  # files above this size are split into ranges when using several processes
RANGES_PER_PROCESS = 2  # ranges of one file per process, to even out the work
PARALLEL_MIN_BYTES = 8 << 20  # below this much text, worker processes cost more than they save


@dataclass(frozen=True)
class Unit:
    """One file, or bytes [start, end) of it, to be tokenized into the part files given."""

    path: Path
    start: int
    end: int | None
    document_separator: str | None
    tokens_path: Path
    offsets_path: Path
    size: int  # bytes on disk this unit reads (for progress and scheduling)


def plan_units(path: Path, document_separator: str | None, num_proc: int,
               part_paths: Callable[[int], tuple[Path, Path]]) -> list[Unit]:
    """The units of one file: byte ranges when it is large, splittable and several processes run."""
    size = path.stat().st_size
    ranges: list[tuple[int, int | None]] = [(0, None)]
    if num_proc > 1 and size > RANGE_MIN_BYTES and splittable(path, document_separator):
        count = min(math.ceil(size / RANGE_MIN_BYTES), num_proc * RANGES_PER_PROCESS)
        ranges = list(line_aligned_ranges(path, count))
    units = []
    for k, (start, end) in enumerate(ranges):
        tokens_path, offsets_path = part_paths(k)
        length = (size if end is None else end) - start
        units.append(Unit(path, start, end if len(ranges) > 1 else None, document_separator,
                          tokens_path, offsets_path, length))
    return units


def tokenize_unit(unit: Unit, tokenizer: Any, dtype: np.dtype,
                  progress: Callable[[int], None] | None = None) -> tuple[int, int, str]:
    """Tokenize one unit into its part files; returns (documents, tokens, blake2b of the token bytes)."""
    vocab_size = len(tokenizer)
    encode_batch = getattr(tokenizer, "encode_batch", None)
    if encode_batch is None:
        def encode_batch(texts: Sequence[str]) -> list[list[int]]:
            return [tokenizer.encode(text) for text in texts]

    ends = array("q")  # document end offsets: 8 bytes a document, not a Python int each
    checksum = hashlib.blake2b()
    total = 0
    texts: list[str] = []
    flags: list[bool] = []
    chars = 0

    def flush(out: Any) -> None:
        nonlocal total
        lists = encode_batch(texts)
        lengths = [len(ids) for ids in lists]
        count = sum(lengths)
        try:
            ids = np.fromiter(chain.from_iterable(lists), dtype=dtype, count=count)
        except (OverflowError, ValueError):
            ids = np.array([-1])
        if count and (ids.min() < 0 or int(ids.max()) >= vocab_size):
            raise CorpusError(f"{unit.path}: tokenizer produced ids outside [0, {vocab_size})")
        data = ids.tobytes()
        checksum.update(data)
        out.write(data)
        for length, ends_document in zip(lengths, flags, strict=True):
            total += length
            if ends_document:
                ends.append(total)
        texts.clear()
        flags.clear()

    try:
        with unit.tokens_path.open("wb") as out:
            pieces = iter_pieces(unit.path, document_separator=unit.document_separator, start=unit.start,
                                 end=unit.end, progress=progress)
            for text, ends_document in pieces:
                texts.append(text)
                flags.append(ends_document)
                chars += len(text)
                if chars >= BATCH_CHARS or len(texts) >= BATCH_PIECES:
                    flush(out)
                    chars = 0
            flush(out)
        offsets = np.zeros(len(ends) + 1, dtype=np.int64)
        offsets[1:] = np.frombuffer(ends, dtype=np.int64)
        with unit.offsets_path.open("wb") as f:
            np.save(f, offsets)
    except OSError as error:  # a write fails without naming its file (a full disk): name the cache
        if error.filename is not None or error.errno is None:
            raise
        raise OSError(error.errno, error.strerror, f"{unit.tokens_path.parent} (the token cache, "
                      f"tokenizing {unit.path})") from None
    return len(ends), total, checksum.hexdigest()


# ----------------------------------------------------------------------------------------------
# Worker pool

_worker: dict[str, Any] = {}
PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h): the signal a process gets when its parent dies


def _init_worker(tokenizer: Any, dtype: str, counter: Any, parent: int) -> None:
    die_with_parent(parent)
    _worker.update(tokenizer=tokenizer, dtype=np.dtype(dtype), counter=counter)


def die_with_parent(parent: int) -> None:
    """Have the kernel kill this worker when its parent dies, also by SIGKILL, which runs no
    clean-up code in the parent (Linux ``PR_SET_PDEATHSIG``; elsewhere the pool ends its workers)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request was made
        os._exit(1)


def _add_progress(n: int) -> None:
    counter = _worker["counter"]
    with counter.get_lock():
        counter.value += n


def _run_unit(unit: Unit) -> tuple[int, int, str]:
    return tokenize_unit(unit, _worker["tokenizer"], _worker["dtype"], _add_progress)


def tokenize_units(units: Sequence[Unit], tokenizer: Any, dtype: np.dtype, num_proc: int, *,
                   progress: bool, description: str) -> list[tuple[int, int, str]]:
    """(documents, tokens, checksum) of every unit, tokenized by `num_proc` processes; a progress bar in
    bytes read (with MB/s and ETA) when `progress`."""
    total = sum(u.size for u in units)
    processes = min(num_proc, len(units))
    if total < PARALLEL_MIN_BYTES:
        processes = 1
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=description,
              disable=not progress, leave=False, mininterval=0.5) as bar:
        if processes <= 1:
            return [tokenize_unit(u, tokenizer, dtype, bar.update) for u in units]
        context = multiprocessing.get_context("spawn")  # no fork of a process with threads
        counter = context.Value("q", 0)
        order = sorted(range(len(units)), key=lambda k: -units[k].size)  # longest first
        with context.Pool(processes, _init_worker, (tokenizer, dtype.name, counter, os.getpid())) as pool:
            pending = {k: pool.apply_async(_run_unit, (units[k],)) for k in order}
            shown = 0
            while not all(r.ready() for r in pending.values()):
                for r in pending.values():
                    if r.ready() and not r.successful():
                        r.get()  # raises the worker's error now
                time.sleep(0.2)
                bar.update(counter.value - shown)
                shown = counter.value
            results = {k: r.get() for k, r in pending.items()}
            bar.update(counter.value - shown)
        return [results[k] for k in range(len(units))]


def default_num_proc() -> int:
    """The number of cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1

"""Blank infilling on real text: prose tokenized by a sentencepiece model trained on it, packed into
512-token samples by the pretraining dataset, then corrupted by each of the three objectives.

The same test runs on slices of the shared English corpus (Shakespeare, WikiText, Gutenberg novels)
and on a text it writes itself, so the behaviour is covered without the shared data.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from layouts import row_layout

from datamodules.corpus import tokenize_corpus
from datamodules.pretrain import PackedSampleDataset
from glm_lightning.blank_infilling import BlankInfillingCollator
from glm_lightning.tokenizer import GLMTokenizer, train_sentencepiece

CORPUS_DIR = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "corpus").resolve()
SEQ_LENGTH = 512
SLICE_CHARS = 60_000


def write_shared_slices(out: Path, make_text: Callable[..., str]) -> list[Path]:
    """A slice from the middle of every shared corpus file (past the Gutenberg headers), with the
    line ends normalised; the whole corpus would only make the test slower."""
    files = []
    for source in sorted(p for p in CORPUS_DIR.rglob("*") if p.is_file()):
        text = source.read_text(encoding="utf-8")
        middle = len(text) // 2
        path = out / f"{source.stem}.txt"
        path.write_text(text[middle : middle + SLICE_CHARS], encoding="utf-8")
        files.append(path)
    return files


def write_generated_text(out: Path, make_text: Callable[..., str]) -> list[Path]:
    """Short paragraphs (many documents per sample) and one long document (windows of it)."""
    paragraphs = out / "paragraphs.txt"
    paragraphs.write_text(make_text(num_paragraphs=400, seed=1), encoding="utf-8")
    book = out / "book.txt"
    book.write_text(make_text(num_paragraphs=150, seed=2).replace("\n\n", "\n"), encoding="utf-8")
    return [paragraphs, book]


SOURCES = [
    pytest.param(
        write_shared_slices,
        marks=[
            pytest.mark.data,
            pytest.mark.skipif(
                not CORPUS_DIR.is_dir(), reason=f"shared text corpus not found at {CORPUS_DIR}"
            ),
        ],
        id="shared-corpus",
    ),
    pytest.param(write_generated_text, id="generated-text"),
]


def check_row(
    batch: dict, b: int, original: np.ndarray, tokenizer: GLMTokenizer, mask_id: int
) -> list[tuple[int, int]]:
    """Layout invariants of one row; returns the (start, end) spans of the original sample that
    went to Part B, in text order."""
    part_a, segments, length = row_layout(batch, b)
    sep = len(part_a)
    dim1, dim2 = batch["position_ids"][b].tolist()
    assert dim1[:sep] == list(range(sep)) and not any(dim2[:sep])
    assert not batch["loss_mask"][b, :sep].any() and not batch["input_ids"][b, length:].any()
    assert max(dim1) < SEQ_LENGTH and int(batch["input_ids"][b].max()) < len(tokenizer)

    # Reconstruction: each mask of Part A replaced by its segment's tokens gives the sample back.
    content = {}
    i = sep
    for position, inputs, targets, block in segments:
        assert part_a[position] == mask_id
        assert inputs[0] == tokenizer.sop_id and inputs[1:] == targets[:-1]
        assert block == list(range(1, len(inputs) + 1))
        assert dim1[i : i + len(inputs)] == [position] * len(inputs)
        i += len(inputs)
        # the document-level suffix case generates up to the sample's end and has no [eop]
        content[position] = targets[:-1] if targets[-1] == tokenizer.eop_id else targets
    assert part_a.count(mask_id) == len(segments)
    rebuilt, spans = [], []
    for position, token in enumerate(part_a):
        if position in content:
            spans.append((len(rebuilt), len(rebuilt) + len(content[position])))
            rebuilt += content[position]
        else:
            rebuilt.append(token)
    assert rebuilt == original.tolist()
    return spans


@pytest.mark.parametrize("write_text", SOURCES)
def test_packed_text_through_all_three_objectives(write_text, make_text, tmp_path):
    text_dir = tmp_path / "text"
    text_dir.mkdir()
    files = [str(path) for path in write_text(text_dir, make_text)]
    model = train_sentencepiece(
        files, 800, str(tmp_path / "spm" / "m"), character_coverage=1.0, hard_vocab_limit=False
    )
    tokenizer = GLMTokenizer.from_sentencepiece(model)
    # paragraphs are documents; long ones exceed a sample and are cut into windows
    corpus = tokenize_corpus(
        files, tokenizer, tmp_path / "cache", document_separator=r"\n\s*\n", progress=False
    )
    dataset = PackedSampleDataset(corpus, tokenizer, SEQ_LENGTH, seed=3, num_samples=48)
    samples = [dataset[i] for i in range(len(dataset))]
    cls, eos = tokenizer.cls_id, tokenizer.eos_id
    for tokens in samples:
        assert 3 <= len(tokens) <= SEQ_LENGTH and tokens[0] == cls
    documents = [int(np.count_nonzero(tokens == cls)) for tokens in samples]
    assert min(documents) == 1 and max(documents) > 1  # single windows and packings both occur
    sentence_end = tokenizer.sentence_end_table()
    batches = [samples[i : i + 8] for i in range(0, len(samples), 8)]

    # token level: short spans inside documents, separated, covering at least 15 %
    collator = BlankInfillingCollator(tokenizer, seed=1)
    for batch_samples in batches:
        batch = collator(batch_samples)
        assert batch["objective"] == "span" and len(batch["sep"]) == len(batch_samples)
        for b, original in enumerate(batch_samples):
            spans = check_row(batch, b, original, tokenizer, tokenizer.mask_id)
            masked = [original[start:end] for start, end in spans]
            assert sum(map(len, masked)) >= int(0.15 * len(original))
            assert not any(np.isin(span, [cls, eos]).any() for span in masked)
            assert all(end < start for (_, end), (start, _) in itertools.pairwise(spans))
            assert int(batch["loss_mask"][b].sum()) == sum(len(span) + 1 for span in masked)

    # sentence level: whole sentences by the tokenizer's sentence-end table
    collator = BlankInfillingCollator(tokenizer, span_prob=0.0, sentence_prob=1.0, task_masks=True, seed=2)
    for batch_samples in batches:
        batch = collator(batch_samples)
        assert batch["objective"] == "sentence" and len(batch["sep"]) == len(batch_samples)
        for b, original in enumerate(batch_samples):
            spans = check_row(batch, b, original, tokenizer, tokenizer.smask_id)
            assert spans and sum(end - start for start, end in spans) >= int(0.15 * len(original))
            for start, end in spans:
                sentence = original[start:end]
                # starts a sentence: after the leading [CLS], a sentence end or an eos
                assert start == 1 or sentence_end[original[start - 1]] or original[start - 1] == eos
                # ends one (or is the sample's unfinished tail), with no sentence end or eos inside
                assert sentence_end[sentence[-1]] or end == len(original)
                assert not sentence_end[sentence[:-1]].any() and eos not in sentence

    # document level: one span of 50-100 % of the text (one length per micro-batch)
    collator = BlankInfillingCollator(tokenizer, span_prob=0.0, document_prob=1.0, task_masks=True, seed=3)
    cases = set()
    for batch_samples in batches:
        batch = collator(batch_samples)
        assert batch["objective"] == "document" and len(batch["sep"]) == len(batch_samples)
        sizes = [len(tokens) for tokens in batch_samples]
        generated = [n - int(batch["sep"][b]) + 1 for b, n in enumerate(sizes)]
        longest = max(generated)
        assert int(0.5 * min(sizes)) <= longest <= max(sizes) - 2
        for b, original in enumerate(batch_samples):
            n = len(original)
            assert generated[b] == min(longest, n - 2) and generated[b] >= 0.5 * min(sizes) - 1
            ((start, end),) = check_row(batch, b, original, tokenizer, tokenizer.gmask_id)
            assert end - start == generated[b]
            if end == n:  # suffix: the sample's last tokens, forced when it holds several documents
                cases.add("suffix")
            else:  # one long span inside the sample's only document
                cases.add("inner")
                assert eos not in original[:-1] and start >= 1 and end <= n - 1
    assert cases == {"suffix", "inner"}

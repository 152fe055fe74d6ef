"""ReCoRD's training candidates equal the sample of the official reader.

`reference_examples` re-states `RecordProcessor._create_examples` (official
`tasks/superglue/dataset.py`) on the raw jsonl, independently of the project's reader:

- the passage's entities are the texts of its entity spans (inclusive ends), punctuation
  standardised, de-duplicated and sorted;
- one `random.Random(42)` serves the whole file, in file order;
- training: one example per distinct gold answer of a query; each builds a fresh list of the
  sorted entities that are no gold answer, shuffles it and keeps 9 only when it has more than 9;
  the candidates are the answer followed by that list;
- dev/test: one example per query whose candidates are all sorted entities.

The official reader takes the distinct answers in `set` order (which changes with
PYTHONHASHSEED); the project documents first-occurrence order, and so does the re-statement.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from datamodules.superglue import punctuation_standardization, read_split
from datamodules.superglue_data import SuperGLUEDataModule
from glm_lightning.cloze import answer_candidates, augment_training_examples

FEWGLUE_DIR = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve() / "fewglue"


def reference_examples(path: Path, train: bool) -> list[tuple[tuple[int, int], list[str], list[str]]]:
    """(passage idx, query idx), candidates and gold answers of every example, by the official rules."""
    shuffler = random.Random(42)
    examples = []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        text = punctuation_standardization(row["passage"]["text"])
        entities = sorted({punctuation_standardization(text[e["start"]:e["end"] + 1])
                           for e in row["passage"]["entities"]})
        for qa in row["qas"]:
            answers = [punctuation_standardization(a["text"]) for a in qa.get("answers", [])]
            answers = list(dict.fromkeys(answers))  # distinct; official: set order
            key = (row["idx"], qa["idx"])
            if not train:
                examples.append((key, entities, answers))
                continue
            for answer in answers:
                candidates = [e for e in entities if e not in answers]
                if len(candidates) > 9:
                    shuffler.shuffle(candidates)
                    candidates = candidates[:9]
                examples.append((key, [answer, *candidates], [answer]))
    return examples


def project_examples(data_dir: Path, split: str) -> list[tuple[tuple[int, int], list[str], list[str]]]:
    examples = read_split("ReCoRD", str(data_dir), split)
    if split == "train":
        examples = augment_training_examples("ReCoRD", examples, seed=42)
    return [(ex["idx"], answer_candidates("ReCoRD", ex), ex["label"]) for ex in examples]


def _passage(idx: int, words: list[str], queries: list[tuple[int, list[str]]]) -> dict:
    """A passage naming `words` (each twice, so spans repeat) with queries answered by some of them."""
    text = " ".join(words) + ".\n@highlight\n" + " and ".join(words)
    entities = []
    for word in words:
        for start in (text.index(word), text.rindex(word)):
            entities.append({"start": start, "end": start + len(word) - 1})
    qas = [{"idx": q, "query": f"Q{q} @placeholder", "answers": [
        {"start": text.index(a), "end": text.index(a) + len(a) - 1, "text": a} for a in answers]}
        for q, answers in queries]
    return {"idx": idx, "passage": {"text": text, "entities": entities}, "qas": qas}


def write_sample_file(root: Path, split: str) -> Path:
    """Passages in unsorted word order: many entities and several gold answers (one repeated,
    one with a curly quote), few entities (no shuffle), and again many, so the shared shuffler
    and the per-answer shuffles both show."""
    many = "Zoe Max Ann Lee Bo Cy Dee Eve Fay Gus Hal Ida Jo Kim".split()
    rows = [
        _passage(0, many, [(0, ["Max", "Kim", "Max", "Bo"]), (1, ["Eve"])]),
        _passage(1, ["Rome", "Oslo", "Bern", "Kyiv"], [(2, ["Oslo", "Bern"])]),
        _passage(2, [*many[7:], "O\u2019Neil", *many[:7]], [(3, ["O\u2019Neil", "Zoe"]), (4, ["Hal"])]),
    ]
    path = root / "ReCoRD" / f"{split}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_training_candidates_equal_the_official_sample(tmp_path):
    path = write_sample_file(tmp_path, "train")
    expected = reference_examples(path, train=True)
    assert project_examples(tmp_path, "train") == expected
    # the file exercises what matters: several answers per query, shuffled lists of 9, unshuffled ones
    assert [gold for _, _, (gold,) in expected[:3]] == ["Max", "Kim", "Bo"]
    assert expected[4][1] == ["Oslo", "Kyiv", "Rome"] and expected[5][1] == ["Bern", "Kyiv", "Rome"]
    assert expected[0][1][1:] != expected[1][1][1:]  # each answer has its own shuffle
    assert {len(candidates) for _, candidates, _ in expected} == {3, 10}
    assert expected[6][1][0] == "O'Neil"


def test_dev_candidates_are_all_sorted_entities(tmp_path):
    path = write_sample_file(tmp_path, "val")
    expected = reference_examples(path, train=False)
    assert project_examples(tmp_path, "val") == expected
    assert expected[2] == ((1, 2), ["Bern", "Kyiv", "Oslo", "Rome"], ["Oslo", "Bern"])


def test_datamodule_trains_on_the_official_sample(tmp_path, tokenizer):
    expected = reference_examples(write_sample_file(tmp_path, "train"), train=True)
    write_sample_file(tmp_path, "val")
    dm = SuperGLUEDataModule("ReCoRD", tmp_path, tokenizer, pattern_id=0, max_seq_length=96, batch_size=2)
    dm.setup()
    assert [(ex["idx"], ex["candidates"], ex["label"]) for ex in dm.examples["train"]] == expected
    assert [enc["input_ids"].shape[0] for enc in dm.encoded["train"]] == [len(c) for _, c, _ in expected]
    assert [enc["candidates"] for enc in dm.encoded["val"]] == \
        [c for _, c, _ in reference_examples(tmp_path / "ReCoRD" / "val.jsonl", train=False)]


@pytest.mark.data
@pytest.mark.skipif(not (FEWGLUE_DIR / "ReCoRD").is_dir(), reason=f"FewGLUE not found at {FEWGLUE_DIR}")
def test_fewglue_training_candidates_equal_the_official_sample():
    expected = reference_examples(FEWGLUE_DIR / "ReCoRD" / "train.jsonl", train=True)
    assert project_examples(FEWGLUE_DIR, "train") == expected
    keys = [key for key, _, _ in expected]
    assert len(expected) == 44 and len(set(keys)) == 32  # 12 of the 32 queries have two answers
    assert project_examples(FEWGLUE_DIR, "dev32") == reference_examples(
        FEWGLUE_DIR / "ReCoRD" / "dev32.jsonl", train=False)

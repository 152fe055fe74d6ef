"""Tests for datamodules.superglue: exact parsing of small files, flattening, errors, real data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from datamodules.superglue import TASKS, punctuation_standardization, read_split
from glm_lightning.metrics import TABLE1_METRICS

DATA_DIR = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()
SUPERGLUE_DIR = DATA_DIR / "superglue"
FEWGLUE_DIR = DATA_DIR / "fewglue"


def write_jsonl(root: Path, task: str, split: str, rows: list) -> Path:
    """Write rows (dicts, or raw strings for broken lines) to <root>/<task>/<split>.jsonl."""
    path = root / task / f"{split}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines), encoding="utf-8")  # no trailing newline, as official test files
    return path


def test_tasks_table_is_data():
    assert set(TASKS) == {"BoolQ", "CB", "COPA", "MultiRC", "ReCoRD", "RTE", "WiC", "WSC", "AX-b", "AX-g"}
    assert TASKS["CB"].labels == ("entailment", "contradiction", "neutral")
    assert TASKS["RTE"].labels == ("entailment", "not_entailment")
    assert TASKS["COPA"].standardize is False
    for task, metrics in TABLE1_METRICS.items():
        assert TASKS[task].metrics == metrics


def test_punctuation_standardization():
    assert punctuation_standardization("\u201cHi\u201d \u2018it\u2019s\u2019 1\u20132") == "\"Hi\" 'it's' 1-2"


def test_rte_cb_exact(tmp_path):
    write_jsonl(tmp_path, "RTE", "train", [
        {"premise": "A \u201cquoted\u201d p.", "hypothesis": "It\u2019s h.", "label": "entailment", "idx": 0},
        {"premise": "P2", "hypothesis": "H2", "label": "not_entailment", "idx": 1},
    ])
    assert read_split("RTE", str(tmp_path), "train") == [
        {"idx": 0, "premise": 'A "quoted" p.', "hypothesis": "It's h.", "label": "entailment"},
        {"idx": 1, "premise": "P2", "hypothesis": "H2", "label": "not_entailment"},
    ]
    write_jsonl(tmp_path, "CB", "test", [{"premise": "P", "hypothesis": "H", "idx": 7}])
    assert read_split("CB", str(tmp_path), "test") == [
        {"idx": 7, "premise": "P", "hypothesis": "H", "label": None}]


def test_boolq_and_wic_labels_become_bool(tmp_path):
    write_jsonl(tmp_path, "BoolQ", "val", [
        {"question": "is it", "passage": "Text \u2013 more", "idx": 0, "label": True},
        {"question": "is not", "passage": "T", "idx": 1, "label": False},
    ])
    assert read_split("BoolQ", str(tmp_path), "val") == [
        {"idx": 0, "passage": "Text - more", "question": "is it", "label": True},
        {"idx": 1, "passage": "T", "question": "is not", "label": False},
    ]
    row = {"word": "class", "sentence1": "A class.", "sentence2": "Real class.", "idx": 3, "label": "false",
           "start1": 2, "end1": 7, "start2": 5, "end2": 10, "version": 1.1}
    write_jsonl(tmp_path, "WiC", "dev32", [row])
    assert read_split("WiC", str(tmp_path), "dev32") == [{
        "idx": 3, "word": "class", "sentence1": "A class.", "sentence2": "Real class.",
        "start1": 2, "end1": 7, "start2": 5, "end2": 10, "label": False,
    }]


def test_copa_is_raw(tmp_path):
    row = {"premise": "The man\u2019s faucet.", "choice1": "\u201cA\u201d", "choice2": "B.",
           "question": "effect", "label": 1, "idx": 0}
    write_jsonl(tmp_path, "COPA", "train", [row])
    assert read_split("COPA", str(tmp_path), "train") == [{
        "idx": 0, "premise": "The man\u2019s faucet.", "choice1": "\u201cA\u201d", "choice2": "B.",
        "question": "effect", "label": 1,
    }]


def test_wsc_spans_kept_and_fixed(tmp_path):
    write_jsonl(tmp_path, "WSC", "val", [
        {"text": "Mark told Pete he was late.", "idx": 0, "label": True,
         "target": {"span1_text": "Pete", "span1_index": 2, "span2_text": "he", "span2_index": 3}},
        # off-by-one span1 index and a pronoun glued to its full stop: fixed as the official reader does
        {"text": "The cup hit the jar and broke it.", "idx": 1, "label": False,
         "target": {"span1_text": "the jar", "span1_index": 4, "span2_text": "it", "span2_index": 7}},
    ])
    assert read_split("WSC", str(tmp_path), "val") == [
        {"idx": 0, "text": "Mark told Pete he was late.", "span1_text": "Pete", "span1_index": 2,
         "span2_text": "he", "span2_index": 3, "label": True},
        {"idx": 1, "text": "The cup hit the jar and broke it .", "span1_text": "the jar", "span1_index": 3,
         "span2_text": "it", "span2_index": 7, "label": False},
    ]


def test_multirc_flattened_per_answer(tmp_path):
    row = {"idx": 5, "version": 1.1, "passage": {"text": "Once \u201cupon\u201d.", "questions": [
        {"question": "Who?", "idx": 10, "answers": [
            {"text": "Him", "idx": 100, "label": 1}, {"text": "Her", "idx": 101, "label": 0}]},
        {"question": "Why?", "idx": 11, "answers": [{"text": "Because", "idx": 102, "label": 0}]},
    ]}}
    write_jsonl(tmp_path, "MultiRC", "train", [row])
    common = {"passage": 'Once "upon".'}
    assert read_split("MultiRC", str(tmp_path), "train") == [
        {"idx": (5, 10, 100), **common, "question": "Who?", "answer": "Him", "label": True},
        {"idx": (5, 10, 101), **common, "question": "Who?", "answer": "Her", "label": False},
        {"idx": (5, 11, 102), **common, "question": "Why?", "answer": "Because", "label": False},
    ]
    for answer in row["passage"]["questions"][0]["answers"] + row["passage"]["questions"][1]["answers"]:
        del answer["label"]
    write_jsonl(tmp_path, "MultiRC", "test", [row])
    assert [ex["label"] for ex in read_split("MultiRC", str(tmp_path), "test")] == [None, None, None]


def test_record_flattened_per_query(tmp_path):
    text = "Ann met Bob\u2019s dog.\n@highlight\nAnn and Bob\n@highlight\nAnn"

    def entity(word: str, after: int = 0) -> dict:
        start = text.index(word, after)
        return {"start": start, "end": start + len(word) - 1}  # ReCoRD ends are inclusive

    row = {"source": "x", "idx": 3, "passage": {"text": text, "entities": [
        entity("Ann"), entity("Bob\u2019s"), entity("Ann", 5), entity("Bob", 30)]},
        "qas": [
            {"query": "@placeholder met \u201cthem\u201d", "idx": 40,
             "answers": [{"start": 0, "end": 2, "text": "Ann"}, {"start": 30, "end": 32, "text": "Ann"}]},
            {"query": "Q2 @placeholder", "idx": 41, "answers": [{"start": 8, "end": 10, "text": "Bob"}]},
        ]}
    write_jsonl(tmp_path, "ReCoRD", "train", [row])
    passage = "Ann met Bob's dog.\n- Ann and Bob\n- Ann"
    entities = ["Ann", "Bob", "Bob's"]  # de-duplicated and sorted
    assert read_split("ReCoRD", str(tmp_path), "train") == [
        {"idx": (3, 40), "passage": passage, "query": '@placeholder met "them"', "entities": entities,
         "label": ["Ann"]},
        {"idx": (3, 41), "passage": passage, "query": "Q2 @placeholder", "entities": entities,
         "label": ["Bob"]},
    ]
    for qa in row["qas"]:
        del qa["answers"]
    write_jsonl(tmp_path, "ReCoRD", "test", [row])
    assert [ex["label"] for ex in read_split("ReCoRD", str(tmp_path), "test")] == [None, None]


def test_diagnostics_read_one_file_whatever_the_split(tmp_path):
    (tmp_path / "AX-b").mkdir()
    (tmp_path / "AX-b" / "AX-b.jsonl").write_text(json.dumps(
        {"idx": "0", "label": "not_entailment", "sentence1": "S1", "sentence2": "S2", "logic": "Negation"}))
    (tmp_path / "AX-g").mkdir()
    (tmp_path / "AX-g" / "AX-g.jsonl").write_text(json.dumps(
        {"hypothesis": "H", "idx": 0, "label": "entailment", "pair_id": 1, "premise": "P"}))
    for split in ("train", "val", "test"):
        assert read_split("AX-b", str(tmp_path), split) == [
            {"idx": "0", "premise": "S1", "hypothesis": "S2", "label": "not_entailment"}]
        assert read_split("AX-g", str(tmp_path), split) == [
            {"idx": 0, "premise": "P", "hypothesis": "H", "label": "entailment"}]


GOOD_RTE = {"premise": "P", "hypothesis": "H", "label": "entailment", "idx": 0}


@pytest.mark.parametrize(
    ("task", "split", "bad_row", "message"),
    [
        ("RTE", "train", '{"premise": "P", "hypo', "invalid JSON"),
        ("RTE", "train", "[1, 2]", "field '<line>': expected a JSON object"),
        ("RTE", "train", {"premise": "P", "label": "entailment", "idx": 1}, "field 'hypothesis': missing"),
        ("RTE", "val", {**GOOD_RTE, "label": "maybe"}, "field 'label': unknown label 'maybe'"),
        ("RTE", "val", {**GOOD_RTE, "label": None}, "field 'label': expected"),
        ("RTE", "train", {k: v for k, v in GOOD_RTE.items() if k != "label"}, "field 'label': missing"),
        ("CB", "train", {**GOOD_RTE, "label": "not_entailment"}, "unknown label 'not_entailment'"),
        ("BoolQ", "val", {"question": "q", "passage": "p", "idx": 0, "label": "yes"}, "unknown label 'yes'"),
        ("COPA", "val", {"premise": "p", "choice1": "a", "choice2": "b", "question": "why", "label": 0,
                         "idx": 0}, "field 'question'"),
        ("COPA", "val", {"premise": "p", "choice1": "a", "choice2": "b", "question": "cause", "label": 2,
                         "idx": 0}, "field 'label': unknown label 2"),
        ("MultiRC", "val", {"idx": 0, "passage": {"text": "t", "questions": [
            {"question": "q", "idx": 0, "answers": [{"text": "a", "idx": 0}]}]}},
         "field 'passage.questions[0].answers[0].label': missing"),
        ("ReCoRD", "train", {"idx": 0, "passage": {"text": "abc", "entities": [{"start": 1, "end": 9}]},
                             "qas": []}, "field 'passage.entities[0].end'"),
        ("WSC", "val", {"text": "a b c", "idx": 0, "label": True,
                        "target": {"span1_text": "a", "span1_index": 0,
                                   "span2_text": "zz", "span2_index": 2}},
         "field 'target.span2_index'"),
    ],
)
def test_errors_name_file_line_and_field(tmp_path, task, split, bad_row, message):
    good = {
        "RTE": GOOD_RTE, "CB": GOOD_RTE,
        "BoolQ": {"question": "q", "passage": "p", "idx": 0, "label": True},
        "COPA": {"premise": "p", "choice1": "a", "choice2": "b", "question": "cause", "label": 0, "idx": 0},
        "MultiRC": {"idx": 0, "passage": {"text": "t", "questions": []}},
        "ReCoRD": {"idx": 0, "passage": {"text": "t", "entities": []}, "qas": []},
        "WSC": {"text": "a b", "idx": 0, "label": True,
                "target": {"span1_text": "a", "span1_index": 0, "span2_text": "b", "span2_index": 1}},
    }[task]
    path = write_jsonl(tmp_path, task, split, [good, "", bad_row])  # the bad row is on line 3
    with pytest.raises(ValueError) as info:
        read_split(task, str(tmp_path), split)
    assert str(info.value).startswith(f"{path}:3: ")
    assert message in str(info.value)


def test_unknown_task_or_split(tmp_path):
    with pytest.raises(ValueError, match="unknown task"):
        read_split("SST-2", str(tmp_path), "train")
    with pytest.raises(ValueError, match="unknown split"):
        read_split("RTE", str(tmp_path), "dev")


# Published SuperGLUE sizes (examples; MultiRC answer options). Missing files: BoolQ train, ReCoRD.
SUPERGLUE_COUNTS = {
    ("BoolQ", "val"): 3270, ("BoolQ", "test"): 3245,
    ("CB", "train"): 250, ("CB", "val"): 56, ("CB", "test"): 250,
    ("COPA", "train"): 400, ("COPA", "val"): 100, ("COPA", "test"): 500,
    ("MultiRC", "train"): 27243, ("MultiRC", "val"): 4848, ("MultiRC", "test"): 9693,
    ("RTE", "train"): 2490, ("RTE", "val"): 277, ("RTE", "test"): 3000,
    ("WiC", "train"): 5428, ("WiC", "val"): 638, ("WiC", "test"): 1400,
    ("WSC", "train"): 554, ("WSC", "val"): 104, ("WSC", "test"): 146,
    ("AX-b", "test"): 1104, ("AX-g", "test"): 356,
}
# FewGLUE: 32 examples (MultiRC answer options and ReCoRD queries as they come).
FEWGLUE_COUNTS = {
    **{(task, split): 32 for task in ("BoolQ", "CB", "COPA", "RTE", "WiC", "WSC", "ReCoRD")
       for split in ("train", "dev32")},
    ("MultiRC", "train"): 154, ("MultiRC", "dev32"): 167,
}


@pytest.mark.data
@pytest.mark.skipif(not SUPERGLUE_DIR.is_dir(), reason=f"SuperGLUE data not found at {SUPERGLUE_DIR}")
@pytest.mark.parametrize(("task", "split"), list(SUPERGLUE_COUNTS))
def test_real_superglue_counts(task, split):
    examples = read_split(task, str(SUPERGLUE_DIR), split)
    assert len(examples) == SUPERGLUE_COUNTS[task, split]
    labeled = task.startswith("AX-") or split != "test"
    assert all((ex["label"] is not None) == labeled for ex in examples)
    assert len({ex["idx"] for ex in examples}) == len(examples)  # ids are unique
    if task == "MultiRC":
        questions = {ex["idx"][:2] for ex in examples}
        assert len(questions) == {"train": 5131, "val": 953, "test": 1820}[split]


@pytest.mark.data
@pytest.mark.skipif(not FEWGLUE_DIR.is_dir(), reason=f"FewGLUE data not found at {FEWGLUE_DIR}")
@pytest.mark.parametrize(("task", "split"), list(FEWGLUE_COUNTS))
def test_real_fewglue_counts(task, split):
    examples = read_split(task, str(FEWGLUE_DIR), split)
    assert len(examples) == FEWGLUE_COUNTS[task, split]
    assert all(ex["label"] is not None for ex in examples)
    if task == "ReCoRD":
        for ex in examples:
            assert "@highlight\n" not in ex["passage"] and "@placeholder" in ex["query"]
            assert ex["label"] and len(set(ex["entities"])) == len(ex["entities"])
            # every gold answer is one of the passage entities (up to punctuation standardisation)
            assert set(ex["label"]) <= set(ex["entities"])


def test_wsc_negative_candidates_are_read(tmp_path):
    target = {"span1_text": "The teacher", "span1_index": 0, "span2_text": "she", "span2_index": 6}
    text = "The teacher asked the student because she was curious."
    write_jsonl(tmp_path, "WSC", "train", [
        {"idx": 0, "text": text, "target": target, "label": True,
         "candidates": ["the \u201cstudent\u201d", {"text": "a class"}]},
        {"idx": 1, "text": text, "target": target, "label": False},
    ])
    first, second = read_split("WSC", str(tmp_path), "train")
    assert first["candidates"] == ['the "student"', "a class"]  # punctuation standardised as the text
    assert "candidates" not in second
    write_jsonl(tmp_path, "WSC", "val", [{"idx": 0, "text": text, "target": target, "label": True,
                                          "candidates": ["ok", 7]}])
    with pytest.raises(ValueError, match=r"val.jsonl:1: field 'candidates\[1\]': expected a string"):
        read_split("WSC", str(tmp_path), "val")

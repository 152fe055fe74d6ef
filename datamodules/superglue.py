"""Readers for the official SuperGLUE / FewGLUE jsonl files.

`read_split(task, data_dir, split)` turns one file into a list of plain dicts, one per example the
model scores: MultiRC is flattened to one example per answer option and ReCoRD to one example per
query, as the official processors do (`tasks/superglue/dataset.py`). No tokenization happens here.
A ReCoRD example carries the passage's distinct entities sorted (the official candidates of dev and
test) and its distinct gold answers in the order they first occur.

Every example has an `idx` (a tuple for the flattened tasks, so answers can be grouped back by
question) and a `label` (None where the file has none, e.g. the test split). Errors name the file,
the line number and the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datamodules.jsonl import jsonl_records
from glm_lightning.cloze.tasks import BOOL_LABELS, TASKS, TaskSpec

__all__ = ["TASKS", "SPLITS", "TaskSpec", "punctuation_standardization", "read_split"]


# Splits whose files carry no labels; every other split must have them.
_UNLABELED_SPLITS = ("test", "unlabeled")
SPLITS = ("train", "val", "test", "dev32", "unlabeled")

_PUNCTUATION = {"\u201c": '"', "\u201d": '"', "\u2019": "'", "\u2018": "'", "\u2013": "-"}


def punctuation_standardization(text: str) -> str:
    """Curly quotes and en-dash to ASCII, as the official processors do (one char for one char, so
    character offsets into the text stay valid)."""
    for old, new in _PUNCTUATION.items():
        text = text.replace(old, new)
    return text


class _Line:
    """One parsed jsonl line with error messages that point at file, line and field."""

    def __init__(self, path: Path, lineno: int, obj: Any, split: str):
        self.path, self.lineno, self.split = path, lineno, split
        if not isinstance(obj, dict):
            raise self.error("<line>", "expected a JSON object")
        self.obj = obj

    def error(self, field: str, message: str) -> ValueError:
        return ValueError(f"{self.path}:{self.lineno}: field '{field}': {message}")

    def get(
        self, field: str, kind: type | tuple[type, ...], obj: dict | None = None, prefix: str = ""
    ) -> Any:
        """`obj[field]` (default: the line's object), checked to be of `kind` (bool is not an int)."""
        obj = self.obj if obj is None else obj
        name = prefix + field
        if field not in obj:
            raise self.error(name, "missing")
        value = obj[field]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            raise self.error(name, f"expected {' or '.join(k.__name__ for k in kinds)}, got {value!r}")
        return value

    def text(self, field: str, std: bool, obj: dict | None = None, prefix: str = "") -> str:
        value = self.get(field, str, obj, prefix)
        return punctuation_standardization(value) if std else value

    def label(self, labels: tuple, obj: dict | None = None, prefix: str = "") -> Any:
        """The normalised label, or None on unlabeled splits. Booleans may be written as JSON
        booleans, 0/1 or "true"/"false"; other labels must be in the task's label set as written."""
        obj = self.obj if obj is None else obj
        if "label" not in obj and self.split in _UNLABELED_SPLITS:
            return None
        value = self.get("label", (bool, int, str), obj, prefix)
        if labels is BOOL_LABELS:
            value = _as_bool(value)
        if value is None or value not in labels or type(value) is not type(labels[0]):
            raise self.error(prefix + "label", f"unknown label {obj['label']!r}; expected one of {labels}")
        return value


def _as_bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return None


# One function per file format; each returns the examples of one jsonl line.


def _nli(line: _Line, spec: TaskSpec, first: str = "premise", second: str = "hypothesis") -> list[dict]:
    return [{
        "idx": line.get("idx", (int, str)),
        "premise": line.text(first, spec.standardize),
        "hypothesis": line.text(second, spec.standardize),
        "label": line.label(spec.labels),
    }]


def _ax_b(line: _Line, spec: TaskSpec) -> list[dict]:
    return _nli(line, spec, "sentence1", "sentence2")


def _boolq(line: _Line, spec: TaskSpec) -> list[dict]:
    return [{
        "idx": line.get("idx", int),
        "passage": line.text("passage", spec.standardize),
        "question": line.text("question", spec.standardize),
        "label": line.label(spec.labels),
    }]


def _copa(line: _Line, spec: TaskSpec) -> list[dict]:
    question = line.get("question", str)
    if question not in ("cause", "effect"):
        raise line.error("question", f"expected 'cause' or 'effect', got {question!r}")
    return [{
        "idx": line.get("idx", int),
        "premise": line.text("premise", spec.standardize),
        "choice1": line.text("choice1", spec.standardize),
        "choice2": line.text("choice2", spec.standardize),
        "question": question,
        "label": line.label(spec.labels),
    }]


def _wic(line: _Line, spec: TaskSpec) -> list[dict]:
    example = {
        "idx": line.get("idx", int),
        "word": line.text("word", spec.standardize),
        "sentence1": line.text("sentence1", spec.standardize),
        "sentence2": line.text("sentence2", spec.standardize),
    }
    for field in ("start1", "end1", "start2", "end2"):
        example[field] = line.get(field, int)
    example["label"] = line.label(spec.labels)
    return [example]


def _wsc(line: _Line, spec: TaskSpec) -> list[dict]:
    target = line.get("target", dict)
    span1_text = line.text("span1_text", spec.standardize, target, "target.")
    span2_text = line.text("span2_text", spec.standardize, target, "target.")
    span1_index = line.get("span1_index", int, target, "target.")
    span2_index = line.get("span2_index", int, target, "target.")
    words = line.text("text", spec.standardize).split()
    span1_index, span2_index, words = _fix_wsc_spans(words, span1_text, span1_index, span2_text, span2_index)
    if not 0 <= span2_index < len(words) or words[span2_index] != span2_text:
        raise line.error("target.span2_index", f"word {span2_index} is not {span2_text!r}")
    example = {
        "idx": line.get("idx", int),
        "text": " ".join(words),
        "span1_text": span1_text,
        "span1_index": span1_index,
        "span2_text": span2_text,
        "span2_index": span2_index,
        "label": line.label(spec.labels),
    }
    if "candidates" in line.obj:  # the WSC-negative files of the official --wsc-negative runs
        example["candidates"] = [_wsc_candidate(line, i, c, spec.standardize)
                                 for i, c in enumerate(line.get("candidates", list))]
    return [example]


def _wsc_candidate(line: _Line, index: int, candidate: Any, standardize: bool) -> str:
    """One negative candidate: a string, or an object with a "text" field."""
    if isinstance(candidate, dict):
        return line.text("text", standardize, candidate, f"candidates[{index}].")
    if not isinstance(candidate, str):
        raise line.error(f"candidates[{index}]", f"expected a string or an object with 'text', "
                         f"got {type(candidate).__name__}")
    return punctuation_standardization(candidate) if standardize else candidate


def _fix_wsc_spans(
    words: list[str], span1_text: str, span1_index: int, span2_text: str, span2_index: int
) -> tuple[int, int, list[str]]:
    """Some official WSC word indices are off by one, and a few pronouns are glued to the next
    characters ("him." as one word). The official reader moves the index by +-1 when that makes
    the words match and splits a glued pronoun off; the same is done here."""
    lower = [w.lower() for w in words]
    span1 = span1_text.lower().split()
    if lower[span1_index:span1_index + len(span1)] != span1:
        for offset in (-1, 1):
            start = span1_index + offset
            if start >= 0 and lower[start:start + len(span1)] == span1:
                span1_index = start
                break
    if not 0 <= span2_index < len(words) or words[span2_index] != span2_text:
        for offset in (-1, 1):
            if 0 <= span2_index + offset < len(words) and words[span2_index + offset] == span2_text:
                span2_index += offset
                break
        word = words[span2_index] if 0 <= span2_index < len(words) else ""
        if word != span2_text and word.startswith(span2_text):
            words = words[:span2_index] + [span2_text, word[len(span2_text):]] + words[span2_index + 1:]
    return span1_index, span2_index, words


def _multirc(line: _Line, spec: TaskSpec) -> list[dict]:
    p_idx = line.get("idx", int)
    passage = line.get("passage", dict)
    text = line.text("text", spec.standardize, passage, "passage.")
    examples = []
    for qi, question in enumerate(line.get("questions", list, passage, "passage.")):
        q_prefix = f"passage.questions[{qi}]."
        q_idx = line.get("idx", int, question, q_prefix)
        q_text = line.text("question", spec.standardize, question, q_prefix)
        for ai, answer in enumerate(line.get("answers", list, question, q_prefix)):
            a_prefix = f"{q_prefix}answers[{ai}]."
            examples.append({
                "idx": (p_idx, q_idx, line.get("idx", int, answer, a_prefix)),
                "passage": text,
                "question": q_text,
                "answer": line.text("text", spec.standardize, answer, a_prefix),
                "label": line.label(spec.labels, answer, a_prefix),
            })
    return examples


def _span_text(line: _Line, text: str, span: dict, prefix: str) -> str:
    """Text of an inclusive [start, end] character span, as ReCoRD writes them."""
    start = line.get("start", int, span, prefix)
    end = line.get("end", int, span, prefix)
    if not 0 <= start <= end < len(text):
        raise line.error(prefix + "end", f"span [{start}, {end}] outside the passage ({len(text)} chars)")
    return text[start:end + 1]


def _record(line: _Line, spec: TaskSpec) -> list[dict]:
    p_idx = line.get("idx", int)
    passage = line.get("passage", dict)
    raw = line.get("text", str, passage, "passage.")
    entities: set[str] = set()
    for ei, span in enumerate(line.get("entities", list, passage, "passage.")):
        entity = _span_text(line, raw, span, f"passage.entities[{ei}].")
        entities.add(punctuation_standardization(entity) if spec.standardize else entity)
    text = raw.replace("@highlight\n", "- ")
    if spec.standardize:
        text = punctuation_standardization(text)
    examples = []
    for qi, qa in enumerate(line.get("qas", list)):
        prefix = f"qas[{qi}]."
        answers: list[str] | None = None
        if "answers" in qa or line.split not in _UNLABELED_SPLITS:
            golds = [
                line.text("text", spec.standardize, answer, f"{prefix}answers[{ai}].")
                for ai, answer in enumerate(line.get("answers", list, qa, prefix))
            ]
            answers = list(dict.fromkeys(golds))  # distinct, first occurrence first (official: set order)
        examples.append({
            "idx": (p_idx, line.get("idx", int, qa, prefix)),
            "passage": text,
            "query": line.text("query", spec.standardize, qa, prefix),
            "entities": sorted(entities),  # de-duplicated and sorted, as the official reader
            "label": answers,
        })
    return examples


_PARSERS = {
    "BoolQ": _boolq,
    "CB": _nli,
    "COPA": _copa,
    "MultiRC": _multirc,
    "ReCoRD": _record,
    "RTE": _nli,
    "WiC": _wic,
    "WSC": _wsc,
    "AX-b": _ax_b,
    "AX-g": _nli,
}


def split_path(task: str, data_dir: str | Path, split: str) -> Path:
    """`<data_dir>/<task>/<split>.jsonl`; the diagnostics have one file whatever the split."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {list(TASKS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    name = task if task.startswith("AX-") else split
    return Path(data_dir) / task / f"{name}.jsonl"


def read_split(task: str, data_dir: str, split: str) -> list[dict]:
    """Parsed examples of one official jsonl file, in file order (see the module docstring)."""
    path = split_path(task, data_dir, split)
    spec, parse = TASKS[task], _PARSERS[task]
    examples: list[dict] = []
    with open(path, encoding="utf-8") as f:
        for lineno, obj in jsonl_records(path, f, ValueError):
            examples.extend(parse(_Line(path, lineno, obj, split), spec))
    return examples

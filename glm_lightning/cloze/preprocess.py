"""Task logic that does not fit the pattern tables (official `tasks/superglue/dataset.py`, `pvp.py`).

Template fields per task (punctuation stripping, COPA casing and joiners, WSC pronoun marking,
ReCoRD query split), answer candidates of the multi-token tasks, class labels, the training-set
transformations the official finetuning applies (COPA mirroring, WSC positives with candidate
chunks, ReCoRD sampled candidates) and the plain text pairs of the classifier baseline.
"""

from __future__ import annotations

import random
import string
from collections.abc import Iterable

from glm_lightning.cloze.tasks import TASKS

# WSC training examples carry at most this many negatives; longer lists become several examples.
WSC_MAX_NEGATIVES = 9
# ReCoRD training examples score the gold answer against at most this many other entities.
RECORD_MAX_NEGATIVES = 9


def remove_final_punctuation(text: str) -> str:
    """Strip trailing ASCII punctuation (the patterns add their own)."""
    return text.rstrip(string.punctuation)


def lowercase_first(text: str) -> str:
    """COPA choices continue the premise mid-sentence."""
    return text[:1].lower() + text[1:]


def mark_pronoun(text: str, index: int) -> str:
    """Wrap word `index` (whitespace split) in asterisks, as the WSC patterns refer to '*pronoun*'."""
    words = text.split()
    words[index] = f"*{words[index]}*"
    return " ".join(words)


def _copa_choice(text: str) -> str:
    return remove_final_punctuation(lowercase_first(text))


def _split_query(query: str) -> tuple[str, str]:
    if "@placeholder" not in query:
        raise ValueError(f"ReCoRD query has no @placeholder: {query!r}")
    left, right = query.split("@placeholder", 1)
    return left, right


def cloze_fields(task: str, example: dict) -> dict[str, str]:
    """The template fields the patterns of `task` refer to."""
    if task in ("RTE", "CB", "AX-b", "AX-g"):
        return {
            "premise": example["premise"],
            "hypothesis": example["hypothesis"],
            "hypothesis_stripped": remove_final_punctuation(example["hypothesis"]),
        }
    if task == "BoolQ":
        return {"passage": example["passage"], "question": example["question"]}
    if task == "WiC":
        return {k: example[k] for k in ("word", "sentence1", "sentence2")}
    if task == "MultiRC":
        return {
            "passage": remove_final_punctuation(example["passage"].rstrip()),
            "question": remove_final_punctuation(example["question"].rstrip()),
            "answer": example["answer"],
        }
    if task == "COPA":
        return {
            "premise": remove_final_punctuation(example["premise"]),
            "choice1": _copa_choice(example["choice1"]),
            "choice2": _copa_choice(example["choice2"]),
            "joiner": " because" if example["question"] == "cause" else ", so",
        }
    if task == "WSC":
        return {
            "text": mark_pronoun(example["text"], example["span2_index"]),
            "pronoun": example["span2_text"],
        }
    if task == "ReCoRD":
        left, right = _split_query(example["query"])
        return {"passage": example["passage"], "query_left": " " + left.rstrip(), "query_right": right}
    raise ValueError(f"unknown task {task!r}")


def _candidate_texts(candidates: Iterable) -> list[str]:
    """Candidates as strings; the WSC-negative files store them as {"text": ...} objects."""
    return [c["text"] if isinstance(c, dict) else c for c in candidates]


def answer_candidates(task: str, example: dict) -> list[str]:
    """Answer candidates of a multi-token example, without the leading space added at encoding.

    COPA: the two processed choices. WSC: span1_text followed by the de-duplicated negatives of a
    `candidates` field, if any. ReCoRD: the example's `candidates` (set for training by
    `augment_training_examples`), otherwise all passage entities.
    """
    if task == "COPA":
        return [_copa_choice(example["choice1"]), _copa_choice(example["choice2"])]
    if task == "WSC":
        texts = [example["span1_text"], *_candidate_texts(example.get("candidates", ()))]
        return list(dict.fromkeys(texts))
    if task == "ReCoRD":
        return list(example.get("candidates", example["entities"]))
    raise ValueError(f"{task} is not a multi-token task")


def class_index(task: str, example: dict) -> int:
    """Index of the example's label in the task's label order (0 where the split has no labels)."""
    label = example.get("label")
    if label is None:
        return 0
    labels = TASKS[task].labels
    if label not in labels:
        raise ValueError(f"{task}: unknown label {label!r}; expected one of {labels}")
    return labels.index(label)


def candidate_label(task: str, example: dict, candidates: list[str]) -> int:
    """Index of the correct candidate of a multi-token example.

    COPA: the chosen alternative. WSC: 0, the candidate span1_text that the example asserts the
    pronoun refers to (whether it does is the example's boolean label). ReCoRD: the first
    candidate among the gold answers (0 when none is, e.g. on the test split).
    """
    if task == "COPA":
        return class_index(task, example)
    if task == "WSC":
        return 0
    golds = example.get("label") or ()
    return next((i for i, c in enumerate(candidates) if c in golds), 0)


def augment_training_examples(task: str, examples: list[dict], *, seed: int = 42) -> list[dict]:
    """The training set as the official finetuning sees it (`tasks/superglue/dataset.py`).

    COPA: the examples, then a mirrored copy of each (choices swapped, label flipped). WSC: only
    positive examples; more than 9 negatives are split into chunks of 9 (the last filled by
    wrapping around), one example per chunk. ReCoRD: see `record_training_examples`. Other
    tasks: unchanged.
    """
    if task == "COPA":
        mirrored = [
            {**ex, "choice1": ex["choice2"], "choice2": ex["choice1"], "label": 1 - ex["label"],
             "mirrored": True}
            for ex in examples
        ]
        return [*examples, *mirrored]
    if task == "WSC":
        return [chunk for ex in examples if ex["label"] is True for chunk in _wsc_chunks(ex)]
    if task == "ReCoRD":
        return record_training_examples(examples, seed=seed)
    return list(examples)


def record_training_examples(examples: list[dict], *, seed: int = 42) -> list[dict]:
    """ReCoRD's training examples, the sample of the official `RecordProcessor._create_examples`.

    One example per distinct gold answer of each query, with `candidates` = the answer, then the
    entities that are no gold answer (the reader sorts them), shuffled and cut to 9 when there
    are more than 9. Each answer gets its own shuffle of a fresh list, drawn from one
    `random.Random(seed)` shared by the whole file in file order, so `examples` must be the
    whole file as `read_split` returns it. The official reader takes a query's answers in the
    iteration order of a Python `set`, which changes with PYTHONHASHSEED; here they come in
    first-occurrence order (`read_split`), so for a query with several answers the official run
    draws the same shuffles but may hand them to its answers in another order.
    """
    rng = random.Random(seed)
    out = []
    for ex in examples:
        golds = ex["label"] or []
        for gold in golds:
            others = [e for e in ex["entities"] if e not in golds]
            if len(others) > RECORD_MAX_NEGATIVES:
                rng.shuffle(others)
                others = others[:RECORD_MAX_NEGATIVES]
            out.append({**ex, "candidates": [gold, *others], "label": [gold]})
    return out


def _wsc_chunks(example: dict) -> list[dict]:
    if "candidates" not in example:
        return [example]
    negatives = answer_candidates("WSC", example)[1:]
    if len(negatives) <= WSC_MAX_NEGATIVES:
        return [{**example, "candidates": negatives}]
    chunks = []
    for start in range(0, len(negatives), WSC_MAX_NEGATIVES):
        chunk = negatives[start:start + WSC_MAX_NEGATIVES]
        chunk += negatives[:WSC_MAX_NEGATIVES - len(chunk)]
        chunks.append({**example, "candidates": chunk})
    return chunks


def classifier_inputs(task: str, example: dict) -> list[tuple[str, str]]:
    """(segment A, segment B) texts of the classifier baseline, one pair per scored choice."""
    if task in ("RTE", "CB", "AX-b", "AX-g"):
        return [(example["premise"], example["hypothesis"])]
    if task == "BoolQ":
        return [(example["passage"], example["question"])]
    if task == "WiC":
        return [(f"{example['word']}: {example['sentence1']}", example["sentence2"])]
    if task == "MultiRC":
        return [(example["passage"], f"{example['question']} answer: {example['answer']}")]
    if task == "WSC":
        return [(mark_pronoun(example["text"], example["span2_index"]), example["span1_text"])]
    if task == "COPA":
        premise = f"{example['premise']} {'because' if example['question'] == 'cause' else 'so'}"
        return [(premise, example["choice1"]), (premise, example["choice2"])]
    if task == "ReCoRD":
        return [
            (example["passage"], example["query"].replace("@placeholder", entity, 1))
            for entity in answer_candidates(task, example)
        ]
    raise ValueError(f"unknown task {task!r}")


def classifier_label(task: str, example: dict) -> int:
    """Class index, or for the multiple-choice tasks (COPA, ReCoRD) the correct choice's index."""
    if task == "ReCoRD":
        return candidate_label(task, example, answer_candidates(task, example))
    return class_index(task, example)

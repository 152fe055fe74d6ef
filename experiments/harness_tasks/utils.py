"""Document functions of the local harness tasks (read by lm-evaluation-harness through ``!function``)."""

from __future__ import annotations

from glm_lightning.lm_eval import lambada_text

COPA_CONNECTORS = {"cause": "because", "effect": "therefore"}


def copa_context(doc: dict) -> str:
    """The premise without its final period, joined to the choice by "because" (cause) or
    "therefore" (effect), as the harness's own SuperGLUE COPA task words it."""
    return doc["premise"].strip()[:-1] + " " + COPA_CONNECTORS[doc["question"]]


def copa_choices(doc: dict) -> list[str]:
    """Both choices, each as the continuation of the sentence (first letter lower-cased)."""
    return [" " + choice[0].lower() + choice[1:] for choice in (doc["choice1"], doc["choice2"])]


def nonblank_lines(dataset):  # datasets.Dataset -> datasets.Dataset
    """Every non-blank line of a text file, stripped: the documents of ``exp=lm_eval
    lm_eval.protocol=language_model`` (``glm_lightning.lm_eval.read_documents``)."""
    kept = dataset.filter(lambda doc: bool(doc["text"].strip()))
    return kept.map(lambda doc: {"text": doc["text"].strip()})


def lambada_context(doc: dict) -> str:
    """The passage before its last word, stripped (``glm_lightning.lm_eval.lambada_text``)."""
    return lambada_text(doc["text"])[0]


def lambada_answer(doc: dict) -> str:
    """The last word of the passage, with the space before it."""
    return lambada_text(doc["text"])[1]

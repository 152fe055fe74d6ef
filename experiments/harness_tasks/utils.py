"""Document functions of the local harness tasks (read by lm-evaluation-harness through ``!function``)."""

from __future__ import annotations

from pathlib import Path

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


def local_dataset(task: str, builder: str, data_files: dict[str, str], metadata: dict):
    """The task's splits read by the ``datasets`` builder ``builder`` (``json``, ``text``: no network)
    from the YAML's ``data_files``, or from the file that ``--metadata TASK=PATH`` names on the
    harness's command line (``exp=harness`` rewrites ``data_files`` itself)."""
    import datasets

    if metadata.get(task) is not None:
        data_files = dict.fromkeys(data_files, str(metadata[task]))
    for path in data_files.values():
        if not Path(path).is_file():
            raise FileNotFoundError(f"{task}: no file {path} (--metadata {task}=PATH names another)")
    return datasets.load_dataset(builder, data_files=data_files)


def copa_dataset(data_files: dict[str, str], **metadata):  # -> datasets.DatasetDict
    """glm_copa's COPA jsonl (``--metadata glm_copa=PATH``)."""
    return local_dataset("glm_copa", "json", data_files, metadata)


def perplexity_dataset(data_files: dict[str, str], **metadata):  # -> datasets.DatasetDict
    """glm_perplexity's text file (``--metadata glm_perplexity=PATH``)."""
    return local_dataset("glm_perplexity", "text", data_files, metadata)


def lambada_dataset(data_files: dict[str, str], **metadata):  # -> datasets.DatasetDict
    """glm_lambada's jsonl (``--metadata glm_lambada=PATH``)."""
    return local_dataset("glm_lambada", "json", data_files, metadata)

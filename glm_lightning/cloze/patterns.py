"""Cloze patterns and verbalizers of every SuperGLUE task, as data (official `tasks/superglue/pvp.py`).

A pattern is a list of parts for segment A and (optionally) segment B. Each part is tokenized on
its own, so part boundaries are token boundaries and a leading space belongs to the part that
carries it. A part is

* a plain string: a template filled from the example's fields (`str.format`), never truncated;
* `Shortenable(template)`: the same, but truncation may cut tokens from its end;
* `MASK`: the [MASK] token, the blank the model fills.

`verbalizers` lists one word per label, in the label order of `glm_lightning.cloze.tasks.TASKS`
(single-token tasks); it is None for the multi-token tasks, whose answers are per-example
candidates. The template fields each task offers are built in `preprocess.cloze_fields`.
"""

from __future__ import annotations

from dataclasses import dataclass


class _Mask:
    """The [MASK] part of a pattern (a singleton, compared by identity)."""

    def __repr__(self) -> str:
        return "MASK"


MASK = _Mask()


@dataclass(frozen=True)
class Shortenable:
    """A template part that truncation may cut from the end (long example text)."""

    text: str


PatternPart = str | Shortenable | _Mask


@dataclass(frozen=True)
class Pattern:
    """Segment A and B parts of one pattern id, and its verbalizers (None: multi-token task)."""

    a: tuple[PatternPart, ...]
    b: tuple[PatternPart, ...] = ()
    verbalizers: tuple[str, ...] | None = None


S = Shortenable

# RTE labels: (entailment, not_entailment). The hypothesis has its final punctuation stripped.
_RTE_YES_NO = (" Yes", " No")
RTE_PATTERNS: dict[int, Pattern] = {
    0: Pattern(('"', S("{hypothesis_stripped}"), '" ?'), (MASK, ",", ' "', S("{premise}"), '"'), _RTE_YES_NO),
    1: Pattern((S("{hypothesis_stripped}"), "?"), (MASK, ",", S(" {premise}")), _RTE_YES_NO),
    2: Pattern(('"', S("{hypothesis_stripped}"), '" ?'), (MASK, '. "', S("{premise}"), '"'), _RTE_YES_NO),
    3: Pattern((S("{hypothesis_stripped}"), "?"), (MASK, ".", S(" {premise}")), _RTE_YES_NO),
    4: Pattern(
        (S("{premise}"), " question:", S(" {hypothesis_stripped}"), " True or False?", " answer:", MASK),
        verbalizers=(" true", " false"),
    ),
}

# CB labels: (entailment, contradiction, neutral). Pattern 4 keeps the hypothesis as written.
_CB_YES_NO_MAYBE = (" Yes", " No", " Maybe")
CB_PATTERNS: dict[int, Pattern] = {
    **{pid: Pattern(p.a, p.b, _CB_YES_NO_MAYBE) for pid, p in RTE_PATTERNS.items() if pid < 4},
    4: Pattern(
        (S("{premise}"), " question:", S(" {hypothesis}"), " true, false or neither?", " answer:", MASK),
        verbalizers=(" true", " false", " neither"),
    ),
}

# Boolean tasks: labels (False, True), so verbalizers read (no, yes).
_NO_YES = (" No", " Yes")
_FALSE_TRUE = (" false", " true")
_BOOLQ_QUESTION = (S("{passage}"), " Question:", S(" {question}"), "? Answer:", MASK, ".")
_BOOLQ_PREVIOUS = (S("{passage}"), " Based on the previous passage,", S(" {question}"), "?", MASK, ".")
_BOOLQ_FOLLOWING = ("Based on the following passage", S(" {question}"), "?", MASK, ".", S(" {passage}"))
BOOLQ_PATTERNS: dict[int, Pattern] = {
    0: Pattern(_BOOLQ_QUESTION, verbalizers=_NO_YES),
    1: Pattern(_BOOLQ_QUESTION, verbalizers=_FALSE_TRUE),
    2: Pattern(_BOOLQ_PREVIOUS, verbalizers=_NO_YES),
    3: Pattern(_BOOLQ_PREVIOUS, verbalizers=_FALSE_TRUE),
    4: Pattern(_BOOLQ_FOLLOWING, verbalizers=_NO_YES),
    5: Pattern(_BOOLQ_FOLLOWING, verbalizers=_FALSE_TRUE),
}

WIC_PATTERNS: dict[int, Pattern] = {
    0: Pattern(
        (S('"{sentence1}" / "{sentence2}"'), ' Similar sense of "{word}"?', MASK, "."),
        verbalizers=_NO_YES,
    ),
    1: Pattern(
        (S("{sentence1}"), S(" {sentence2}"), " Does {word} have the same meaning in both sentences?", MASK),
        verbalizers=_NO_YES,
    ),
    2: Pattern(
        ("{word}", " .", ' Sense (1) (a) "', S("{sentence1}"), '"', " (", MASK, ') "', "{sentence2}", '"'),
        verbalizers=("2", "b"),
    ),
}

# Passage and question have their final punctuation stripped (the patterns add their own).
MULTIRC_PATTERNS: dict[int, Pattern] = {
    0: Pattern(
        (S("{passage}"), ".", " Question:", " {question}?", " Is it", " {answer}", "?", MASK, "."),
        verbalizers=_NO_YES,
    ),
    1: Pattern(
        (S("{passage}"), ".", " Question:", " {question}", "?", ' Is the correct answer "', "{answer}", '"?',
         MASK, "."),
        verbalizers=_NO_YES,
    ),
    2: Pattern(
        (S("{passage}"), ". Based on the previous passage,", " {question}", "?", ' Is "', "{answer}",
         '" a correct answer?', MASK, "."),
        verbalizers=_NO_YES,
    ),
    3: Pattern(
        (S("{passage}"), " {question}", "- [", MASK, "]", "{answer}"),
        verbalizers=(" False", " True"),
    ),
    4: Pattern(
        (S("{passage}"), ".", " Question:", " {question}", "?", " {answer}", "?", MASK, "."),
        verbalizers=_NO_YES,
    ),
}

# Multi-token tasks: candidates come from the example (`preprocess.answer_candidates`).
# COPA: choices lower-cased first letter, final punctuation removed; joiner " because" / ", so".
COPA_PATTERNS: dict[int, Pattern] = {
    0: Pattern(('"', "{choice1}", '" or "', "{choice2}", '"?', S(" {premise}"), "{joiner}", MASK, ".")),
    1: Pattern(("{choice1}", " or", " {choice2}", "?", S(" {premise}"), "{joiner}", MASK, ".")),
}

# WSC: `text` has the pronoun wrapped in asterisks.
WSC_PATTERNS: dict[int, Pattern] = {
    0: Pattern((S("{text}"), " The pronoun '*{pronoun}*' refers to", MASK, ".")),
    1: Pattern((S("{text}"), " In the previous sentence, the pronoun '*{pronoun}*' refers to", MASK, ".")),
    2: Pattern((
        S("{text}"),
        " Question: In the passage above, what does the pronoun '*{pronoun}*' refer to?",
        " Answer:",
        MASK,
        ".",
    )),
}

# ReCoRD: the query is split at @placeholder; `query_left` is " " + its rstripped left side.
RECORD_PATTERNS: dict[int, Pattern] = {
    0: Pattern((S("{passage}"), "{query_left}", MASK, "{query_right}")),
}

# Every task by its `read_split` name; the diagnostics are scored with RTE's patterns.
PATTERNS: dict[str, dict[int, Pattern]] = {
    "RTE": RTE_PATTERNS,
    "AX-b": RTE_PATTERNS,
    "AX-g": RTE_PATTERNS,
    "CB": CB_PATTERNS,
    "BoolQ": BOOLQ_PATTERNS,
    "WiC": WIC_PATTERNS,
    "MultiRC": MULTIRC_PATTERNS,
    "COPA": COPA_PATTERNS,
    "WSC": WSC_PATTERNS,
    "ReCoRD": RECORD_PATTERNS,
}

MULTI_TOKEN_TASKS = frozenset({"COPA", "WSC", "ReCoRD"})


def get_pattern(task: str, pattern_id: int) -> Pattern:
    """The pattern of `task` with id `pattern_id`; errors list what exists."""
    if task not in PATTERNS:
        raise ValueError(f"unknown task {task!r}; expected one of {list(PATTERNS)}")
    patterns = PATTERNS[task]
    if pattern_id not in patterns:
        raise ValueError(f"{task} has no pattern {pattern_id}; available: {sorted(patterns)}")
    return patterns[pattern_id]

"""WikiText detokenization, as the released `wikitext` evaluation applies it before tokenizing
(`tasks/language_model/detokenizer.py`, used by `build_wikitext103_dataset`).

WikiText ships tokenized: ``@-@``-style number separators, spaces around punctuation, spaced-out
heading markers. The rules below undo that in the released order, so that a subword tokenizer sees
ordinary prose and the perplexity is comparable with the paper's (§3.3, Figure 4).

The released rule meant for ``' <digit>`` is written with slash delimiters (``/' [0-9]/``) and so
matches only that literal text, which WikiText does not contain; it is left out.
"""

from __future__ import annotations

import re

# Literal replacements of the first half, in the released order.
_SEPARATORS_AND_PUNCTUATION = (
    ("s '", "s'"),  # plural possessive: "players ' " -> "players' "
    (" @-@ ", "-"),  # number and compound separators: "1 @,@ 000" -> "1,000"
    (" @,@ ", ","),
    (" @.@ ", "."),
    (" : ", ": "),  # no space before punctuation
    (" ; ", "; "),
    (" . ", ". "),
    (" ! ", "! "),
    (" ? ", "? "),
    (" , ", ", "),
)

# Paired delimiters whose inner edges lose their spaces: "( 1 )" -> "(1)", '" a "' -> '"a"'.
_PAIRS = (("(", ")"), ("[", "]"), ("{", "}"), ('"', '"'), ("'", "'"))

# Literal replacements of the second half, in the released order.
_HEADINGS_AND_REST = (
    ("= = = =", "===="),  # heading markers: "= = Career = =" -> "== Career =="
    ("= = =", "==="),
    ("= =", "=="),
    (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"),
    (" \n", "\n"),  # no space at either end of a line
    ("\n ", "\n"),
    (" N ", " 1 "),  # the placeholder for a number
    (" 's", "'s"),  # possessive
)


def _tighten(text: str, opening: str, closing: str) -> str:
    """Drop the whitespace just inside each pair: scanning left to right, an ``opening`` pairs with
    the first ``closing`` after it, and the scan resumes after that ``closing``."""
    inner = rf"[^{re.escape(closing)}]*?"
    pattern = re.compile(rf"{re.escape(opening)}\s*({inner})\s*{re.escape(closing)}")
    return pattern.sub(lambda match: f"{opening}{match.group(1)}{closing}", text)


def _replace_all(text: str, rules: tuple[tuple[str, str], ...]) -> str:
    for old, new in rules:
        text = text.replace(old, new)
    return text


def wikitext_detokenize(text: str) -> str:
    """``text`` with the WikiText tokenization undone (see the module docstring); any text is
    accepted, blank lines included."""
    text = _replace_all(text, _SEPARATORS_AND_PUNCTUATION)
    for opening, closing in _PAIRS:
        text = _tighten(text, opening, closing)
    return _replace_all(text, _HEADINGS_AND_REST)

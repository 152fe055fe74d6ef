"""Held-out probes of the built-in world: deterministic, enough of them, never seen in training."""

import json
import re
from pathlib import Path

import pytest

from datamodules.builtin_corpus import CITIES, PEOPLE, builtin_documents, write_builtin_corpus
from datamodules.builtin_probes import MASK, Probe, builtin_probes, read_probes
from glm_lightning.tokenizer import GLMTokenizer, train_sentencepiece


def test_probes_are_deterministic_one_per_fact_and_at_least_100() -> None:
    probes = builtin_probes()
    assert probes == builtin_probes()
    assert len(probes) == 5 * len(CITIES) + 4 * len(PEOPLE) >= 100
    assert len({(p.relation, p.subject) for p in probes}) == len(probes)
    for probe in probes:
        assert probe.text.count(MASK) == 1 and probe.subject in probe.text
        assert MASK not in probe.filled and probe.answer in probe.filled
    arlen = {p.relation: p.answer for p in probes if p.subject == "Arlen"}
    assert arlen == {"city.river": "Vesk", "city.region": "Dunmoor", "city.goods": "glass",
                     "city.weather": "windy", "city.founded": "812"}
    assert [p.text for p in builtin_probes(seed=1)] != [p.text for p in probes]


def test_no_filled_probe_occurs_in_the_training_text() -> None:
    text = "\n".join(builtin_documents())
    assert "The city of Arlen lies on the river Vesk." in text  # a training phrasing is found
    seen = [p.filled for p in builtin_probes() if p.filled in text]
    assert seen == []
    # Nor the probe sentence up to and including its answer (what precedes the blank is new).
    seen = [p for p in builtin_probes() if p.text.split(MASK)[0] + p.answer in text]
    assert seen == []


def test_answers_are_one_to_three_tokens_of_the_quickstart_tokenizer(tmp_path: Path) -> None:
    files = write_builtin_corpus(tmp_path / "corpus")
    model = train_sentencepiece(files, 1000, str(tmp_path / "sp"), hard_vocab_limit=False)
    tokenizer = GLMTokenizer.from_sentencepiece(model)
    lengths = {p.answer: len(tokenizer.encode(" " + p.answer)) for p in builtin_probes()}
    assert {answer for answer, n in lengths.items() if not 1 <= n <= 3} == set()


def test_read_probes_reads_the_builtin_format_and_names_bad_lines(tmp_path):
    path = tmp_path / "probes.jsonl"
    path.write_text('{"relation": "city.river", "subject": "Arlen", "text": "Arlen is on [MASK].", '
                    '"answer": "Vesk"}\n\n'
                    '{"relation": "job", "text": "Mira is a [MASK].", "answer": "baker"}\n')
    assert read_probes(path) == [Probe("city.river", "Arlen", "Arlen is on [MASK].", "Vesk"),
                                 Probe("job", "", "Mira is a [MASK].", "baker")]
    good = json.dumps({"relation": "r", "text": "a [MASK] b", "answer": "x"})
    for line, message in [
        ('{"relation": "r", "text": "a [MASK] b"}', r":2: field 'answer': expected a non-empty string"),
        ('{"relation": "r", "text": "[MASK] [MASK]", "answer": "x"}', r":2: field 'text': expected exactly"),
        ('["r", "a [MASK]", "x"]', r":2: expected a JSON object"),
        ('{"relation": "r", "text": ', r":2: invalid JSON"),
    ]:
        path.write_text(f"{good}\n{line}\n")
        with pytest.raises(ValueError, match=f"^{re.escape(str(path))}{message}"):
            read_probes(path)
    path.write_text("\n")
    with pytest.raises(ValueError, match="no probes"):
        read_probes(path)
    with pytest.raises(ValueError, match="no such probe file"):
        read_probes(tmp_path / "missing.jsonl")

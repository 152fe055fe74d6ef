"""Held-out infilling probes about the world of the built-in corpus.

A probe is one sentence with one ``[MASK]`` whose answer is a single fact of the world
(``datamodules.builtin_corpus``): a city's river, region, goods, weather or founding year, a
person's home city, job, pet or the pet's colour. Every probe uses a phrasing that the corpus never
uses for its relation, so a model fills it from what it learned about the entity, not by recalling
the sentence. There is one probe per fact, in one of a few held-out templates picked by a seeded
generator: the probes are the same on every machine and generated in code (no data file).
``read_probes`` reads probes of another corpus in the same format: a jsonl file of objects with
``relation``, ``text`` (one ``[MASK]``), ``answer`` and optionally ``subject``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from datamodules.builtin_corpus import CITIES, PEOPLE, City, Person
from datamodules.jsonl import jsonl_records

MASK = "[MASK]"


@dataclass(frozen=True)
class Probe:
    """One held-out sentence: ``text`` holds one [MASK]; ``answer`` is the fact that fills it."""

    relation: str  # "city.river", "person.job", ...
    subject: str  # the city or the person the fact is about
    text: str
    answer: str

    @property
    def filled(self) -> str:
        """The sentence with its answer in place of the blank."""
        return self.text.replace(MASK, self.answer)


def _water_name(c: City) -> str:
    return c.water.split()[-1]  # "the river Vesk" -> "Vesk", "lake Hollin" -> "Hollin"


def _water_kind(c: City) -> str:
    return c.water.rsplit(" ", 1)[0]  # "the river" / "lake"


def _their(p: Person) -> str:
    return "her" if p.pronoun == "she" else "his"


# Templates per relation, none of which the corpus uses for that relation (checked by the tests:
# no filled probe occurs in the training text). Each maps an entity to (text with [MASK], answer).
CityTemplate = Callable[[City], tuple[str, str]]
PersonTemplate = Callable[[Person], tuple[str, str]]

CITY_TEMPLATES: dict[str, list[CityTemplate]] = {
    "city.river": [
        lambda c: (f"{c.name} stands on the banks of {_water_kind(c)} {MASK}.", _water_name(c)),
        lambda c: (f"From the walls of {c.name} you can see {_water_kind(c)} {MASK}.", _water_name(c)),
    ],
    "city.region": [
        lambda c: (f"On the old map, {c.name} is drawn inside the region of {MASK}.", c.region),
        lambda c: (f"The road to {c.name} runs through the region of {MASK}.", c.region),
    ],
    "city.goods": [
        lambda c: (f"The workers of {c.name} make {MASK} for the whole region.", c.goods),
        lambda c: (f"Travellers come to {c.name} to buy its famous {MASK}.", c.goods),
    ],
    "city.weather": [
        lambda c: (f"Travellers say that the weather in {c.name} is {MASK}.", c.weather),
        lambda c: (f"Pack well for {c.name}: the weather there is often {MASK}.", c.weather),
    ],
    "city.founded": [
        lambda c: (f"Old books say that {c.name} was founded in the year {MASK}, long ago.", str(c.founded)),
        lambda c: (f"{c.name} was founded long ago, in the year {MASK}.", str(c.founded)),
    ],
}

PERSON_TEMPLATES: dict[str, list[PersonTemplate]] = {
    "person.city": [
        lambda p: (f"{p.name} has lived in {MASK} for many years.", p.city),
        lambda p: (f"If you look for {p.name}, go to {MASK}, where {p.pronoun} lives.", p.city),
    ],
    "person.job": [
        lambda p: (f"By trade, {p.name} is a {MASK}.", p.job),
        lambda p: (f"{p.name} has worked as a {MASK} for many years.", p.job),
    ],
    "person.pet": [
        lambda p: (f"Every evening {p.name} feeds {_their(p)} {p.colour} {MASK}.", p.pet),
        lambda p: (f"The {p.colour} animal that {p.name} keeps at home is a {MASK}.", p.pet),
    ],
    "person.colour": [
        lambda p: (f"{p.name} keeps a {MASK} {p.pet}, as all the neighbours know.", p.colour),
        lambda p: (f"The {p.pet} that {p.name} keeps at home is {MASK}.", p.colour),
    ],
}


def builtin_probes(seed: int = 0) -> list[Probe]:
    """One probe per fact of the built-in world (10 cities x 5 + 16 people x 4 = 114), each in a
    held-out template chosen by ``seed``; deterministic for a given seed."""
    rng = random.Random(seed)
    probes = []
    for table, entities in ((CITY_TEMPLATES, CITIES), (PERSON_TEMPLATES, PEOPLE)):
        for relation, templates in table.items():
            for entity in entities:
                text, answer = rng.choice(templates)(entity)
                probes.append(Probe(relation, entity.name, text, answer))
    return probes



def read_probes(path: str | Path) -> list[Probe]:
    """The probes of a jsonl file, one object per line: ``relation``, ``text`` with exactly one
    ``[MASK]``, ``answer`` (strings) and an optional ``subject``. A bad line is a ValueError naming
    the file, the line and the field."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such probe file")
    probes = []
    with path.open(encoding="utf-8") as lines:
        for number, obj in jsonl_records(path, lines, ValueError):
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object with relation, text, answer")
            fields = {}
            for field in ("relation", "text", "answer", "subject"):
                value = obj.get(field, "" if field == "subject" else None)
                if not isinstance(value, str) or (field != "subject" and not value.strip()):
                    raise ValueError(f"{path}:{number}: field '{field}': expected a non-empty string, "
                                     f"got {value!r}")
                fields[field] = value
            if fields["text"].count(MASK) != 1:
                raise ValueError(f"{path}:{number}: field 'text': expected exactly one {MASK}, "
                                 f"found {fields['text'].count(MASK)}")
            probes.append(Probe(fields["relation"], fields["subject"], fields["text"], fields["answer"]))
    if not probes:
        raise ValueError(f"{path}: no probes (one JSON object per line)")
    return probes

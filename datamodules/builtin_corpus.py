"""A small synthetic English corpus, generated on the fly, for the quickstart and the tests.

Nothing is downloaded and no data file is kept in the repository: `write_builtin_corpus` writes a
few hundred short documents (about 400 KB) built from templated sentences about one small, fixed
world (cities on rivers, the goods they make, the people who live there). The same facts recur in
many documents and in many phrasings, and the sentences end in ``. ? ! ; :`` and newlines, so a
tiny GLM can learn to fill blanks from context within a short training run: its blank-infilling
loss drops clearly, which is what the quickstart needs to show. ``datamodules.builtin_probes`` asks
about the same facts in phrasings this module never uses for them, to measure what a model learned.
The text is synthetic and says nothing true about the real world.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from glm_lightning.atomic import atomic_write

DOCUMENT_SEPARATOR = "\n\f\n"  # form feed: one document each (see datamodules.corpus)
DOCUMENTS_PER_FILE = 100


@dataclass(frozen=True)
class City:
    name: str
    water: str  # "the river Vesk", "lake Hollin", ...
    region: str
    goods: str
    founded: int
    landmark: str
    weather: str


@dataclass(frozen=True)
class Person:
    first: str
    last: str
    job: str
    city: str
    pet: str
    colour: str
    age: int
    pronoun: str  # "she" / "he"

    @property
    def name(self) -> str:
        return f"{self.first} {self.last}"


CITIES = [
    City("Arlen", "the river Vesk", "Dunmoor", "glass", 812, "the Tower of Bells", "windy"),
    City("Brisk", "the river Oma", "Tellar", "salt fish", 640, "the Old Harbour", "wet"),
    City("Corvel", "the river Vesk", "Dunmoor", "wool", 905, "the Grey Bridge", "cold"),
    City("Dallow", "the river Amber", "Sorn", "copper", 733, "the Copper Gate", "dry"),
    City("Eskin", "the river Oma", "Tellar", "rope", 1021, "the Long Market", "mild"),
    City("Fenmark", "lake Hollin", "the Fens", "baskets", 588, "the Reed Hall", "foggy"),
    City("Galt", "the river Amber", "Sorn", "cheese", 867, "the White Dome", "sunny"),
    City("Harrow", "lake Hollin", "the Fens", "boats", 699, "the Boat Yard", "rainy"),
    City("Istel", "the river Kern", "Varra", "paper", 954, "the Great Library", "warm"),
    City("Joss", "the river Kern", "Varra", "silver", 776, "the Silver Stair", "hot"),
]

PEOPLE = [
    Person("Mira", "Tolan", "baker", "Arlen", "cat", "grey", 40, "she"),
    Person("Oren", "Valk", "smith", "Dallow", "dog", "brown", 52, "he"),
    Person("Tessa", "Morrow", "teacher", "Istel", "owl", "white", 34, "she"),
    Person("Bram", "Keller", "fisher", "Brisk", "gull", "white", 61, "he"),
    Person("Lina", "Farr", "weaver", "Corvel", "goat", "black", 27, "she"),
    Person("Tomas", "Vey", "sailor", "Eskin", "parrot", "green", 45, "he"),
    Person("Alma", "Reed", "basket maker", "Fenmark", "frog", "green", 70, "she"),
    Person("Piet", "Sander", "cheese maker", "Galt", "cow", "brown", 38, "he"),
    Person("Nora", "Hale", "boat builder", "Harrow", "duck", "yellow", 29, "she"),
    Person("Ivo", "Brandt", "silversmith", "Joss", "horse", "black", 56, "he"),
    Person("Edda", "Quill", "librarian", "Istel", "cat", "orange", 48, "she"),
    Person("Jonas", "Reef", "rope maker", "Eskin", "dog", "grey", 33, "he"),
    Person("Selma", "Crane", "glass blower", "Arlen", "crow", "black", 44, "she"),
    Person("Karl", "Moss", "shepherd", "Corvel", "sheep", "white", 66, "he"),
    Person("Ruth", "Lindqvist", "doctor", "Galt", "cat", "white", 51, "she"),
    Person("Hugo", "Penn", "miner", "Dallow", "mule", "grey", 39, "he"),
]

_NUMBER_WORDS = {
    20: "twenty",
    30: "thirty",
    40: "forty",
    50: "fifty",
    60: "sixty",
    70: "seventy",
}


def _age_words(age: int) -> str:
    tens, ones = divmod(age, 10)
    small = ["", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    return _NUMBER_WORDS[tens * 10] + (f"-{small[ones]}" if ones else "")


def _city(name: str) -> City:
    return next(c for c in CITIES if c.name == name)


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _city_facts(c: City, rng: random.Random) -> list[str]:
    neighbours = [o.name for o in CITIES if o.water == c.water and o.name != c.name]
    facts = [
        rng.choice(
            [
                f"The city of {c.name} lies on {c.water}.",
                f"{c.name} is a city on {c.water}.",
                f"{c.name} was built beside {c.water}.",
                f"Boats leave {c.name} on {c.water} every morning.",
                f"{c.name} sits by {c.water}, and its people fish there.",
            ]
        ),
        rng.choice(
            [
                f"{c.name} is in the region of {c.region}.",
                f"It belongs to the region of {c.region}.",
                f"The region of {c.region} is the home of {c.name}.",
                f"{c.name}, in the region of {c.region}, is a busy city.",
            ]
        ),
        rng.choice(
            [
                f"The people of {c.name} make {c.goods}.",
                f"{c.name} is famous for its {c.goods}!",
                f"What does {c.name} sell? It sells {c.goods}.",
                f"Everyone knows the {c.goods} of {c.name}.",
                f"{c.name} sends its {c.goods} to the other cities by road.",
                f"Buy {c.goods} in {c.name}, and you buy the best.",
            ]
        ),
        rng.choice(
            [
                f"{c.name} was founded in the year {c.founded}.",
                f"The city is old: it was founded in {c.founded}.",
                f"When was {c.name} founded? In the year {c.founded}.",
                f"In {c.founded}, the first families came to {c.name}.",
                f"{c.name}, founded in {c.founded}, is older than many cities.",
            ]
        ),
        rng.choice(
            [
                f"The pride of {c.name} is {c.landmark}.",
                f"Visitors to {c.name} always see {c.landmark}.",
                f"In the middle of {c.name} stands {c.landmark}.",
            ]
        ),
        rng.choice(
            [
                f"The weather in {c.name} is often {c.weather}.",
                f"{c.name} is a {c.weather} place; people say so every day.",
                f"Is {c.name} {c.weather}? Yes, most of the year.",
                f"It is {c.weather} in {c.name} today, as on most days.",
                f"{c.name} has {c.weather} days in every season.",
            ]
        ),
    ]
    if neighbours:
        other = rng.choice(neighbours)
        facts.append(
            rng.choice(
                [
                    f"{other} lies on the same water as {c.name}.",
                    f"A boat can go from {c.name} to {other} on {c.water}.",
                ]
            )
        )
    return facts


def _person_facts(p: Person, rng: random.Random) -> list[str]:
    c = _city(p.city)
    they = _cap(p.pronoun)
    their = "her" if p.pronoun == "she" else "his"
    return [
        rng.choice(
            [
                f"{p.name} is a {p.job} from {p.city}.",
                f"{p.name} works as a {p.job} in {p.city}.",
                f"In {p.city} lives {p.name}, the {p.job}.",
                f"{p.name}, the {p.job}, is known all over {p.city}.",
                f"{p.name} lives in {p.city} and works there as a {p.job}.",
            ]
        ),
        rng.choice(
            [
                f"{they} keeps a {p.colour} {p.pet}.",
                f"{they} has a {p.colour} {p.pet} at home.",
                f"{p.first}'s {p.pet} is {p.colour}.",
                f"{p.first} and {their} {p.colour} {p.pet} go out together every day.",
                f"A {p.colour} {p.pet} lives with {p.name}.",
            ]
        ),
        rng.choice(
            [
                f"{they} is {_age_words(p.age)} years old.",
                f"{p.first} is {p.age} years old.",
                f"How old is {p.first}? {they} is {_age_words(p.age)}.",
            ]
        ),
        rng.choice(
            [
                f"Every morning {p.pronoun} walks past {c.landmark}.",
                f"{their.capitalize()} house is close to {c.landmark}.",
                f"{p.first} likes the {c.goods} of {p.city}; who does not?",
            ]
        ),
    ]


def _profile(rng: random.Random) -> str:
    c = rng.choice(CITIES)
    facts = _city_facts(c, rng)
    rng.shuffle(facts)
    first = facts[: len(facts) // 2]
    second = facts[len(facts) // 2 :]
    residents = [p for p in PEOPLE if p.city == c.name]
    lines = [f"{p.name}: {p.job}, {p.age} years old." for p in residents]
    people = (f"People of {c.name}:\n" + "\n".join(lines)) if lines else f"Few people live in {c.name}."
    return "\n\n".join([f"About {c.name}.", " ".join(first), " ".join(second), people])


def _biography(rng: random.Random) -> str:
    p = rng.choice(PEOPLE)
    c = _city(p.city)
    facts = _person_facts(p, rng)
    city = _city_facts(c, rng)
    rng.shuffle(city)
    friend = rng.choice([o for o in PEOPLE if o is not p])
    return "\n\n".join(
        [
            " ".join(facts),
            f"{_cap(p.pronoun)} lives in {p.city}. " + " ".join(city[:3]),
            rng.choice(
                [
                    f"{p.first} has a friend called {friend.name}, a {friend.job} from {friend.city}.",
                    f"Sometimes {p.first} writes to {friend.name} in {friend.city}; the letters are long.",
                ]
            ),
        ]
    )


def _journey(rng: random.Random) -> str:
    p = rng.choice(PEOPLE)
    start = _city(p.city)
    end = rng.choice([c for c in CITIES if c is not start])
    by_boat = end.water == start.water
    travel = (
        f"Both cities lie on {start.water}, so {p.pronoun} took a boat."
        if by_boat
        else f"{start.name} lies on {start.water} but {end.name} lies on {end.water}, so {p.pronoun} walked."
    )
    return "\n\n".join(
        [
            f"{p.name} travelled from {start.name} to {end.name}. {travel}",
            rng.choice(
                [
                    f"On the way {p.pronoun} thought of {start.landmark}. "
                    f"Would {p.pronoun} see it again soon?",
                    f"The road was long! {_cap(p.pronoun)} carried {start.goods} from {start.name} to sell.",
                ]
            ),
            " ".join(_city_facts(end, rng)[:4]),
            rng.choice(
                [
                    f"In {end.name} {p.first} bought {end.goods}; "
                    f"then {p.pronoun} went home to {start.name}.",
                    f"{p.first} liked {end.name}: the {end.goods} was good and {end.landmark} was beautiful.",
                ]
            ),
        ]
    )


def _questions(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(4, 7)):
        if rng.random() < 0.5:
            c = rng.choice(CITIES)
            q, a = rng.choice(
                [
                    (f"On which water does {c.name} lie?", f"On {c.water}."),
                    (f"What is {c.name} known for?", f"Its {c.goods}."),
                    (f"When was {c.name} founded?", f"In {c.founded}."),
                    (f"What stands in {c.name}?", f"{_cap(c.landmark)}."),
                    (f"Which region is {c.name} in?", f"{_cap(c.region)}."),
                    (f"Will it be {c.weather} in {c.name} tomorrow?", "Maybe. It often is."),
                    (f"Is {c.name} older than the river?", "Maybe, but nobody can tell."),
                    (f"Is {c.name} known for its {c.goods}?", "Yes, everyone knows it."),
                    (f"Does {c.name} lie by the sea?", f"No, on {c.water}."),
                ]
            )
        else:
            p = rng.choice(PEOPLE)
            q, a = rng.choice(
                [
                    (f"Where does {p.name} live?", f"In {p.city}."),
                    (f"What is {p.first}'s job?", f"{_cap(p.pronoun)} is a {p.job}."),
                    (f"What pet does {p.name} keep?", f"A {p.colour} {p.pet}."),
                    (f"How old is {p.name}?", f"{p.age}."),
                    (f"Does {p.name} live in {p.city}?", f"Yes, {p.first} does."),
                    (f"Is {p.first} a {p.job}?", "Yes."),
                    (f"Does {p.first} keep a {p.colour} {p.pet}?", "Yes, and it is well loved."),
                    (f"Is {p.first} rich?", "Maybe. Nobody knows."),
                    (f"{p.name} lives in {p.city}: true or false?", "That is true."),
                    (f"{p.name} keeps a dragon: true or false?", "That is false."),
                    (f"Is {p.first} tall or short?", f"{_cap(p.pronoun)} is neither tall nor short."),
                    (f"Is {p.first} young or old?", f"{_cap(p.pronoun)} is neither, they say."),
                    (f"Does {p.name} live on the moon?", f"No, {p.first} lives in {p.city}."),
                    (f"Is {p.first} a king?", f"No. {_cap(p.pronoun)} is a {p.job}."),
                ]
            )
        lines.append(f"Q: {q}\nA: {a}")
    return "Questions and answers.\n\n" + "\n\n".join(lines)


def _letter(rng: random.Random) -> str:
    writer, reader = rng.sample(PEOPLE, 2)
    c = _city(writer.city)
    facts = _city_facts(c, rng)
    rng.shuffle(facts)
    return "\n\n".join(
        [
            f"Dear {reader.first},",
            f"I write to you from {c.name}! " + " ".join(facts[:3]),
            rng.choice(
                [
                    f"My {writer.pet} is well; it is still {writer.colour}. How is life in {reader.city}?",
                    f"Work is good: a {writer.job} is never idle here. Is the weather in {reader.city} "
                    f"{_city(reader.city).weather} again?",
                ]
            ),
            f"Yours,\n{writer.name}",
        ]
    )


def _market(rng: random.Random) -> str:
    c = rng.choice(CITIES)
    sellers = rng.sample(CITIES, 4)
    items = [f"- {s.goods} from {s.name}, {rng.randint(2, 40)} coins" for s in sellers]
    return "\n\n".join(
        [
            f"Market day in {c.name}.",
            "Goods for sale:\n" + "\n".join(items),
            rng.choice(
                [
                    f"The best seller was the {c.goods} of {c.name}; it always is.",
                    f"Nobody sold more than the makers of {c.goods}. Why? Because {c.name} is famous for it.",
                ]
            ),
        ]
    )


_KINDS = [_profile, _biography, _journey, _questions, _letter, _market]


def builtin_documents(num_documents: int = 400, seed: int = 0) -> list[str]:
    """The documents of the built-in corpus (deterministic for a given seed)."""
    rng = random.Random(seed)
    documents = []
    for i in range(num_documents):
        # a few paragraphs: one section of each kind in turn, then two more of random kinds
        kinds = [_KINDS[i % len(_KINDS)], rng.choice(_KINDS), rng.choice(_KINDS)]
        documents.append("\n\n".join(kind(rng) for kind in kinds))
    return documents


def write_builtin_corpus(directory: str | Path, num_documents: int = 400, seed: int = 0) -> list[str]:
    """Write the built-in corpus as text files of form-feed separated documents; return their paths.

    Runs that start together share these files: each file is written atomically, and only when it
    does not already hold the same text, so no run ever reads a half-written file and the files
    (and their modification times, which the content-hash memo trusts) stay as they are.
    """
    out = Path(directory)
    documents = builtin_documents(num_documents, seed)
    paths = []
    for k, start in enumerate(range(0, len(documents), DOCUMENTS_PER_FILE)):
        path = out / f"builtin_{k:02d}.txt"
        data = (DOCUMENT_SEPARATOR.join(documents[start : start + DOCUMENTS_PER_FILE]) + "\n").encode("utf-8")
        if not _holds(path, data):
            atomic_write(path, lambda f, data=data: f.write(data))
        paths.append(str(path))
    return paths


def _holds(path: Path, data: bytes) -> bool:
    try:
        return path.stat().st_size == len(data) and path.read_bytes() == data
    except FileNotFoundError:
        return False

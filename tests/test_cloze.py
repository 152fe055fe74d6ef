"""Golden tests of the SuperGLUE cloze encoding (official `tasks/superglue/pvp.py`).

Expected sequences are built here from the pattern text of the official `pvp.py`, typed out independently of
`glm_lightning.cloze.patterns`: each expected part is encoded on its own and the ids concatenated.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from datamodules.superglue import read_split
from glm_lightning.cloze import (
    MASK,
    PATTERNS,
    Pattern,
    answer_candidates,
    augment_training_examples,
    encode_example,
)
from glm_lightning.tokenizer import GLMTokenizer, train_sentencepiece

L = 128
M = "<MASK>"  # marks the mask part in expected part lists

_VERBALIZER_WORDS = "Yes No Maybe true false neither True False".split()


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory, make_text) -> GLMTokenizer:
    """Sentencepiece model on which every verbalizer of §7.3 is a single token."""
    root = tmp_path_factory.mktemp("cloze_spm")
    text = make_text() + "Is it true? Yes, No or Maybe. Sense (1) (a) b 2 neither False True\n" * 20
    (root / "corpus.txt").write_text(text, encoding="utf-8")
    symbols = ["\u2581" + w for w in _VERBALIZER_WORDS] + ["b", "2"]
    model = train_sentencepiece(
        [str(root / "corpus.txt")], 600, str(root / "cloze"),
        user_defined_symbols=symbols, character_coverage=1.0, hard_vocab_limit=False,
    )
    return GLMTokenizer.from_sentencepiece(model)


def _ids(tok: GLMTokenizer, parts: list[str]) -> tuple[list[int], int]:
    """[CLS] + parts + eos, and the index of the mask in it."""
    ids = [tok.cls_id]
    mask_at = -1
    for part in parts:
        if part == M:
            mask_at = len(ids)
            ids.append(tok.mask_id)
        else:
            ids.extend(tok.encode(part))
    return ids + [tok.eos_id], mask_at


NLI = {"idx": 0, "premise": "The cat sat on the mat.", "hypothesis": "A cat sat!", "label": "entailment"}
CB_EX = {**NLI, "label": "neutral"}
BOOLQ = {"idx": 0, "passage": "The river is long.", "question": "is the river long", "label": True}
WIC = {"idx": 0, "word": "bank", "sentence1": "The bank was closed.", "sentence2": "He sat by the bank.",
       "start1": 4, "end1": 8, "start2": 14, "end2": 18, "label": False}
MULTIRC = {"idx": (0, 0, 0), "passage": "The city has a harbor. ", "question": "What does the city have?",
           "answer": "A harbor", "label": True}

H, P = "A cat sat", "The cat sat on the mat."
RTE_GOLDEN = {
    0: ['"', H, '" ?', M, ",", ' "', P, '"'],
    1: [H, "?", M, ",", " " + P],
    2: ['"', H, '" ?', M, '. "', P, '"'],
    3: [H, "?", M, ".", " " + P],
    4: [P, " question:", " " + H, " True or False?", " answer:", M],
}
PSG, Q = "The river is long.", "is the river long"
BOOLQ_GOLDEN = {
    0: [PSG, " Question:", " " + Q, "? Answer:", M, "."],
    2: [PSG, " Based on the previous passage,", " " + Q, "?", M, "."],
    4: ["Based on the following passage", " " + Q, "?", M, ".", " " + PSG],
}
S1, S2 = "The bank was closed.", "He sat by the bank."
WIC_GOLDEN = {
    0: [f'"{S1}" / "{S2}"', ' Similar sense of "bank"?', M, "."],
    1: [S1, " " + S2, " Does bank have the same meaning in both sentences?", M],
    2: ["bank", " .", ' Sense (1) (a) "', S1, '"', " (", M, ') "', S2, '"'],
}
MP, MQ, MA = "The city has a harbor", "What does the city have", "A harbor"
MULTIRC_GOLDEN = {
    0: [MP, ".", " Question:", f" {MQ}?", " Is it", " " + MA, "?", M, "."],
    1: [MP, ".", " Question:", " " + MQ, "?", ' Is the correct answer "', MA, '"?', M, "."],
    2: [MP, ". Based on the previous passage,", " " + MQ, "?", ' Is "', MA, '" a correct answer?', M, "."],
    3: [MP, " " + MQ, "- [", M, "]", MA],
    4: [MP, ".", " Question:", " " + MQ, "?", " " + MA, "?", M, "."],
}

SINGLE_TOKEN_CASES = (
    [("RTE", pid, NLI, parts, (" true", " false") if pid == 4 else (" Yes", " No"), 0)
     for pid, parts in RTE_GOLDEN.items()]
    + [("AX-g", 0, NLI, RTE_GOLDEN[0], (" Yes", " No"), 0)]
    + [("CB", pid, CB_EX, RTE_GOLDEN[pid], (" Yes", " No", " Maybe"), 2) for pid in range(4)]
    + [("CB", 4, CB_EX, [P, " question:", " A cat sat!", " true, false or neither?", " answer:", M],
        (" true", " false", " neither"), 2)]
    + [("BoolQ", pid + odd, BOOLQ, parts, (" false", " true") if odd else (" No", " Yes"), 1)
       for pid, parts in BOOLQ_GOLDEN.items() for odd in (0, 1)]
    + [("WiC", pid, WIC, parts, ("2", "b") if pid == 2 else (" No", " Yes"), 0)
       for pid, parts in WIC_GOLDEN.items()]
    + [("MultiRC", pid, MULTIRC, parts, (" False", " True") if pid == 3 else (" No", " Yes"), 1)
       for pid, parts in MULTIRC_GOLDEN.items()]
)


@pytest.mark.parametrize(("task", "pid", "example", "parts", "verbalizers", "label"), SINGLE_TOKEN_CASES,
                         ids=[f"{c[0]}-p{c[1]}" for c in SINGLE_TOKEN_CASES])
def test_single_token_golden(tok, task, pid, example, parts, verbalizers, label):
    out = encode_example(task, example, tok, pattern_id=pid, max_seq_length=L)
    context, mask_at = _ids(tok, parts)
    sep = len(context)
    assert out["input_ids"].shape == (1, L) and out["position_ids"].shape == (1, 2, L)
    assert out["input_ids"][0, :sep].tolist() == context
    assert out["sep"].tolist() == [sep]
    # Part B: one [sop] at the mask position, intra-span position 1, scored by logit_mask
    assert out["input_ids"][0, sep] == tok.sop_id
    assert out["position_ids"][0, 0].tolist()[: sep + 1] == [*range(sep), mask_at]
    assert out["position_ids"][0, 1].tolist()[: sep + 1] == [0] * sep + [1]
    assert out["logit_mask"][0].tolist() == [0] * sep + [1] + [0] * (L - sep - 1)
    assert not out["target_ids"].any()
    # padding with the pad (= eos) id, positions 0
    assert (out["input_ids"][0, sep + 1:] == tok.pad_id).all()
    assert not out["position_ids"][0, :, sep + 1:].any()
    assert out["verbalizer_ids"].tolist() == [tok.encode(v)[0] for v in verbalizers]
    assert all(len(tok.encode(v)) == 1 for v in verbalizers)
    assert out["label"] == label


def test_labels_map_to_the_right_verbalizer(tok):
    yes = tok.encode(" Yes")[0]
    rte = encode_example("RTE", NLI, tok, pattern_id=0, max_seq_length=L)
    assert rte["verbalizer_ids"][rte["label"]] == yes  # entailment -> " Yes"
    rte_no = encode_example("RTE", {**NLI, "label": "not_entailment"}, tok, pattern_id=0, max_seq_length=L)
    assert rte_no["verbalizer_ids"][rte_no["label"]] == tok.encode(" No")[0]
    boolq = encode_example("BoolQ", BOOLQ, tok, pattern_id=0, max_seq_length=L)
    assert boolq["verbalizer_ids"][boolq["label"]] == yes  # True -> " Yes"
    wic = encode_example("WiC", {**WIC, "label": True}, tok, pattern_id=2, max_seq_length=L)
    assert wic["verbalizer_ids"][wic["label"]] == tok.encode("b")[0]
    unlabeled = encode_example("CB", {**NLI, "label": None}, tok, pattern_id=0, max_seq_length=L)
    assert unlabeled["label"] == 0


def test_every_pattern_id_of_the_spec_exists():
    expected = {"RTE": 5, "AX-b": 5, "AX-g": 5, "CB": 5, "BoolQ": 6, "WiC": 3, "MultiRC": 5, "COPA": 2,
                "WSC": 3, "ReCoRD": 1}
    assert {task: sorted(p) for task, p in PATTERNS.items()} == {
        task: list(range(n)) for task, n in expected.items()}


def test_unknown_pattern_id_is_an_error(tok):
    with pytest.raises(ValueError, match="available"):
        encode_example("RTE", NLI, tok, pattern_id=7, max_seq_length=L)


def test_verbalizer_must_be_single_token(tok, monkeypatch):
    bad = Pattern(("{premise}", MASK), verbalizers=(" Yes", " zebra castle"))
    monkeypatch.setitem(PATTERNS["RTE"], 9, bad)
    with pytest.raises(ValueError, match="' zebra castle'"):
        encode_example("RTE", NLI, tok, pattern_id=9, max_seq_length=L)
    monkeypatch.setitem(PATTERNS["RTE"], 9, Pattern(("{premise}", MASK), verbalizers=(" Yes", "[MASK]")))
    with pytest.raises(ValueError, match=r"'\[MASK\]'"):
        encode_example("RTE", NLI, tok, pattern_id=9, max_seq_length=L)


def _multi_token_check(tok, out, parts, candidates, label):
    context, mask_at = _ids(tok, parts)
    sep = len(context)
    assert out["input_ids"].shape == (len(candidates), L)
    assert out["position_ids"].shape == (len(candidates), 2, L)
    assert "verbalizer_ids" not in out
    for row, cand in enumerate(candidates):
        answer = tok.encode(" " + cand)
        m = len(answer)
        assert out["sep"][row] == sep
        assert out["input_ids"][row, :sep].tolist() == context
        assert out["input_ids"][row, sep: sep + m + 1].tolist() == [tok.sop_id, *answer]
        assert out["target_ids"][row, sep: sep + m + 1].tolist() == [*answer, tok.eop_id]
        assert out["position_ids"][row, 0, sep: sep + m + 1].tolist() == [mask_at] * (m + 1)
        rest = [0] * (L - sep - m - 1)
        assert out["position_ids"][row, 1].tolist() == [0] * sep + list(range(1, m + 2)) + rest
        assert out["logit_mask"][row].tolist() == [0] * sep + [1] * (m + 1) + rest
        assert (out["input_ids"][row, sep + m + 1:] == tok.pad_id).all()
        assert not out["target_ids"][row, :sep].any()
    assert out["label"] == label


COPA = {"idx": 0, "premise": "My body cast a shadow over the grass.", "choice1": "The sun was rising.",
        "choice2": "The grass was cut.", "question": "cause", "label": 0}


@pytest.mark.parametrize("pid", [0, 1])
@pytest.mark.parametrize("question", ["cause", "effect"])
def test_copa_golden(tok, pid, question):
    example = {**COPA, "question": question, "label": 1}
    joiner = " because" if question == "cause" else ", so"
    c1, c2, prem = "the sun was rising", "the grass was cut", " My body cast a shadow over the grass"
    if pid == 0:
        parts = ['"', c1, '" or "', c2, '"?', prem, joiner, M, "."]
    else:
        parts = [c1, " or", " " + c2, "?", prem, joiner, M, "."]
    out = encode_example("COPA", example, tok, pattern_id=pid, max_seq_length=L)
    _multi_token_check(tok, out, parts, [c1, c2], label=1)


WSC = {"idx": 0, "text": "The teacher asked the student because she was curious.",
       "span1_text": "The teacher", "span1_index": 0, "span2_text": "she", "span2_index": 6, "label": True}


@pytest.mark.parametrize("pid", [0, 1, 2])
def test_wsc_golden(tok, pid):
    text = "The teacher asked the student because *she* was curious."
    prompt = {
        0: [" The pronoun '*she*' refers to"],
        1: [" In the previous sentence, the pronoun '*she*' refers to"],
        2: [" Question: In the passage above, what does the pronoun '*she*' refer to?", " Answer:"],
    }[pid]
    example = {**WSC, "candidates": ["the student", "The teacher", "the student"]}
    out = encode_example("WSC", example, tok, pattern_id=pid, max_seq_length=L)
    _multi_token_check(tok, out, [text, *prompt, M, "."], ["The teacher", "the student"], label=0)


def test_record_golden(tok):
    example = {"idx": (0, 0), "passage": "- The famous painter visits Zurich.",
               "query": "The @placeholder painter writes a letter.",
               "entities": ["Zurich", "painter", "famous"], "label": ["famous"]}
    out = encode_example("ReCoRD", example, tok, pattern_id=0, max_seq_length=L)
    parts = [example["passage"], " The", M, " painter writes a letter."]
    _multi_token_check(tok, out, parts, ["Zurich", "painter", "famous"], label=2)


def test_truncation_cuts_the_longer_shortenable_segment(tok):
    premise = " ".join(["the quiet river crosses the ancient valley"] * 6) + "."
    example = {**NLI, "premise": premise}
    h_ids, p_ids = tok.encode("A cat sat"), tok.encode(premise)
    n = lambda text: len(tok.encode(text))  # noqa: E731
    # [CLS] " h " ? [MASK] , " p " eos [sop]
    full = 1 + n('"') + len(h_ids) + n('" ?') + 1 + n(",") + n(' "') + len(p_ids) + n('"') + 1 + 1
    max_len = full - 10
    out = encode_example("RTE", example, tok, pattern_id=0, max_seq_length=max_len)
    context, _ = _ids(tok, ['"', "A cat sat", '" ?', M, ",", ' "'])
    expected = context[:-1] + p_ids[:-10] + tok.encode('"') + [tok.eos_id, tok.sop_id]
    assert out["input_ids"][0].tolist() == expected  # exactly full: no padding left
    assert out["sep"][0] == max_len - 1


def test_truncation_alternates_between_segments(tok):
    # WiC p1: both sentences shortenable in segment A; RTE p1 splits them across A and B.
    hyp = "the famous painter repairs a bridge " * 3
    premise = "the famous painter repairs a bridge " * 3
    example = {**NLI, "hypothesis": hyp.strip(), "premise": premise.strip()}
    a, b = tok.encode(hyp.strip()), tok.encode(" " + premise.strip())
    full = 1 + len(a) + 1 + 1 + len(tok.encode(",")) + len(b) + 1 + 1
    la, lb = len(a), len(b)
    for _ in range(7):  # greedy: cut from A only while A has strictly more shortenable tokens
        if la > lb:
            la -= 1
        else:
            lb -= 1
    out = encode_example("RTE", example, tok, pattern_id=1, max_seq_length=full - 7)
    expected = [tok.cls_id, *a[:la], *tok.encode("?"), tok.mask_id, *tok.encode(","), *b[:lb], tok.eos_id]
    assert out["input_ids"][0, : len(expected)].tolist() == expected


def test_multi_token_rows_are_truncated_per_candidate(tok):
    passage = " ".join(["the curious student reads a strange story"] * 8)
    example = {"idx": (0, 0), "passage": passage, "query": "The @placeholder learns.",
               "entities": ["story", "the curious student reads a strange story"], "label": ["story"]}
    out = encode_example("ReCoRD", example, tok, pattern_id=0, max_seq_length=64)
    cands = answer_candidates("ReCoRD", example)
    lengths = [1 + int(s) + len(tok.encode(" " + c)) for s, c in zip(out["sep"], cands, strict=True)]
    assert lengths == [64, 64]  # each row filled exactly; the longer answer leaves less context
    assert out["sep"][0] > out["sep"][1]
    assert (out["input_ids"][:, 0] == tok.cls_id).all()


def test_too_long_without_shortenable_text_is_an_error(tok):
    with pytest.raises(ValueError, match="max_seq_length"):
        encode_example("RTE", NLI, tok, pattern_id=0, max_seq_length=8)


def test_copa_mirroring():
    examples = [COPA, {**COPA, "idx": 1, "label": 1}]
    out = augment_training_examples("COPA", examples)
    assert out[:2] == examples
    assert [(e["choice1"], e["choice2"], e["label"]) for e in out[2:]] == [
        (COPA["choice2"], COPA["choice1"], 1), (COPA["choice2"], COPA["choice1"], 0)]


def test_wsc_training_keeps_positives_with_candidate_chunks(tok):
    words = "river city village teacher student mountain garden window bridge forest ocean"
    negatives = [f"the {w}" for w in words.split()]
    examples = [
        {**WSC, "candidates": negatives + ["the river"]},
        {**WSC, "idx": 1, "label": False, "candidates": negatives},
        {**WSC, "idx": 2},
    ]
    out = augment_training_examples("WSC", examples)
    assert [e["idx"] for e in out] == [0, 0, 2]
    assert out[0]["candidates"] == negatives[:9]
    assert out[1]["candidates"] == negatives[9:] + negatives[:7]  # last chunk wraps around
    assert answer_candidates("WSC", out[2]) == ["The teacher"]
    enc = encode_example("WSC", out[1], tok, pattern_id=0, max_seq_length=L)
    assert enc["input_ids"].shape[0] == 10 and enc["label"] == 0


def test_record_training_candidates(tok):
    entities = [f"entity{i}" for i in range(20)]
    example = {"idx": (0, 0), "passage": "p", "query": "@placeholder", "entities": entities,
               "label": ["entity3", "entity7"]}
    sources = [example, {**example, "idx": (0, 1), "label": ["entity1"]}]
    out = augment_training_examples("ReCoRD", sources)
    assert [e["label"] for e in out] == [["entity3"], ["entity7"], ["entity1"]]
    golds = [example["label"], example["label"], ["entity1"]]
    for ex, gold in zip(out, golds, strict=True):
        cands = answer_candidates("ReCoRD", ex)
        assert len(cands) == 10 and cands[0] == ex["label"][0] and len(set(cands)) == 10
        assert not set(cands[1:]) & set(gold)  # the other candidates are never gold answers
    assert answer_candidates("ReCoRD", out[0])[1:] != entities[:9]  # shuffled before sampling
    assert out == augment_training_examples("ReCoRD", sources)  # seeded
    enc = encode_example("ReCoRD", out[1], tok, pattern_id=0, max_seq_length=L)
    assert enc["input_ids"].shape == (10, L) and enc["label"] == 0
    small = augment_training_examples("ReCoRD", [{**example, "entities": entities[:4]}])
    assert answer_candidates("ReCoRD", small[0]) == ["entity3", "entity0", "entity1", "entity2"]
    # evaluation: every entity is a candidate, the label points at a gold one
    assert answer_candidates("ReCoRD", example) == entities


def test_classifier_mode(tok):
    out = encode_example("RTE", NLI, tok, pattern_id=0, max_seq_length=L, mode="classifier")
    ids = [tok.cls_id, *tok.encode(NLI["premise"]), tok.sep_id, *tok.encode(NLI["hypothesis"]), tok.eos_id]
    n = len(ids)
    assert out["input_ids"][0].tolist() == ids + [tok.pad_id] * (L - n)
    assert out["sep"].tolist() == [n]  # all bidirectional
    assert out["position_ids"][0, 0].tolist() == list(range(n)) + [0] * (L - n)
    assert not out["position_ids"][0, 1].any() and not out["logit_mask"].any()
    assert out["label"] == 0 and "verbalizer_ids" not in out
    copa = encode_example("COPA", {**COPA, "label": 1}, tok, pattern_id=0, max_seq_length=L,
                          mode="classifier")
    assert copa["input_ids"].shape == (2, L) and copa["label"] == 1
    short = encode_example("BoolQ", BOOLQ, tok, pattern_id=0, max_seq_length=8, mode="classifier")
    assert short["sep"].tolist() == [8] and short["input_ids"][0, -1] == tok.eos_id


def test_examples_from_read_split(tok, tmp_path: Path):
    wsc = {"idx": 3, "text": "Mark told Pete many lies about himself, which Pete included in his book.",
           "target": {"span1_text": "Pete", "span1_index": 2, "span2_text": "his", "span2_index": 12},
           "label": False}
    record = {"idx": 5, "passage": {"text": "The museum opens.\n@highlight\nThe city is quiet.",
                                    "entities": [{"start": 4, "end": 9}, {"start": 33, "end": 36}]},
              "qas": [{"idx": 9, "query": "The @placeholder is quiet.", "answers": [{"text": "city"}]}]}
    for task, obj in (("WSC", wsc), ("ReCoRD", record)):
        (tmp_path / task).mkdir()
        (tmp_path / task / "val.jsonl").write_text(json.dumps(obj) + "\n")
    (ex,) = read_split("WSC", str(tmp_path), "val")
    out = encode_example("WSC", ex, tok, pattern_id=2, max_seq_length=L)
    marked = tok.encode("Mark told Pete many lies about himself, which Pete included in *his* book.")
    assert out["input_ids"][0, 1: 1 + len(marked)].tolist() == marked
    assert out["input_ids"].shape[0] == 1 and out["label"] == 0
    (ex,) = read_split("ReCoRD", str(tmp_path), "val")
    out = encode_example("ReCoRD", ex, tok, pattern_id=0, max_seq_length=L)
    assert answer_candidates("ReCoRD", ex) == ["city", "museum"] and out["label"] == 0  # sorted
    assert out["input_ids"].dtype == np.int64 and out["input_ids"].shape == (2, L)

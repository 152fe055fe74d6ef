"""Generative WSC, the official path when the data has no negative candidates: the encoding equals
the official LM-style sample (``WscPVP.encode`` with ``--loss-func cross_entropy`` and
``build_input_from_ids``, re-stated below from the official code), the evaluation rule (True iff the
argmax reproduces span1_text and [eop] at every target position), and a finetuning run that learns
a crafted referent rule and predicts both True and False."""

from __future__ import annotations

import random
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from datamodules.cloze_collate import cloze_collate
from datamodules.superglue import read_split
from glm_lightning.cloze import encode_example
from glm_lightning.model import GLMConfig
from glm_lightning.modules.cloze import GLMClozeModule, greedy_reproduces
from glm_lightning.tokenizer import GLMTokenizer, train_sentencepiece

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PROMPTS = {
    0: [" The pronoun '*{p}*' refers to", "<M>", "."],
    1: [" In the previous sentence, the pronoun '*{p}*' refers to", "<M>", "."],
    2: [" Question: In the passage above, what does the pronoun '*{p}*' refer to?", " Answer:", "<M>", "."],
}


def official_lm_sample(tok: GLMTokenizer, example: dict, pattern_id: int, max_seq_length: int) -> dict:
    """The official sample, step by step: parts tokenized one by one, the (shortenable) text cut
    from its end until [CLS] + parts + eos + answer fits, then ``build_input_from_ids``."""
    words = example["text"].split()
    words[example["span2_index"]] = f"*{words[example['span2_index']]}*"
    text = tok.encode(" ".join(words))
    prompt = [[tok.mask_id] if part == "<M>" else tok.encode(part.format(p=example["span2_text"]))
              for part in PROMPTS[pattern_id]]
    answer = tok.encode(" " + example["span1_text"]) + [tok.eop_id]
    while 2 + len(text) + sum(map(len, prompt)) + len(answer) > max_seq_length:
        text = text[:-1]
    ids = [tok.cls_id, *text, *(i for part in prompt for i in part), tok.eos_id]
    sep = len(ids)
    mask_position = len(ids) - ids[::-1].index(tok.mask_id) - 1
    ids += [tok.sop_id, *answer[:-1]]
    position = list(range(sep)) + [mask_position] * len(answer)
    block = [0] * sep + list(range(1, len(answer) + 1))
    target = [0] * sep + answer
    loss = [0] * sep + [1] * len(answer)
    pad = max_seq_length - len(ids)
    return {"text": ids + [tok.eos_id] * pad, "position": [position + [0] * pad, block + [0] * pad],
            "attention_mask": sep, "target": target + [0] * pad, "loss_mask": loss + [0] * pad,
            "label": int(example["label"] is True)}


def assert_equals_official(out: dict, official: dict) -> None:
    assert out["input_ids"].tolist() == [official["text"]]
    assert out["position_ids"].tolist() == [official["position"]]
    assert out["sep"].tolist() == [official["attention_mask"]]
    assert out["target_ids"].tolist() == [official["target"]]
    assert out["logit_mask"].tolist() == [official["loss_mask"]]
    assert out["label"] == official["label"]


EXAMPLE = {"idx": 0, "text": "The teacher asked the student because she was curious.",
           "span1_text": "The teacher", "span1_index": 0, "span2_text": "she", "span2_index": 6,
           "label": True, "candidates": ["the student"]}


@pytest.mark.parametrize("pattern_id", [0, 1, 2])
def test_generative_row_equals_the_official_lm_sample(tokenizer, pattern_id):
    for example in (EXAMPLE, {**EXAMPLE, "label": False, "span1_text": "the student"}):
        natural = sum(official_lm_sample(tokenizer, example, pattern_id, 512)["loss_mask"]) + \
            official_lm_sample(tokenizer, example, pattern_id, 512)["attention_mask"]
        for max_seq_length in (natural + 3, natural - 4):  # padded, and cut from the end of the text
            out = encode_example("WSC", example, tokenizer, pattern_id=pattern_id,
                                 max_seq_length=max_seq_length, wsc_mode="generative")  # negatives unused
            assert_equals_official(out, official_lm_sample(tokenizer, example, pattern_id, max_seq_length))
    candidates = encode_example("WSC", EXAMPLE, tokenizer, pattern_id=0, max_seq_length=256)
    assert candidates["input_ids"].shape[0] == 2  # the default layout scores span1 and the negative


@pytest.mark.data
@pytest.mark.parametrize("max_seq_length", [128, 48])
def test_generative_rows_on_real_dev_examples(max_seq_length):
    vocab = DATA / "vocab" / "bert-base-uncased" / "vocab.txt"
    if not (DATA / "superglue" / "WSC" / "val.jsonl").exists() or not vocab.exists():
        pytest.skip(f"real WSC dev set or BERT vocabulary not found under {DATA}")
    tok = GLMTokenizer.from_wordpiece(str(vocab))
    examples = read_split("WSC", str(DATA / "superglue"), "val")
    assert sum(ex["label"] for ex in examples) == 38  # positives among the 104 dev examples
    for example in examples[:20]:
        out = encode_example("WSC", example, tok, pattern_id=2, max_seq_length=max_seq_length,
                             wsc_mode="generative")
        assert_equals_official(out, official_lm_sample(tok, example, 2, max_seq_length))


def test_evaluation_rule_on_hand_built_logits():
    V = 6
    targets = torch.tensor([2, 5, 1, 3, 3, 4])  # rows: 0 0 1 1 1 2 (row 3 has no targets)
    rows = torch.tensor([0, 0, 1, 1, 1, 2])
    logits = torch.full((6, V), -1.0)
    logits[torch.arange(6), targets] = 1.0  # every argmax right ...
    logits[3, 0] = 2.0  # ... except the second target of row 1
    logits[5, 4], logits[5, 1] = 0.5, 0.5  # a tie resolves to the lower id: row 2 misses target 4
    assert greedy_reproduces(logits, targets, rows, 4).tolist() == [True, False, False, True]


def test_generative_loss_is_the_token_level_cross_entropy(tokenizer):
    torch.manual_seed(0)
    module = GLMClozeModule(GLMConfig.from_name("tiny", vocab_size=len(tokenizer)), task="WSC",
                            wsc_mode="generative").eval()
    examples = [EXAMPLE, {**EXAMPLE, "idx": 1, "span1_text": "the curious student", "label": False}]
    batch = cloze_collate([{**encode_example("WSC", ex, tokenizer, pattern_id=0, max_seq_length=64,
                                             wsc_mode="generative"), "idx": ex["idx"]} for ex in examples])
    loss, reproduced = module.generative_wsc(batch)
    ids, pos, sep = batch["input_ids"][:, 0], batch["position_ids"][:, 0], batch["sep"][:, 0]
    with torch.no_grad():
        logits = module.model(ids, pos, sep)
    mask = batch["logit_mask"][:, 0].bool()
    expected = torch.nn.functional.cross_entropy(logits[mask], batch["target_ids"][:, 0][mask])
    torch.testing.assert_close(loss, expected)  # mean over the 5 + 6 target tokens of the batch
    targets = batch["target_ids"][:, 0]
    argmax_ok = [int((logits[b][mask[b]].argmax(-1) == targets[b][mask[b]]).all()) for b in (0, 1)]
    assert reproduced.tolist() == argmax_ok


# A crafted WSC: two people, a gendered pronoun; the referent is the one of the pronoun's gender.
FEMALE, MALE = ("Anna", "Mary", "Lisa"), ("Tom", "John", "Paul")
VERBS = ("thanked", "called", "helped", "visited")


def crafted_examples(count: int, seed: int, positives_only: bool = False) -> list[dict]:
    rng = random.Random(seed)
    examples = []
    for i in range(count):
        female, male = rng.choice(FEMALE), rng.choice(MALE)
        first, second = (female, male) if rng.random() < 0.5 else (male, female)
        pronoun = rng.choice(("she", "he"))
        referent, other = (female, male) if pronoun == "she" else (male, female)
        words = f"{first} {rng.choice(VERBS)} {second} because {pronoun} was kind .".split()
        label = positives_only or i % 2 == 0
        span1 = referent if label else other
        examples.append({"idx": i, "text": " ".join(words), "span1_text": span1,
                         "span1_index": words.index(span1), "span2_text": pronoun, "span2_index": 4,
                         "label": label})
    return examples


@pytest.fixture(scope="module")
def crafted_tokenizer(tmp_path_factory) -> GLMTokenizer:
    root = tmp_path_factory.mktemp("wsc_spm")
    lines = [ex["text"] + " The pronoun refers to someone." for ex in crafted_examples(300, 1)]
    (root / "text.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    names = [f"\u2581{name}" for name in (*FEMALE, *MALE)]
    model = train_sentencepiece([str(root / "text.txt")], 400, str(root / "sp"), character_coverage=1.0,
                                user_defined_symbols=names, hard_vocab_limit=False)
    return GLMTokenizer.from_sentencepiece(model)


@pytest.mark.slow
def test_generative_finetuning_learns_the_referent(crafted_tokenizer):
    tok = crafted_tokenizer

    def encode(examples: list[dict]) -> list[dict]:
        return [{**encode_example("WSC", ex, tok, pattern_id=0, max_seq_length=48, wsc_mode="generative"),
                 "idx": ex["idx"]} for ex in examples]

    train = DataLoader(encode(crafted_examples(256, 2, positives_only=True)), batch_size=16, shuffle=True,
                       collate_fn=cloze_collate, generator=torch.Generator().manual_seed(0))
    val = DataLoader(encode(crafted_examples(60, 3)), batch_size=20, collate_fn=cloze_collate)
    L.seed_everything(0)
    config = GLMConfig.from_name("tiny", vocab_size=len(tok), max_sequence_length=64)
    module = GLMClozeModule(config, task="WSC", wsc_mode="generative", lr=3e-3, weight_decay=0.0, warmup=0.05)
    trainer = L.Trainer(max_epochs=50, check_val_every_n_epoch=50, log_every_n_steps=16, accelerator="cpu",
                        logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    before = trainer.validate(module, dataloaders=val, verbose=False)[0]["val/accuracy"]
    trainer.fit(module, train_dataloaders=train, val_dataloaders=val)
    after = trainer.validate(module, dataloaders=val, verbose=False)[0]["val/accuracy"]
    predictions = np.array([p for _, p in module.predictions])
    assert before == pytest.approx(0.5)  # untrained: reproduces nothing, predicts False everywhere
    assert after >= 0.9
    assert 0.3 < predictions.mean() < 0.7  # True for the positives, False for the negatives

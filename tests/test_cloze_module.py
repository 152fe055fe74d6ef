"""GLMClozeModule: cloze scores against independent full forwards, losses, classifier head,
a Trainer run on a separable synthetic task, and the candidate-padding collate function."""

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from datamodules.cloze_collate import cloze_collate
from glm_lightning.model import GLMConfig
from glm_lightning.modules.cloze import GLMClozeModule, cloze_loss

VOCAB = 128
CLS, EOS, SOP, EOP, MASK, TOKEN_A, TOKEN_B = 1, 2, 3, 4, 5, 6, 7
VERBALIZERS = np.array([60, 61])


def tiny_config() -> GLMConfig:
    return GLMConfig.from_name("tiny", vocab_size=VOCAB, embedding_dropout_prob=0.0,
                               attention_dropout_prob=0.0, output_dropout_prob=0.0)


def single_token_example(context: list[int], length: int, label: int, idx: int) -> dict:
    """[CLS] context eos, then [sop] at index sep with dim-1 position = the [MASK] position."""
    part_a = [CLS, *context, EOS]
    sep = len(part_a)
    input_ids = np.full(length, EOS)
    input_ids[:sep] = part_a
    input_ids[sep] = SOP
    position_ids = np.zeros((2, length), dtype=np.int64)
    position_ids[0, :sep] = np.arange(sep)
    position_ids[0, sep] = part_a.index(MASK) if MASK in part_a else sep - 1
    position_ids[1, sep] = 1
    zeros = np.zeros((1, length), dtype=np.int64)
    return {"input_ids": input_ids[None], "position_ids": position_ids[None], "sep": np.array([sep]),
            "target_ids": zeros, "logit_mask": zeros, "label": label, "verbalizer_ids": VERBALIZERS,
            "idx": idx}


def candidate_row(context: list[int], answer: list[int], length: int) -> dict:
    """Inputs [CLS] context eos [sop] a_1..a_m; targets a_1..a_m [eop] at the m + 1 Part-B slots."""
    part_a = [CLS, *context, EOS]
    sep, m = len(part_a), len(answer)
    input_ids = np.zeros(length, dtype=np.int64)
    input_ids[:sep + m + 1] = [*part_a, SOP, *answer]
    target_ids = np.zeros(length, dtype=np.int64)
    target_ids[sep:sep + m + 1] = [*answer, EOP]
    logit_mask = np.zeros(length, dtype=np.int64)
    logit_mask[sep:sep + m + 1] = 1
    position_ids = np.zeros((2, length), dtype=np.int64)
    position_ids[0, :sep] = np.arange(sep)
    position_ids[0, sep:sep + m + 1] = part_a.index(MASK)
    position_ids[1, sep:sep + m + 1] = np.arange(1, m + 2)
    return {"input_ids": input_ids, "position_ids": position_ids, "sep": sep, "target_ids": target_ids,
            "logit_mask": logit_mask}


def multi_token_example(context: list[int], answers: list[list[int]], length: int, label: int,
                        idx: int) -> dict:
    rows = [candidate_row(context, answer, length) for answer in answers]
    example = {key: np.stack([np.asarray(row[key]) for row in rows]) for key in rows[0]}
    return {**example, "label": label, "idx": idx}


def full_logits(module: GLMClozeModule, batch: dict) -> torch.Tensor:
    """Logits [B*C, L, V] of an ordinary full forward pass."""
    B, C, Lx = batch["input_ids"].shape
    with torch.no_grad():
        return module.model(batch["input_ids"].reshape(B * C, Lx),
                            batch["position_ids"].reshape(B * C, 2, Lx), batch["sep"].reshape(B * C))


def test_single_token_scores_are_raw_verbalizer_logits_at_sop():
    torch.manual_seed(0)
    module = GLMClozeModule(tiny_config(), task="RTE").eval()
    rng = np.random.default_rng(0)
    examples = [single_token_example([*rng.integers(10, 50, n), MASK], 16, label=i % 2, idx=i)
                for i, n in enumerate((3, 6, 9))]
    batch = cloze_collate(examples)
    with torch.no_grad():
        scores = module(batch)
    logits = full_logits(module, batch)
    sep = batch["sep"][:, 0]
    expected = torch.stack([logits[b, sep[b], batch["verbalizer_ids"]] for b in range(3)])
    assert scores.shape == (3, 2)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5)


def multi_token_batch() -> dict:
    rng = np.random.default_rng(1)
    first = multi_token_example([*rng.integers(10, 50, 4), MASK, 9], [[20], [21, 22], [23, 24, 25]], 16, 2, 0)
    second = multi_token_example([MASK, *rng.integers(10, 50, 6)], [[30, 31, 32], [33]], 16, 1, 1)
    return cloze_collate([first, second])


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_multi_token_scores_sum_answer_and_eop_log_probs(length_penalty):
    torch.manual_seed(0)
    module = GLMClozeModule(tiny_config(), task="COPA", length_penalty=length_penalty).eval()
    batch = multi_token_batch()
    with torch.no_grad():
        scores = module(batch)
    log_p = torch.log_softmax(full_logits(module, batch), -1)
    B, C, Lx = batch["input_ids"].shape
    targets, mask = batch["target_ids"].reshape(B * C, Lx), batch["logit_mask"].reshape(B * C, Lx)
    expected = torch.zeros(B * C)
    for row in range(B * C):
        positions = mask[row].nonzero()[:, 0]
        total = sum(log_p[row, t, targets[row, t]] for t in positions)
        expected[row] = total / len(positions) ** length_penalty
    expected = expected.reshape(B, C)
    real = batch["candidate_mask"]
    assert scores.shape == (2, 3)
    torch.testing.assert_close(scores[real], expected[real], rtol=1e-4, atol=1e-4)
    # The filler candidate repeats candidate 0 and loses to it by 10000: it can never win.
    assert not real[1, 2]
    torch.testing.assert_close(scores[1, 2], expected[1, 0] - 10000.0)
    assert scores.argmax(-1)[1] != 2


def test_mix_and_generative_losses_match_their_formulas():
    g = torch.Generator().manual_seed(0)
    scores = -torch.rand(4, 3, generator=g) * 5
    label = torch.tensor([0, 2, 1, 0])
    correct = scores[torch.arange(4), label]
    ce = -torch.log_softmax(scores, -1)[torch.arange(4), label].mean()
    torch.testing.assert_close(cloze_loss(scores, label, "cross_entropy"), ce)
    torch.testing.assert_close(cloze_loss(scores, label, "generative"), -correct.mean())
    torch.testing.assert_close(cloze_loss(scores, label, "mix"), -correct.mean() + ce)
    module = GLMClozeModule(tiny_config(), task="WSC", loss_func="mix", length_penalty=1.0)
    torch.testing.assert_close(module.loss(scores, label), -correct.mean() + ce)
    with pytest.raises(ValueError, match="loss_func"):
        cloze_loss(scores, label, "hinge-ish")


def classifier_batch() -> dict:
    """Full bidirectional rows (sep = length): label 0 iff the context holds token A."""
    rng = np.random.default_rng(2)
    examples = []
    for i in range(8):
        context = [*rng.integers(10, 50, 6)]
        context.insert(int(rng.integers(0, 6)), TOKEN_A if i % 2 == 0 else TOKEN_B)
        row = np.array([CLS, *context, EOS])
        positions = np.stack([np.arange(len(row)), np.zeros(len(row), dtype=np.int64)])
        examples.append({"input_ids": row[None], "position_ids": positions[None], "sep": np.array([len(row)]),
                         "label": i % 2, "idx": i})
    return cloze_collate(examples)


def test_classifier_head_shapes_and_training():
    torch.manual_seed(0)
    batch = classifier_batch()
    module = GLMClozeModule(tiny_config(), task="CB", head="classifier")
    assert module(batch).shape == (8, 3)
    module = GLMClozeModule(tiny_config(), task="RTE", head="classifier")
    assert module(batch).shape == (8, 2)
    choice = multi_token_batch()
    copa = GLMClozeModule(tiny_config(), task="COPA", head="classifier").eval()
    with torch.no_grad():
        choice_scores = copa(choice)
    assert choice_scores.shape == (2, 3) and choice_scores.argmax(-1)[1] != 2

    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    module.eval()
    with torch.no_grad():
        before = module.loss(module(batch), batch["label"]).item()
    module.train()
    for _ in range(30):
        optimizer.zero_grad()
        module.loss(module(batch), batch["label"]).backward()
        optimizer.step()
    module.eval()
    with torch.no_grad():
        after = module.loss(module(batch), batch["label"]).item()
    assert after < 0.5 * before


def separable_examples(count: int, seed: int) -> list[dict]:
    """Single-token task: token A somewhere in the context -> label 0, token B -> label 1."""
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(count):
        label = i % 2
        context = [*rng.integers(10, 50, int(rng.integers(4, 9))), MASK]
        context.insert(int(rng.integers(0, len(context))), TOKEN_A if label == 0 else TOKEN_B)
        examples.append(single_token_example(context, 16, label, i))
    return examples


def test_trainer_learns_a_separable_cloze_task():
    L.seed_everything(0)
    module = GLMClozeModule(tiny_config(), task="RTE", lr=2e-3, weight_decay=0.01)
    data = separable_examples(32, seed=3)
    loader = DataLoader(data, batch_size=8, shuffle=True, collate_fn=cloze_collate)
    val_loader = DataLoader(data, batch_size=16, collate_fn=cloze_collate)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=15, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
                        num_sanity_val_steps=0, check_val_every_n_epoch=15)
    trainer.fit(module, loader, val_loader)
    assert trainer.callback_metrics["val/accuracy"].item() == 1.0
    metrics = trainer.validate(module, val_loader, verbose=False)[0]
    assert metrics["val/accuracy"] == 1.0
    assert sorted(module.predictions) == [(i, i % 2) for i in range(32)]


def test_wsc_predicts_true_when_span1_wins():
    module = GLMClozeModule(tiny_config(), task="WSC")
    scores = torch.tensor([[0.0, -1.0, -2.0], [-3.0, -1.0, -10003.0]])
    assert module.prediction(scores).tolist() == [1, 0]


def test_collate_repeats_candidate_zero_and_masks_fillers():
    first = multi_token_example([MASK, 11, 12], [[20], [21, 22]], 10, 1, 5)
    second = multi_token_example([13, MASK], [[30], [31], [32, 33, 34]], 12, 2, 6)
    batch = cloze_collate([first, second])
    # Rows of 10 and 12 columns; the longest row holds 8 real tokens, the columns after it are cut.
    assert batch["input_ids"].shape == (2, 3, 8) and batch["position_ids"].shape == (2, 3, 2, 8)
    assert not first["position_ids"][..., 8:].any() and not second["position_ids"][..., 8:].any()
    assert batch["candidate_mask"].tolist() == [[True, True, False], [True, True, True]]
    for key in ("input_ids", "position_ids", "target_ids", "logit_mask", "sep"):
        assert torch.equal(batch[key][0, 2], batch[key][0, 0]), key
    assert torch.equal(batch["input_ids"][0, :2], torch.from_numpy(first["input_ids"][:, :8]))
    assert torch.equal(batch["input_ids"][1], torch.from_numpy(second["input_ids"][:, :8]))
    assert batch["label"].tolist() == [1, 2] and batch["idx"].tolist() == [5, 6]
    assert "verbalizer_ids" not in batch

    single = cloze_collate([single_token_example([MASK, 11], 8, 0, 0),
                            single_token_example([12, MASK], 8, 1, 1)])
    assert single["input_ids"].shape == (2, 1, 5) and single["candidate_mask"].all()  # [CLS] x x eos [sop]
    assert single["verbalizer_ids"].tolist() == VERBALIZERS.tolist()


def test_record_scores_predicted_candidate_strings_with_tuple_ids():
    torch.manual_seed(0)
    batch = multi_token_batch()
    batch["candidates"] = [["Paris", "London", "Rome"], ["Oslo", "Bern"]]
    module = GLMClozeModule(tiny_config(), task="ReCoRD")
    module.eval()
    with torch.no_grad():
        predicted = module(batch).argmax(-1).tolist()
    # Gold = the predicted entity for example 0, another one for example 1: EM 0.5.
    batch["answers"] = [[batch["candidates"][0][predicted[0]]], ["Nowhere"]]
    batch["idx"] = torch.tensor([[0, 0], [0, 1]])
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    metrics = trainer.validate(module, DataLoader([batch], batch_size=None), verbose=False)[0]
    assert metrics["val/em"] == pytest.approx(0.5)
    assert module.predictions == [((0, 0), predicted[0]), ((0, 1), predicted[1])]


def pad_columns(batch: dict, extra: int) -> dict:
    """``batch`` with ``extra`` padding columns appended to every row (as encoded rows carry)."""
    keys = ("input_ids", "position_ids", "target_ids", "logit_mask")
    return {**batch, **{key: torch.nn.functional.pad(batch[key], (0, extra)) for key in keys if key in batch}}


@pytest.mark.parametrize("kind", ["single_token", "multi_token", "classifier"])
def test_cut_padding_columns_do_not_change_scores(kind):
    torch.manual_seed(0)
    if kind == "single_token":
        module = GLMClozeModule(tiny_config(), task="RTE")
        batch = cloze_collate([single_token_example([*range(10, 10 + n), MASK], 16, 0, n) for n in (2, 5)])
    elif kind == "multi_token":
        module, batch = GLMClozeModule(tiny_config(), task="COPA"), multi_token_batch()
    else:
        module, batch = GLMClozeModule(tiny_config(), task="RTE", head="classifier"), classifier_batch()
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(module(batch), module(pad_columns(batch, 9)), rtol=1e-5, atol=1e-5)

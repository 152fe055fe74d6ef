"""Precisions: bf16-true and 16-mixed are accepted, losses and log-softmax stay fp32 in every
module, and checkpoints written under one precision load under any other (resumed training and
``model.init_from``)."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from datamodules.cloze_collate import cloze_collate
from datamodules.seq2seq import Seq2SeqCollator, build_seq2seq_sample
from experiments.config import load_config
from glm_lightning.blank_infilling import BlankInfillingCollator
from glm_lightning.checkpoint import init_weights, load_glm
from glm_lightning.lm_eval import infilling_sample, score_samples
from glm_lightning.model import GLMConfig, GLMModel
from glm_lightning.modules.cloze import GLMClozeModule
from glm_lightning.modules.pretrain import GLMPretrainModule
from glm_lightning.modules.seq2seq import GLMSeq2SeqModule


def tiny(tokenizer) -> GLMConfig:
    return GLMConfig.from_name("tiny", vocab_size=len(tokenizer), embedding_dropout_prob=0.0,
                               attention_dropout_prob=0.0, output_dropout_prob=0.0)


def padded(row: np.ndarray, width: int) -> np.ndarray:
    return np.pad(row, [(0, 0)] * (row.ndim - 1) + [(0, width - row.shape[-1])])


def saved_weights(path) -> dict[str, torch.Tensor]:
    state = torch.load(path, weights_only=False)["state_dict"]
    return {k.removeprefix("model."): v for k, v in state.items()}


def pretraining_batch(tokenizer, seed: int = 3) -> dict:
    rng = np.random.default_rng(seed)
    words = "the river city market long road bright morning quiet garden".split()
    samples = [np.array([tokenizer.cls_id, *tokenizer.encode(" ".join(rng.choice(words, size=n))),
                         tokenizer.eos_id]) for n in (30, 22)]
    return BlankInfillingCollator(tokenizer, seed=seed)(samples)


@pytest.mark.parametrize("precision", ["bf16-true", "16-mixed", "bf16-mixed"])
def test_precisions_are_accepted_by_the_config(precision):
    assert load_config("quickstart", [f"trainer.precision={precision}"]).trainer.precision == precision


def test_losses_and_log_softmax_are_fp32_under_bf16_weights(tokenizer):
    """With bf16 weights (bf16-true) every loss and score is computed from fp32 logits."""
    torch.manual_seed(0)
    batch = pretraining_batch(tokenizer)
    pretrain = GLMPretrainModule(tiny(tokenizer)).to(torch.bfloat16).eval()
    loss, _ = pretrain.loss(batch)
    predicted = batch["loss_mask"].bool()
    logits = pretrain.model(batch["input_ids"], batch["position_ids"], batch["sep"], output_mask=predicted)
    assert loss.dtype == logits.dtype == torch.float32
    expected = torch.nn.functional.cross_entropy(logits, batch["target_ids"][predicted])
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)

    seq2seq = GLMSeq2SeqModule(tiny(tokenizer), tokenizer).to(torch.bfloat16).eval()
    samples = [build_seq2seq_sample(tokenizer, s, t, src_length=24, tgt_length=8)
               for s, t in (("the river city", "a road"), ("quiet garden in the morning", "bright"))]
    assert seq2seq.loss(Seq2SeqCollator(tokenizer.pad_id)(samples))[0].dtype == torch.float32

    cloze = GLMClozeModule(tiny(tokenizer), task="COPA").to(torch.bfloat16).eval()
    rows = []
    for i, answers in enumerate((["a road", "the city"], ["morning", "quiet bright garden"])):
        candidates = [infilling_sample([tokenizer.cls_id, *tokenizer.encode("the river"), tokenizer.mask_id],
                                       3, tokenizer.encode(a) + [tokenizer.eop_id], sop_id=tokenizer.sop_id)
                      for a in answers]
        width = max(len(c["input_ids"]) for c in candidates)
        rows.append({key: np.stack([padded(c[source], width) for c in candidates]) for key, source in
                     (("input_ids", "input_ids"), ("position_ids", "position_ids"),
                      ("target_ids", "target_ids"), ("logit_mask", "loss_mask"))}
                    | {"sep": np.array([c["sep"] for c in candidates]), "label": i % 2, "idx": i})
    for shared in (False, True):
        scores = cloze(cloze_collate(rows, shared_context=shared))
        assert scores.dtype == torch.float32
        assert cloze.loss(scores, torch.tensor([0, 1])).dtype == torch.float32

    model = GLMModel(tiny(tokenizer)).to(torch.bfloat16)
    sample = infilling_sample([tokenizer.cls_id, 20, 21, tokenizer.mask_id], 3, [30, 31],
                              sop_id=tokenizer.sop_id)
    scored = score_samples(model, [sample])[0]
    ids, positions = (torch.from_numpy(sample[key])[None] for key in ("input_ids", "position_ids"))
    logits = model(ids, positions, torch.tensor([sample["sep"]]))[0, -2:]
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([30, 31]), reduction="sum")
    assert scored.num_tokens == 2 and scored.loss == pytest.approx(expected.item(), rel=1e-6)


def fit(module: L.LightningModule, precision: str, steps: int, tokenizer, ckpt_path=None,
        callbacks=()) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision, max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=1, val_check_interval=steps, callbacks=list(callbacks))
    loader = DataLoader([pretraining_batch(tokenizer, seed) for seed in range(steps)], batch_size=None)
    trainer.fit(module, loader, val_dataloaders=loader, ckpt_path=ckpt_path, weights_only=False)
    return trainer


SAVED_DTYPE = {"bf16-true": torch.bfloat16, "32-true": torch.float32, "bf16-mixed": torch.float32}


class WeightsAtStart(L.Callback):
    """The weights as training (re)starts: after the checkpoint was restored, before any step."""

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.weights = {k: v.detach().clone() for k, v in module.model.state_dict().items()}


@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended")  # a list, not a sampler
@pytest.mark.parametrize(("saved_under", "loaded_under"), [
    ("bf16-true", "32-true"), ("bf16-true", "bf16-mixed"), ("32-true", "bf16-true"),
    ("bf16-mixed", "bf16-true"),
])
def test_checkpoints_load_under_another_precision(tokenizer, tmp_path, saved_under, loaded_under):
    torch.manual_seed(0)
    trainer = fit(GLMPretrainModule(tiny(tokenizer), lr=1e-3), saved_under, 3, tokenizer)
    assert torch.isfinite(trainer.callback_metrics["val/loss"])
    path = tmp_path / "saved.ckpt"
    trainer.save_checkpoint(path)
    saved = saved_weights(path)
    assert {v.dtype for v in saved.values()} == {SAVED_DTYPE[saved_under]}

    start = WeightsAtStart()
    resumed = fit(GLMPretrainModule(tiny(tokenizer), lr=1e-3), loaded_under, 4, tokenizer, ckpt_path=path,
                  callbacks=[start])
    assert resumed.global_step == 4  # the optimizer state loaded and stepped in the new precision
    dtype = SAVED_DTYPE[loaded_under]
    for key, value in saved.items():
        assert start.weights[key].dtype == dtype, key
        assert torch.equal(start.weights[key], value.to(dtype)), key


def test_init_from_a_bf16_true_checkpoint(tokenizer, tmp_path):
    torch.manual_seed(0)
    trainer = fit(GLMPretrainModule(tiny(tokenizer), lr=1e-3), "bf16-true", 2, tokenizer)
    path = tmp_path / "bf16.ckpt"
    trainer.save_checkpoint(path)
    saved = saved_weights(path)
    module = GLMPretrainModule(tiny(tokenizer))
    init_weights(module.model, path)
    loaded = load_glm(path)
    for key, value in saved.items():
        assert value.dtype == torch.bfloat16
        assert torch.equal(module.model.state_dict()[key], value.float()), key
        assert torch.equal(loaded.state_dict()[key], value.float()), key
    fit(module, "32-true", 1, tokenizer)  # and trains on in fp32

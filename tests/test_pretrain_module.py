"""GLMPretrainModule: the loss, per-objective validation losses, the schedule inside a Trainer."""

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from glm_lightning.blank_infilling import BlankInfillingCollator
from glm_lightning.model import GLMConfig
from glm_lightning.modules.pretrain import GLMPretrainModule, UnigramBaseline, blank_infilling_loss
from glm_lightning.optim import annealing_factor


def packed_samples(tokenizer, count: int, seed: int = 0) -> list[np.ndarray]:
    """Packed samples of the fixture text: [CLS] doc eos."""
    rng = np.random.default_rng(seed)
    words = "the river city market long road bright morning quiet garden".split()
    samples = []
    for _ in range(count):
        text = " ".join(rng.choice(words, size=40)) + "."
        samples.append(np.array([tokenizer.cls_id, *tokenizer.encode(text), tokenizer.eos_id]))
    return samples


def tiny_module(tokenizer, **optim) -> GLMPretrainModule:
    config = GLMConfig.from_name("tiny", vocab_size=len(tokenizer), embedding_dropout_prob=0.0,
                                 attention_dropout_prob=0.0, output_dropout_prob=0.0)
    return GLMPretrainModule(config, **optim)


def trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kwargs)


def test_loss_is_token_weighted_fp32_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g).bfloat16()
    targets = torch.randint(0, 11, (2, 5), generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 0, 0, 0]])
    loss, tokens = blank_infilling_loss(logits, targets, mask)
    log_p = torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None])[..., 0]
    expected = -(log_p * mask).sum() / 4  # four predicted tokens, whatever their sample
    assert loss.dtype == torch.float32 and tokens.item() == 4
    torch.testing.assert_close(loss, expected)


def test_validation_losses_per_objective(tokenizer):
    module = tiny_module(tokenizer)
    samples = packed_samples(tokenizer, 8)
    span = BlankInfillingCollator(tokenizer, seed=1)(samples[:4])
    document = BlankInfillingCollator(tokenizer, span_prob=0.0, document_prob=1.0, seed=2)(samples[4:])
    assert (span["objective"], document["objective"]) == ("span", "document")
    metrics = trainer().validate(module, DataLoader([span, document], batch_size=None), verbose=False)[0]

    def expected(batch):
        with torch.no_grad():
            return blank_infilling_loss(module(batch), batch["target_ids"], batch["loss_mask"])

    (ls, ts), (ld, td) = expected(span), expected(document)
    assert metrics["val/loss_span"] == pytest.approx(ls.item(), rel=1e-5)
    assert metrics["val/loss_document"] == pytest.approx(ld.item(), rel=1e-5)
    assert metrics["val/loss"] == pytest.approx(((ls * ts + ld * td) / (ts + td)).item(), rel=1e-5)
    assert metrics["val/ppl_span"] == pytest.approx(np.exp(ls.item()), rel=1e-5)
    assert "val/loss_sentence" not in metrics
    predicted = torch.cat([b["target_ids"][b["loss_mask"].bool()] for b in (span, document)])
    p = torch.bincount(predicted).double()
    p = p[p > 0] / p.sum()
    assert metrics["val/unigram_baseline"] == pytest.approx(-(p * p.log()).sum().item(), rel=1e-5)


OBJECTIVE_OPTIONS = {
    "span": {},
    "sentence": {"span_prob": 0.0, "sentence_prob": 1.0},
    "document": {"span_prob": 0.0, "document_prob": 1.0},
    "masked_lm": {"masked_lm": True},
}


@pytest.mark.parametrize("objective", OBJECTIVE_OPTIONS)
def test_training_fits_a_batch_and_follows_the_schedule(tokenizer, objective):
    module = tiny_module(tokenizer, lr=3e-3, warmup=0.1, lr_decay_style="cosine", lr_decay_ratio=0.1,
                         weight_decay=0.0)
    collator = BlankInfillingCollator(tokenizer, seed=3, **OBJECTIVE_OPTIONS[objective])
    batch = collator(packed_samples(tokenizer, 4))
    assert batch["objective"] == objective
    with torch.no_grad():
        before = blank_infilling_loss(module(batch), batch["target_ids"], batch["loss_mask"])[0].item()
    fit = trainer(max_steps=40, limit_val_batches=0, gradient_clip_val=1.0)
    loader = DataLoader([batch] * 40, batch_size=None)
    fit.fit(module, loader, val_dataloaders=loader)  # validation off (limit 0), but the loop is defined
    with torch.no_grad():
        after = blank_infilling_loss(module(batch), batch["target_ids"], batch["loss_mask"])[0].item()
    assert after < 0.5 * before
    lr = fit.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(3e-3 * annealing_factor(40, decay_iters=40, warmup=0.1, style="cosine",
                                                       decay_ratio=0.1))
    groups = fit.optimizers[0].param_groups
    assert [g["weight_decay"] for g in groups] == [0.0, 0.0]


def test_non_finite_loss_stops_with_a_clear_error_and_a_failed_run(tokenizer, tmp_path):
    import mlflow

    from experiments.tracking import RunLogger

    module = tiny_module(tokenizer)
    batch = BlankInfillingCollator(tokenizer, seed=3)(packed_samples(tokenizer, 2))
    with torch.no_grad():
        module.model.transformer.final_layernorm.weight[0] = float("nan")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = RunLogger(experiment_name="nan", tracking_uri=uri, artifact_location=tmp_path.as_uri())
    fit = L.Trainer(accelerator="cpu", devices=1, logger=logger, enable_checkpointing=False,
                    enable_progress_bar=False, max_steps=3, limit_val_batches=0, log_every_n_steps=1)
    loader = DataLoader([batch] * 3, batch_size=None)
    with pytest.raises(FloatingPointError, match=r"non-finite loss \(nan\) at step 0 on a 'span' batch"):
        fit.fit(module, loader, val_dataloaders=loader)
    mlflow.set_tracking_uri(uri)
    assert mlflow.MlflowClient().get_run(logger.run_id).info.status == "FAILED"


def test_unigram_baseline_is_the_entropy_of_the_predicted_tokens():
    metric = UnigramBaseline(16)
    metric.update(torch.tensor([[9, 5, 5, 7]]), torch.tensor([[0, 1, 1, 1]]))
    metric.update(torch.tensor([[5, 9, 0, 0]]), torch.tensor([[1, 1, 0, 0]]))
    # predicted tokens: 5, 5, 7, 5, 9 -> p = (3/5, 1/5, 1/5)
    expected = -(0.6 * np.log(0.6) + 2 * 0.2 * np.log(0.2))
    assert metric.compute().item() == pytest.approx(expected, rel=1e-6)


def test_per_objective_curves_hold_only_the_steps_of_their_objective(tokenizer, tmp_path):
    """A 7-step mixed run logged to MLflow every second step: ``train/loss_<objective>`` has a point
    only where that objective trained, ``train/loss_<objective>_mean`` averages its own steps of
    each logging window; read back as ``compare`` reads curves."""
    from lightning.pytorch.callbacks import Callback
    from mlflow.tracking import MlflowClient

    from experiments.plots import history
    from experiments.tracking import RunLogger

    order = ["span", "document", "document", "span", "span", "document", "span"]
    samples = packed_samples(tokenizer, 2 * len(order))
    batches = [BlankInfillingCollator(tokenizer, seed=i, **OBJECTIVE_OPTIONS[name])(samples[2 * i:2 * i + 2])
               for i, name in enumerate(order)]
    assert [batch["objective"] for batch in batches] == order

    class Losses(Callback):
        def __init__(self):
            self.losses: list[float] = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.losses.append(outputs["loss"].item())

    losses = Losses()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = RunLogger(experiment_name="mixed", tracking_uri=uri, artifact_location=tmp_path.as_uri())
    fit = L.Trainer(accelerator="cpu", devices=1, logger=logger, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, max_steps=len(order),
                    limit_val_batches=0, log_every_n_steps=2, callbacks=[losses])
    loader = DataLoader(batches, batch_size=None)
    fit.fit(tiny_module(tokenizer), loader, val_dataloaders=loader)
    assert len(losses.losses) == len(order)

    client = MlflowClient(tracking_uri=uri)
    logged = {step for step in history(client, logger.run_id, "train/loss")}
    assert logged == {1, 3, 5}  # Lightning writes every second step
    windows = [(0, 1), (2, 3), (4, 5)]
    for objective in ("span", "document"):
        points = history(client, logger.run_id, f"train/loss_{objective}")
        own_steps = [step for step in logged if order[step] == objective]
        assert points == pytest.approx({step: losses.losses[step] for step in own_steps})
        means = history(client, logger.run_id, f"train/loss_{objective}_mean")
        expected = {}
        for window in windows:
            own = [losses.losses[step] for step in window if order[step] == objective]
            if own:
                expected[window[-1]] = sum(own) / len(own)
        assert means == pytest.approx(expected, rel=1e-6)
    # the written steps 1, 3, 5 trained document, span, document
    assert set(history(client, logger.run_id, "train/loss_span")) == {3}
    assert set(history(client, logger.run_id, "train/loss_document")) == {1, 5}

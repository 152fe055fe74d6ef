"""Precisions: bf16-true and 16-mixed are accepted, losses and log-softmax stay fp32 in every
module, checkpoints written under one precision load under any other (resumed training and
``model.init_from``), and the recommended bf16 setting keeps the small updates that bf16-true loses."""

from __future__ import annotations

import runpy
import socket
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from datamodules.cloze_collate import cloze_collate
from datamodules.seq2seq import Seq2SeqCollator, build_seq2seq_sample
from experiments.config import load_config
from glm_lightning import parallel
from glm_lightning.blank_infilling import BlankInfillingCollator
from glm_lightning.checkpoint import init_weights, load_glm
from glm_lightning.lm_eval import infilling_sample, score_samples
from glm_lightning.model import GLMConfig, GLMModel
from glm_lightning.modules.cloze import GLMClozeModule
from glm_lightning.modules.pretrain import GLMPretrainModule
from glm_lightning.modules.seq2seq import GLMSeq2SeqModule


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


class GatheredDtypes(L.Callback):
    """The dtypes of the first layer's weights while it runs (what FSDP2 all-gathered) and at rest."""

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        layer = module.model.transformer.layers[0]
        self.in_forward: set[torch.dtype] = set()
        # after FSDP2's own pre-forward hook, which all-gathers the layer
        layer.register_forward_pre_hook(lambda m, _: self.in_forward.update(p.dtype for p in m.parameters()))

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.at_rest = {p.dtype for p in module.model.transformer.layers[0].parameters()}


def layernorm_gains(module: GLMPretrainModule) -> torch.Tensor:
    """Every LayerNorm gain of the model, fp32, gathered from FSDP2 shards if need be."""
    gains = [p.full_tensor() if hasattr(p, "full_tensor") else p
             for name, p in module.model.named_parameters() if "layernorm.weight" in name]
    return torch.cat([g.detach().float().flatten() for g in gains])


def micro_batches(vocab_size: int, n: int = 4) -> list[dict]:
    """Tiny blank-infilling batches (Part A then Part B of 8 tokens each) of random tokens."""
    g = torch.Generator().manual_seed(0)
    positions = torch.stack([torch.arange(16).expand(2, 16), torch.zeros(2, 16, dtype=torch.long)], dim=1)
    loss_mask = torch.cat([torch.zeros(2, 8), torch.ones(2, 8)], dim=1)
    return [{"input_ids": (ids := torch.randint(0, vocab_size, (2, 16), generator=g)),
             "position_ids": positions, "sep": torch.tensor([8, 8]), "target_ids": ids.roll(-1, dims=1),
             "loss_mask": loss_mask, "objective": "span"} for _ in range(n)]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
@pytest.mark.parametrize(("precision", "strategy"), [
    ("bf16-true", "auto"), ("bf16-mixed", "auto"), ("bf16-mixed", "fsdp"),
])
def test_small_updates_are_lost_under_bf16_true_and_kept_with_fp32_master_weights(
    monkeypatch, capfd, precision, strategy
):
    """A LayerNorm gain of 1.0 trained at lr 1e-5 for 100 steps: AdamW moves it by about 1e-5 a step,
    below half a bf16 ulp of 1.0 (2**-8), so bf16-true rounds every step away and the gain stays
    bit-identical. The recommended setting steps fp32 master weights and the gain moves by ~1e-3;
    under fsdp that is FSDP2 with bf16 all-gathers over fp32 shards."""
    parallel.say_once.cache_clear()  # an earlier test of this process may have said it already
    torch.manual_seed(0)
    config = GLMConfig.from_name("tiny", vocab_size=128, num_layers=1, hidden_size=32, num_attention_heads=2,
                                 embedding_dropout_prob=0.0, attention_dropout_prob=0.0,
                                 output_dropout_prob=0.0)
    module = GLMPretrainModule(config, lr=1e-5, warmup=0.0, lr_decay_style="constant")
    before = layernorm_gains(module)
    assert torch.equal(before, torch.ones_like(before))
    if strategy == "fsdp":  # one gloo process: FSDP2's hooks and dtypes as on a cluster
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(free_port()))
    gathered = GatheredDtypes()
    trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision, max_steps=100, logger=False,
                        strategy=parallel.build_strategy(strategy, accelerator="cpu", precision=precision),
                        limit_val_batches=0, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[gathered])
    try:
        trainer.fit(module, DataLoader(micro_batches(config.vocab_size) * 25, batch_size=None))
        after = layernorm_gains(module)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert trainer.global_step == 100
    notices = capfd.readouterr().err.count(parallel.BF16_TRUE_NOTICE)
    if precision == "bf16-true":
        assert torch.equal(after, before)  # 100 updates, not one kept
        assert gathered.in_forward == gathered.at_rest == {torch.bfloat16}
        assert notices == 1
    else:
        moved = (after - before).abs()
        assert (moved > 0).all() and 5e-4 < moved.max() < 2e-3  # every gain, by about lr x steps
        assert gathered.at_rest == {torch.float32}  # the master weights (FSDP2: the local shards)
        assert gathered.in_forward == ({torch.bfloat16} if strategy == "fsdp" else {torch.float32})
        assert notices == 0


def test_bf16_true_says_what_it_drops_once_per_process(tokenizer, capfd):
    parallel.say_once.cache_clear()
    for _ in range(2):
        fit(GLMPretrainModule(tiny(tokenizer), lr=1e-3), "bf16-true", 1, tokenizer)
    lines = [line for line in capfd.readouterr().err.splitlines() if "bf16-true" in line]
    assert lines == [parallel.BF16_TRUE_NOTICE]


def test_the_gpu_recipes_keep_fp32_master_weights():
    """The README's recommended GPU flags and the expected-best row of the GPU check use bf16 compute
    over fp32 master weights, never bf16-true."""
    root = Path(__file__).resolve().parents[1]
    readme = root.joinpath("README.md").read_text()
    section = readme[readme.index("### GPU machines"):]
    table = [line for line in section[:section.index("\n\n", section.index("| run |"))].splitlines()
             if line.startswith("| glm-")]
    assert table and all(f"trainer.precision={parallel.RECOMMENDED_PRECISION}" in line for line in table)
    gpu_check = runpy.run_path(str(root / "benchmarks" / "gpu_check.py"))
    expected_best = [row for row in gpu_check["MATRIX"] if row.attention == "flex" and row.compile
                     and row.strategy == "single"]
    assert expected_best and {row.precision for row in expected_best} == {parallel.RECOMMENDED_PRECISION}

"""Seq2seq finetuning: layout, padding, label-smoothed loss, ROUGE, training and the job."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from timeouts import HANG_S

from datamodules.seq2seq import (
    Seq2SeqCollator,
    Seq2SeqDataError,
    Seq2SeqDataModule,
    build_seq2seq_sample,
    read_jsonl,
)
from experiments.run import main
from glm_lightning.callbacks import LastCheckpoint
from glm_lightning.model import GLMConfig, GLMModel
from glm_lightning.modules.seq2seq import GLMSeq2SeqModule, label_smoothed_loss
from glm_lightning.tokenizer import GLMTokenizer

ROOT = Path(__file__).resolve().parents[1]
WORDS = "river city market garden forest ocean island bridge castle valley".split()
NO_DROPOUT = dict(embedding_dropout_prob=0.0, attention_dropout_prob=0.0, output_dropout_prob=0.0)


def tiny_config(tokenizer: GLMTokenizer, **dropout: float) -> GLMConfig:
    return GLMConfig.from_name("tiny", vocab_size=len(tokenizer), **{**NO_DROPOUT, **dropout})


def write_copy_task(folder: Path, *, train: int = 256, val: int = 16, test: int = 0, seed: int = 0) -> Path:
    """Five random words in, the first three out: learnable by a tiny model in a few hundred steps."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("val", val), ("test", test)):
        if not count:
            continue
        with (folder / f"{split}.jsonl").open("w") as out:
            for _ in range(count):
                words = rng.sample(WORDS, 5)
                out.write(json.dumps({"source": " ".join(words), "target": " ".join(words[:3])}) + "\n")
    return folder


# ---------------------------------------------------------------------------------------------
# Layout


def test_layout_of_one_example(tokenizer: GLMTokenizer) -> None:
    tok = tokenizer
    prompt, source, target = tok.encode(" Content:"), tok.encode(" the river"), tok.encode(" a city")
    sample = build_seq2seq_sample(tok, "the river", "a city", src_length=32, tgt_length=8)
    head = [tok.cls_id, tok.mask_id, *prompt, *source]
    S, T = len(head), len(target) + 1
    assert sample["sep"] == S
    assert sample["input_ids"].tolist() == head + [tok.sop_id, *target]
    assert sample["target_ids"].tolist() == [0] * S + target + [tok.eop_id]
    assert sample["loss_mask"].tolist() == [0] * S + [1] * T
    assert sample["position_ids"][0].tolist() == list(range(S)) + [1] * T  # the mask sits at position 1
    assert sample["position_ids"][1].tolist() == [0] * S + list(range(1, T + 1))
    assert sample["source_ids"].tolist() == head

    # Task mask; truncation of the source (to src_length) and of target + [eop] (to tgt_length).
    short = build_seq2seq_sample(tok, "the river " * 20, "a city " * 20, src_length=12, tgt_length=5,
                                 task_mask=True)
    assert short["source_ids"][1] == tok.smask_id and short["sep"] == 12
    assert short["target_ids"][12:].tolist() == tok.encode(" " + "a city " * 20)[:5]
    assert short["input_ids"][12:].tolist() == [tok.sop_id, *short["target_ids"][12:16].tolist()]

    # Padding goes after Part B: pad id, no loss, positions 0; the sources are padded separately.
    other = build_seq2seq_sample(tok, "the river flows", "a city of bridges", src_length=32, tgt_length=8)
    batch = Seq2SeqCollator(tok.pad_id)([sample, other])
    n = len(sample["input_ids"])
    assert batch["input_ids"].shape[1] == len(other["input_ids"]) > n
    assert batch["input_ids"][0, :n].tolist() == sample["input_ids"].tolist()
    assert set(batch["input_ids"][0, n:].tolist()) == {tok.pad_id}
    assert batch["loss_mask"][0, n:].sum() == 0 and batch["position_ids"][0, :, n:].abs().sum() == 0
    assert batch["sep"].tolist() == [S, other["sep"]]
    assert batch["source_ids"][0, :S].tolist() == head
    assert batch["references"] == ["a city", "a city of bridges"]


def test_malformed_lines_name_file_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('{"source": "a", "target": "b"}\n\n{"source": "a"}\n')
    with pytest.raises(Seq2SeqDataError, match=r"train\.jsonl:3: field 'target' is missing"):
        read_jsonl(path)
    path.write_text('{"source": "a", "target": 3}\nnot json\n')
    with pytest.raises(Seq2SeqDataError, match=r"train\.jsonl:1: field 'target' is not a string"):
        read_jsonl(path)
    path.write_text('{"source": "a", "target": "b"}\nnot json\n')
    with pytest.raises(Seq2SeqDataError, match=r"train\.jsonl:2: invalid JSON"):
        read_jsonl(path)


# ---------------------------------------------------------------------------------------------
# Padding is never attended


def test_logits_do_not_depend_on_padding(tokenizer: GLMTokenizer) -> None:
    torch.manual_seed(0)
    model = GLMModel(tiny_config(tokenizer)).eval()
    samples = [build_seq2seq_sample(tokenizer, s, t, src_length=32, tgt_length=8)
               for s, t in (("the river", "a city"), ("a long market garden story", "bridge"))]

    def real_logits(batch: dict) -> list[torch.Tensor]:
        """The logits of each sample's real (non-padding) positions."""
        with torch.no_grad():
            logits = model(batch["input_ids"], batch["position_ids"], batch["sep"])
        return [logits[b, :n] for b, n in enumerate((batch["loss_mask"] > 0).cumsum(1).argmax(1) + 1)]

    tight = Seq2SeqCollator(tokenizer.pad_id)(samples)
    wide = Seq2SeqCollator(tokenizer.pad_id, pad_to=tight["input_ids"].shape[1] + 9)(samples)
    noisy = {**wide, "input_ids": wide["input_ids"].clone()}  # padding replaced by arbitrary tokens
    padding = wide["input_ids"] == tokenizer.pad_id
    noisy["input_ids"][padding] = torch.randint(5, 100, (int(padding.sum()),))
    alone = [real_logits(Seq2SeqCollator(tokenizer.pad_id)([s]))[0] for s in samples]  # no padding at all
    assert tight["input_ids"][0].eq(tokenizer.pad_id).any()  # the first sample is padded in the batch
    for a, b, c, d in zip(alone, real_logits(tight), real_logits(wide), real_logits(noisy), strict=True):
        for other in (b, c, d):
            torch.testing.assert_close(other, a, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Loss


def reference_smoothed_loss(logits: torch.Tensor, targets: torch.Tensor, epsilon: float) -> torch.Tensor:
    log_p = torch.log_softmax(logits.double(), dim=-1)
    nll = -log_p.gather(1, targets[:, None])[:, 0]
    smooth = -log_p.sum(dim=-1) / log_p.shape[-1]  # over every row of the (padded) vocabulary
    return ((1 - epsilon) * nll + epsilon * smooth).mean()


@pytest.mark.parametrize("epsilon", [0.0, 0.1, 0.3])
def test_label_smoothed_loss_equals_the_formula(epsilon: float) -> None:
    torch.manual_seed(0)
    logits, targets = torch.randn(13, 256) * 3, torch.randint(0, 200, (13,))
    expected = reference_smoothed_loss(logits, targets, epsilon)
    torch.testing.assert_close(label_smoothed_loss(logits, targets, epsilon).double(), expected,
                               rtol=1e-6, atol=1e-6)


def test_module_loss_is_over_target_tokens_only(tokenizer: GLMTokenizer) -> None:
    torch.manual_seed(0)
    module = GLMSeq2SeqModule(tiny_config(tokenizer), tokenizer, label_smoothing=0.1).eval()
    samples = [build_seq2seq_sample(tokenizer, s, t, src_length=32, tgt_length=8)
               for s, t in (("the river", "a city"), ("a long market garden story", "bridge"))]
    batch = Seq2SeqCollator(tokenizer.pad_id)(samples)
    with torch.no_grad():
        loss, tokens = module.loss(batch)
        logits = module(batch)  # every position, the padded vocabulary included
    mask = batch["loss_mask"].bool()
    assert tokens == sum(len(s["target_ids"]) - s["sep"] for s in samples)
    expected = reference_smoothed_loss(logits[mask], batch["target_ids"][mask], 0.1)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# ROUGE


def test_rouge_on_known_strings() -> None:
    from torchmetrics.text.rouge import ROUGEScore

    f1 = lambda overlap, predicted, reference: 2 * overlap / (predicted + reference)  # noqa: E731
    # 1: unigrams 5 of 6 / 6 shared (the x2, cat, on, mat); bigrams 3 of 5 / 5; LCS "the cat on the mat" = 5.
    # 2: unigrams {river, city} of 4 / 3; bigrams {river city} of 3 / 2; LCS 2.
    pairs = [("the cat sat on the mat", "the cat lay on the mat"),
             ("river city market garden", "river city bridge")]
    expected = {
        "rouge1": (f1(5, 6, 6) + f1(2, 4, 3)) / 2,
        "rouge2": (f1(3, 5, 5) + f1(1, 3, 2)) / 2,
        "rougeL": (f1(5, 6, 6) + f1(2, 4, 3)) / 2,
    }
    rouge = ROUGEScore(rouge_keys=("rouge1", "rouge2", "rougeL"))
    scores = rouge([p for p, _ in pairs], [r for _, r in pairs])
    for key, value in expected.items():
        assert scores[f"{key}_fmeasure"].item() == pytest.approx(value, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Training and the job


class ValidationMetrics(L.Callback):
    """The val/* metrics of every validation (sanity checks excluded)."""

    def __init__(self):
        self.history: list[dict[str, float]] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            metrics = trainer.callback_metrics
            self.history.append({k: float(v) for k, v in metrics.items() if k.startswith("val/")})


def test_finetuning_raises_validation_rouge(tokenizer: GLMTokenizer, tmp_path: Path) -> None:
    L.seed_everything(0)
    data = Seq2SeqDataModule(tokenizer, write_copy_task(tmp_path / "data"), src_length=32, tgt_length=8,
                             batch_size=16, seed=0)
    module = GLMSeq2SeqModule(tiny_config(tokenizer), tokenizer, lr=3e-3, warmup=0.05, lr_decay_ratio=0.1,
                              generation=dict(strategy="greedy", max_new_tokens=6),
                              predictions_dir=str(tmp_path / "predictions"))
    metrics = ValidationMetrics()
    trainer = L.Trainer(max_steps=300, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        val_check_interval=300, check_val_every_n_epoch=None, callbacks=[metrics])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small gains nothing from threads; a busy machine slows them
    try:
        trainer.validate(module, datamodule=data, verbose=False)  # before training
        trainer.fit(module, datamodule=data)  # one validation at the end
    finally:
        torch.set_num_threads(threads)
    first, last = metrics.history[0], metrics.history[-1]
    print(f"ROUGE-1/2/L before {first['val/rouge1']:.3f}/{first['val/rouge2']:.3f}/{first['val/rougeL']:.3f}"
          f" after {last['val/rouge1']:.3f}/{last['val/rouge2']:.3f}/{last['val/rougeL']:.3f}")
    assert len(metrics.history) == 2
    assert first["val/rouge1"] < 0.2 and last["val/rouge1"] > 0.7
    assert last["val/rouge2"] > first["val/rouge2"] + 0.4 and last["val/rougeL"] > 0.7
    assert last["val/loss"] < first["val/loss"] - 2
    predictions = [json.loads(line) for line in (tmp_path / "predictions" / "val_predictions.jsonl").open()]
    assert len(predictions) == 16 and set(predictions[0]) == {"prediction", "reference"}


def test_job_through_the_command_line(tokenizer: GLMTokenizer, sentencepiece_model: str, tmp_path: Path,
                                      capsys: pytest.CaptureFixture) -> None:
    data = write_copy_task(tmp_path / "data", train=32, val=4, test=3)
    init = tmp_path / "init.pt"
    torch.save(GLMModel(tiny_config(tokenizer)).state_dict(), init)
    args = [f"data.dir={data}", f"model.init_from={init}", f"tokenizer.path={sentencepiece_model}",
            "model.name=tiny", f"output_dir={tmp_path / 'outputs'}", "run_name=r1", "data.num_workers=0",
            "data.batch_size=8", "seq2seq.src_length=32", "seq2seq.tgt_length=8", "generation.strategy=beam",
            "generation.num_beams=2", "generation.min_length=0", "generation.max_new_tokens=6",
            "trainer.max_steps=4", "trainer.val_check_interval=4", "trainer.precision=32-true",
            "trainer.accelerator=cpu", "trainer.devices=1", "optim.lr=1e-3"]
    result = subprocess.run([sys.executable, "-m", "experiments.run", "exp=seq2seq", *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=HANG_S)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "outputs" / "seq2seq" / "r1"
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    predictions = (run_dir / "predictions" / "val_predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 4
    assert list((tmp_path / "outputs" / "mlartifacts").rglob("predictions/val_predictions.jsonl"))
    assert "val/rouge1" in json.loads((run_dir / "summary.json").read_text())["metrics"]
    assert set(json.loads((run_dir / "test_metrics.json").read_text())) >= {"test/loss", "test/rouge2"}
    assert len((run_dir / "predictions" / "test_predictions.jsonl").read_text().splitlines()) == 3

    # A malformed line: one line on stderr naming the file and line, no traceback.
    with (data / "val.jsonl").open("a") as out:
        out.write('{"source": "river city"}\n')
    capsys.readouterr()
    assert main(["exp=seq2seq", *args, "run_name=r2"]) == 1
    expected = f"error: {data / 'val.jsonl'}:5: field 'target' is missing"
    assert capsys.readouterr().err.splitlines() == [expected]


def test_missing_data_dir_is_a_config_error(capsys: pytest.CaptureFixture) -> None:
    assert main(["exp=seq2seq"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: 'data.dir' is not set; it must name a folder with train.jsonl and val.jsonl"]


class BatchRecorder(L.Callback):
    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict,
                             *args) -> None:
        self.batches.append(batch["references"])


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_resumed_finetuning_sees_the_batches_of_an_uninterrupted_run(tokenizer: GLMTokenizer, tmp_path: Path,
                                                                        dropout: float) -> None:
    """10 examples in batches of 4 (3 per epoch); stopped after step 4, inside the second epoch. With
    dropout on, the same weights need the same dropout draws after the resume."""
    data = write_copy_task(tmp_path / "data", train=10, val=2)

    def fit(max_steps: int, ckpt_path: Path | None = None) -> tuple[list[list[str]], dict]:
        L.seed_everything(0)
        config = tiny_config(tokenizer, embedding_dropout_prob=dropout, attention_dropout_prob=dropout,
                             output_dropout_prob=dropout)
        module = GLMSeq2SeqModule(config, tokenizer, lr=1e-3, lr_decay_iters=7,
                                  generation=dict(strategy="greedy", max_new_tokens=2),
                                  predictions_dir=str(tmp_path / "predictions"))
        recorder = BatchRecorder()
        trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                            default_root_dir=tmp_path,
                            callbacks=[recorder, LastCheckpoint(tmp_path / "last.ckpt")])
        datamodule = Seq2SeqDataModule(tokenizer, data, src_length=32, tgt_length=8, batch_size=4, seed=3)
        with warnings.catch_warnings():
            # as the jobs do: the datamodule restores the position the dataloader cannot
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended")
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=False)
        return recorder.batches, module.state_dict()

    straight, weights = fit(7)
    first, _ = fit(4)
    rest, resumed = fit(7, tmp_path / "last.ckpt")
    assert [len(b) for b in straight] == [4, 4, 2, 4, 4, 2, 4]
    assert straight[:3] != straight[3:6]  # each epoch has its own order
    assert first + rest == straight
    for key, value in weights.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0)

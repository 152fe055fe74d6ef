"""FSDP2 for the finetuning modules: SuperGLUE cloze and seq2seq finetuning on two CPU processes (gloo) end
with the weights of one process trained on the same global batches, with the ``init_from`` checkpoint read
after sharding (each rank holds exactly its slice of every weight) and activation checkpointing on.

The runs execute this file as a script, as ``tests/test_parallel.py`` does (whose docstring explains why the
weights must match: per-micro-batch mean losses, gradients averaged over ranks or accumulated, no dropout).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from test_parallel import WORLD_SIZE, assert_same_weights, launch, load_weights
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

from datamodules.cloze_collate import cloze_collate
from datamodules.seq2seq import Seq2SeqCollator, build_seq2seq_sample
from glm_lightning.checkpoint import read_state_dict, save_ours
from glm_lightning.cloze import encode_example
from glm_lightning.model import GLMConfig, GLMModel
from glm_lightning.modules.cloze import GLMClozeModule
from glm_lightning.modules.seq2seq import GLMSeq2SeqModule
from glm_lightning.parallel import build_strategy
from glm_lightning.tokenizer import GLMTokenizer

STEPS = 3
LR = 3e-3
WORDS = "the river city market long road bright morning quiet garden stone bridge".split()

# -- the training script ---------------------------------------------------------------------------


class ShardCheck(L.Callback):
    """Before the first step: whether every parameter is sharded and its local part equals this rank's
    slice of the weight in the ``init_from`` checkpoint."""

    def __init__(self, init_from: str) -> None:
        self.init_from = init_from
        self.result: dict = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        stored = read_state_dict(self.init_from)
        params = dict(pl_module.model.named_parameters())
        sharded = all(isinstance(p, DTensor) for p in params.values())
        matches = sharded and all(
            torch.equal(p.to_local(), stored[k].chunk(trainer.world_size)[trainer.global_rank])
            for k, p in params.items())
        self.result = {"sharded": sharded, "slices_match": matches,
                       "local_numel": sum(p.to_local().numel() for p in params.values()) if sharded else 0,
                       "numel": sum(p.numel() for p in params.values())}


def train(args: argparse.Namespace) -> None:
    """Finetune from the data file's checkpoint for ``STEPS`` steps; rank 0 writes result.json and weights."""
    data = torch.load(args.batches, weights_only=True)
    config = GLMConfig(**{**data["config"], "checkpoint_activations": args.activation_checkpointing})
    settings = dict(lr=LR, warmup=0.0, lr_decay_style="constant", weight_decay=0.01,
                    init_from=data["init_from"])
    torch.manual_seed(0)
    if args.kind == "cloze":
        module = GLMClozeModule(config, task="COPA", **settings)
    else:
        tokenizer = GLMTokenizer.from_sentencepiece(data["tokenizer"])
        module = GLMSeq2SeqModule(config, tokenizer, generation={"max_new_tokens": 3}, **settings)
    single = args.strategy == "single"
    check = ShardCheck(data["init_from"])
    trainer = L.Trainer(
        accelerator="cpu", devices=1 if single else WORLD_SIZE,
        strategy="auto" if single else build_strategy("fsdp", accelerator="cpu"),
        max_steps=STEPS, gradient_clip_val=1.0, accumulate_grad_batches=WORLD_SIZE if single else 1,
        use_distributed_sampler=False, num_sanity_val_steps=0, limit_val_batches=1, val_check_interval=STEPS,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[check], default_root_dir=args.out,
    )
    batches = data["batches"] if single else data["batches"][trainer.global_rank::trainer.world_size]
    # validation (seq2seq: decoding) under FSDP on each rank's first micro-batch
    trainer.fit(module, DataLoader(batches, batch_size=None), DataLoader(batches[:1], batch_size=None))
    weights = get_model_state_dict(module.model, options=StateDictOptions(full_state_dict=True,
                                                                          cpu_offload=True))
    if trainer.global_rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        torch.save(weights, out / "weights.pt")
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        (out / "result.json").write_text(json.dumps({**check.result, "global_step": trainer.global_step,
                                                     "metrics": metrics}))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kind", choices=("cloze", "seq2seq"), required=True)
    parser.add_argument("--strategy", choices=("single", "fsdp"), required=True)
    parser.add_argument("--batches", required=True, help="file with the config, checkpoint and micro-batches")
    parser.add_argument("--out", required=True, help="folder for result.json and weights.pt")
    parser.add_argument("--activation-checkpointing", action="store_true")
    return parser.parse_args(argv)


# -- the tests -------------------------------------------------------------------------------------


def sentence(rng: np.random.Generator, n: int) -> str:
    return " ".join(rng.choice(WORDS, size=n))


def cloze_batches(tokenizer: GLMTokenizer) -> list[dict]:
    """COPA micro-batches of 4 examples (two answers scored by their log-likelihood), in the order one
    process accumulates them."""
    rng = np.random.default_rng(0)
    examples = [{"idx": i, "premise": sentence(rng, 6) + ".", "choice1": sentence(rng, 3) + ".",
                 "choice2": sentence(rng, 2) + ".", "question": ("cause", "effect")[i % 2],
                 "label": int(rng.integers(2))} for i in range(4 * STEPS * WORLD_SIZE)]
    encoded = [encode_example("COPA", ex, tokenizer, pattern_id=0, max_seq_length=128) for ex in examples]
    return [cloze_collate(encoded[i:i + 4]) for i in range(0, len(encoded), 4)]


def seq2seq_batches(tokenizer: GLMTokenizer) -> list[dict]:
    rng = np.random.default_rng(1)
    collate = Seq2SeqCollator(tokenizer.pad_id)
    samples = [build_seq2seq_sample(tokenizer, sentence(rng, 10), sentence(rng, 3), src_length=24,
                                    tgt_length=6) for _ in range(4 * STEPS * WORLD_SIZE)]
    return [collate(samples[i:i + 4]) for i in range(0, len(samples), 4)]


@pytest.fixture(scope="module")
def data_files(tokenizer: GLMTokenizer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Per module kind: the tiny config (no dropout), a starting checkpoint in our layout and the batches."""
    root = tmp_path_factory.mktemp("finetune")
    config = GLMConfig.from_name("tiny", vocab_size=len(tokenizer), embedding_dropout_prob=0.0,
                                 attention_dropout_prob=0.0, output_dropout_prob=0.0)
    torch.manual_seed(5)
    init_from = save_ours(GLMModel(config), root / "start.ckpt")
    files = {}
    for kind, batches in (("cloze", cloze_batches(tokenizer)), ("seq2seq", seq2seq_batches(tokenizer))):
        files[kind] = root / f"{kind}.pt"
        torch.save({"config": config.__dict__, "init_from": str(init_from), "batches": batches,
                    "tokenizer": tokenizer.backend.path}, files[kind])
    return files


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cloze", "seq2seq"])
def test_fsdp_finetuning_on_two_processes_matches_one_process(
    kind: str, data_files: dict[str, Path], tmp_path: Path
) -> None:
    """One process without activation checkpointing, two FSDP2 processes with it: the same weights after
    three steps, so the recomputed activations gave the same gradients too."""
    single = tmp_path / "single"
    train(parse_args(["--kind", kind, "--strategy", "single", "--batches", str(data_files[kind]),
                      "--out", str(single)]))
    result = launch(data_files[kind], tmp_path / "fsdp", "--kind", kind, "--strategy", "fsdp",
                    "--activation-checkpointing", script=Path(__file__))
    assert result["sharded"] and result["slices_match"]
    assert result["local_numel"] < 0.6 * result["numel"]  # each rank holds about half the weights
    assert result["global_step"] == STEPS
    start = read_state_dict(data_files[kind].parent / "start.ckpt")
    trained = load_weights(tmp_path / "fsdp")
    assert not torch.equal(trained["word_embeddings.weight"], start["word_embeddings.weight"])
    assert_same_weights(trained, load_weights(single))
    assert np.isfinite(result["metrics"]["val/loss"])  # validated under FSDP on both ranks
    if kind == "seq2seq":
        assert "val/rougeL" in result["metrics"]


if __name__ == "__main__":
    torch.set_num_threads(1)  # two ranks share the cores
    train(parse_args(sys.argv[1:]))

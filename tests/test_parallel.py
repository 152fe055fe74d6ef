"""Strategies: the factory's choices, FSDP2 sharding, and 2-process CPU training (gloo) that resumes
from its checkpoints and ends with the weights of a single process trained on the same batches.

The multi-process runs execute this file as a script (``python tests/test_parallel.py ...``): Lightning
starts the second rank by re-running the same command, as it does for any training script on CPU.

Why the weights must match: each rank's loss is the token-weighted mean of its own micro-batch, and DDP
and FSDP2 average the gradients of the ranks. A single process that accumulates the same micro-batches
(``accumulate_grad_batches=2``, each loss divided by 2) gets that same mean gradient, so the optimizer
sees the same gradients up to float rounding. (Concatenating the micro-batches instead would weight every
token equally, a different loss whenever the ranks predict different numbers of tokens.) Dropout is off,
because every rank draws its own dropout masks. What remains is the order of fp32 sums (all-reduce /
reduce-scatter versus accumulation), about 1e-7 relative per gradient; AdamW moves each weight by at most
about lr per step, so six steps of lr 3e-3 leave differences far below the 1e-5 tolerance used here.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.distributed as dist
from timeouts import HANG_S
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

from glm_lightning.blank_infilling import BlankInfillingCollator
from glm_lightning.model import GLMConfig, GLMModel
from glm_lightning.modules.pretrain import GLMPretrainModule, blank_infilling_loss
from glm_lightning.parallel import (
    FSDP2Strategy,
    apply_fsdp2,
    build_strategy,
    consolidate_checkpoint,
    mixed_precision_dtypes,
)
from glm_lightning.tokenizer import GLMTokenizer

WORLD_SIZE = 2
STEPS_PER_EPOCH = 2
EPOCHS = 3  # runs stop at epoch ends: Lightning resumes a plain DataLoader only from there
LR = 3e-3

# -- the training script ---------------------------------------------------------------------------


def micro_batches(tokenizer: GLMTokenizer) -> list[dict]:
    """One epoch of fixed micro-batches, in the order a single process accumulates them: step 0 of rank 0,
    step 0 of rank 1, step 1 of rank 0, ... Rank r trains on ``batches[r::WORLD_SIZE]``."""
    rng = np.random.default_rng(0)
    words = "the river city market long road bright morning quiet garden stone bridge".split()
    batches = []
    for index in range(STEPS_PER_EPOCH * WORLD_SIZE):
        samples = [
            np.array([tokenizer.cls_id, *tokenizer.encode(" ".join(rng.choice(words, size=30)) + "."),
                      tokenizer.eos_id])
            for _ in range(4)
        ]
        batches.append({**BlankInfillingCollator(tokenizer, seed=index)(samples), "index": index})
    return batches


class Recorder(L.Callback):
    """The step a run starts from, and the index and loss of every micro-batch this rank trained on."""

    def __init__(self) -> None:
        self.start_step = -1
        self.indices: list[int] = []
        self.losses: list[float] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.indices.append(int(batch["index"]))
        # Lightning reports the loss divided by the accumulation factor; undo that.
        self.losses.append(float(outputs["loss"]) * trainer.accumulate_grad_batches)


def train(args: argparse.Namespace) -> None:
    """Train the tiny GLM up to epoch ``epochs``; rank 0 writes ``result.json`` and the full weights."""
    data = torch.load(args.batches, weights_only=True)
    torch.manual_seed(0)  # the same initial weights on every rank (FSDP2 shards, it does not broadcast)
    config = GLMConfig.from_name("tiny", vocab_size=data["vocab_size"], embedding_dropout_prob=0.0,
                                 attention_dropout_prob=0.0, output_dropout_prob=0.0,
                                 checkpoint_activations=args.checkpoint_activations)
    module = GLMPretrainModule(config, lr=LR, warmup=0.0, lr_decay_style="constant", weight_decay=0.01,
                               lr_decay_iters=EPOCHS * STEPS_PER_EPOCH)
    single = args.strategy == "single"
    recorder = Recorder()
    trainer = L.Trainer(
        accelerator="cpu", devices=1 if single else WORLD_SIZE // args.nodes, num_nodes=args.nodes,
        strategy="auto" if single else build_strategy(args.strategy, accelerator="cpu",
                                                       precision=args.precision,
                                                       checkpoint_format=args.checkpoint_format),
        precision=args.precision, max_epochs=args.epochs, gradient_clip_val=1.0,
        accumulate_grad_batches=WORLD_SIZE if single else 1, use_distributed_sampler=False,
        num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder],
        default_root_dir=args.out,
    )
    batches = data["batches"] if single else data["batches"][trainer.global_rank::trainer.world_size]
    # Validation at each epoch end on the rank's first micro-batch: the losses are reduced across ranks.
    trainer.fit(module, DataLoader(batches, batch_size=None), DataLoader(batches[:1], batch_size=None),
                ckpt_path=args.resume)
    if args.save:
        trainer.save_checkpoint(args.save)
    # Collective for FSDP2 (every rank sends its shards); a plain state_dict otherwise.
    weights = get_model_state_dict(module.model, options=StateDictOptions(full_state_dict=True,
                                                                          cpu_offload=True))
    params, layers = list(module.model.parameters()), module.model.transformer.layers
    if trainer.global_rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        torch.save(weights, out / "weights.pt")
        result = {
            "start_step": recorder.start_step,
            "global_step": trainer.global_step,
            "indices": recorder.indices,
            "losses": recorder.losses,
            "val_loss": float(trainer.callback_metrics["val/loss"]),
            "strategy": type(trainer.strategy).__name__,
            "cluster_environment": type(getattr(trainer.strategy, "cluster_environment", None)).__name__,
            "world_size": trainer.world_size,
            "dtensor_layers": all(isinstance(p, DTensor) for p in layers.parameters()),
            "local_numel": sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params),
            "numel": sum(p.numel() for p in params),
            "param_dtypes": sorted({str(p.dtype) for p in params}),
        }
        (out / "result.json").write_text(json.dumps(result))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--strategy", choices=("single", "ddp", "fsdp"), required=True)
    parser.add_argument("--batches", required=True, help="file with vocab_size and the micro-batches")
    parser.add_argument("--out", required=True, help="folder for result.json and weights.pt")
    parser.add_argument("--epochs", type=int, required=True, help="train until this many epochs are done")
    parser.add_argument("--nodes", type=int, default=1, help="num_nodes; a launcher starts the ranks")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--checkpoint-format", default="full")
    parser.add_argument("--checkpoint-activations", action="store_true")
    parser.add_argument("--resume", default=None, help="checkpoint to continue from")
    parser.add_argument("--save", default=None, help="where to save a checkpoint at the end")
    return parser.parse_args(argv)


# -- launching it ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(batches: Path, out: Path, *args: str, script: Path = Path(__file__)) -> dict:
    """Run ``script`` (this file) on two processes (Lightning starts the second); kill them all on timeout."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "PL_", "TORCHELASTIC_"))
           and k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK")}
    # the script imports the packages of this tree, not of another installed copy
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    command = [sys.executable, str(script.resolve()), "--batches", str(batches), "--out", str(out), *args]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        log, _ = process.communicate(timeout=HANG_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        log, _ = process.communicate()
        pytest.fail(f"{' '.join(args)} did not finish within {HANG_S} s:\n{log[-3000:]}")
    assert process.returncode == 0, f"{' '.join(args)} failed:\n{log[-5000:]}"
    return json.loads((out / "result.json").read_text())


def load_weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "weights.pt", weights_only=True)


def assert_same_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-5, msg=name)


def assert_continued(results: list[dict], epochs: list[int]) -> None:
    """Each run started where the previous one stopped, saw the right micro-batches, and the loss of
    every micro-batch went down from its first epoch to its last."""
    ends = [STEPS_PER_EPOCH * epoch for epoch in epochs]
    spans = [(r["start_step"], r["global_step"]) for r in results]
    assert spans == list(zip([0, *ends[:-1]], ends, strict=True))
    indices = [i for r in results for i in r["indices"]]
    losses = [loss for r in results for loss in r["losses"]]
    assert indices == list(range(0, STEPS_PER_EPOCH * WORLD_SIZE, WORLD_SIZE)) * EPOCHS  # rank 0's share
    assert np.isfinite(losses).all() and all(np.isfinite(r["val_loss"]) for r in results)
    first, last = losses[:STEPS_PER_EPOCH], losses[-STEPS_PER_EPOCH:]
    assert all(b < a for a, b in zip(first, last, strict=True)), losses


@pytest.fixture(scope="module")
def batches_file(tokenizer: GLMTokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The micro-batches, built once and read by every run, so all runs train on identical data."""
    path = tmp_path_factory.mktemp("batches") / "batches.pt"
    torch.save({"vocab_size": len(tokenizer), "batches": micro_batches(tokenizer)}, path)
    return path


@pytest.fixture(scope="module")
def single_process_weights(batches_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """All epochs in this process, accumulating the ranks' micro-batches of each step."""
    out = tmp_path_factory.mktemp("single")
    train(parse_args(["--strategy", "single", "--batches", str(batches_file), "--out", str(out),
                      "--epochs", str(EPOCHS)]))
    return load_weights(out)


@pytest.mark.slow
def test_ddp_two_processes_resume_and_match_one_process(
    batches_file: Path, single_process_weights: dict, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "ddp.ckpt"
    results = [
        launch(batches_file, tmp_path / "run1", "--strategy", "ddp", "--epochs", "1",
               "--save", str(checkpoint)),
        launch(batches_file, tmp_path / "run2", "--strategy", "ddp", "--epochs", str(EPOCHS),
               "--resume", str(checkpoint)),
    ]
    assert results[0]["strategy"] == "DDPStrategy"
    assert_continued(results, [1, EPOCHS])
    assert_same_weights(load_weights(tmp_path / "run2"), single_process_weights)
    restored = GLMPretrainModule.load_from_checkpoint(checkpoint, map_location="cpu")
    assert_same_weights(restored.model.state_dict(), load_weights(tmp_path / "run1"))


@pytest.mark.slow
def test_fsdp_two_processes_resume_from_full_and_sharded_and_match_one_process(
    batches_file: Path, single_process_weights: dict, tmp_path: Path
) -> None:
    """Epoch 1 saves a full checkpoint; epoch 2 resumes from it with sharded checkpoints and activation
    checkpointing on and saves a sharded one; epoch 3 resumes from that."""
    assert EPOCHS == 3
    full, sharded = tmp_path / "epoch1.ckpt", tmp_path / "epoch2.ckpt"
    results = [
        launch(batches_file, tmp_path / "run1", "--strategy", "fsdp", "--checkpoint-format", "full",
               "--epochs", "1", "--save", str(full)),
        launch(batches_file, tmp_path / "run2", "--strategy", "fsdp", "--checkpoint-format", "sharded",
               "--checkpoint-activations", "--epochs", "2", "--resume", str(full), "--save", str(sharded)),
        launch(batches_file, tmp_path / "run3", "--strategy", "fsdp", "--checkpoint-format", "sharded",
               "--epochs", "3", "--resume", str(sharded)),
    ]
    assert results[0]["strategy"] == "FSDP2Strategy" and results[0]["dtensor_layers"]
    assert results[0]["local_numel"] < 0.6 * results[0]["numel"]  # each rank holds about half the weights
    assert_continued(results, [1, 2, 3])
    assert_same_weights(load_weights(tmp_path / "run3"), single_process_weights)

    # The full checkpoint is one file that loads without a process group; the sharded one is a folder
    # that does after consolidation.
    assert full.is_file() and sharded.is_dir()
    restored = GLMPretrainModule.load_from_checkpoint(full, map_location="cpu")
    assert_same_weights(restored.model.state_dict(), load_weights(tmp_path / "run1"))
    consolidated = consolidate_checkpoint(sharded, tmp_path / "consolidated.ckpt")
    assert torch.load(consolidated, weights_only=False)["global_step"] == 2 * STEPS_PER_EPOCH
    restored = GLMPretrainModule.load_from_checkpoint(consolidated, map_location="cpu")
    assert_same_weights(restored.model.state_dict(), load_weights(tmp_path / "run2"))


@pytest.mark.slow
def test_fsdp_bf16_mixed_trains_with_fp32_master_weights(batches_file: Path, tmp_path: Path) -> None:
    result = launch(batches_file, tmp_path, "--strategy", "fsdp", "--precision", "bf16-mixed",
                    "--epochs", "1")
    assert result["global_step"] == STEPS_PER_EPOCH and np.isfinite(result["losses"]).all()
    assert result["param_dtypes"] == ["torch.float32"]


# -- the factory -----------------------------------------------------------------------------------


def test_auto_and_ddp() -> None:
    assert build_strategy("auto") == "auto"
    ddp = build_strategy("ddp", accelerator="cpu")
    assert type(ddp) is L.pytorch.strategies.DDPStrategy
    assert ddp._ddp_kwargs == {"find_unused_parameters": False}


@pytest.mark.parametrize("checkpoint_format", ["full", "sharded"])
def test_fsdp_is_fsdp2_through_model_parallel(checkpoint_format: str) -> None:
    strategy = build_strategy("fsdp", accelerator="cpu", precision="bf16-mixed",
                              checkpoint_format=checkpoint_format)
    assert isinstance(strategy, FSDP2Strategy)
    assert isinstance(strategy, L.pytorch.strategies.ModelParallelStrategy)
    assert strategy._save_distributed_checkpoint is (checkpoint_format == "sharded")


def test_fsdp_spans_every_process_without_tensor_parallelism(monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = L.Trainer(accelerator="cpu", devices=2, num_nodes=3, strategy=build_strategy("fsdp"),
                        logger=False, enable_checkpointing=False)
    strategy = trainer.strategy
    assert isinstance(strategy, FSDP2Strategy)
    # Only the sizes chosen before Lightning creates the process group and the mesh.
    monkeypatch.setattr(L.pytorch.strategies.ModelParallelStrategy, "setup_environment", lambda self: None)
    strategy.setup_environment()
    assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == (6, 1)


@pytest.mark.parametrize(("precision", "dtypes"), [
    ("32-true", None),
    ("bf16-mixed", (torch.bfloat16, torch.float32)),
    ("16-mixed", (torch.float16, torch.float32)),
])
def test_mixed_precision_reduces_in_fp32(precision: str, dtypes) -> None:
    assert mixed_precision_dtypes(precision) == dtypes


@pytest.mark.parametrize(("state_dict_type", "precision"), [("full", "bf16-mixed"), ("sharded", "32-true")])
def test_fsdp1_wraps_each_layer_on_gpu(state_dict_type: str, precision: str) -> None:
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from glm_lightning.model import GLMLayer

    strategy = build_strategy("fsdp1", accelerator="gpu", precision=precision,
                              checkpoint_format=state_dict_type, activation_checkpointing=True)
    assert type(strategy) is L.pytorch.strategies.FSDPStrategy
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy) and policy._module_classes == {GLMLayer}
    assert strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == {GLMLayer}
    assert strategy._state_dict_type == state_dict_type
    if precision == "32-true":
        assert strategy.mixed_precision is None
    else:
        mp = strategy.mixed_precision
        assert (mp.param_dtype, mp.reduce_dtype) == (torch.bfloat16, torch.float32)


def test_fsdp1_on_cpu_points_to_fsdp() -> None:
    with pytest.raises(ValueError, match="use strategy 'fsdp'") as error:
        build_strategy("fsdp1", accelerator="cpu")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"name": "deepspeed"}, "unknown strategy 'deepspeed'; valid choices: auto, ddp, fsdp, fsdp1"),
    ({"name": "fsdp", "checkpoint_format": "zip"}, "valid choices: full, sharded"),
    ({"name": "ddp", "checkpoint_format": "sharded"}, "needs strategy fsdp or fsdp1"),
    ({"name": "fsdp", "precision": "16-mixed"}, "supports precision 32-true, bf16-mixed"),
    ({"name": "fsdp", "activation_checkpointing": True}, "model.activation_checkpointing"),
])
def test_bad_choices_are_one_line_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as error:
        build_strategy(**kwargs)
    assert message in str(error.value) and "\n" not in str(error.value)


# -- FSDP2 sharding in one process -----------------------------------------------------------------


@pytest.fixture
def one_rank_mesh() -> Iterator[DeviceMesh]:
    """A 1-process gloo group: enough to apply fully_shard and run its hooks."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def tiny_batch(vocab_size: int, checkpoint_activations: bool = False) -> tuple[GLMConfig, dict]:
    config = GLMConfig.from_name("tiny", vocab_size=vocab_size, embedding_dropout_prob=0.0,
                                 attention_dropout_prob=0.0, output_dropout_prob=0.0,
                                 checkpoint_activations=checkpoint_activations)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (2, 12), generator=g)
    positions = torch.stack([torch.arange(12).expand(2, 12), torch.zeros(2, 12, dtype=torch.long)], dim=1)
    batch = {"input_ids": ids, "position_ids": positions, "sep": torch.tensor([6, 8]),
             "target_ids": ids.roll(-1, dims=1), "loss_mask": torch.ones(2, 12)}
    return config, batch


def loss_and_grads(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
    logits = model(batch["input_ids"], batch["position_ids"], batch["sep"])
    loss = blank_infilling_loss(logits, batch["target_ids"], batch["loss_mask"])[0]
    loss.backward()
    grads = {name: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
             for name, p in model.named_parameters()}
    return loss.detach(), grads


@pytest.mark.parametrize("checkpoint_activations", [False, True])
def test_apply_fsdp2_shards_every_layer_and_keeps_the_head_tied(
    one_rank_mesh: DeviceMesh, checkpoint_activations: bool
) -> None:
    config, batch = tiny_batch(500, checkpoint_activations)
    torch.manual_seed(0)
    reference = GLMModel(config)
    model = GLMModel(config)
    model.load_state_dict(reference.state_dict())
    assert apply_fsdp2(model, one_rank_mesh) is model
    assert apply_fsdp2(model, one_rank_mesh) is model  # a second call changes nothing

    assert isinstance(model, FSDPModule)
    assert all(isinstance(layer, FSDPModule) for layer in model.transformer.layers)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    names = [name for name, _ in model.named_parameters()]
    assert names == [name for name, _ in reference.named_parameters()]  # official keys unchanged
    assert "word_embeddings.weight" in names and not any("lm_head" in name for name in names)

    # The head's gradient adds to the embedding's: equal to the unsharded model's, both uses included.
    expected_loss, expected = loss_and_grads(reference, batch)
    loss, grads = loss_and_grads(model, batch)
    torch.testing.assert_close(loss, expected_loss)
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name], msg=name)


def test_apply_fsdp2_bf16_computes_in_bf16_and_keeps_fp32_weights(one_rank_mesh: DeviceMesh) -> None:
    config, batch = tiny_batch(500)
    torch.manual_seed(0)
    reference = GLMModel(config)
    model = GLMModel(config)
    model.load_state_dict(reference.state_dict())
    apply_fsdp2(model, one_rank_mesh, param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    logits = model(batch["input_ids"], batch["position_ids"], batch["sep"])
    expected = reference(batch["input_ids"], batch["position_ids"], batch["sep"])
    assert logits.dtype == torch.float32
    assert not torch.equal(logits, expected)  # computed in bf16 ...
    torch.testing.assert_close(logits, expected, atol=0.05, rtol=0.05)  # ... to bf16 accuracy
    assert {p.dtype for p in model.parameters()} == {torch.float32}


if __name__ == "__main__":
    torch.set_num_threads(1)  # two ranks share the cores
    train(parse_args(sys.argv[1:]))

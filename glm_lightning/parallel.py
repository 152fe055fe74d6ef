"""How a GLM is spread over processes: the Lightning strategy for each ``trainer.strategy`` name.

=========  =======================================================================================
``auto``   Lightning's choice: one device, or DDP when ``devices``/``num_nodes`` ask for more.
``ddp``    Data parallel, a full model replica per process (gloo on CPU, NCCL on GPU).
``fsdp``   FSDP2 (``torch.distributed.fsdp.fully_shard``) through Lightning's
           ``ModelParallelStrategy``: one data-parallel mesh dimension over every process.
           The ``configure_model`` of every training module (pretraining, SuperGLUE, seq2seq) is
           ``configure_glm_module``: it shards each ``GLMLayer`` and then the root, so the tied
           word embedding / output projection is one parameter in the root group.
           Runs on CPU (gloo) and GPU. Precision: ``32-true`` or ``bf16-mixed``, which is
           FSDP2's ``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)`` over fp32
           shards: the all-gathers carry bf16, the gradients are reduce-scattered in fp32 and the
           optimizer steps the fp32 shards (the master weights).
``fsdp1``  Lightning's ``FSDPStrategy`` (FlatParameter FSDP): one wrapped unit per ``GLMLayer``,
           optional activation checkpointing through Lightning's wrapper, fp32 gradient
           reduction under mixed precision. GPU only (Lightning refuses it on CPU).
=========  =======================================================================================

Checkpoints (``checkpoint_format``): ``full`` gathers the weights and optimizer state on rank 0
into one ordinary ``.ckpt`` file that loads without a process group
(``GLMPretrainModule.load_from_checkpoint``, ``torch.load``); ``sharded`` lets every rank write
its own shard into a checkpoint folder (fast, no rank-0 memory peak; PyTorch's distributed
checkpoint format, which reshards on load). ``consolidate_checkpoint`` turns such a folder into
a single weights file.

Activation checkpointing (``model.activation_checkpointing=true``, ``GLMConfig.checkpoint_activations``)
recomputes every layer in the backward pass inside the model, which composes with ``ddp`` and
``fsdp`` (under FSDP2 the recomputation gathers the layer's weights again). With ``fsdp1`` use
either that flag or ``activation_checkpointing=True`` here, not both (both recompute twice).

Starting weights (``init_from``): the modules then build their model on the meta device and
``configure_glm_module`` fills it from the checkpoint after sharding, one weight at a time, each
rank copying only its own shard (``glm_lightning.checkpoint.load_weights``): no rank ever holds
the whole model.

Multi-node runs: Lightning starts one process per device and reads the cluster from the
environment, so the same command works under torchrun and SLURM. Two nodes of 8 GPUs::

    # torchrun, on every node (node_rank 0 and 1; MASTER is the address of node 0):
    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=$NODE_RANK \\
        --master_addr=$MASTER --master_port=29500 \\
        -m experiments.run exp=pretrain trainer.num_nodes=2 trainer.devices=8 trainer.strategy=fsdp

    # SLURM: one task per GPU, srun starts them all (Lightning detects SLURM by itself):
    #SBATCH --nodes=2
    #SBATCH --ntasks-per-node=8
    #SBATCH --gpus-per-node=8
    srun python -m experiments.run exp=pretrain trainer.num_nodes=2 trainer.devices=8 \\
        trainer.strategy=fsdp trainer.checkpoint_format=sharded

Every collective of ``ddp`` and ``fsdp`` gives up after ``collective_timeout_s``
(``trainer.collective_timeout_s``): a lost node stops the others instead of hanging them. The batch
script and the cluster settings are in ``docs/slurm.md``.

On one machine, ``python -m experiments.run exp=pretrain trainer.devices=N trainer.strategy=fsdp``
is enough: Lightning launches the other N - 1 processes itself (also on CPU with
``trainer.accelerator=cpu``).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from functools import cache
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy, Strategy
from lightning.pytorch.utilities import rank_zero_only
from torch import nn
from torch.distributed.constants import default_pg_timeout
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from glm_lightning.checkpoint import load_weights, read_checkpoint
from glm_lightning.model import GLMLayer, GLMModel

STRATEGIES = ("auto", "ddp", "fsdp", "fsdp1")
# bf16 compute over fp32 master weights, on one device (autocast) and under every strategy.
RECOMMENDED_PRECISION = "bf16-mixed"
BF16_TRUE_NOTICE = (
    "note: trainer.precision=bf16-true keeps the weights and the AdamW state in bf16 (8 bits of "
    "mantissa): an update smaller than about 1/256 of its weight is lost, so a LayerNorm gain of 1.0 "
    f"does not move under steps below 0.004 (lr 1e-5, say); {RECOMMENDED_PRECISION} computes in bf16 "
    "and keeps fp32 master weights")
CHECKPOINT_FORMATS = ("full", "sharded")
# Precisions whose FSDP dtypes we know; ModelParallelStrategy (FSDP2) has no fp16 grad scaler.
FSDP_PRECISIONS = {"fsdp": ("32-true", "bf16-mixed"), "fsdp1": ("32-true", "bf16-mixed", "16-mixed")}


def mixed_precision_dtypes(precision: str) -> tuple[torch.dtype, torch.dtype] | None:
    """``(param_dtype, reduce_dtype)`` for a Lightning precision, or None for full fp32.

    Gradients are reduced in fp32 even under mixed precision: summing many low-precision
    gradients across ranks loses the small ones.
    """
    if precision == "32-true":
        return None
    if precision == "bf16-mixed":
        return torch.bfloat16, torch.float32
    if precision == "16-mixed":
        return torch.float16, torch.float32
    raise ValueError(f"unknown precision {precision!r}; choose one of 32-true, bf16-mixed, 16-mixed")


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` with pure data parallelism: data_parallel_size = every process,
    tensor_parallel_size = 1. The world size is known only once Lightning has resolved devices and
    nodes, so it is filled in here rather than by the caller."""

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()


def build_strategy(
    name: str,
    *,
    accelerator: str = "auto",
    precision: str = "32-true",
    checkpoint_format: str = "full",
    activation_checkpointing: bool = False,
    collective_timeout_s: float | None = None,
) -> Strategy | str:
    """The ``Trainer(strategy=...)`` value for a strategy name (see the module docstring).

    ``accelerator`` and ``precision`` are the Trainer's; they decide what the FSDP variants can
    do. ``activation_checkpointing`` is for ``fsdp1`` only (Lightning's checkpoint wrapper per
    layer); the other strategies take recomputation from ``GLMConfig.checkpoint_activations``.
    ``collective_timeout_s`` (None = torch's default) bounds how long a collective of ``ddp``/``fsdp``
    waits for a rank that stopped answering before it fails.
    """
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; valid choices: {', '.join(STRATEGIES)}")
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"unknown checkpoint_format {checkpoint_format!r}; "
                         f"valid choices: {', '.join(CHECKPOINT_FORMATS)}")
    sharded = checkpoint_format == "sharded"
    if sharded and name not in FSDP_PRECISIONS:
        raise ValueError(f"checkpoint_format 'sharded' needs strategy fsdp or fsdp1, not {name!r} "
                         "(its checkpoints are always one full file)")
    if activation_checkpointing and name != "fsdp1":
        raise ValueError("activation_checkpointing is an fsdp1 option; for other strategies set "
                         "GLMConfig.checkpoint_activations (model.activation_checkpointing=true)")
    if name in FSDP_PRECISIONS and precision not in FSDP_PRECISIONS[name]:
        raise ValueError(f"strategy {name!r} supports precision {', '.join(FSDP_PRECISIONS[name])}; "
                         f"got {precision!r}")

    if name == "auto":
        return "auto"
    timeout = default_pg_timeout if collective_timeout_s is None else timedelta(seconds=collective_timeout_s)
    if name == "ddp":
        # Every parameter gets a gradient in every step, so DDP need not search for unused ones.
        return DDPStrategy(find_unused_parameters=False, timeout=timeout)
    if name == "fsdp":
        return FSDP2Strategy(save_distributed_checkpoint=sharded, timeout=timeout)

    if accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available()):
        raise ValueError("strategy 'fsdp1' (Lightning FSDPStrategy) needs CUDA GPUs; "
                         "use strategy 'fsdp' (FSDP2), which also runs on CPU")
    dtypes = mixed_precision_dtypes(precision)
    mixed_precision = None
    if dtypes is not None:
        from torch.distributed.fsdp import MixedPrecision

        param_dtype, reduce_dtype = dtypes
        mixed_precision = MixedPrecision(param_dtype=param_dtype, reduce_dtype=reduce_dtype,
                                         buffer_dtype=param_dtype)
    return FSDPStrategy(
        auto_wrap_policy={GLMLayer},
        activation_checkpointing_policy={GLMLayer} if activation_checkpointing else None,
        state_dict_type="sharded" if sharded else "full",
        mixed_precision=mixed_precision,
        timeout=timeout,
    )


def apply_fsdp2(
    model: GLMModel,
    device_mesh: DeviceMesh,
    *,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
    reshard_after_forward: bool = True,
) -> GLMModel:
    """Shard ``model`` in place over the 1-D data-parallel ``device_mesh``; returns it.

    One FSDP group per ``GLMLayer`` (its parameters are gathered just before it runs and freed
    after it, so peak memory holds one layer's full weights), then the root group with the
    embeddings, position tables and final LayerNorm. The output head reuses
    ``word_embeddings.weight``, which lives in the root group: it stays gathered from the
    embedding lookup to the head, and both uses add to the same gradient, so tying survives.
    ``param_dtype`` / ``reduce_dtype`` (None = keep fp32) set the compute and gradient-reduction
    dtypes; the sharded master weights stay fp32. Calling it twice is a no-op.

    Every rank keeps its own slice of its own copy, nothing is broadcast: build the model on all
    ranks from the same seed or checkpoint (the jobs seed before building the module).
    """
    if isinstance(model, FSDPModule):
        return model
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for layer in model.transformer.layers:
        fully_shard(layer, mesh=device_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=device_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model


def apply_fsdp2_for_precision(model: GLMModel, device_mesh: DeviceMesh, precision: str) -> GLMModel:
    """``apply_fsdp2`` with the dtypes of a Lightning precision string (the Trainer's)."""
    dtypes = mixed_precision_dtypes(precision)
    param_dtype, reduce_dtype = dtypes if dtypes is not None else (None, None)
    return apply_fsdp2(model, device_mesh, param_dtype=param_dtype, reduce_dtype=reduce_dtype)


def configure_glm_module(module: L.LightningModule) -> None:
    """The ``configure_model`` of every GLM training module (``module.model``, ``module.init_from``).

    Under the ``fsdp`` strategy (the one that gives the module a device mesh) the model is sharded
    per layer in the Trainer's precision (``apply_fsdp2``), and every other child with parameters
    (the classifier head) becomes an FSDP group of its own, so that its gradients are reduced
    across ranks too. A model still on the meta device (built so for ``init_from``) is then
    filled from that checkpoint, each rank copying only its shards. Under every other strategy the
    model trains as built. Calling it again changes nothing. Under ``bf16-true`` it says once per
    process, on global rank 0, which updates that precision drops (``BF16_TRUE_NOTICE``).
    """
    if module._trainer is not None and module.trainer.precision == "bf16-true":
        say_once(BF16_TRUE_NOTICE)
    mesh = module.device_mesh
    if mesh is not None:
        data_parallel = mesh["data_parallel"]
        apply_fsdp2_for_precision(module.model, data_parallel, module.trainer.precision)
        dtypes = mixed_precision_dtypes(module.trainer.precision) or (None, None)
        for child in module.children():
            if child is not module.model and not isinstance(child, FSDPModule) and any(child.parameters()):
                fully_shard(child, mesh=data_parallel, mp_policy=MixedPrecisionPolicy(*dtypes))
    if module.init_from and any(p.is_meta for p in module.model.parameters()):
        device = module.trainer.strategy.root_device if module._trainer is not None else "cpu"
        load_weights(module.model, read_checkpoint(module.init_from), module.init_from, device=device)


@cache
@rank_zero_only
def say_once(line: str) -> None:
    """Print ``line`` to stderr the first time it comes, on global rank 0 only."""
    print(line, file=sys.stderr, flush=True)


@contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Keep the weights of an FSDP2-sharded ``model`` gathered over a stretch of forward passes whose
    number may differ between ranks (decoding stops when its own batch is done): otherwise every
    forward all-gathers, and a rank that stopped early would leave the others waiting. One
    all-gather on entry, which every rank must reach; a model that is not sharded is left alone."""
    groups = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for group in groups:
        group.set_reshard_after_forward(False, recurse=False)
        group.unshard()
    try:
        yield
    finally:
        for group in groups:
            group.reshard()
            group.set_reshard_after_forward(True, recurse=False)


def consolidate_checkpoint(folder: str | Path, output_file: str | Path) -> Path:
    """Merge a sharded ``fsdp`` checkpoint folder into one file without a process group.

    The file has the full ``state_dict`` and the metadata of an ordinary checkpoint (hyper-parameters,
    step counters), so ``GLMPretrainModule.load_from_checkpoint`` and ``torch.load`` read it. The
    optimizer state is left out: to continue training, resume from the folder itself.
    """
    import torch.distributed.checkpoint as dcp

    folder = Path(folder)
    reader = dcp.FileSystemReader(folder)
    # Allocate every weight at its full size from the folder's metadata, then let DCP fill them.
    prefix = "state_dict."
    weights = {
        key[len(prefix):]: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in reader.read_metadata().state_dict_metadata.items()
        if key.startswith(prefix)
    }
    state = {"state_dict": weights}
    with warnings.catch_warnings():  # loading in one process is the point here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable")
        dcp.load(state, storage_reader=reader, no_dist=True)
    checkpoint = torch.load(folder / "meta.pt", weights_only=False)
    checkpoint["state_dict"] = state["state_dict"]
    output_file = Path(output_file)
    torch.save(checkpoint, output_file)
    return output_file

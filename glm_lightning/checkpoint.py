"""GLM checkpoints in the official, Hugging Face and our own layouts: import, export, conversion.

All three layouts carry the key names of the official `model/modeling_glm.py`, so conversion is mostly about
where the tensors are stored:

* official Megatron/DeepSpeed: ``<dir>/<tag>/mp_rank_XX_model_states.pt`` with the tag named by
  ``<dir>/latest_checkpointed_iteration.txt`` (or DeepSpeed's ``latest``), or the ``.pt`` files
  directly in the folder as in the released archives; weights under ``module``. With model
  parallelism each rank holds a slice of the sharded weights (see ``merge_model_parallel``).
* Hugging Face: ``pytorch_model.bin`` or ``model.safetensors`` (single, or sharded with an
  ``*.index.json``) beside a ``config.json``; keys may be prefixed ``glm.``; head weights that are
  not part of the GLM backbone are ignored with a warning. Exports add what the released
  repositories hold beside the weights (``auto_map``, tokenizer files: ``glm_lightning.hf_folder``).
* ours: a Lightning-style checkpoint file, ``{"state_dict": {"model.<key>": ...},
  "hyper_parameters": {"model_config": {...}}}``, which ``init_weights`` reads and
  ``GLMPretrainModule.load_from_checkpoint`` restores (training checkpoints of that module are
  read the same way).

Plain state dicts in a single file (keys optionally prefixed ``glm.`` or ``model.``) are read too.
``.safetensors`` files need the ``safetensors`` package.

Large checkpoints load without a second copy in memory: ``.pt`` / ``.ckpt`` / ``.bin`` zip files are
memory-mapped (``torch.load(mmap=True)``), safetensors files opened with ``safe_open``, and
``load_weights`` copies one weight at a time into a model built on the meta device (model-parallel
shards merged per weight, cast per weight, the file pages released after each), so peak memory is
the model plus one weight. Under FSDP2 each rank copies only its own shard of each weight.

Command line::

    python -m glm_lightning.checkpoint convert SRC DST --to ours|official|hf [--model-parallel N]
        [--num-heads H] [--fix-chinese-gmask] [--tokenizer PATH] [--remote-code REPO]
    python -m glm_lightning.checkpoint inspect SRC [--num-heads H]
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import logging
import mmap
import pickle
import re
import sys
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

from glm_lightning.atomic import atomic_write
from glm_lightning.hf_folder import (
    REMOTE_CODE_REPOS,
    auto_map,
    has_tokenizer,
    load_tokenizer,
    read_tokenizer,
    tokenizer_kind,
    write_tokenizer,
)
from glm_lightning.model import VOCAB_MULTIPLE, GLMConfig, GLMModel
from glm_lightning.tokenizer import GLMTokenizer

log = logging.getLogger(__name__)

PREFIXES = ("model.", "glm.")
TRACKER_FILES = ("latest_checkpointed_iteration.txt", "latest")
SHARD_PATTERN = re.compile(r"mp_rank_(\d+)_model_states\.pt")
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HEAD_DIM = 64  # every released GLM uses 64-dimensional heads (official `config/*.sh`)
# Our GLMConfig beside the weights of an official checkpoint we write, so that its head count is not
# guessed on load. The official loaders read only "module" of a "release" checkpoint (official
# `utils.py` load_checkpoint), so the extra key leaves them unaffected.
OFFICIAL_CONFIG_KEY = "model_config"

# glm-10b-chinese was trained with [gMASK] and [eop] sharing id 50007; the Hugging Face release
# gives [gMASK] its own id 50009 and copies the embedding row there (the Hugging Face glm-10b-chinese files).
CHINESE_EOP_ID = 50007
CHINESE_GMASK_ID = 50009

# Model-parallel slicing of the official checkpoints (official `mpu/`), by key suffix.
QKV_KEYS = ("attention.query_key_value.weight", "attention.query_key_value.bias")
COLUMN_KEYS = ("word_embeddings.weight", "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias")
ROW_KEYS = ("attention.dense.weight", "mlp.dense_4h_to_h.weight")

# Fields of the Hugging Face GLM config (THUDM/glm-* on the hub) that our GLMConfig does not have.
HF_FIXED_FIELDS = {
    "checkpoint_num_layers": 1,
    "parallel_output": True,
    "relative_encoding": False,
    "output_predict": True,
    "spell_length": None,
    "spell_func": "lstm",
    "attention_scale": 1.0,
    "pool_token": "cls",
}


# Top-level keys of our checkpoints naming the tokenizer the model was trained with (sharded saves
# keep them in the folder's meta.pt); official and Hugging Face checkpoints carry none.
TOKENIZER_FINGERPRINT = "tokenizer_fingerprint"  # GLMTokenizer.vocabulary_fingerprint()
TOKENIZER_SOURCE = "tokenizer_source"  # how that run named its tokenizer, for messages


@dataclass(frozen=True)
class TokenizerRecord:
    """The tokenizer a checkpoint of ours was trained with: a model reads token ids as that tokenizer
    assigned them, so another one of the same padded size would load silently and mean nonsense."""

    fingerprint: str  # GLMTokenizer.vocabulary_fingerprint()
    source: str  # e.g. "wordpiece /vocab/bert-base-uncased.txt"

    @classmethod
    def of(cls, checkpoint: object) -> TokenizerRecord | None:
        """The record in a loaded checkpoint dict; None where there is none (official, Hugging Face)."""
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(TOKENIZER_FINGERPRINT), str):
            return cls(checkpoint[TOKENIZER_FINGERPRINT], str(checkpoint.get(TOKENIZER_SOURCE, "unnamed")))
        return None

    def store(self, checkpoint: dict) -> None:
        checkpoint[TOKENIZER_FINGERPRINT] = self.fingerprint
        checkpoint[TOKENIZER_SOURCE] = self.source


@dataclass
class StoredCheckpoint:
    """The backbone weights of a checkpoint, with what else the checkpoint says. The tensors are
    memory-mapped where the file format allows: nothing is read from disk until a weight is used."""

    shards: list[dict[str, Tensor]]  # one per model-parallel rank of an official checkpoint, else one
    layout: str  # e.g. "official (2-way model parallel)", for messages and ``inspect``
    config: dict = field(default_factory=dict)  # GLMConfig fields stored beside the weights
    mapped: bool = False  # the tensors are views of torch.load(mmap=True) files (see ``stream``)
    tokenizer: TokenizerRecord | None = None  # recorded in our checkpoints only

    @property
    def weights(self) -> dict[str, Tensor]:
        """Every weight, model-parallel shards merged (in memory at once: conversion, small models)."""
        return merge_model_parallel(self.shards)

    def shapes(self) -> dict[str, Tensor]:
        """Meta tensors with the merged shape and dtype of every weight; reads no data."""
        return merge_model_parallel([{k: torch.empty_like(v, device="meta") for k, v in shard.items()}
                                     for shard in self.shards])

    def stream(self, keys: Iterable[str]) -> Iterator[tuple[str, Tensor]]:
        """The merged weights of ``keys`` one at a time, read from disk when reached. Once the caller
        asks for the next one, the previous one is dropped from these shards and its file pages are
        released, so memory holds one weight of the checkpoint at a time; the shards are consumed."""
        for key in keys:
            parts = [shard.pop(key) for shard in self.shards]
            yield key, merge_tensor(key, parts)
            if self.mapped:
                release_pages(parts)


# ---------------------------------------------------------------------------------------------
# Reading


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The GLM backbone weights stored in ``path`` (a file or a folder), under the official key
    names; model-parallel shards are merged."""
    return read_checkpoint(path).weights


HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # e.g. THUDM/glm-large
HUB_FILES = ["*.bin", "*.safetensors", "*.json", "*.model", "*.txt"]


def resolve_source(source: str | Path) -> Path:
    """A local path as is; a Hugging Face repo id that is not a local path (``THUDM/glm-large``)
    downloaded once into the hub cache (weights, configs and vocabulary files only)."""
    path = Path(source)
    if path.exists() or not HUB_REPO_ID.match(str(source)):
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(source), allow_patterns=HUB_FILES))
    except Exception as error:  # offline, unknown repo, no permission: one clear message
        raise FileNotFoundError(
            f"{source} is not a local path and could not be fetched from the Hugging Face hub "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'no detail'}); "
            "download the checkpoint and pass its folder"
        ) from error


def read_checkpoint(path: str | Path) -> StoredCheckpoint:
    """The weights of ``path`` (or of a Hugging Face repo id) in any supported layout, plus the
    config stored beside them."""
    path = resolve_source(path)
    if path.is_dir():
        return _read_folder(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; expected a checkpoint file or folder")
    stored, mapped = _load_file(path)
    config = {}
    if isinstance(stored, dict) and isinstance(stored.get("state_dict"), dict):
        # A Lightning checkpoint, ours or a training checkpoint of GLMPretrainModule.
        hparams = stored.get("hyper_parameters") or {}
        config = dict(hparams.get("model_config") or {})
        layout = "ours (Lightning checkpoint)"
    elif isinstance(stored, dict) and isinstance(stored.get("module"), dict):
        config = dict(stored.get(OFFICIAL_CONFIG_KEY) or {})
        layout = "official (single file)"
    else:
        config = _hf_config(path.parent)
        layout = "state dict"
    return StoredCheckpoint([_backbone(stored, path)], layout, config, mapped, TokenizerRecord.of(stored))


def _read_folder(folder: Path) -> StoredCheckpoint:
    shard_folder = folder
    for tracker in TRACKER_FILES:
        if (folder / tracker).is_file():
            tag = (folder / tracker).read_text().strip()
            shard_folder = folder / tag
            if not shard_folder.is_dir():
                raise FileNotFoundError(f"{folder / tracker} names checkpoint tag {tag!r}, "
                                        f"but {shard_folder} is not a folder")
            break
    shards = {int(m.group(1)): p for p in shard_folder.iterdir() if (m := SHARD_PATTERN.fullmatch(p.name))}
    if shards:
        if sorted(shards) != list(range(len(shards))):
            raise ValueError(f"{shard_folder}: model-parallel ranks {sorted(shards)} "
                             f"are not 0..{len(shards) - 1}")
        loaded = [_load_file(shards[rank]) for rank in range(len(shards))]
        weights = [_backbone(stored, shards[rank]) for rank, (stored, _) in enumerate(loaded)]
        layout = "official" if len(weights) == 1 else f"official ({len(weights)}-way model parallel)"
        first = loaded[0][0]
        config = first.get(OFFICIAL_CONFIG_KEY) if isinstance(first, dict) else None
        mapped = all(mapped for _, mapped in loaded)
        return StoredCheckpoint(weights, layout, dict(config or {}), mapped)
    for name in HF_WEIGHT_FILES:
        index = folder / f"{name}.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else (
            [name] if (folder / name).is_file() else [])
        if files:
            weights, all_mapped = {}, True
            for file in files:
                stored, mapped = _load_file(folder / file)
                weights.update(_backbone(stored, folder / file))
                all_mapped = all_mapped and mapped
            layout = f"hugging face ({name}{', sharded' if index.is_file() else ''})"
            return StoredCheckpoint([weights], layout, _hf_config(folder), all_mapped)
    raise FileNotFoundError(
        f"{folder}: no GLM checkpoint file found in this folder (looked for mp_rank_XX_model_states.pt, "
        f"{' or '.join(TRACKER_FILES)}, {', '.join(HF_WEIGHT_FILES)} and their .index.json)"
    )


def _load_file(path: Path) -> tuple[object, bool]:
    """The object stored in ``path`` and whether its tensors are views of one ``mmap`` of the file.

    Zip-format torch files (every ``torch.save`` since PyTorch 1.6) are memory-mapped; safetensors
    tensors each map their own bytes (``safe_open``: unmapped when the tensor is dropped); only
    legacy torch files are read whole.
    """
    if path.suffix == ".safetensors":
        try:
            from safetensors import safe_open
        except ImportError as error:
            raise ValueError(f"{path}: reading .safetensors needs the safetensors package") from error
        try:
            with safe_open(path, framework="pt") as file:
                return {key: file.get_tensor(key) for key in file.keys()}, False  # noqa: SIM118 (not a dict)
        except Exception as error:  # safetensors raises its own SafetensorError (an Exception) on bad files
            if isinstance(error, OSError):
                raise
            raise ValueError(f"{path} is not a readable .safetensors file ({error})") from error
    mapped = zipfile.is_zipfile(path)
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mapped), mapped
        except pickle.UnpicklingError:
            # Official DeepSpeed files also pickle their training arguments; only tensors are used.
            return torch.load(path, map_location="cpu", weights_only=False, mmap=mapped), mapped
    # A text or truncated file fails in the unpickler in many ways (a text file: KeyError of its memo).
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ModuleNotFoundError, KeyError,
            IndexError, ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''})") from error


def _backbone(stored: object, path: Path) -> dict[str, Tensor]:
    if isinstance(stored, dict) and isinstance(stored.get("state_dict"), dict):
        stored = stored["state_dict"]
    elif isinstance(stored, dict) and isinstance(stored.get("module"), dict):
        stored = stored["module"]
    if not isinstance(stored, dict) or not any(isinstance(v, Tensor) for v in stored.values()):
        raise ValueError(f"{path} holds no state dict of tensors")
    return {strip_prefix(k): v for k, v in stored.items() if isinstance(v, Tensor)}


def strip_prefix(key: str) -> str:
    for prefix in PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _hf_config(folder: Path) -> dict:
    """The GLMConfig fields of a Hugging Face GLM ``config.json`` in ``folder``, if there is one."""
    path = folder / "config.json"
    if not path.is_file():
        return {}
    try:
        hf = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    if not isinstance(hf, dict) or not (hf.get("model_type") == "glm" or "block_position_encoding" in hf):
        return {}  # some other model's config
    names = {f.name for f in dataclasses.fields(GLMConfig)}
    return {k: v for k, v in hf.items() if k in names}


# ---------------------------------------------------------------------------------------------
# Model parallelism


def merge_model_parallel(shards: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """One state dict from the per-rank state dicts of an official model-parallel checkpoint.

    Column-parallel weights (vocabulary rows of ``word_embeddings``, ``dense_h_to_4h`` weight and
    bias) are concatenated on dim 0; the QKV projection is column-parallel but strided: rank r holds
    [Q_r; K_r; V_r], so the slices are concatenated per Q/K/V block. Row-parallel weights
    (``attention.dense``, ``dense_4h_to_h``) are concatenated on dim 1; everything else (their
    biases, LayerNorms, position tables) is replicated and taken from rank 0.
    """
    keys = list(shards[0])
    for rank, shard in enumerate(shards[1:], start=1):
        if set(shard) != set(keys):
            raise ValueError(f"model-parallel rank {rank} holds other weights than rank 0: "
                             f"{sorted(set(shard) ^ set(keys))[:5]}")
    return {key: merge_tensor(key, [shard[key] for shard in shards]) for key in keys}


def merge_tensor(key: str, parts: list[Tensor]) -> Tensor:
    """One weight from its model-parallel ``parts`` (rank order), as ``merge_model_parallel``."""
    if len(parts) == 1:
        return parts[0]
    if key.endswith(QKV_KEYS):
        blocks = [part.chunk(3, dim=0) for part in parts]
        return torch.cat([torch.cat([b[i] for b in blocks], dim=0) for i in range(3)], dim=0)
    if key.endswith(COLUMN_KEYS):
        return torch.cat(parts, dim=0)
    if key.endswith(ROW_KEYS):
        return torch.cat(parts, dim=1)
    return parts[0]


def release_pages(tensors: list[Tensor]) -> None:
    """Drop the memory-mapped file pages that lie wholly inside ``tensors`` from this process
    (``madvise(MADV_DONTNEED)``; Linux only, elsewhere a no-op). The data stays valid: a page
    touched again is read back from the file. Only for tensors of ``torch.load(mmap=True)``, whose
    mapping lives as long as any tensor of the file, so pages read once would otherwise stay."""
    if not sys.platform.startswith("linux"):
        return
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    for tensor in tensors:
        storage = tensor.untyped_storage()
        start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
        first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first:
            madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), mmap.MADV_DONTNEED)


def split_model_parallel(state_dict: dict[str, Tensor], model_parallel: int) -> list[dict[str, Tensor]]:
    """The per-rank state dicts of an official ``model_parallel``-way checkpoint (the inverse of
    ``merge_model_parallel``)."""
    shards: list[dict[str, Tensor]] = [{} for _ in range(model_parallel)]
    for key, tensor in state_dict.items():
        if key.endswith(QKV_KEYS):
            blocks = [block.chunk(model_parallel, dim=0) for block in _split(tensor, 3, 0, key)]
            parts = [torch.cat([b[rank] for b in blocks], dim=0) for rank in range(model_parallel)]
        elif key.endswith(COLUMN_KEYS):
            parts = _split(tensor, model_parallel, 0, key)
        elif key.endswith(ROW_KEYS):
            parts = _split(tensor, model_parallel, 1, key)
        else:
            parts = [tensor] * model_parallel
        for shard, part in zip(shards, parts, strict=True):
            shard[key] = part.clone()  # contiguous, and not saved as a view of the whole tensor
    return shards


def _split(tensor: Tensor, parts: int, dim: int, key: str) -> list[Tensor]:
    if tensor.shape[dim] % parts:
        raise ValueError(f"{key}: dim {dim} of size {tensor.shape[dim]} does not split into "
                         f"{parts} equal parts")
    return list(tensor.chunk(parts, dim=dim))


# ---------------------------------------------------------------------------------------------
# Config and model


def infer_config(state_dict: dict[str, Tensor], num_attention_heads: int | None = None) -> GLMConfig:
    """The GLMConfig whose model has exactly the weights of ``state_dict``.

    Layers, hidden size, vocabulary rows, FFN size, ``max_sequence_length`` (position rows - 1) and
    block positions follow from the keys and shapes. The head count does not; without
    ``num_attention_heads`` it is ``hidden_size // 64``, the head size of every released GLM.
    """
    try:
        vocab_rows, hidden = state_dict["word_embeddings.weight"].shape
        position_rows = state_dict["transformer.position_embeddings.weight"].shape[0]
        ffn = state_dict["transformer.layers.0.mlp.dense_h_to_4h.weight"].shape[0]
    except KeyError as error:
        raise ValueError(f"not a GLM state dict: it lacks {error.args[0]}") from error
    if vocab_rows % VOCAB_MULTIPLE:
        raise ValueError(f"word_embeddings has {vocab_rows} rows, not a multiple of {VOCAB_MULTIPLE} "
                         "as GLMConfig requires")
    layers = {int(m.group(1)) for key in state_dict if (m := re.match(r"transformer\.layers\.(\d+)\.", key))}
    heads = num_attention_heads or max(hidden // HEAD_DIM, 1)
    return GLMConfig(
        num_layers=len(layers),
        hidden_size=hidden,
        num_attention_heads=heads,
        vocab_size=vocab_rows,
        max_sequence_length=position_rows - 1,
        intermediate_size=ffn,
        block_position_encoding="transformer.block_position_embeddings.weight" in state_dict,
    )


def checkpoint_config(stored: StoredCheckpoint, num_attention_heads: int | None = None) -> GLMConfig:
    """The config of a read checkpoint: sizes from the weights, the head count from the argument,
    else from the config stored beside the weights, else ``hidden_size // 64``; dropouts and
    other settings from the stored config where there is one."""
    heads = num_attention_heads or stored.config.get("num_attention_heads")
    sizes = dataclasses.asdict(infer_config(stored.shapes(), heads))
    names = {f.name for f in dataclasses.fields(GLMConfig)}
    settings = {k: v for k, v in stored.config.items() if k in names}
    shape_fields = ("num_layers", "hidden_size", "num_attention_heads", "vocab_size",
                    "max_sequence_length", "intermediate_size", "block_position_encoding")
    return GLMConfig(**{**settings, **{k: sizes[k] for k in shape_fields}})


def fix_chinese_gmask(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """A copy of the glm-10b-chinese weights with embedding row 50007 ([eop], which the original
    training also used for [gMASK]) copied into row 50009, the id the Hugging Face tokenizer gives
    [gMASK]; as the Hugging Face conversion does."""
    return {**state_dict, "word_embeddings.weight": _chinese_gmask_row(state_dict["word_embeddings.weight"])}


def _chinese_gmask_row(embeddings: Tensor) -> Tensor:
    if embeddings.shape[0] <= CHINESE_GMASK_ID:
        raise ValueError(f"the [gMASK] fix needs the Chinese vocabulary (50048 rows); "
                         f"word_embeddings has {embeddings.shape[0]}")
    embeddings = embeddings.clone()
    embeddings[CHINESE_GMASK_ID] = embeddings[CHINESE_EOP_ID]
    return embeddings


def load_glm(path: str | Path, *, num_attention_heads: int | None = None,
             fix_chinese_gmask_row: bool = False, dtype: torch.dtype = torch.float32) -> GLMModel:
    """A GLMModel (in eval mode, ``dtype``) with the config inferred from the checkpoint at
    ``path`` (see ``checkpoint_config``) and its weights, built on the meta device and filled one
    weight at a time (``load_weights``): peak memory is the model plus one weight."""
    return build_glm(read_checkpoint(path), path, num_attention_heads=num_attention_heads,
                     fix_chinese_gmask_row=fix_chinese_gmask_row, dtype=dtype)


def build_glm(stored: StoredCheckpoint, source: str | Path, *, num_attention_heads: int | None = None,
              fix_chinese_gmask_row: bool = False, dtype: torch.dtype = torch.float32) -> GLMModel:
    """``load_glm`` of a checkpoint already read (``read_checkpoint``), whose other records the
    caller has looked at; consumes ``stored``."""
    config = checkpoint_config(stored, num_attention_heads)
    with torch.device("meta"):  # no random init of weights that are overwritten anyway
        model = GLMModel(config).to(dtype)
    load_weights(model, stored, source, fix_chinese_gmask_row=fix_chinese_gmask_row)
    return model.eval()


def init_weights(model: GLMModel, path: str | Path) -> None:
    """Copy the weights of ``path`` into ``model`` (see ``load_weights``); every backbone weight must
    be present with the model's shape, so a wrong size or vocabulary fails here instead of training
    a mix."""
    load_weights(model, read_checkpoint(path), path)


def new_glm(config: GLMConfig, init_from: str | Path | None = None) -> GLMModel:
    """The model a training module starts from: randomly initialised, or for ``init_from`` built on
    the meta device (no memory, no random init), to be filled from that checkpoint when the Trainer
    sets the module up (``glm_lightning.parallel.configure_glm_module``), after any sharding."""
    if init_from is None:
        return GLMModel(config)
    with torch.device("meta"):
        return GLMModel(config)


def check_weights(config: GLMConfig, path: str | Path) -> StoredCheckpoint:
    """Raise ValueError unless the checkpoint at ``path`` holds every weight of a model with
    ``config`` in its shape; reads no weights, so a job can check before it trains. Returns the
    checkpoint read, for its other records (the tokenizer)."""
    stored = read_checkpoint(path)
    with torch.device("meta"):
        _select(GLMModel(config), stored.shapes(), path)
    return stored


def load_weights(model: nn.Module, stored: StoredCheckpoint, source: str | Path, *,
                 device: torch.device | str = "cpu", fix_chinese_gmask_row: bool = False) -> None:
    """Fill ``model`` (a GLMModel, possibly sharded) with the weights of ``stored``, one at a time.

    Each weight is read from disk, merged across model-parallel shards, copied into its parameter
    (cast to the parameter's dtype) and its file pages released, so memory holds the model and one
    weight of the checkpoint. Meta-device parameters are allocated on ``device`` first. FSDP2
    parameters (DTensors) receive only this rank's shard of each weight. Consumes ``stored``.
    """
    _select(model, stored.shapes(), source)  # every weight present, in the model's shape
    if any(p.is_meta for p in model.parameters()):
        model.to_empty(device=device)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, weight in stored.stream(params):
            if key == "word_embeddings.weight" and fix_chinese_gmask_row:
                weight = _chinese_gmask_row(weight)
            param = params[key]
            if isinstance(param, DTensor):  # this rank's slice, cut locally (no communication)
                shard = distribute_tensor(weight, param.device_mesh, param.placements, src_data_rank=None)
                param.to_local().copy_(shard.to_local())
            else:
                param.copy_(weight)


def _select(model: nn.Module, weights: dict[str, Tensor], source: str | Path) -> dict[str, Tensor]:
    """The weights ``model`` needs, after checking that all are there with its shapes."""
    expected = dict(model.named_parameters())
    ignored = sorted(set(weights) - set(expected))
    if ignored:
        log.warning("%s: ignoring %d weights that are not part of the GLM backbone: %s",
                    source, len(ignored), ", ".join(ignored[:8]) + (" ..." if len(ignored) > 8 else ""))
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ValueError(f"{source} lacks GLM weights {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
                         "is the configured model larger than the checkpoint?")
    for key, tensor in expected.items():
        if weights[key].shape != tensor.shape:
            raise ValueError(
                f"{source}: {key} has shape {list(weights[key].shape)} but the model needs "
                f"{list(tensor.shape)}; set the model size (model.name and overrides) and the "
                "tokenizer the checkpoint was trained with"
            )
    return {key: weights[key] for key in expected}


# ---------------------------------------------------------------------------------------------
# Writing


def export_official(model: GLMModel, out_dir: str | Path, *, model_parallel: int = 1) -> Path:
    """Write ``model`` as an official GLM checkpoint: ``out_dir/release/mp_rank_XX_model_states.pt``
    (``{"module": state_dict, "model_config": {...}}``, one file per model-parallel rank) and
    ``out_dir/latest_checkpointed_iteration.txt`` naming the ``release`` tag, as the official
    loaders expect. Returns the folder of the shards."""
    return _write_official(_plain(model), model.config, Path(out_dir), model_parallel)


def _write_official(weights: dict[str, Tensor], config: GLMConfig, out_dir: Path,
                    model_parallel: int) -> Path:
    if model_parallel < 1:
        raise ValueError(f"model_parallel must be >= 1, got {model_parallel}")
    if config.num_attention_heads % model_parallel:
        raise ValueError(f"{config.num_attention_heads} attention heads do not split over "
                         f"{model_parallel} model-parallel ranks")
    shards = split_model_parallel(weights, model_parallel) if model_parallel > 1 else [weights]
    tag_dir = out_dir / "release"
    tag_dir.mkdir(parents=True, exist_ok=True)
    for rank, shard in enumerate(shards):
        torch.save({"module": shard, OFFICIAL_CONFIG_KEY: dataclasses.asdict(config)},
                   tag_dir / f"mp_rank_{rank:02d}_model_states.pt")
    (out_dir / TRACKER_FILES[0]).write_text("release")
    return tag_dir


def hf_config(config: GLMConfig, *, remote_code: str = REMOTE_CODE_REPOS["wordpiece"],
              dtype: torch.dtype = torch.float32) -> dict:
    """The Hugging Face GLM ``config.json`` of a model with ``config``, as THUDM/glm-* on the hub
    hold it, with an ``auto_map`` that takes the released classes from the repository ``remote_code``."""
    if config.intermediate_size != 4 * config.hidden_size:
        raise ValueError(f"the Hugging Face GLM has FFN size 4 * hidden_size = {4 * config.hidden_size}; "
                         f"this model has {config.intermediate_size}")
    return {
        "architectures": ["GLMModel"],
        "auto_map": auto_map(remote_code),
        "model_type": "glm",
        "num_layers": config.num_layers,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_attention_heads,
        "embedding_dropout_prob": config.embedding_dropout_prob,
        "attention_dropout_prob": config.attention_dropout_prob,
        "output_dropout_prob": config.output_dropout_prob,
        "max_sequence_length": config.max_sequence_length,
        "checkpoint_activations": config.checkpoint_activations,
        "block_position_encoding": config.block_position_encoding,
        "initializer_range": config.initializer_range,
        "torch_dtype": str(dtype).removeprefix("torch."),
        **HF_FIXED_FIELDS,
    }


def export_hf(model: GLMModel, out_dir: str | Path, *, tokenizer: GLMTokenizer | None = None,
              remote_code: str | None = None) -> Path:
    """Write ``model`` as a Hugging Face GLM folder that loads as the released GLM
    (``glm_lightning.hf_folder``): ``pytorch_model.bin`` with the official keys (the HF conversion
    saves the official dict verbatim), ``config.json`` with its ``auto_map`` and, given
    ``tokenizer``, the tokenizer files. ``remote_code`` names the repository of the remote code
    (default: the THUDM repository released with the tokenizer's vocabulary)."""
    return _write_hf(_plain(model), model.config, Path(out_dir), tokenizer, remote_code)


def _write_hf(weights: dict[str, Tensor], config: GLMConfig, out_dir: Path,
              tokenizer: GLMTokenizer | None = None, remote_code: str | None = None) -> Path:
    repo = remote_code or REMOTE_CODE_REPOS[tokenizer_kind(tokenizer) if tokenizer else "wordpiece"]
    dtype = next(iter(weights.values())).dtype
    hf = hf_config(config, remote_code=repo, dtype=dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(weights, out_dir / "pytorch_model.bin")
    (out_dir / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    if tokenizer is None:
        log.warning("%s: no tokenizer given, so no tokenizer files were written and auto_map names %s; give "
                    "the tokenizer (--tokenizer) to make the folder loadable by AutoTokenizer", out_dir, repo)
    else:
        note = write_tokenizer(tokenizer, out_dir, repo=repo)
        if note:
            log.warning("%s", note)
    return out_dir


def save_ours(model: GLMModel, path: str | Path) -> Path:
    """Write ``model`` as our checkpoint file: Lightning's layout with the model config in
    ``hyper_parameters``, so ``init_weights``, ``load_glm`` and
    ``GLMPretrainModule.load_from_checkpoint`` all read it."""
    return _write_ours(_plain(model), model.config, Path(path))


def _write_ours(weights: dict[str, Tensor], config: GLMConfig, path: Path,
                tokenizer: TokenizerRecord | None = None) -> Path:
    checkpoint: dict = {
        "state_dict": {f"model.{k}": v for k, v in weights.items()},
        "hyper_parameters": {"model_config": dataclasses.asdict(config)},
    }
    if tokenizer is not None:  # converting one of ours keeps the tokenizer it was trained with
        tokenizer.store(checkpoint)
    try:
        checkpoint["pytorch-lightning_version"] = version("lightning")  # Lightning's loader needs it
    except PackageNotFoundError:
        pass
    return atomic_write(path, lambda f: torch.save(checkpoint, f))


def _plain(model: GLMModel) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# Command line


def convert(src: str | Path, dst: str | Path, to: str, *, model_parallel: int = 1,
            num_attention_heads: int | None = None, fix_chinese_gmask_row: bool = False,
            overwrite: bool = False, tokenizer: GLMTokenizer | None = None,
            remote_code: str | None = None) -> GLMConfig:
    """Rewrite the checkpoint ``src`` in layout ``to`` (``ours``: a file; ``official``, ``hf``: a
    folder) at ``dst``. Works on the state dict, so the stored dtype is kept and no model is
    built beyond checking the shapes. An existing ``dst`` (a file, or a folder that is not empty)
    is refused with ``FileExistsError`` before anything is read, unless ``overwrite``. ``hf``
    writes the tokenizer files of ``tokenizer`` (default: ``source_tokenizer(src)``) and an
    ``auto_map`` naming ``remote_code`` (see ``export_hf``). Returns the config."""
    refuse_existing(dst, overwrite, "--overwrite")
    if to == "hf" and tokenizer is None:
        tokenizer = source_tokenizer(resolve_source(src))
    stored = read_checkpoint(src)
    config = checkpoint_config(stored, num_attention_heads)
    with torch.device("meta"):
        weights = _select(GLMModel(config), stored.weights, src)
    if fix_chinese_gmask_row:
        weights = fix_chinese_gmask(weights)
    weights = {k: v.contiguous() for k, v in weights.items()}
    if to != "official" and model_parallel != 1:
        raise ValueError("--model-parallel applies to --to official only")
    if to == "official":
        _write_official(weights, config, Path(dst), model_parallel)
    elif to == "hf":
        _write_hf(weights, config, Path(dst), tokenizer, remote_code)
    elif to == "ours":
        _write_ours(weights, config, Path(dst), stored.tokenizer)
    else:
        raise ValueError(f"unknown layout {to!r}; choose ours, official or hf")
    return config


RUN_TOKENIZER = "tokenizer.model"  # where a pretraining run keeps its sentencepiece model


def source_tokenizer(src: str | Path) -> GLMTokenizer | None:
    """The tokenizer that comes with a checkpoint, if any: the tokenizer files of a Hugging Face
    folder, or ``<run>/tokenizer.model`` of a pretraining run's ``<run>/checkpoints/*.ckpt``."""
    src = Path(src)
    if has_tokenizer(src):
        return read_tokenizer(src)
    run_tokenizer = src.resolve().parent.parent / RUN_TOKENIZER
    if src.parent.name == "checkpoints" and run_tokenizer.is_file():
        return GLMTokenizer.from_sentencepiece(str(run_tokenizer))
    return None


def refuse_existing(path: str | Path, overwrite: bool, how: str) -> None:
    """Raise ``FileExistsError`` naming ``path`` when it is a file or a folder that is not empty and
    ``overwrite`` is false (``how``: the option that allows replacing it)."""
    path = Path(path)
    if not overwrite and (path.is_file() or (path.is_dir() and any(path.iterdir()))):
        raise FileExistsError(f"{path} already exists; give {how} to replace it")


def describe(src: str | Path, num_attention_heads: int | None = None) -> str:
    """What ``inspect`` prints: layout, inferred config and parameter count."""
    stored = read_checkpoint(src)
    config = checkpoint_config(stored, num_attention_heads)
    with torch.device("meta"):
        weights = _select(GLMModel(config), stored.shapes(), src)
    count = sum(t.numel() for t in weights.values())
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in weights.values()})
    if num_attention_heads:
        heads_from = "given"
    elif "num_attention_heads" in stored.config:
        heads_from = "stored config"
    else:
        heads_from = (f"a guess: hidden_size // {HEAD_DIM}, the head size of every released GLM; give "
                      "--num-heads (model.num_attention_heads in a run) if this model's differs")
    lines = [f"layout: {stored.layout}", f"parameters: {count:,}", f"dtype: {', '.join(dtypes)}",
             f"heads: {config.num_attention_heads} ({heads_from})", "config:"]
    lines += [f"  {k}: {v}" for k, v in dataclasses.asdict(config).items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glm_lightning.checkpoint",
                                     description="Convert or inspect GLM checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True)
    conv = commands.add_parser("convert", help="rewrite a checkpoint in another layout")
    conv.add_argument("src")
    conv.add_argument("dst", help="a file for --to ours, else a folder")
    conv.add_argument("--to", required=True, choices=("ours", "official", "hf"))
    conv.add_argument("--model-parallel", type=int, default=1, help="official shards to write")
    conv.add_argument("--num-heads", type=int, default=None)
    conv.add_argument("--fix-chinese-gmask", action="store_true",
                      help="copy embedding row 50007 into 50009 (glm-10b-chinese)")
    conv.add_argument("--overwrite", action="store_true", help="replace an existing dst")
    conv.add_argument("--tokenizer", default=None,
                      help="--to hf: the tokenizer to write beside the weights (a folder, a sentencepiece "
                           ".model, a vocab.txt, or a vocab.json with merges.txt beside it); default: the "
                           "one that comes with SRC")
    conv.add_argument("--tokenizer-kind", choices=("gpt2", "roberta"), default=None,
                      help="which layout a vocab.json has (default gpt2)")
    conv.add_argument("--remote-code", default=None,
                      help="--to hf: the Hugging Face repository whose modeling_glm.py loads the folder "
                           "(default: the THUDM repository of the tokenizer's vocabulary)")
    insp = commands.add_parser("inspect", help="print the inferred config and parameter count")
    insp.add_argument("src")
    insp.add_argument("--num-heads", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "convert":
            tokenizer = load_tokenizer(args.tokenizer, kind=args.tokenizer_kind) if args.tokenizer else None
            config = convert(args.src, args.dst, args.to, model_parallel=args.model_parallel,
                             num_attention_heads=args.num_heads, fix_chinese_gmask_row=args.fix_chinese_gmask,
                             overwrite=args.overwrite, tokenizer=tokenizer, remote_code=args.remote_code)
            print(f"wrote {args.dst} ({args.to}): {config.num_layers} layers, hidden {config.hidden_size}, "
                  f"{config.num_attention_heads} heads, vocab {config.vocab_size}")
        else:
            print(describe(args.src, args.num_heads))
    except (OSError, ValueError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

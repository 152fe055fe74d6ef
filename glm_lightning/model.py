"""The GLM transformer (paper §2.2; official `model/modeling_glm.py`), in one file read top to bottom.

Pre-LN layers with a fused QKV projection, GeLU (tanh approximation), a final LayerNorm and an
output head tied to the word embeddings without bias. Every token carries two positions (2D
positional encoding): its position in the corrupted text and its position inside the span being
generated; each has its own learned table of ``max_sequence_length + 1`` rows (the extra row serves
the sentinel-token ablation).

Module paths mirror the official implementation, so the state-dict keys are the official GLM keys
(``word_embeddings.weight``, ``transformer.layers.{i}.attention.query_key_value.weight``, ...).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.utils.checkpoint import checkpoint

from glm_lightning.attention_mask import dense_block_mask, glm_attention_mask, glm_block_mask, real_lengths
from glm_lightning.errors import ConfigError

VOCAB_MULTIPLE = 128
ATTENTION_BACKENDS = ("auto", "sdpa", "flex")


def pad_vocab_size(vocab_size: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """Round up to a multiple of 128, as the official ``--make-vocab-size-divisible-by``."""
    return -(-vocab_size // multiple) * multiple


@dataclass
class GLMConfig:
    """Sizes and regularisation of a GLM; field names follow the Hugging Face GLM config."""

    num_layers: int = 24
    hidden_size: int = 1024
    num_attention_heads: int = 16
    vocab_size: int = 30592  # padded up to a multiple of 128 on construction
    max_sequence_length: int = 512  # position tables have one more row than this
    intermediate_size: int | None = None  # None = 4 * hidden_size
    embedding_dropout_prob: float = 0.1
    attention_dropout_prob: float = 0.1
    output_dropout_prob: float = 0.1
    layernorm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    block_position_encoding: bool = True  # False = the "w/o 2D positions" ablation
    checkpoint_activations: bool = False  # recompute each layer in backward to save memory
    attention: str = "auto"  # sdpa, flex (FlexAttention, block-sparse) or auto (flex on CUDA)
    compile: bool = False  # torch.compile each layer (see GLMStack for the shapes it compiles)

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention {self.attention!r}; "
                             f"valid choices: {', '.join(ATTENTION_BACKENDS)}")
        self.vocab_size = pad_vocab_size(self.vocab_size)
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_name(cls, name: str, **overrides) -> GLMConfig:
        """A released model's sizes, optionally overridden field by field."""
        if name not in PRESETS:
            raise ValueError(f"unknown GLM preset {name!r}; choose one of {sorted(PRESETS)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise TypeError(f"unknown GLMConfig field(s) {unknown}; valid fields: {sorted(fields)}")
        return cls(**{**PRESETS[name], **overrides})


_BERT_VOCAB, _BPE_VOCAB = 30592, 50304
PRESETS: dict[str, dict] = {
    "tiny": dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=1024,
                 max_sequence_length=256),
    "glm-base": dict(num_layers=12, hidden_size=768, num_attention_heads=12,
                     vocab_size=_BERT_VOCAB, max_sequence_length=512),
    "glm-large": dict(num_layers=24, hidden_size=1024, num_attention_heads=16,
                      vocab_size=_BERT_VOCAB, max_sequence_length=512),
    "glm-roberta-large": dict(num_layers=24, hidden_size=1024, num_attention_heads=16,
                              vocab_size=_BPE_VOCAB, max_sequence_length=512),
    "glm-410m": dict(num_layers=30, hidden_size=1024, num_attention_heads=16,
                     vocab_size=_BERT_VOCAB, max_sequence_length=512),
    "glm-515m": dict(num_layers=30, hidden_size=1152, num_attention_heads=18,
                     vocab_size=_BERT_VOCAB, max_sequence_length=512),
    "glm-2b": dict(num_layers=36, hidden_size=2048, num_attention_heads=32,
                   vocab_size=_BPE_VOCAB, max_sequence_length=1024),
    "glm-10b": dict(num_layers=48, hidden_size=4096, num_attention_heads=64,
                    vocab_size=_BPE_VOCAB, max_sequence_length=1024),
}


class KVCache:
    """Keys and values of already-processed tokens, preallocated for ``max_length`` tokens.

    Equivalent to the official hidden-state "mems": a cached token's keys and values are what the
    full forward pass would compute for it, so decoding one token at a time gives the same logits.

    Tokens are appended in two ways. By default the new tokens go after ``length`` (a Python int)
    and attention reads the filled slots only, so shapes grow with every call (the context and
    multi-token blocks). With ``static`` set, each layer writes its one new token in place at the
    slot ``position`` (a one-element tensor). Under ``torch.compile`` attention then reads all
    ``max_length`` slots under the mask ``key_valid [batch, max_length]`` (False = padding or not
    yet written): every step has the same shapes and touches no Python state, so it compiles to
    one graph (and can be captured in a CUDA graph). Run eagerly, it reads the filled slots only,
    as the default path does. The decoding loop advances ``position`` and ``length`` together.
    """

    def __init__(self, config: GLMConfig, batch_size: int, max_length: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        shape = (batch_size, config.num_attention_heads, max_length, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.length = 0  # tokens cached so far (advanced once per forward, after the last layer)
        self.max_length = max_length
        self.key_valid = torch.zeros(batch_size, max_length, dtype=torch.bool, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.static = False

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store this layer's new keys/values; return the keys/values attention reads: all of
        them up to the new ones (compiled with ``static``: the whole preallocated buffers)."""
        if self.static:
            self.keys[layer].index_copy_(2, self.position, k)
            self.values[layer].index_copy_(2, self.position, v)
            if torch.compiler.is_compiling():
                return self.keys[layer], self.values[layer]
            end = self.length + 1
            return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]
        end = self.length + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache full: {end} tokens > max_length {self.max_length}")
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def snapshot(self) -> tuple[list[Tensor], list[Tensor], Tensor, int]:
        """A point to come back to with :meth:`restore` (tokens appended later are discarded:
        appends never overwrite the slots before ``length``, and :meth:`reorder` makes new
        tensors; ``key_valid`` beyond ``length`` is the caller's to reset)."""
        return self.keys, self.values, self.key_valid, self.length

    def restore(self, snapshot: tuple[list[Tensor], list[Tensor], Tensor, int]) -> None:
        self.keys, self.values, self.key_valid, self.length = snapshot

    def reorder(self, index: Tensor) -> None:
        """Select batch rows into new tensors (beam search expands each sample to its beams)."""
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]
        self.key_valid = self.key_valid.index_select(0, index)

    def reorder_(self, index: Tensor) -> None:
        """Select as many batch rows in place (beam search keeps the surviving beams): the
        buffers keep their addresses, which a captured CUDA graph needs. Only the ``length``
        filled slots are copied."""
        n = self.length
        for t in (*self.keys, *self.values):
            t[:, :, :n] = t[:, :, :n].index_select(0, index)
        self.key_valid[:, :n] = self.key_valid[:, :n].index_select(0, index)


def attention_backend(config: GLMConfig, device: torch.device, training: bool) -> str:
    """``"sdpa"`` or ``"flex"`` for one forward pass. ``auto`` takes flex on CUDA, where its
    compiled kernels skip the masked blocks, except while attention dropout is active (flex has
    no dropout); elsewhere sdpa (FlexAttention has no backward pass off CUDA)."""
    if config.attention != "auto":
        return config.attention
    dropout = training and config.attention_dropout_prob > 0
    return "flex" if device.type == "cuda" and not dropout else "sdpa"


def check_trainable(config: GLMConfig, device: torch.device) -> None:
    """Refuse, in one line before the first step, an attention backend that cannot train here."""
    if attention_backend(config, device, training=True) != "flex":
        return
    if device.type != "cuda":
        raise ConfigError(f"model.attention=flex cannot train on {device.type}: FlexAttention's backward "
                          "pass needs CUDA; use model.attention=sdpa or auto")
    if config.attention_dropout_prob > 0:
        raise ConfigError("model.attention=flex has no attention dropout (model.attention_dropout_prob="
                          f"{config.attention_dropout_prob}); set it to 0, or use model.attention=sdpa")


@functools.cache
def compiled_flex_attention() -> Callable[..., Tensor]:
    """``flex_attention`` compiled once per process: only compiled does it run the fused,
    block-sparse kernels (eagerly it materialises every score)."""
    return torch.compile(flex_attention)


def flex_attention_forward(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask) -> Tensor:
    """FlexAttention of ``q [B, h, Lq, d]`` against ``k, v [B, h, Lk, d]``: traced into the graph
    of a compiled layer, compiled on GPUs, and eager on CPU (forward only; torch's advice to
    compile it there is meant for GPUs and is silenced)."""
    if torch.compiler.is_compiling():
        return flex_attention(q, k, v, block_mask=block_mask)
    if q.device.type == "cpu":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            return flex_attention(q, k, v, block_mask=block_mask)
    return compiled_flex_attention()(q, k, v, block_mask=block_mask)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, packed: Tensor | None) -> Tensor:
    """``F.linear``, or oneDNN's linear on ``packed``, ``weight`` reordered into oneDNN's layout
    (glm_lightning.prepack: the CPU decoding step)."""
    if packed is None:
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class Linear(nn.Linear):
    """``nn.Linear`` that runs on a prepacked weight while one is attached (the CPU decoding step)."""

    packed: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias, self.packed)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused QKV projection (rows: Q | K | V, heads contiguous)."""

    def __init__(self, config: GLMConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.query_key_value = Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = Linear(config.hidden_size, config.hidden_size)
        self.attention_dropout = config.attention_dropout_prob
        self.output_dropout = nn.Dropout(config.output_dropout_prob)

    def forward(self, x: Tensor, mask: Tensor | BlockMask | None, kv_cache: KVCache | None, layer: int,
                causal: bool = False) -> Tensor:
        B, L, H = x.shape
        q, k, v = (
            t.view(B, L, self.num_heads, -1).transpose(1, 2)
            for t in self.query_key_value(x).split(H, dim=-1)
        )
        if kv_cache is not None:
            k, v = kv_cache.append(layer, k, v)
        if isinstance(mask, BlockMask):
            y = flex_attention_forward(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v,
                attn_mask=mask,
                dropout_p=self.attention_dropout if self.training else 0.0,
                is_causal=causal,
            )
        return self.output_dropout(self.dense(y.transpose(1, 2).reshape(B, L, H)))


class MLP(nn.Module):
    def __init__(self, config: GLMConfig):
        super().__init__()
        self.dense_h_to_4h = Linear(config.hidden_size, config.intermediate_size)
        self.dense_4h_to_h = Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.output_dropout_prob)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh")))


class GLMLayer(nn.Module):
    """Pre-LN block: ``h = x + Attn(LN1(x))``; ``y = h + MLP(LN2(h))``."""

    def __init__(self, config: GLMConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = SelfAttention(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, mask: Tensor | BlockMask | None, kv_cache: KVCache | None = None,
                layer: int = 0, causal: bool = False) -> Tensor:
        x = x + self.attention(self.input_layernorm(x), mask, kv_cache, layer, causal)
        return x + self.mlp(self.post_attention_layernorm(x))


def run_layer(layer: GLMLayer, h: Tensor, mask: Tensor | BlockMask | None, causal: bool) -> Tensor:
    """One layer without a KV cache: the unit that ``GLMConfig.compile`` compiles."""
    return layer(h, mask, None, 0, causal)


@functools.cache
def compiled_run_layer() -> Callable[..., Tensor]:
    """``run_layer`` compiled once per process with dynamic batch and sequence sizes (see GLMStack)."""
    return torch.compile(run_layer, dynamic=True)


class GLMStack(nn.Module):
    """Position embeddings, the layers and the final LayerNorm (the official ``transformer``).

    With ``config.compile`` every layer runs through one compiled function (the layers share its
    graphs; parameters are graph inputs, so the state-dict keys stay the official ones). Shapes are
    compiled dynamically (``dynamic=True``): batch size and length are symbols, so the varying
    batches of cloze, seq2seq and evaluation reuse a graph instead of compiling one per shape
    (padding lengths to buckets would still compile once per bucket and per batch size). A graph
    is added only per kind of mask (GLM ``sep``, explicit, causal), per train/eval mode, and for
    sizes of 1, which torch specialises. Decoding on the KV cache runs eagerly: the cache is Python
    state whose length changes at every step, which would guard and recompile the graph each time.
    """

    def __init__(self, config: GLMConfig):
        super().__init__()
        self.config = config
        rows = config.max_sequence_length + 1
        self.position_embeddings = nn.Embedding(rows, config.hidden_size)
        if config.block_position_encoding:
            self.block_position_embeddings = nn.Embedding(rows, config.hidden_size)
        self.embedding_dropout = nn.Dropout(config.embedding_dropout_prob)
        self.layers = nn.ModuleList(GLMLayer(config) for _ in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)

    def forward(self, words: Tensor, position_ids: Tensor, mask: Tensor | BlockMask | None,
                kv_cache: KVCache | None, causal: bool = False) -> Tensor:
        h = words + self.position_embeddings(position_ids[:, 0])
        if self.config.block_position_encoding:
            h = h + self.block_position_embeddings(position_ids[:, 1])
        h = self.embedding_dropout(h)
        recompute = self.config.checkpoint_activations and self.training
        run = compiled_run_layer() if self.config.compile else run_layer
        for i, layer in enumerate(self.layers):
            if kv_cache is not None:
                h = layer(h, mask, kv_cache, i, causal)
            elif recompute:
                h = checkpoint(run, layer, h, mask, causal, use_reentrant=False)
            else:
                h = run(layer, h, mask, causal)
        return self.final_layernorm(h)


class GLMModel(nn.Module):
    """GLM backbone with the tied, bias-free language-model head."""

    head_packed: Tensor | None = None  # the head's prepacked weight (see ``Linear``)

    def __init__(self, config: GLMConfig):
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.transformer = GLMStack(config)
        self.apply(self._init_weights)
        # Residual output projections get a smaller init so the residual stream's variance
        # does not grow with depth (official scaled_init_method).
        residual_std = config.initializer_range / math.sqrt(2.0 * config.num_layers)
        for layer in self.transformer.layers:
            nn.init.normal_(layer.attention.dense.weight, std=residual_std)
            nn.init.normal_(layer.mlp.dense_4h_to_h.weight, std=residual_std)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def new_kv_cache(self, batch_size: int, max_length: int) -> KVCache:
        """An empty cache on this model's device and dtype, for incremental decoding."""
        weight = self.word_embeddings.weight
        return KVCache(self.config, batch_size, max_length, dtype=weight.dtype, device=weight.device)

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        sep: Tensor | None = None,
        attention_mask: Tensor | None = None,
        kv_cache: KVCache | None = None,
        *,
        output_mask: Tensor | None = None,
        return_hidden: bool = False,
    ) -> Tensor:
        """Logits ``[B, L, V]`` (float32) of ``input_ids [B, L]`` at ``position_ids [B, 2, L]``.

        ``sep [B]`` is the Part-A length of each sample (positions ``< sep`` attend to all of
        Part A; the rest attend to Part A and causally to Part B). ``attention_mask [B, 1, L, Lk]``
        (True = may attend) overrides it; with neither, attention is causal. With ``kv_cache`` the
        inputs are the next tokens after the cached ones: they also see every cached token, and
        the cache grows by ``L`` (a ``static`` cache takes one token, written at its
        ``position``; its caller advances it and gives the mask of the slots it reads, or None
        for all of them). ``output_mask [B, L]`` (bool) computes the logits only where it
        is True and returns them as ``[N, V]`` in row-major order: pretraining predicts Part B only,
        so this skips most of the output projection, the largest matmul of a small model.
        ``return_hidden`` returns the final hidden states instead of logits (for other heads).

        The attention runs on ``config.attention`` (see ``attention_backend``); its mask is built
        once here for all layers. FlexAttention skips the blocks of padding: with ``sep`` and no
        cache, the tokens after the last non-zero dim-1 position (``real_lengths``) are padding.
        """
        B, L = input_ids.shape
        if position_ids.shape != (B, 2, L):
            raise ValueError(f"position_ids must be [B, 2, L] = {[B, 2, L]}, got {list(position_ids.shape)}")
        static = kv_cache is not None and kv_cache.static
        past = kv_cache.length if kv_cache is not None and not static else 0
        mask, causal = attention_mask, False
        if attention_backend(self.config, input_ids.device, self.training) == "flex":
            if mask is not None:
                mask = dense_block_mask(mask, B)
            else:
                lengths = None
                if sep is not None and not past:  # Part A is never padding
                    lengths = torch.maximum(real_lengths(position_ids), sep)
                mask = glm_block_mask(sep, lengths, L, past + L)
        elif mask is None and not static:  # (a static step without a mask sees every slot it reads)
            if sep is not None or (past and L > 1):
                mask = glm_attention_mask(sep, L, past + L, device=input_ids.device)
            else:  # no Part A: plain causal, or one new token that sees every cached one (no mask)
                causal = past == 0
        h = self.transformer(self.word_embeddings(input_ids), position_ids, mask, kv_cache, causal)
        if kv_cache is not None and not static:
            kv_cache.length += L
        if return_hidden:
            return h
        if output_mask is not None:
            h = h[output_mask]
        return linear(h, self.word_embeddings.weight, None, self.head_packed).float()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

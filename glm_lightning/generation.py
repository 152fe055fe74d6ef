"""Autoregressive decoding of GLM blanks and multi-blank infilling (official `generate_samples.py`).

A blank is generated the way Part B is laid out in pretraining: ``[sop]`` at (mask position, 1),
then each generated token at (mask position, 2), (mask position, 3), ... Decoding runs on the KV
cache: the context (Part A) is run once, bidirectionally, and every later token attends to all
cached tokens and causally to the tokens generated before it.

Batches hold right-padded contexts of different lengths (``sep`` = each context's length). The
padding stays in the cache, hidden by the cache's ``key_valid`` mask: a generated token then sees
exactly what it would see if its sample were decoded alone.

Each generated token is one call of :func:`decode_step` on the preallocated cache in its static
mode (fixed shapes, the new slot written in place), which ``generation.compile`` compiles
(docs/decoding.md). Finished rows and beams are tracked on tensors.

Logits processors are small functions applied to the next-token logits before the softmax, in
the order min length, no-repeat n-gram (then temperature, top-k, top-p when sampling); inside the
loop the first two work in place and do nothing while they have nothing to forbid.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from glm_lightning import prepack
from glm_lightning.attention_mask import glm_attention_mask
from glm_lightning.model import GLMModel, KVCache, attention_backend
from glm_lightning.tokenizer import GLMTokenizer

Strategy = Literal["greedy", "sample", "beam"]
STRATEGIES = ("greedy", "sample", "beam")


# ----------------------------------------------------------------------------------------------
# Logits processors
# ----------------------------------------------------------------------------------------------

def _min_length_(logits: Tensor, num_generated: int, min_length: int, end_ids: Sequence[int]) -> Tensor:
    if num_generated < min_length:
        logits[:, list(end_ids)] = -float("inf")
    return logits


def apply_min_length(logits: Tensor, num_generated: int, min_length: int, end_ids: Sequence[int]) -> Tensor:
    """Forbid the end tokens until ``min_length`` tokens have been generated."""
    if num_generated >= min_length:
        return logits
    return _min_length_(logits.clone(), num_generated, min_length, end_ids)


def banned_ngram_tokens(tokens: Sequence[int], ngram_size: int) -> list[int]:
    """Tokens that would complete an n-gram already present in ``tokens`` (the definition that
    :func:`banned_ngrams` computes for all rows at once)."""
    if ngram_size <= 0 or len(tokens) + 1 < ngram_size:
        return []
    prefix = tuple(tokens[len(tokens) - ngram_size + 1:]) if ngram_size > 1 else ()
    return [
        tokens[i + ngram_size - 1]
        for i in range(len(tokens) - ngram_size + 1)
        if tuple(tokens[i:i + ngram_size - 1]) == prefix
    ]


def banned_ngrams(history: Tensor, ngram_size: int) -> tuple[Tensor, Tensor] | None:
    """``(rows, tokens)``: the tokens that would repeat an n-gram of their row of ``history [R, t]``
    (the generated tokens), or None when no row can repeat one yet. Every window of
    ``ngram_size - 1`` tokens equal to the row's last ones bans the token that followed it. Only
    the ``[R, t]`` history is compared; nothing of vocabulary size is allocated."""
    windows = history.shape[1] - ngram_size + 1
    if ngram_size <= 0 or windows <= 0:
        return None
    following = history[:, ngram_size - 1:]  # [R, windows]: the token after each window
    if ngram_size == 1:
        rows = torch.arange(len(history), device=history.device)[:, None].expand_as(following)
        return rows.reshape(-1), following.reshape(-1)
    grams = history.unfold(1, ngram_size - 1, 1)[:, :windows]  # [R, windows, n - 1]
    rows, starts = (grams == history[:, None, windows:]).all(-1).nonzero(as_tuple=True)
    return rows, following[rows, starts]


def apply_no_repeat_ngram(logits: Tensor, generated: Tensor | Sequence[Sequence[int]],
                          ngram_size: int) -> Tensor:
    """Forbid, row by row, every token that would repeat an n-gram of that row's generated tokens
    (``generated [R, t]``, rows of equal length)."""
    history = torch.as_tensor(generated, dtype=torch.long, device=logits.device).view(len(logits), -1)
    banned = banned_ngrams(history, ngram_size)
    return logits if banned is None else logits.index_put(banned, logits.new_tensor(-float("inf")))


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """Sharpen (< 1) or flatten (> 1) the distribution."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return logits if temperature == 1.0 else logits / temperature


def apply_top_k(logits: Tensor, top_k: int) -> Tensor:
    """Keep the ``top_k`` largest logits of each row (0 = keep all)."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = logits.topk(top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, -float("inf"))


def apply_top_p(logits: Tensor, top_p: float) -> Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability reaches
    ``top_p`` (the most likely token is always kept)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative > top_p
    remove[..., 1:] = remove[..., :-1].clone()  # shift right: keep the token that crosses top_p
    remove[..., 0] = False
    return logits.masked_fill(remove.scatter(-1, order, remove), -float("inf"))


def _constrain_(logits: Tensor, history: Tensor, *, min_length: int, no_repeat_ngram_size: int,
                end_ids: Sequence[int]) -> Tensor:
    """Min length and no-repeat n-grams, in place on the step's own logits (no copy when
    neither has anything to forbid); ``history [R, t]`` holds the tokens generated so far."""
    _min_length_(logits, history.shape[1], min_length, end_ids)
    banned = banned_ngrams(history, no_repeat_ngram_size)
    return logits if banned is None else logits.index_put_(banned, logits.new_tensor(-float("inf")))


# ----------------------------------------------------------------------------------------------
# The one-token step on a static cache
# ----------------------------------------------------------------------------------------------

COMPILE_SETTINGS = ("auto", "true", "false")
# How the step is compiled per device type: inductor on CPU; on CUDA inductor with CUDA graphs,
# which replay the whole step as one launch (the cache buffers keep their addresses for them).
COMPILE_OPTIONS: dict[str, dict[str, Any]] = {"cpu": {}, "cuda": {"mode": "reduce-overhead"}}


def compile_step(setting: bool | str, device: torch.device) -> bool:
    """Whether ``generation.compile`` (``auto``, ``true``/True or ``false``/False) compiles the
    step on ``device``. ``auto`` compiles on CUDA only: on CPU the compiled step measured not
    consistently faster than the eager one (benchmarks/RESULTS.md, "Decoding on the static cache")."""
    value = str(setting).lower()
    if value not in COMPILE_SETTINGS:
        raise ValueError(f"unknown generation compile setting {setting!r}; choose one of {COMPILE_SETTINGS}")
    return value == "true" or (value == "auto" and device.type == "cuda")


def decode_step(model: GLMModel, cache: KVCache, tokens: Tensor, position_ids: Tensor) -> Tensor:
    """One new token per row on a static cache: ``tokens [R, 1]`` at ``position_ids [R, 2, 1]``
    written at ``cache.position``, attending to every valid slot; the next-token logits ``[R, V]``.

    Compiled, every call has the same shapes (all ``max_length`` slots under ``key_valid``) and
    changes no Python state, so the whole step (all layers, the cache writes, the mask) is one
    graph. Eagerly it reads the filled slots only, and without a mask when none of them is padding
    (SDPA's unmasked path; FlexAttention always takes the mask).
    """
    cache.key_valid.index_fill_(1, cache.position, True)
    if torch.compiler.is_compiling():
        mask = cache.key_valid[:, None, None, :]
    else:
        valid = cache.key_valid[:, :cache.length + 1]
        flex = attention_backend(model.config, tokens.device, model.training) == "flex"
        mask = None if not flex and bool(valid.all()) else valid[:, None, None, :]
    logits = model(tokens, position_ids, attention_mask=mask, kv_cache=cache)
    cache.position.add_(1)
    return logits[:, -1].float()


@functools.cache
def _compiled_step(device_type: str) -> Callable[..., Tensor]:
    return torch.compile(decode_step, fullgraph=True, dynamic=False, **COMPILE_OPTIONS[device_type])


class _StaticSteps:
    """Decoding on ``cache`` one token at a time from its current length; restores the dynamic
    mode afterwards (``fill_blanks`` appends whole blocks between blanks). The eager step runs
    on prepacked weights where it can (glm_lightning.prepack: float32 on CPU)."""

    def __init__(self, model: GLMModel, cache: KVCache, compile: bool | str):
        self.model, self.cache = model, cache
        device = cache.position.device
        self.run = _compiled_step(device.type) if compile_step(compile, device) else decode_step
        self.graphs = self.run is not decode_step and device.type == "cuda"
        self.prepack = self.run is decode_step and prepack.supported(model)
        self.packed_rows = 0

    def mark_static(self) -> None:
        """Tell a CUDA graph that the cache buffers are updated in place, never replaced
        (again after beam search expands the cache into new buffers)."""
        if self.graphs:
            for t in (*self.cache.keys, *self.cache.values, self.cache.key_valid, self.cache.position):
                torch._dynamo.mark_static_address(t)

    def __enter__(self) -> _StaticSteps:
        self.mark_static()
        self.cache.static = True
        self.cache.position.fill_(self.cache.length)
        self.cache.key_valid[:, self.cache.length:] = False
        return self

    def __exit__(self, *exc: object) -> None:
        self.cache.static = False
        if self.packed_rows:
            prepack.detach(self.model)

    def __call__(self, tokens: Tensor, dim1: Tensor, block_position: int) -> Tensor:
        """Logits ``[R, V]`` of ``tokens [R, 1]`` at (dim1, block_position)."""
        cache = self.cache
        if cache.length >= cache.max_length:
            raise ValueError(f"KV cache full: {cache.length + 1} tokens > max_length {cache.max_length}")
        position_ids = torch.stack([dim1, torch.full_like(dim1, block_position)], dim=1)[:, :, None]
        if self.prepack and len(tokens) != self.packed_rows:
            prepack.attach(self.model, len(tokens))
            self.packed_rows = len(tokens)
        logits = self.run(self.model, self.cache, tokens, position_ids)
        cache.length += 1
        # A CUDA graph's output is overwritten by its next replay; the loop keeps what it reads.
        return logits.clone() if self.graphs else logits


def _forward_block(model: GLMModel, cache: KVCache, tokens: Tensor, dim1: Tensor) -> None:
    """Append ``tokens [R, n]`` at (dim1, 1..n) after the cache (a chosen blank, as Part B): each
    sees the valid cached slots and causally the block."""
    rows, n = tokens.shape
    start = cache.length
    block = torch.arange(1, n + 1, device=tokens.device)
    position_ids = torch.stack([dim1[:, None].expand(rows, n), block[None].expand(rows, n)], dim=1)
    cache.key_valid[:, start:start + n] = True
    causal = glm_attention_mask(None, n, start + n, device=tokens.device)  # [1, 1, n, Lk]
    mask = causal & cache.key_valid[:, None, None, :start + n]
    model(tokens, position_ids, attention_mask=mask, kv_cache=cache, return_hidden=True)  # the cache only


class _BeamHypotheses:
    """The best finished hypotheses of one sample, scored ``sum log p / length ** length_penalty``."""

    def __init__(self, num_beams: int, length_penalty: float):
        self.num_beams = num_beams
        self.length_penalty = length_penalty
        self.hyps: list[tuple[float, list[int]]] = []

    def _score(self, sum_logprobs: float, length: int) -> float:
        return sum_logprobs / max(length, 1) ** self.length_penalty

    @property
    def worst_score(self) -> float:
        return min(score for score, _ in self.hyps)

    def add(self, tokens: list[int], sum_logprobs: float) -> None:
        score = self._score(sum_logprobs, len(tokens))
        if len(self.hyps) < self.num_beams or score > self.worst_score:
            self.hyps.append((score, tokens))
            if len(self.hyps) > self.num_beams:
                self.hyps.remove(min(self.hyps, key=lambda h: h[0]))

    def is_done(self, best_sum_logprobs: float, length: int) -> bool:
        """No running beam can still beat the worst kept hypothesis (no early stopping)."""
        if len(self.hyps) < self.num_beams:
            return False
        return self.worst_score >= self._score(best_sum_logprobs, length)

    def best(self) -> list[int]:
        return max(self.hyps, key=lambda h: h[0])[1]


def _decode(
    model: GLMModel,
    cache: KVCache,
    mask_positions: Tensor,
    *,
    sop_id: int,
    end_ids: Sequence[int],
    strategy: Strategy = "greedy",
    max_new_tokens: int = 32,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    min_length: int = 0,
    no_repeat_ngram_size: int = 0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    compile: bool | str = False,
) -> list[list[int]]:
    """Generate one blank per sample after whatever the cache already holds (``cache.key_valid``
    marks the cached slots a generated token may see)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
    if max_new_tokens < 1:
        return [[] for _ in range(len(mask_positions))]
    if max_new_tokens >= model.config.max_sequence_length + 1:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) exceeds the block-position table "
                         f"({model.config.max_sequence_length})")
    constraints = dict(min_length=min_length, no_repeat_ngram_size=no_repeat_ngram_size, end_ids=end_ids)
    with _StaticSteps(model, cache, compile) as step:
        if strategy == "beam":
            return _beam_search(step, mask_positions, sop_id=sop_id, max_new_tokens=max_new_tokens,
                                num_beams=num_beams, length_penalty=length_penalty, **constraints)
        batch, device = len(mask_positions), mask_positions.device
        ends = torch.tensor(list(end_ids), device=device)
        history = torch.zeros(batch, max_new_tokens, dtype=torch.long, device=device)
        lengths = torch.full((batch,), max_new_tokens, device=device)  # tokens before each row's end
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        tokens = torch.full((batch, 1), sop_id, dtype=torch.long, device=device)
        for i in range(max_new_tokens):
            logits = _constrain_(step(tokens, mask_positions, i + 1), history[:, :i], **constraints)
            if strategy == "greedy":
                next_tokens = logits.argmax(dim=-1)
            else:
                logits = apply_top_p(apply_top_k(apply_temperature(logits, temperature), top_k), top_p)
                probs = logits.softmax(dim=-1)
                if generator is not None:  # sample where the generator lives, so a seed is portable
                    probs = probs.to(generator.device)
                next_tokens = torch.multinomial(probs, 1, generator=generator)[:, 0].to(device)
            history[:, i] = next_tokens
            ended = torch.isin(next_tokens, ends) & ~finished
            lengths.masked_fill_(ended, i)
            finished |= ended
            if bool(finished.all()):
                break
            tokens = next_tokens[:, None]
        return [row[:n] for row, n in zip(history.tolist(), lengths.tolist(), strict=True)]


def _beam_search(step: _StaticSteps, mask_positions: Tensor, *, sop_id: int, end_ids: Sequence[int],
                 max_new_tokens: int, num_beams: int, length_penalty: float, min_length: int,
                 no_repeat_ngram_size: int) -> list[list[int]]:
    """HF-style beam search without early stopping. The top ``(1 + len(end_ids)) * num_beams``
    candidates of each sample are taken deterministically, so however many of them end, the
    first ``num_beams`` that do not fill the beams; candidates that end within the top
    ``num_beams`` become finished hypotheses. The beams are chosen on tensors; only finished
    hypotheses (a few per sample) pass through Python."""
    batch, K = len(mask_positions), num_beams
    cache, device = step.cache, mask_positions.device
    expand = torch.arange(batch, device=device).repeat_interleave(K)
    cache.reorder(expand)
    step.mark_static()
    dim1 = mask_positions[expand]
    beam_scores = torch.zeros(batch, K, device=device)
    beam_scores[:, 1:] = -1e9  # all beams start identical: expand only the first at step 0
    beam_scores = beam_scores.view(-1)
    history = torch.zeros(batch * K, max_new_tokens, dtype=torch.long, device=device)
    ends = torch.tensor(list(end_ids), device=device)
    first_row = torch.arange(batch, device=device)[:, None] * K
    hyps = [_BeamHypotheses(K, length_penalty) for _ in range(batch)]
    done = [False] * batch
    tokens = torch.full((batch * K, 1), sop_id, dtype=torch.long, device=device)
    for i in range(max_new_tokens):
        logits = _constrain_(step(tokens, dim1, i + 1), history[:, :i], min_length=min_length,
                             no_repeat_ngram_size=no_repeat_ngram_size, end_ids=end_ids)
        scores = F.log_softmax(logits, dim=-1) + beam_scores[:, None]
        vocab = scores.shape[-1]
        top_scores, top_index = scores.view(batch, K * vocab).topk(min((1 + len(end_ids)) * K, K * vocab),
                                                                   dim=1)
        top_tokens, top_rows = top_index % vocab, first_row + top_index // vocab
        is_end = torch.isin(top_tokens, ends)
        # The first K candidates that do not end, in rank order (a stable sort moves them first).
        continuing = ~is_end & ((~is_end).cumsum(dim=1) <= K)
        chosen = torch.sort((~continuing).to(torch.uint8), dim=1, stable=True).indices[:, :K]
        finished = is_end[:, :K] & ~torch.tensor(done, device=device)[:, None]
        for b, rank in finished.nonzero().tolist():
            hyps[b].add(history[top_rows[b, rank], :i].tolist(), top_scores[b, rank].item())
        best = top_scores[:, 0].tolist()
        for b in range(batch):
            done[b] = done[b] or hyps[b].is_done(best[b], i)
        if all(done):
            break
        rows = top_rows.gather(1, chosen).view(-1)
        if step.graphs:  # a CUDA graph reads the same buffers at every replay
            cache.reorder_(rows)
        else:  # one copy instead of two
            cache.reorder(rows)
        history = history[rows]
        tokens = top_tokens.gather(1, chosen).view(-1, 1)
        history[:, i] = tokens[:, 0]
        beam_scores = top_scores.gather(1, chosen).view(-1)
    for b in range(batch):
        if not done[b]:
            for row in range(b * K, (b + 1) * K):
                hyps[b].add(history[row].tolist(), beam_scores[row].item())
    return [h.best() for h in hyps]


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------

class _EvalMode:
    """Decoding without dropout, restoring the caller's mode afterwards."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.was_training = model, model.training

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)


@torch.no_grad()
def generate(
    model: GLMModel,
    input_ids: Tensor,
    position_ids: Tensor,
    sep: Tensor,
    mask_positions: Tensor,
    *,
    sop_id: int,
    eop_id: int,
    eos_id: int | None = None,
    max_new_tokens: int = 32,
    **decoding: Any,
) -> list[list[int]]:
    """Fill one blank per sample: the tokens generated for it, without the end token.

    ``input_ids [B, L]`` / ``position_ids [B, 2, L]`` are right-padded contexts (Part A) of
    lengths ``sep [B]``; ``mask_positions [B]`` is the dim-1 position every generated token takes.
    ``decoding`` takes the keyword options of ``_decode`` (one list for this and ``fill_blanks``):
    ``strategy`` is "greedy", "sample" (``temperature``, ``top_k``, ``top_p``, ``generator``) or
    "beam" (``num_beams``, ``length_penalty``). Decoding stops at ``[eop]`` (or ``eos_id``) or after
    ``max_new_tokens``; ``min_length`` and ``no_repeat_ngram_size`` constrain every strategy.
    ``compile`` (``auto``, True or False; see :func:`compile_step`) compiles the one-token step.
    """
    batch, length = input_ids.shape
    with _EvalMode(model):
        cache = model.new_kv_cache(batch, length + max_new_tokens)
        model(input_ids, position_ids, sep, kv_cache=cache, return_hidden=True)  # the cache, no logits
        cache.key_valid[:, :length] = torch.arange(length, device=input_ids.device)[None] < sep.to(
            input_ids.device)[:, None]
        end_ids = [eop_id] if eos_id is None else [eop_id, eos_id]
        return _decode(model, cache, mask_positions.to(input_ids.device), sop_id=sop_id,
                       end_ids=end_ids, max_new_tokens=max_new_tokens, **decoding)


def infilling_context(tokenizer: GLMTokenizer, text: str) -> tuple[list[int], list[int]]:
    """The infilling context and its sorted mask positions (official ``generate_samples.py``):
    ``[CLS]`` + text, a ``[gMASK]`` appended when the text has no mask, and ``eos`` unless the text
    ends with ``[gMASK]``."""
    masks = {tokenizer.mask_id, tokenizer.smask_id, tokenizer.gmask_id}
    ids = tokenizer.encode(text)
    if not masks.intersection(ids):
        ids.append(tokenizer.gmask_id)
    context = [tokenizer.cls_id, *ids]
    if ids[-1] != tokenizer.gmask_id:
        context.append(tokenizer.eos_id)
    return context, [i for i, t in enumerate(context) if t in masks]


@torch.no_grad()
def fill_blanks(
    model: GLMModel,
    tokenizer: GLMTokenizer,
    text: str,
    *,
    strategy: Strategy = "greedy",
    max_new_tokens: int = 32,
    return_ids: bool = False,
    **decoding: Any,
) -> str | list[list[int]]:
    """Fill every [MASK]/[sMASK]/[gMASK] of ``text`` left to right (official `generate_samples.py`).

    The context is run once; each blank then starts with ``[sop]`` at (its mask position, 1).
    After a blank is chosen, its ``[sop]`` and tokens stay in the cache exactly as Part B is laid
    out in pretraining, so later blanks attend to earlier fills. Returns the text with the blanks
    replaced, or with ``return_ids`` the generated ids of each blank ([eop] excluded).
    ``decoding`` takes the options of :func:`generate` (``num_beams``, ``min_length``, ...).
    """
    context, mask_positions = infilling_context(tokenizer, text)
    device = model.word_embeddings.weight.device
    end_ids = [tokenizer.eop_id, tokenizer.eos_id]
    fills: list[list[int]] = []
    with _EvalMode(model):
        cache = model.new_kv_cache(1, len(context) + len(mask_positions) * (max_new_tokens + 1))
        ids = torch.tensor([context], device=device)
        position_ids = torch.stack([torch.arange(len(context), device=device),
                                    torch.zeros(len(context), dtype=torch.long, device=device)])[None]
        model(ids, position_ids, torch.tensor([len(context)], device=device), kv_cache=cache,
              return_hidden=True)
        cache.key_valid[:, :cache.length] = True
        for i, mask_position in enumerate(mask_positions):
            dim1 = torch.tensor([mask_position], device=device)
            saved = cache.snapshot()
            fill = _decode(model, cache, dim1, sop_id=tokenizer.sop_id, end_ids=end_ids,
                           strategy=strategy, max_new_tokens=max_new_tokens, **decoding)[0]
            fills.append(fill)
            if i + 1 < len(mask_positions):
                # Rewind to before this blank (beam search expands the cache into new buffers)
                # and keep exactly "[sop] fill" for the blanks that follow.
                cache.restore(saved)
                _forward_block(model, cache, torch.tensor([[tokenizer.sop_id, *fill]], device=device), dim1)
    if return_ids:
        return fills
    out: list[int] = []
    fill_iter = iter(fills)
    for position, token in enumerate(context[1:], start=1):
        if position in mask_positions:
            out.extend(next(fill_iter))
        elif token != tokenizer.eos_id or position != len(context) - 1:
            out.append(token)
    return tokenizer.decode(out)

"""Autoregressive decoding of GLM blanks and multi-blank infilling (official `generate_samples.py`).

A blank is generated the way Part B is laid out in pretraining: ``[sop]`` at (mask position, 1),
then each generated token at (mask position, 2), (mask position, 3), ... Decoding runs on the KV
cache: the context (Part A) is run once, bidirectionally, and every later token attends to all
cached tokens and causally to the tokens generated before it.

Batches hold right-padded contexts of different lengths (``sep`` = each context's length). The
padding stays in the cache, so every step passes an explicit attention mask that hides it: a
generated token then sees exactly what it would see if its sample were decoded alone.

Logits processors are small pure functions applied to the next-token logits before the
softmax, in the order min length, no-repeat n-gram (then temperature, top-k, top-p when sampling).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from glm_lightning.attention_mask import glm_attention_mask
from glm_lightning.model import GLMModel, KVCache
from glm_lightning.tokenizer import GLMTokenizer

Strategy = Literal["greedy", "sample", "beam"]
STRATEGIES = ("greedy", "sample", "beam")


# ----------------------------------------------------------------------------------------------
# Logits processors
# ----------------------------------------------------------------------------------------------

def apply_min_length(logits: Tensor, num_generated: int, min_length: int, end_ids: Sequence[int]) -> Tensor:
    """Forbid the end tokens until ``min_length`` tokens have been generated."""
    if num_generated >= min_length:
        return logits
    logits = logits.clone()
    logits[:, list(end_ids)] = -float("inf")
    return logits


def banned_ngram_tokens(tokens: Sequence[int], ngram_size: int) -> list[int]:
    """Tokens that would complete an n-gram already present in ``tokens``."""
    if ngram_size <= 0 or len(tokens) + 1 < ngram_size:
        return []
    prefix = tuple(tokens[len(tokens) - ngram_size + 1:]) if ngram_size > 1 else ()
    return [
        tokens[i + ngram_size - 1]
        for i in range(len(tokens) - ngram_size + 1)
        if tuple(tokens[i:i + ngram_size - 1]) == prefix
    ]


def apply_no_repeat_ngram(logits: Tensor, generated: Sequence[Sequence[int]], ngram_size: int) -> Tensor:
    """Forbid, row by row, every token that would repeat an n-gram of that row's generated tokens."""
    if ngram_size <= 0:
        return logits
    logits = logits.clone()
    for row, tokens in enumerate(generated):
        banned = banned_ngram_tokens(tokens, ngram_size)
        if banned:
            logits[row, banned] = -float("inf")
    return logits


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


def _constrain(logits: Tensor, generated: Sequence[Sequence[int]], num_generated: int, *,
               min_length: int, no_repeat_ngram_size: int, end_ids: Sequence[int]) -> Tensor:
    logits = apply_min_length(logits, num_generated, min_length, end_ids)
    return apply_no_repeat_ngram(logits, generated, no_repeat_ngram_size)


# ----------------------------------------------------------------------------------------------
# Cached forward steps
# ----------------------------------------------------------------------------------------------

def _forward_new(model: GLMModel, cache: KVCache, key_valid: Tensor, tokens: Tensor, dim1: Tensor,
                 first_block_position: int) -> tuple[Tensor, Tensor]:
    """Run ``tokens [R, n]`` after the cache at (dim1, first_block_position + 0..n-1).

    ``key_valid [R, cached]`` marks the cached slots a new token may see (False = padding). Returns
    the logits of the last new token ``[R, V]`` and the grown ``key_valid``.
    """
    rows, n = tokens.shape
    block = torch.arange(first_block_position, first_block_position + n, device=tokens.device)
    position_ids = torch.stack([dim1[:, None].expand(rows, n), block[None].expand(rows, n)], dim=1)
    key_valid = torch.cat([key_valid, key_valid.new_ones(rows, n)], dim=1)
    if n == 1 and bool(key_valid.all()):
        mask = None  # one token, nothing to hide: it attends to every cached token, no mask needed
    else:
        causal = glm_attention_mask(None, n, key_valid.shape[1], device=tokens.device)  # [1, 1, n, Lk]
        mask = causal & key_valid[:, None, None, :]
    logits = model(tokens, position_ids, attention_mask=mask, kv_cache=cache)
    return logits[:, -1], key_valid


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
    key_valid: Tensor,
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
) -> list[list[int]]:
    """Generate one blank per sample after whatever the cache already holds."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
    if max_new_tokens < 1:
        return [[] for _ in range(len(mask_positions))]
    if max_new_tokens >= model.config.max_sequence_length + 1:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) exceeds the block-position table "
                         f"({model.config.max_sequence_length})")
    if strategy == "beam":
        return _beam_search(model, cache, key_valid, mask_positions, sop_id=sop_id, end_ids=end_ids,
                            max_new_tokens=max_new_tokens, num_beams=num_beams,
                            length_penalty=length_penalty, min_length=min_length,
                            no_repeat_ngram_size=no_repeat_ngram_size)
    batch = len(mask_positions)
    tokens = torch.full((batch, 1), sop_id, dtype=torch.long, device=mask_positions.device)
    generated: list[list[int]] = [[] for _ in range(batch)]
    finished = [False] * batch
    for step in range(max_new_tokens):
        logits, key_valid = _forward_new(model, cache, key_valid, tokens, mask_positions, step + 1)
        logits = _constrain(logits.float(), generated, step, min_length=min_length,
                            no_repeat_ngram_size=no_repeat_ngram_size, end_ids=end_ids)
        if strategy == "greedy":
            next_tokens = logits.argmax(dim=-1)
        else:
            logits = apply_top_p(apply_top_k(apply_temperature(logits, temperature), top_k), top_p)
            probs = logits.softmax(dim=-1)
            if generator is not None:  # sample where the generator lives, so a seed is portable
                probs = probs.to(generator.device)
            next_tokens = torch.multinomial(probs, 1, generator=generator)[:, 0].to(logits.device)
        for b, token in enumerate(next_tokens.tolist()):
            if finished[b]:
                continue
            if token in end_ids:
                finished[b] = True
            else:
                generated[b].append(token)
        if all(finished):
            break
        tokens = next_tokens[:, None]
    return generated


def _beam_search(model: GLMModel, cache: KVCache, key_valid: Tensor, mask_positions: Tensor, *,
                 sop_id: int, end_ids: Sequence[int], max_new_tokens: int, num_beams: int,
                 length_penalty: float, min_length: int, no_repeat_ngram_size: int) -> list[list[int]]:
    """HF-style beam search without early stopping; the top ``2 * num_beams`` candidates of each
    sample are taken deterministically, so up to ``num_beams`` of them can end and the rest still
    fill the beams."""
    batch, K = len(mask_positions), num_beams
    device = mask_positions.device
    expand = torch.arange(batch, device=device).repeat_interleave(K)
    cache.reorder(expand)
    key_valid, dim1 = key_valid[expand], mask_positions[expand]
    beam_scores = torch.zeros(batch, K, device=device)
    beam_scores[:, 1:] = -1e9  # all beams start identical: expand only the first at step 0
    beam_scores = beam_scores.view(-1)
    generated: list[list[int]] = [[] for _ in range(batch * K)]
    hyps = [_BeamHypotheses(K, length_penalty) for _ in range(batch)]
    done = [False] * batch
    tokens = torch.full((batch * K, 1), sop_id, dtype=torch.long, device=device)
    for step in range(max_new_tokens):
        logits, key_valid = _forward_new(model, cache, key_valid, tokens, dim1, step + 1)
        logits = _constrain(logits.float(), generated, step, min_length=min_length,
                            no_repeat_ngram_size=no_repeat_ngram_size, end_ids=end_ids)
        scores = F.log_softmax(logits, dim=-1) + beam_scores[:, None]
        vocab = scores.shape[-1]
        top_scores, top_index = scores.view(batch, K * vocab).topk(min(2 * K, K * vocab), dim=1)
        new_scores: list[float] = []
        new_tokens: list[int] = []
        new_rows: list[int] = []
        for b in range(batch):
            if done[b]:  # keep feeding something; its results are never read
                new_scores += [0.0] * K
                new_tokens += [end_ids[0]] * K
                new_rows += [b * K] * K
                continue
            chosen = 0
            for rank, (score, index) in enumerate(zip(top_scores[b].tolist(), top_index[b].tolist(),
                                                      strict=True)):
                row, token = b * K + index // vocab, index % vocab
                if token in end_ids:
                    if rank < K:
                        hyps[b].add(list(generated[row]), score)
                    continue
                new_scores.append(score)
                new_tokens.append(token)
                new_rows.append(row)
                chosen += 1
                if chosen == K:
                    break
            done[b] = hyps[b].is_done(top_scores[b].max().item(), step)
        if all(done):
            break
        rows = torch.tensor(new_rows, device=device)
        cache.reorder(rows)
        key_valid = key_valid[rows]
        generated = [generated[r] + [t] for r, t in zip(new_rows, new_tokens, strict=True)]
        beam_scores = torch.tensor(new_scores, device=device)
        tokens = torch.tensor(new_tokens, device=device)[:, None]
    for b in range(batch):
        if not done[b]:
            for row in range(b * K, (b + 1) * K):
                hyps[b].add(generated[row], beam_scores[row].item())
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
    """
    batch, length = input_ids.shape
    with _EvalMode(model):
        cache = model.new_kv_cache(batch, length + max_new_tokens)
        model(input_ids, position_ids, sep, kv_cache=cache)
        key_valid = torch.arange(length, device=input_ids.device)[None] < sep.to(input_ids.device)[:, None]
        end_ids = [eop_id] if eos_id is None else [eop_id, eos_id]
        return _decode(model, cache, key_valid, mask_positions.to(input_ids.device), sop_id=sop_id,
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
        model(ids, position_ids, torch.tensor([len(context)], device=device), kv_cache=cache)
        for i, mask_position in enumerate(mask_positions):
            dim1 = torch.tensor([mask_position], device=device)
            saved = cache.snapshot()
            key_valid = torch.ones(1, cache.length, dtype=torch.bool, device=device)
            fill = _decode(model, cache, key_valid, dim1, sop_id=tokenizer.sop_id, end_ids=end_ids,
                           strategy=strategy, max_new_tokens=max_new_tokens, **decoding)[0]
            fills.append(fill)
            if i + 1 < len(mask_positions):
                # Rewind to before this blank (beam search reorders the cache rows) and keep
                # exactly "[sop] fill" for the blanks that follow.
                cache.restore(saved)
                block = torch.tensor([[tokenizer.sop_id, *fill]], device=device)
                _forward_new(model, cache, key_valid, block, dim1, 1)
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

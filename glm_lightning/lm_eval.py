"""Zero-shot language modelling with GLM (paper §3.3; official `tasks/language_model/`): LAMBADA
last-word accuracy and sliding-window perplexity.

Both tasks lay the text out as blank infilling: a Part A that holds the context and one mask,
then ``[sop]`` and the tokens to predict in Part B at (mask position, 1, 2, ...), exactly as a
blank is generated, and score Part B under teacher forcing.

* LAMBADA: the last whitespace word of a passage is the answer, tokenized as ``" " + word``.
  Bidirectional: ``[CLS] context [M] eos [sop] answer[:-1]``. Unidirectional: only the first
  context token is in Part A, the rest of the context and the answer are in Part B, and only
  the answer is scored. A passage is correct iff every answer token is the argmax.
* Perplexity: windows of ``max_length`` tokens start every ``stride`` tokens. Window 0 keeps its
  first token in Part A and predicts the rest; each later window keeps its first
  ``max_length - stride`` tokens as bidirectional context and predicts the tokens after them, so
  every token but the first of each document is predicted exactly once.

A ``Protocol`` names the conventions of one released script: how the file splits into documents,
the detokenizer, and how words are counted for the word-adjusted perplexity. Every released
script runs with ``--seq-length 512``: windows of 511 text tokens, 256 new ones per window.

A sample is a dict of numpy arrays ``input_ids [L]``, ``position_ids [2, L]``, ``target_ids [L]``,
``loss_mask [L]`` and the int ``sep`` (the length of Part A), like
``blank_infilling.build_block_sample``. Scoring is batched, without gradients and deterministic.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from glm_lightning.detokenize import wikitext_detokenize
from glm_lightning.model import GLMModel
from glm_lightning.tokenizer import GLMTokenizer

Sample = dict[str, "np.ndarray | int"]

RELEASED_WINDOW = 511  # --seq-length 512 minus one (`LMDataset.max_seq_len`)
RELEASED_STRIDE = 256  # --overlapping-eval 256


@dataclass(frozen=True)
class Protocol:
    """The conventions of one released zero-shot evaluation script."""

    name: str
    task: str  # "perplexity" or "lambada": what is measured, and the prefix of the metric names
    script: str  # the released `config_tasks/` script it follows
    documents: str  # "stream": the whole file is one document; "lines": every non-blank line is one
    detokenize: Callable[[str], str] | None = None  # applied to each document before tokenizing


PROTOCOLS = {
    # `build_wikitext103_dataset`: the file detokenized and tokenized as one stream.
    "wikitext": Protocol("wikitext", "perplexity", "config_tasks/zero_wikitext.sh", "stream",
                         wikitext_detokenize),
    # `build_lm_dataset`: each line of a plain-text file is its own document, as it is.
    "language_model": Protocol("language_model", "perplexity", "config_tasks/zero_lm.sh", "lines"),
    # `LambadaDataset`: the "text" of every jsonl line is one passage.
    "lambada": Protocol("lambada", "lambada", "config_tasks/zero_lambada.sh", "lines"),
}
DOCUMENT_SPLITS = ("stream", "lines")


def count_words(document: str) -> int:
    """The words of a document as the released code counts them for the word-adjusted perplexity
    (`tasks/language_model/dataset.py`): ``len(text.strip().split(" "))``, so a newline stays
    inside its word and a double space counts an empty word."""
    return len(document.strip().split(" "))


# ----------------------------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------------------------

def infilling_sample(part_a: Sequence[int], mask_position: int, part_b: Sequence[int], *,
                     sop_id: int, num_scored: int | None = None) -> Sample:
    """``part_a`` followed by ``[sop] part_b[:-1]`` in Part B, predicting ``part_b``.

    Every Part-B token sits at (``mask_position``, 1, 2, ...); only the last ``num_scored``
    targets (default: all of ``part_b``) count.
    """
    n_a, n_b = len(part_a), len(part_b)
    if n_b < 1:
        raise ValueError("Part B must predict at least one token")
    num_scored = n_b if num_scored is None else num_scored
    input_ids = np.array([*part_a, sop_id, *part_b[:-1]], dtype=np.int64)
    position_ids = np.zeros((2, n_a + n_b), dtype=np.int64)
    position_ids[0, :n_a] = np.arange(n_a)
    position_ids[0, n_a:] = mask_position
    position_ids[1, n_a:] = np.arange(1, n_b + 1)
    target_ids = np.zeros(n_a + n_b, dtype=np.int64)
    target_ids[n_a:] = part_b
    loss_mask = np.zeros(n_a + n_b, dtype=np.int64)
    loss_mask[n_a + n_b - num_scored:] = 1
    return {"input_ids": input_ids, "position_ids": position_ids, "target_ids": target_ids,
            "loss_mask": loss_mask, "sep": n_a}


def lambada_text(text: str) -> tuple[str, str]:
    """(context, answer) of a passage: the answer is its last whitespace word as ``" " + word``
    (the strict LAMBADA of the official code); the context is the text before it, stripped."""
    words = text.split()
    if not words:
        raise ValueError("a LAMBADA passage needs at least one word")
    word = words[-1]
    return text[:text.rfind(word)].strip(), " " + word


def lambada_tokens(tokenizer: GLMTokenizer, text: str) -> tuple[list[int], list[int]]:
    """(context, answer) token ids of a passage (``lambada_text``)."""
    context, answer = lambada_text(text)
    return tokenizer.encode(context), tokenizer.encode(answer)


def lambada_sample(context: Sequence[int], answer: Sequence[int], tokenizer: GLMTokenizer, *,
                   mask_id: int | None = None, unidirectional: bool = False,
                   max_length: int | None = None) -> Sample:
    """The LAMBADA layout of one passage (see the module docstring); the context is truncated on
    the left so that the sample has at most ``max_length`` tokens."""
    mask_id = tokenizer.mask_id if mask_id is None else mask_id
    context = list(context)
    if not context:
        raise ValueError("a LAMBADA passage needs context before its last word")
    if max_length is not None:  # [CLS] context [M] eos [sop] predicted[:-1]
        overflow = len(context) + len(answer) + 3 - max_length
        if overflow > 0:
            if unidirectional or overflow >= len(context):
                raise ValueError(f"passage of {len(context) + len(answer)} tokens does not fit "
                                 f"max_length {max_length}")
            context = context[overflow:]
    if unidirectional:
        context, predicted = context[:1], [*context[1:], *answer]
    else:
        predicted = list(answer)
    part_a = [tokenizer.cls_id, *context, mask_id, tokenizer.eos_id]
    return infilling_sample(part_a, len(context) + 1, predicted, sop_id=tokenizer.sop_id,
                            num_scored=len(answer))


def perplexity_windows(tokens: Sequence[int], tokenizer: GLMTokenizer, *, max_length: int,
                       stride: int, mask_id: int | None = None,
                       unidirectional: bool = False) -> list[Sample]:
    """The sliding windows of one tokenized text (see the module docstring).

    A window is ``[CLS] context [M] | [sop] predicted[:-1]`` (no ``eos``). With
    ``unidirectional`` every window keeps only its first token in Part A and scores only the
    tokens no earlier window predicted.
    """
    if not 0 < stride <= max_length:
        raise ValueError(f"stride must be in 1..max_length ({max_length}), got {stride}")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    mask_id = tokenizer.mask_id if mask_id is None else mask_id
    num_windows = max(math.ceil(max(len(tokens) - max_length, 0) / stride) + 1, 1)
    context_length = max_length - stride
    samples = []
    for index in range(num_windows):
        window = list(tokens[index * stride: index * stride + max_length])
        if index == 0 or unidirectional:
            context, predicted = window[:1], window[1:]
        else:
            context, predicted = window[:context_length], window[context_length:]
        if not predicted:
            continue  # a text of one token has nothing to predict
        num_scored = len(predicted) if index == 0 else min(len(predicted), len(window) - context_length)
        samples.append(infilling_sample([tokenizer.cls_id, *context, mask_id], len(context) + 1,
                                        predicted, sop_id=tokenizer.sop_id, num_scored=num_scored))
    return samples


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------

@dataclass
class SampleScore:
    """Teacher-forced result on the scored tokens of one sample."""

    loss: float  # summed negative log-likelihood (nats)
    num_tokens: int
    all_correct: bool  # every scored token is the argmax


def collate(samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
    """Right-pad samples into a batch; padding lies after Part B, where no real token looks."""
    length = max(len(s["input_ids"]) for s in samples)
    batch = {
        "input_ids": torch.zeros(len(samples), length, dtype=torch.long),
        "position_ids": torch.zeros(len(samples), 2, length, dtype=torch.long),
        "target_ids": torch.zeros(len(samples), length, dtype=torch.long),
        "loss_mask": torch.zeros(len(samples), length, dtype=torch.bool),
        "sep": torch.tensor([int(s["sep"]) for s in samples], dtype=torch.long),
    }
    for row, s in enumerate(samples):
        n = len(s["input_ids"])
        batch["input_ids"][row, :n] = torch.from_numpy(s["input_ids"])
        batch["position_ids"][row, :, :n] = torch.from_numpy(s["position_ids"])
        batch["target_ids"][row, :n] = torch.from_numpy(s["target_ids"])
        batch["loss_mask"][row, :n] = torch.from_numpy(s["loss_mask"]).bool()
    return batch


@torch.no_grad()
def score_samples(model: GLMModel, samples: Sequence[Sample], *, batch_size: int = 8,
                  progress: str | None = None) -> list[SampleScore]:
    """Loss, token count and exact-match of every sample, in order.

    Samples are batched by length (less padding); logits are computed at the scored positions
    only and the loss in float32. ``progress`` names a progress bar over the samples (None: none).
    """
    was_training = model.training
    model.eval()
    device = model.word_embeddings.weight.device
    order = sorted(range(len(samples)), key=lambda i: len(samples[i]["input_ids"]))
    scores: list[SampleScore | None] = [None] * len(samples)
    bar = tqdm(total=len(samples), desc=progress, unit="sample", disable=progress is None, leave=False)
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = {k: v.to(device) for k, v in collate([samples[i] for i in rows]).items()}
            mask = batch["loss_mask"]
            logits = model(batch["input_ids"], batch["position_ids"], batch["sep"], output_mask=mask)
            targets = batch["target_ids"][mask]
            losses = F.cross_entropy(logits.float(), targets, reduction="none")
            correct = logits.argmax(dim=-1) == targets
            owner = torch.arange(len(rows), device=device)[:, None].expand_as(mask)[mask]
            loss_sum = torch.zeros(len(rows), dtype=torch.float64, device=device)
            loss_sum.index_add_(0, owner, losses.double())
            counts = mask.sum(dim=1)
            wrong = torch.zeros(len(rows), dtype=torch.long, device=device)
            wrong.index_add_(0, owner, (~correct).long())
            for j, i in enumerate(rows):
                scores[i] = SampleScore(float(loss_sum[j]), int(counts[j]), bool(wrong[j] == 0))
            bar.update(len(rows))
    finally:
        bar.close()
        model.train(was_training)
    return scores  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------------

def read_jsonl_texts(path: str | Path) -> list[str]:
    """The ``text`` field of every non-blank line of a jsonl file (LAMBADA's format); a line that
    is not a JSON object with a string ``text`` is a ValueError naming the file and line."""
    texts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}:{number}: expected a JSON object with a string 'text' field")
            texts.append(record["text"])
    return texts


def read_documents(path: str | Path, documents: str) -> list[str]:
    """The documents of a text file or, for ``*.jsonl``, of the ``text`` fields of its lines.

    ``stream``: the whole file, read without newline translation as the released
    `build_wikitext103_dataset` reads it (jsonl texts joined by newlines). ``lines``: every
    non-blank line, stripped, as `build_lm_dataset` reads it (jsonl: every non-blank text).
    Blank lines are skipped; the released code fails on them.
    """
    if documents not in DOCUMENT_SPLITS:
        raise ValueError(f"documents must be one of {', '.join(DOCUMENT_SPLITS)}, got {documents!r}")
    path = Path(path)
    if path.suffix == ".jsonl":
        texts = read_jsonl_texts(path)
        if documents == "stream":
            return ["\n".join(texts)]
    elif documents == "stream":
        return [path.read_bytes().decode("utf-8")]
    else:
        with open(path, encoding="utf-8") as f:
            texts = list(f)
    return [text.strip() for text in texts if text.strip()]


def evaluate_lambada(model: GLMModel, tokenizer: GLMTokenizer, texts: Iterable[str], *,
                     mask_id: int | None = None, unidirectional: bool = False,
                     max_length: int | None = None, batch_size: int = 8,
                     progress: str | None = None) -> dict[str, float]:
    """Last-word accuracy: the fraction of passages whose every answer token is the argmax.

    ``max_length`` bounds each sample (default: the released 512, or the model's
    ``max_sequence_length`` when smaller).
    """
    max_length = max_length or default_window(model) + 1
    samples = [lambada_sample(*lambada_tokens(tokenizer, text), tokenizer, mask_id=mask_id,
                              unidirectional=unidirectional, max_length=max_length)
               for text in texts]
    if not samples:
        raise ValueError("no LAMBADA passages to evaluate")
    scores = score_samples(model, samples, batch_size=batch_size, progress=progress)
    correct = sum(s.all_correct for s in scores)
    loss = sum(s.loss for s in scores)
    tokens = sum(s.num_tokens for s in scores)
    return {"accuracy": correct / len(scores), "correct": correct, "total": len(scores),
            "answer_loss": loss / tokens}


def perplexities(total_loss: float, num_tokens: int, num_words: int,
                 num_documents: int = 1) -> tuple[float, float]:
    """(token-level, word-adjusted) perplexity of ``num_documents`` documents of ``num_tokens``
    tokens and ``num_words`` words in all, whose first tokens are not predicted:
    ``exp(total_loss / (num_tokens - num_documents))`` and
    ``exp(total_loss / (num_words - num_documents))``.

    With one document these are the released formulas (`tasks/language_model/finetune.py`). With
    several, the released code still divides by ``num_tokens - 1`` and ``num_words - 1``, counting
    tokens no window predicts; here each document's first token and word are left out.
    """
    return (math.exp(total_loss / (num_tokens - num_documents)),
            math.exp(total_loss / (num_words - num_documents)))


def default_window(model: GLMModel) -> int:
    """Text tokens per window when none is set: the released 511, or fewer on a model with
    fewer positions."""
    return min(RELEASED_WINDOW, model.config.max_sequence_length - 1)


def evaluate_perplexity(model: GLMModel, tokenizer: GLMTokenizer, text: str | Sequence[str], *,
                        detokenize: Callable[[str], str] | None = None, max_length: int | None = None,
                        stride: int = RELEASED_STRIDE, mask_id: int | None = None,
                        unidirectional: bool = False, batch_size: int = 8,
                        progress: str | None = None) -> dict[str, float]:
    """Sliding-window perplexity of ``text``: one document, or a sequence of documents whose
    windows never cross from one into the next.

    Words are counted on each raw document (``count_words``); ``detokenize`` then rewrites it
    before tokenizing. Blank documents are skipped. ``max_length`` is the number of text tokens
    per window (default: ``default_window``); ``stride`` (at most ``max_length``) tokens are
    predicted per window after the first.
    """
    documents = [text] if isinstance(text, str) else list(text)
    documents = [document for document in documents if document.strip()]
    max_length = max_length or default_window(model)
    stride = min(stride, max_length)
    counted = [(count_words(document), tokenizer.encode(detokenize(document) if detokenize else document))
               for document in documents]
    counted = [(words, tokens) for words, tokens in counted if tokens]
    encoded = [tokens for _, tokens in counted]
    num_words = sum(words for words, _ in counted)
    num_tokens = sum(len(tokens) for tokens in encoded)
    if num_tokens - len(encoded) < 1 or num_words - len(encoded) < 1:
        raise ValueError("perplexity needs a document of at least two words")
    samples = [sample for tokens in encoded
               for sample in perplexity_windows(tokens, tokenizer, max_length=max_length, stride=stride,
                                                mask_id=mask_id, unidirectional=unidirectional)]
    scores = score_samples(model, samples, batch_size=batch_size, progress=progress)
    total_loss = sum(s.loss for s in scores)
    predicted = sum(s.num_tokens for s in scores)
    ppl, adjusted = perplexities(total_loss, num_tokens, num_words, len(encoded))
    return {"loss": total_loss / predicted, "ppl": ppl, "adjusted_ppl": adjusted, "nll": total_loss,
            "num_tokens": num_tokens, "num_words": num_words, "num_documents": len(encoded),
            "num_predicted": predicted, "num_windows": len(samples), "window": max_length,
            "stride": stride}

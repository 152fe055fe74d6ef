"""GLM as a model of EleutherAI's lm-evaluation-harness (``lm-eval`` 0.4, the ``harness`` extra).

Importing this module registers the model ``glm`` (alias ``glm-lightning``); the harness has no
plugin mechanism for models, so ``python -m glm_lightning.harness ARGS`` runs the harness's own
command line (``lm_eval ARGS``) with it registered::

    python -m glm_lightning.harness --model glm --model_args pretrained=CKPT,tokenizer=TOK \\
        --tasks glm_copa --include_path experiments/harness_tasks

``pretrained`` is anything ``glm_lightning.checkpoint.load_glm`` reads (our ``.ckpt``, an official
checkpoint, a Hugging Face folder); ``tokenizer`` a tokenizer folder or vocabulary file
(``hf_folder.load_tokenizer``), by default the one that comes with the checkpoint.

The three request types are scored as GLM scores text (paper §3.3; `tasks/language_model/`):

* ``loglikelihood(context, continuation)``: the LAMBADA layout of ``glm_lightning.lm_eval``,
  ``[CLS] context [MASK] eos | [sop] continuation[:-1]``: the context is Part A, bidirectional,
  ending in the blank; the continuation is generated in Part B at (mask position, 1, 2, ...) and
  its summed log-probability and whether every token is the argmax are returned. The blank is
  ``[MASK]``, or ``[gMASK]`` with ``mask=gMASK`` for models pretrained with task masks, as
  ``exp=lm_eval`` chooses with ``data.task_masks``. Whitespace that ends the context moves to
  the continuation (as the harness's Hugging Face backend does).
* ``loglikelihood_rolling(text)``: the sliding-window perplexity of ``exp=lm_eval``
  (``perplexity_windows``: windows of ``max_length`` tokens, ``stride`` new ones each); the first
  token of the text is context, not predicted.
* ``generate_until(context, gen_kwargs)``: ``[CLS] context [gMASK]`` decoded on the KV cache
  (``glm_lightning.generation.generate``), as ``exp=generate`` fills a prompt without blanks, up to
  ``[eop]`` or ``max_gen_toks``; the text is cut before the first stop sequence (``until``).

Requests run in length-sorted batches with a progress bar, on ``device`` (default: a GPU when
there is one), in the checkpoint's precision (``dtype=auto``) or the one given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from glm_lightning.checkpoint import build_glm, read_checkpoint, resolve_source, source_tokenizer
from glm_lightning.generation import generate
from glm_lightning.hf_folder import load_tokenizer
from glm_lightning.lm_eval import (
    RELEASED_STRIDE,
    Sample,
    default_window,
    infilling_sample,
    perplexity_windows,
    score_samples,
)
from glm_lightning.model import GLMModel
from glm_lightning.tokenizer import GLMTokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MASKS = ("MASK", "gMASK")
DEFAULT_MAX_GEN_TOKS = 256


@dataclass
class RollingScore:
    """``loglikelihood_rolling`` of one text, with the counts ``exp=lm_eval`` reports."""

    nll: float  # summed negative log-likelihood of the predicted tokens (nats)
    num_tokens: int  # tokens of the text
    num_predicted: int  # tokens scored (all but the first)


def load(pretrained: str, tokenizer: str | None = None, *, tokenizer_kind: str | None = None,
         num_heads: int | None = None, dtype: str = "auto") -> tuple[GLMModel, GLMTokenizer]:
    """The model at ``pretrained`` and its tokenizer: ``tokenizer`` when given, else the one that comes
    with the checkpoint (``checkpoint.source_tokenizer``). A tokenizer other than the one recorded in
    our checkpoint, or smaller than the vocabulary, is a ValueError."""
    source = resolve_source(pretrained)  # a hub repo id: its downloaded folder
    glm_tokenizer = load_tokenizer(tokenizer, kind=tokenizer_kind) if tokenizer else source_tokenizer(source)
    if glm_tokenizer is None:
        raise ValueError(f"no tokenizer comes with {pretrained}; give tokenizer=PATH (a folder, a "
                         "sentencepiece .model, a vocab.txt, or a vocab.json with merges.txt beside it)")
    stored = read_checkpoint(source)
    recorded = stored.tokenizer
    if recorded and recorded.fingerprint != glm_tokenizer.vocabulary_fingerprint():
        raise ValueError(f"{pretrained} was trained with another tokenizer ({recorded.source})")
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}")
    torch_dtype = stored.shapes()["word_embeddings.weight"].dtype if dtype == "auto" else DTYPES[dtype]
    model = build_glm(stored, pretrained, num_attention_heads=num_heads, dtype=torch_dtype)
    if len(glm_tokenizer) > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {len(glm_tokenizer)} ids but {pretrained} only "
                         f"{model.config.vocab_size}; give the tokenizer the model was trained with")
    return model, glm_tokenizer


@register_model("glm", "glm-lightning")
class GLMHarnessLM(LM):
    """A GLM checkpoint as an lm-evaluation-harness model (see the module docstring)."""

    def __init__(self, pretrained: str, tokenizer: str | None = None, tokenizer_kind: str | None = None,
                 num_heads: int | None = None, dtype: str = "auto", device: str | None = None,
                 batch_size: int | str = 8, max_batch_size: int | None = None, mask: str = "MASK",
                 max_length: int | None = None, stride: int = RELEASED_STRIDE,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, seed: int = 1234) -> None:
        model, glm_tokenizer = load(str(pretrained), tokenizer, tokenizer_kind=tokenizer_kind,
                                    num_heads=num_heads, dtype=dtype)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._setup(model.to(device), glm_tokenizer, batch_size=batch_size, max_batch_size=max_batch_size,
                    mask=mask, max_length=max_length, stride=stride, max_gen_toks=max_gen_toks, seed=seed)

    @classmethod
    def wrap(cls, model: GLMModel, tokenizer: GLMTokenizer, **options: object) -> GLMHarnessLM:
        """A backend over a model already loaded (``exp=harness``, tests), with the options of
        ``__init__`` after ``device``."""
        lm = cls.__new__(cls)
        lm._setup(model, tokenizer, **options)  # type: ignore[arg-type]
        return lm

    def _setup(self, model: GLMModel, tokenizer: GLMTokenizer, *, batch_size: int | str = 8,
               max_batch_size: int | None = None, mask: str = "MASK", max_length: int | None = None,
               stride: int = RELEASED_STRIDE, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
               seed: int = 1234) -> None:
        LM.__init__(self)
        if mask not in MASKS:
            raise ValueError(f"mask must be MASK or gMASK, got {mask!r}")
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive number (no 'auto'), got {batch_size!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = min(int(batch_size), int(max_batch_size or batch_size))
        self.mask_id = tokenizer.mask_id if mask == "MASK" else tokenizer.gmask_id
        positions = model.config.max_sequence_length
        self.window = max_length or default_window(model)  # text tokens per perplexity window
        if not 2 <= self.window <= positions - 1:
            raise ValueError(f"max_length must be in 2..{positions - 1} (the model's positions - 1), "
                             f"got {self.window}")
        self.stride = min(int(stride), self.window)
        self.max_gen_toks = min(int(max_gen_toks), positions)
        self.seed = int(seed)

    @property
    def device(self) -> torch.device:
        return self.model.word_embeddings.weight.device

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.fingerprint()[:16]

    # ------------------------------------------------------------------------------------------
    # loglikelihood

    def pair_sample(self, context: str, continuation: str) -> Sample:
        """The layout of one ``loglikelihood`` request: ``[CLS] context [MASK] eos | [sop]
        continuation[:-1]``, predicting the continuation; the context is cut on the left to fit
        the model's positions."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        tok = self.tokenizer
        context_ids, continuation_ids = tok.encode(context), tok.encode(continuation)
        if not continuation_ids:
            raise ValueError(f"the continuation {continuation!r} encodes to no tokens")
        overflow = len(context_ids) + len(continuation_ids) + 3 - self.model.config.max_sequence_length
        if overflow > len(context_ids):
            raise ValueError(f"a continuation of {len(continuation_ids)} tokens does not fit the model's "
                             f"{self.model.config.max_sequence_length} positions")
        context_ids = context_ids[max(overflow, 0):]
        part_a = [tok.cls_id, *context_ids, self.mask_id, tok.eos_id]
        return infilling_sample(part_a, len(context_ids) + 1, continuation_ids, sop_id=tok.sop_id)

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [tuple(request.args) for request in requests]
        samples = [self.pair_sample(context, continuation) for context, continuation in pairs]
        scores = score_samples(self.model, samples, batch_size=self.batch_size,
                               progress=None if disable_tqdm else "loglikelihood requests")
        results = [(-score.loss, score.all_correct) for score in scores]
        for pair, result in zip(pairs, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", pair, result)
        return results

    # ------------------------------------------------------------------------------------------
    # loglikelihood_rolling

    def rolling_scores(self, texts: list[str], disable_tqdm: bool = False) -> list[RollingScore]:
        """Sliding-window NLL and token counts of each text, all windows scored in one batched pass."""
        encoded = [self.tokenizer.encode(text) for text in texts]
        windows = [perplexity_windows(tokens, self.tokenizer, max_length=self.window, stride=self.stride,
                                      mask_id=self.mask_id) if tokens else [] for tokens in encoded]
        scores = iter(score_samples(self.model, [w for text in windows for w in text],
                                    batch_size=self.batch_size,
                                    progress=None if disable_tqdm else "perplexity windows"))
        results = []
        for tokens, text_windows in zip(encoded, windows, strict=True):
            mine = [next(scores) for _ in text_windows]
            results.append(RollingScore(sum(s.loss for s in mine), len(tokens),
                                        sum(s.num_tokens for s in mine)))
        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        texts = [request.args[0] for request in requests]
        results = [-score.nll for score in self.rolling_scores(texts, disable_tqdm)]
        for text, result in zip(texts, results, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), result)
        return results

    # ------------------------------------------------------------------------------------------
    # generate_until

    def generation_context(self, context: str) -> list[int]:
        """``[CLS] context [gMASK]``, the context cut on the left to the model's positions."""
        tok = self.tokenizer
        ids = tok.encode(context)[-(self.model.config.max_sequence_length - 2):]
        return [tok.cls_id, *ids, tok.gmask_id]

    def generate_ids(self, contexts: list[str], max_new_tokens: int, *, do_sample: bool = False,
                     temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                     disable_tqdm: bool = True) -> list[list[int]]:
        """The tokens generated for each context (``[eop]`` excluded), decoded in length-sorted batches."""
        tok = self.tokenizer
        rows = [self.generation_context(context) for context in contexts]
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        options: dict = {"strategy": "greedy"}
        if do_sample and temperature > 0:
            options = {"strategy": "sample", "temperature": temperature, "top_k": top_k, "top_p": top_p,
                       "generator": torch.Generator().manual_seed(self.seed)}
        out: list[list[int]] = [[] for _ in rows]
        bar = tqdm(total=len(rows), desc="generate_until requests", disable=disable_tqdm, leave=False)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            length = max(len(rows[i]) for i in batch)
            input_ids = torch.full((len(batch), length), tok.pad_id, dtype=torch.long)
            position_ids = torch.zeros(len(batch), 2, length, dtype=torch.long)
            for j, i in enumerate(batch):
                input_ids[j, :len(rows[i])] = torch.tensor(rows[i])
                position_ids[j, 0, :len(rows[i])] = torch.arange(len(rows[i]))
            sep = torch.tensor([len(rows[i]) for i in batch])
            generated = generate(self.model, input_ids.to(self.device), position_ids.to(self.device), sep,
                                 sep - 1, sop_id=tok.sop_id, eop_id=tok.eop_id, eos_id=tok.eos_id,
                                 max_new_tokens=max_new_tokens, **options)
            for i, ids in zip(batch, generated, strict=True):
                out[i] = ids
            bar.update(len(batch))
        bar.close()
        return out

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}  # requests with the same generation settings decode together
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        for members in groups.values():
            kwargs = dict(requests[members[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = min(int(kwargs.pop("max_gen_toks", self.max_gen_toks)),
                          self.model.config.max_sequence_length)
            generated = self.generate_ids([requests[i].args[0] for i in members], max_new,
                                          do_sample=bool(kwargs.get("do_sample", False)),
                                          temperature=float(kwargs.get("temperature", 1.0)),
                                          top_k=int(kwargs.get("top_k") or 0),
                                          top_p=float(kwargs.get("top_p") or 1.0), disable_tqdm=disable_tqdm)
            for i, ids in zip(members, generated, strict=True):
                text = self.tokenizer.decode(ids)
                for stop in until:
                    if stop:
                        text = text.split(stop, 1)[0]
                results[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results  # type: ignore[return-value]


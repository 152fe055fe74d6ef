"""Decoding speed: GLM on its static KV cache (`glm_lightning.generation.generate`), eager and
with the one-token step compiled (`generation.compile=true`), against Hugging Face transformers'
GPT-2 `generate` (use_cache=True) at the same shape: greedy, and 4-beam search with a length
penalty, no-repeat 3-grams and a minimum length.

Both models have random weights and the same sizes (layers, hidden, heads, vocabulary); each
batch holds `--context` random tokens per row and generates exactly `--new-tokens` tokens (a
minimum length equal to the maximum, so no row and no beam stops early and both models do the
same number of steps). GLM's context is Part A ending in `[MASK]`, decoded as a blank. The
cases run one after the other; within a case, every round times each model once, the order of
the models rotating from round to round, in one process; the ratios are taken within a round
(GPT-2 seconds / GLM seconds), so load that changes between rounds hits both sides alike.
tokens/s counts generated tokens (batch x new tokens, beams not counted) over the whole call,
prefill included. An untimed warm-up call per case and model compiles the compiled step and
reorders the eager step's weights for the case's row count (glm_lightning.prepack; kept until
the row count changes, as in a decoding job); the reordering is timed once per case on a copy
of the model and printed.

    PYTHONPATH=. python benchmarks/bench_generate.py     # tens of minutes on 2 cores (compiling included)
    PYTHONPATH=. python benchmarks/bench_generate.py --rounds 3 --new-tokens 16 --no-compiled  # quick
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
import transformers
from machine import cpu_model
from transformers import GPT2Config, GPT2LMHeadModel

from glm_lightning import prepack
from glm_lightning.generation import generate
from glm_lightning.model import GLMConfig, GLMModel

MASK_ID, SOP_ID, EOP_ID = 3, 4, 5  # any ids: random weights, and [eop] is blocked anyway
BEAM = dict(num_beams=4, length_penalty=0.7, no_repeat_ngram_size=3)  # as the official CNN/DM setting
CASES = {"greedy": (1, 8), "beam": (1, 4)}  # strategy: batch sizes


def glm_inputs(batch: int, context: int, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, vocab, (batch, context), generator=g)
    ids[:, -1] = MASK_ID
    positions = torch.stack([torch.arange(context), torch.zeros(context, dtype=torch.long)])
    return {"input_ids": ids, "position_ids": positions[None].expand(batch, 2, context).contiguous(),
            "sep": torch.full((batch,), context), "mask_positions": torch.full((batch,), context - 1)}


def glm_call(model: GLMModel, inputs: dict[str, torch.Tensor], strategy: str, new_tokens: int,
             compile: bool) -> Callable[[], int]:
    options = BEAM if strategy == "beam" else {}

    def call() -> int:
        out = generate(model, **inputs, sop_id=SOP_ID, eop_id=EOP_ID, max_new_tokens=new_tokens,
                       min_length=new_tokens, strategy=strategy, compile=compile, **options)
        assert all(len(row) == new_tokens for row in out)
        return len(out) * new_tokens

    return call


def gpt2_call(model: GPT2LMHeadModel, ids: torch.Tensor, strategy: str, new_tokens: int) -> Callable[[], int]:
    options = dict(BEAM, early_stopping=False) if strategy == "beam" else {"num_beams": 1}

    def call() -> int:
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, use_cache=True,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=EOP_ID,
                                 pad_token_id=0, **options)
        assert out.shape == (ids.shape[0], ids.shape[1] + new_tokens)
        return ids.shape[0] * new_tokens

    return call


def seconds(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=30592)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--strategies", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--no-compiled", action="store_true", help="leave out the compiled GLM step")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    length = args.context + args.new_tokens
    glm = GLMModel(GLMConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                             vocab_size=args.vocab, max_sequence_length=length)).eval()
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=args.layers, n_embd=args.hidden, n_head=args.heads,
                                      vocab_size=args.vocab, n_positions=length,
                                      activation_function="gelu_new", bos_token_id=0,
                                      eos_token_id=EOP_ID)).eval()
    load_start = os.getloadavg()
    print(f"GLM {glm.num_parameters() / 1e6:.1f}M params, GPT-2 {gpt2.num_parameters() / 1e6:.1f}M params; "
          f"context {args.context}, {args.new_tokens} new tokens, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds; beam search: {BEAM}, min length = new tokens")
    models = ["GLM", "GPT-2"] if args.no_compiled else ["GLM", "GLM compiled", "GPT-2"]
    cases: dict[tuple[str, int], dict[str, Callable[[], int]]] = {}
    for strategy in args.strategies:
        for batch in CASES[strategy]:
            inputs = glm_inputs(batch, args.context, args.vocab, seed=batch)
            calls = {"GLM": glm_call(glm, inputs, strategy, args.new_tokens, compile=False),
                     "GLM compiled": glm_call(glm, inputs, strategy, args.new_tokens, compile=True),
                     "GPT-2": gpt2_call(gpt2, inputs["input_ids"], strategy, args.new_tokens)}
            cases[(strategy, batch)] = {name: calls[name] for name in models}
    timed: dict[tuple[str, int], dict[str, list[float]]] = {c: {m: [] for m in models} for c in cases}
    for case, calls in cases.items():  # all rounds of one case, then the next: a decoding job's steady state
        rows = case[1] * (BEAM["num_beams"] if case[0] == "beam" else 1)
        reorder = seconds(lambda rows=rows: prepack.attach(copy.deepcopy(glm), rows))
        print(f"{case[0]} batch {case[1]}: reordering the weights for {rows} rows: {reorder * 1e3:.0f} ms",
              flush=True)
        for call in calls.values():  # warm-up: compiling the step, reordering the weights (cached)
            call()
        for r in range(args.rounds):
            for name in models[r % len(models):] + models[:r % len(models)]:
                timed[case][name].append(seconds(calls[name]))
    print("\n| strategy | batch | model | tok/s median | tok/s best "
          "| GPT-2 s / this s (median of rounds) | range |")
    print("|---|---:|---|---:|---:|---:|---|")
    for (strategy, batch), by_model in timed.items():
        tokens = batch * args.new_tokens
        for name, s in by_model.items():
            ratios = [g2 / g1 for g1, g2 in zip(s, by_model["GPT-2"], strict=True)]
            print(f"| {strategy} | {batch} | {name} | {tokens / statistics.median(s):.0f} "
                  f"| {tokens / min(s):.0f} | {statistics.median(ratios):.3f} "
                  f"| {min(ratios):.2f}-{max(ratios):.2f} |")
    print(f"\nmachine: {os.cpu_count()} cores, {cpu_model()}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, Python {platform.python_version()}; "
          f"{datetime.datetime.now():%Y-%m-%d %H:%M}; load average (1, 5, 15 min) at the start "
          f"{', '.join(f'{x:.2f}' for x in load_start)}, at the end "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()

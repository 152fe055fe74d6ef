"""Greedy decoding speed: GLM on its KV cache (`glm_lightning.generation.generate`) against
Hugging Face transformers' GPT-2 `generate` (greedy, use_cache=True) at the same shape.

Both models have random weights and the same sizes (layers, hidden, heads, vocabulary); each
batch holds `--context` random tokens per row and generates exactly `--new-tokens` tokens (a
minimum length equal to the maximum, so neither stops early). GLM's context is Part A ending in
`[MASK]`, decoded as a blank. Timings alternate between the two models, one repetition at a time,
in the same process; tokens/s counts generated tokens (batch x new tokens) over the whole call,
prefill included.

    python benchmarks/bench_generate.py                 # about a minute on 2 cores
    python benchmarks/bench_generate.py --batch 1 8 --repeats 5
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import torch
import transformers
from machine import cpu_model
from transformers import GPT2Config, GPT2LMHeadModel

from glm_lightning.generation import generate
from glm_lightning.model import GLMConfig, GLMModel

MASK_ID, SOP_ID, EOP_ID = 3, 4, 5  # any ids: random weights, and [eop] is blocked anyway


def glm_inputs(batch: int, context: int, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, vocab, (batch, context), generator=g)
    ids[:, -1] = MASK_ID
    positions = torch.stack([torch.arange(context), torch.zeros(context, dtype=torch.long)])
    return {"input_ids": ids, "position_ids": positions[None].expand(batch, 2, context).contiguous(),
            "sep": torch.full((batch,), context), "mask_positions": torch.full((batch,), context - 1)}


def time_glm(model: GLMModel, inputs: dict[str, torch.Tensor], new_tokens: int) -> float:
    start = time.perf_counter()
    out = generate(model, **inputs, sop_id=SOP_ID, eop_id=EOP_ID, max_new_tokens=new_tokens,
                   min_length=new_tokens)
    seconds = time.perf_counter() - start
    assert all(len(row) == new_tokens for row in out)
    return seconds


def time_gpt2(model: GPT2LMHeadModel, ids: torch.Tensor, new_tokens: int) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1,
                             use_cache=True, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             eos_token_id=EOP_ID, pad_token_id=0)
    seconds = time.perf_counter() - start
    assert out.shape[1] == ids.shape[1] + new_tokens
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=30592)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    length = args.context + args.new_tokens
    glm = GLMModel(GLMConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                             vocab_size=args.vocab, max_sequence_length=length)).eval()
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=args.layers, n_embd=args.hidden, n_head=args.heads,
                                      vocab_size=args.vocab, n_positions=length,
                                      activation_function="gelu_new", bos_token_id=0,
                                      eos_token_id=EOP_ID)).eval()
    print(f"GLM {glm.num_parameters() / 1e6:.1f}M params, GPT-2 {gpt2.num_parameters() / 1e6:.1f}M params; "
          f"context {args.context}, {args.new_tokens} new tokens, {torch.get_num_threads()} threads")
    rows = []
    for batch in args.batch:
        inputs = glm_inputs(batch, args.context, args.vocab, seed=batch)
        time_glm(glm, inputs, 4)  # warm-up
        time_gpt2(gpt2, inputs["input_ids"], 4)
        glm_s, gpt2_s = [], []
        for _ in range(args.repeats):  # alternate, so load changes hit both alike
            glm_s.append(time_glm(glm, inputs, args.new_tokens))
            gpt2_s.append(time_gpt2(gpt2, inputs["input_ids"], args.new_tokens))
        tokens = batch * args.new_tokens
        ratios = [g2 / g1 for g1, g2 in zip(glm_s, gpt2_s, strict=True)]
        rows.append((batch, tokens / statistics.median(glm_s), tokens / min(glm_s),
                     tokens / statistics.median(gpt2_s), tokens / min(gpt2_s), statistics.median(ratios),
                     min(ratios), max(ratios)))
    print("\n| batch | GLM tok/s median | GLM tok/s best | GPT-2 tok/s median | GPT-2 tok/s best "
          "| GLM / GPT-2 (median of rounds) | range |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    for b, gm, gb, hm, hb, r, lo, hi in rows:
        print(f"| {b} | {gm:.0f} | {gb:.0f} | {hm:.0f} | {hb:.0f} | {r:.3f} | {lo:.2f}-{hi:.2f} |")
    print(f"\nmachine: {os.cpu_count()} cores, {cpu_model()}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, Python {platform.python_version()}; "
          f"{datetime.datetime.now():%Y-%m-%d %H:%M}; load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
